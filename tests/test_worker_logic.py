"""The worker's task logic without gRPC: the key source (the discovery
service's FetchKey) and the submitter are plain functions; the sandbox is a
real pool where a test needs one, a counting stand-in where it only asks
what ran, and a gated one (each run ends when the test says) for CancelTask."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field

import pytest

from ec262.encoding import decode_pairs, encode_pairs
from ec262.envelope import decrypt_data
from ec262.errors import (
    FunctionNotCached,
    LateTask,
    NoFreeSlot,
    PermissionDenied,
    ResultNotDelivered,
    TaskConflict,
    UnknownTask,
)
from ec262.payload import digest, pack_functions
from worker_service import worker as worker_module
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.pool import Cancellation, Cancelled, SandboxPool, SandboxResult
from worker_service.tasks import checked_task
from worker_service.worker import Worker, one_by_one

KEY = bytes(range(16))
FOREMAN_A = "00000000-0000-4000-8000-00000000000a"
FOREMAN_B = "00000000-0000-4000-8000-00000000000b"


def counting(key, value):
    """Counts the tasks its sandbox has run, in a function attribute."""
    counting.runs = getattr(counting, "runs", 0) + 1
    yield "runs", counting.runs


class Ledger:
    """The discovery service's answer to FetchKey: tasks it assigned to this
    worker, and their foremen."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.late: set[str] = set()  # settled, this worker late for them
        self.asked: list[str] = []

    def __call__(self, task_id: str) -> tuple[bytes, str]:
        self.asked.append(task_id)
        if task_id in self.late:
            raise LateTask(f"task {task_id} settled, your commitment still counts")
        if task_id not in self.owners:
            raise UnknownTask(f"task {task_id} not found")
        return KEY, self.owners[task_id]


class CountingSandbox:
    def __init__(self) -> None:
        self.runs: list[tuple[str, bytes]] = []

    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        self.runs.append((digest, rows))
        return SandboxResult(True, b"[]")


@dataclass
class Gate:
    """One run of GatedSandbox: which task, and the test's hand on it."""

    task_id: str
    go: threading.Event = field(default_factory=threading.Event)


class GatedSandbox:
    """Each run waits until the test opens its gate. Obeying cancels (as the
    pool does, killing the sandbox), a cancel opens the gate and the run
    raises Cancelled; not obeying, the run notices nothing and returns a
    result, as a sandbox does whose reply was read just before the cancel."""

    def __init__(self, *, obey_cancel: bool = True) -> None:
        self.obey_cancel = obey_cancel
        self.entered: queue.Queue[Gate] = queue.Queue()
        self.ran: list[str] = []

    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        gate = Gate(_task_id_of(rows))
        self.ran.append(gate.task_id)
        if self.obey_cancel:
            with cancel.on_cancel(gate.go.set):
                self.entered.put(gate)
                assert gate.go.wait(10), f"task {gate.task_id}'s gate was never opened"
            if cancel.cancelled:
                raise Cancelled("cancelled")
        else:
            self.entered.put(gate)
            assert gate.go.wait(10), f"task {gate.task_id}'s gate was never opened"
        return SandboxResult(True, b"[]")

    def next(self) -> Gate:
        return self.entered.get(timeout=10)


class Submissions:
    def __init__(self) -> None:
        self.results: dict[str, dict] = {}
        self.order: list[str] = []
        self.done = threading.Semaphore(0)

    def __call__(self, task, worker_id, ciphertext, cancel=None) -> None:
        self.results[task.task_id] = decrypt_data(ciphertext, KEY)
        self.order.append(task.task_id)
        self.done.release()


def _task(
    number: int,
    foreman: str,
    payload: bytes,
    *,
    rows: bytes | None = None,
    send=True,
    token: str = "t",
):
    return checked_task(
        task_id=f"{number:032x}",
        job_id="j",
        phase=1,
        function=payload if send else b"",
        function_sha256=digest(payload),
        rows=rows or encode_pairs([("task", f"{number:032x}")]),
        result_address="127.0.0.1:1",
        foreman_id=foreman,
        submit_token=token,
    )


def _task_id_of(rows: bytes) -> str:
    """The id `_task` wrote into its default rows."""
    return dict(decode_pairs(rows))["task"]


@pytest.fixture
def stand_in():
    ledger, sandbox, submitted = Ledger(), CountingSandbox(), Submissions()
    worker = Worker(
        slots=1,
        sandbox=sandbox,
        fetch_keys=one_by_one(ledger),
        submit=submitted,
        client_id=lambda: "w",
    )
    yield worker, ledger, sandbox, submitted
    worker.close()


def test_a_sandbox_is_reused_for_one_foreman_but_never_shared_with_another():
    pool = SandboxPool(SandboxLimits(task_timeout=10), size=4)
    ledger, submitted = Ledger(), Submissions()
    worker = Worker(
        slots=1,
        sandbox=pool,
        fetch_keys=one_by_one(ledger),
        submit=submitted,
        client_id=lambda: "w",
    )
    try:
        payload = pack_functions(counting)
        for number, foreman in enumerate([FOREMAN_A, FOREMAN_A, FOREMAN_B, FOREMAN_A]):
            ledger.owners[f"{number:032x}"] = foreman
            worker.assign(_task(number, foreman, payload))
            assert submitted.done.acquire(timeout=30)
            assert worker.wait_idle(30)  # the slot frees just after the submit
        runs = [submitted.results[f"{n:032x}"]["runs"] for n in range(4)]
        assert runs == [[1], [2], [1], [3]]
    finally:
        worker.close()
        pool.close()


def test_a_task_the_discovery_service_does_not_confirm_leaves_nothing_behind(stand_in):
    worker, ledger, sandbox, _ = stand_in
    payload = pack_functions(counting) + b"\0" * 1_000_000  # a big payload to park
    with pytest.raises(UnknownTask):
        worker.assign(_task(1, FOREMAN_A, payload))
    snapshot = worker.snapshot()
    assert snapshot.cached_functions == []  # not parked
    assert snapshot.busy_slots == 0  # the slot is free again
    assert sandbox.runs == []
    # and since it is not cached, a later bare request must send it
    ledger.owners[f"{2:032x}"] = FOREMAN_A
    with pytest.raises(FunctionNotCached):
        worker.assign(_task(2, FOREMAN_A, payload, send=False))


def test_a_request_naming_another_foreman_is_refused_and_logged(stand_in, caplog):
    worker, ledger, sandbox, _ = stand_in
    payload = pack_functions(counting)
    ledger.owners[f"{1:032x}"] = FOREMAN_A
    with (
        caplog.at_level(logging.WARNING, logger="worker_service.worker"),
        pytest.raises(PermissionDenied, match=FOREMAN_B),
    ):
        worker.assign(_task(1, FOREMAN_B, payload))
    assert any("belongs to " + FOREMAN_A in r.getMessage() for r in caplog.records)
    assert worker.snapshot().cached_functions == []
    assert worker.snapshot().busy_slots == 0
    assert sandbox.runs == []


def test_a_task_id_runs_at_most_once(stand_in):
    worker, ledger, sandbox, submitted = stand_in
    payload = pack_functions(counting)
    ledger.owners[f"{1:032x}"] = FOREMAN_A
    task = _task(1, FOREMAN_A, payload)
    worker.assign(task)
    assert submitted.done.acquire(timeout=10)
    assert worker.wait_idle(10)
    worker.assign(task)  # the same request again (a lost reply): accepted, not run
    other_rows = _task(1, FOREMAN_A, payload, rows=encode_pairs([("k", "other rows")]))
    with pytest.raises(TaskConflict, match="at most once"):
        worker.assign(other_rows)
    assert worker.wait_idle(10)
    assert len(sandbox.runs) == 1
    assert ledger.asked == [f"{1:032x}"]  # a repeat costs no discovery call either


def test_a_place_is_held_while_the_discovery_service_is_asked(stand_in):
    """One slot, no queue, and one place for a late copy: two offers being
    confirmed hold both, and a third is refused as busy."""
    worker, _, _, submitted = stand_in
    worker.capacity = worker.slots
    payload = pack_functions(counting)
    asking, answer = threading.Semaphore(0), threading.Event()

    def slow_ledger(task_id):
        asking.release()
        assert answer.wait(10)
        return KEY, FOREMAN_A

    worker._fetch_keys = one_by_one(slow_ledger)
    offers = [
        threading.Thread(target=worker.assign, args=(_task(n, FOREMAN_A, payload),)) for n in (1, 2)
    ]
    for offer in offers:
        offer.start()
    assert asking.acquire(timeout=10) and asking.acquire(timeout=10)
    with pytest.raises(NoFreeSlot, match="queue is full"):
        worker.assign(_task(3, FOREMAN_A, payload))
    answer.set()
    for offer in offers:
        offer.join(10)
    assert submitted.done.acquire(timeout=10) and submitted.done.acquire(timeout=10)


def test_the_payload_cache_is_bounded_in_bytes(stand_in, monkeypatch):
    worker, ledger, _, submitted = stand_in
    monkeypatch.setattr(worker_module, "MAX_CACHED_PAYLOAD_BYTES", 3_000_000)
    payloads = [pack_functions(counting) + bytes([n]) * 1_000_000 for n in range(6)]
    for number, payload in enumerate(payloads):
        ledger.owners[f"{number:032x}"] = FOREMAN_A
        worker.assign(_task(number, FOREMAN_A, payload))
        assert submitted.done.acquire(timeout=10)
        assert worker.wait_idle(10)
        assert worker._payload_bytes <= 3_000_000 + len(payload)
    cached = worker.snapshot().cached_functions
    assert digest(payloads[-1]) in cached
    assert digest(payloads[0]) not in cached
    assert sum(len(p) for p in payloads if digest(p) in cached) <= 3_000_000


# -- CancelTask --------------------------------------------------------------


@pytest.fixture
def gated(request):
    """A one-slot worker whose sandbox runs each task until the test lets it
    end (obeying cancels unless the test's parameter says False)."""
    ledger, submitted = Ledger(), Submissions()
    sandbox = GatedSandbox(obey_cancel=getattr(request, "param", True))
    worker = Worker(
        slots=1,
        sandbox=sandbox,
        fetch_keys=one_by_one(ledger),
        submit=submitted,
        client_id=lambda: "w",
    )
    yield worker, ledger, sandbox, submitted
    worker.close()


def _assign(worker, ledger, number: int, **options):
    task = _task(number, FOREMAN_A, pack_functions(counting), **options)
    ledger.owners[task.task_id] = FOREMAN_A
    worker.assign(task)
    return task


def _sent(submitted, count: int, worker) -> list[str]:
    """The ids submitted, once `count` have been and the worker is idle."""
    for _ in range(count):
        assert submitted.done.acquire(timeout=10)
    assert worker.wait_idle(10)
    return submitted.order


def _nothing_failed(worker) -> None:
    assert worker.counters.tasks_failed == 0
    assert worker.counters.tasks_dropped == 0
    assert worker.snapshot().tasks_failed == 0


def test_a_queued_task_cancelled_never_runs(gated):
    worker, ledger, sandbox, submitted = gated
    running = _assign(worker, ledger, 1)
    gate = sandbox.next()
    queued = _assign(worker, ledger, 2)
    assert worker.snapshot().busy_slots == 2
    assert worker.cancel(queued.task_id, "t") is True
    assert worker.snapshot().busy_slots == 1
    later = _assign(worker, ledger, 3)  # the place in the queue is free again
    gate.go.set()
    gate = sandbox.next()
    assert gate.task_id == later.task_id  # not the cancelled one
    gate.go.set()
    assert _sent(submitted, 2, worker) == [running.task_id, later.task_id]
    assert sandbox.ran == [running.task_id, later.task_id]
    assert worker.counters.tasks_cancelled == 1
    _nothing_failed(worker)


def test_a_withdrawal_drops_a_queued_task_and_leaves_a_started_one_at_work(gated):
    """CancelTask with only_queued (the foreman's quorum no longer needs
    the replica): a queued task is dropped unrun, a running one goes on
    and sends its result, and a wrong token learns nothing."""
    worker, ledger, sandbox, submitted = gated
    running = _assign(worker, ledger, 1)
    gate = sandbox.next()
    queued = _assign(worker, ledger, 2)
    assert worker.cancel(running.task_id, "t", only_queued=True) is False
    assert worker.cancel(queued.task_id, "t", only_queued=True) is True
    assert worker.cancel(queued.task_id, "t", only_queued=True) is True  # a repeat
    with pytest.raises(UnknownTask):
        worker.cancel(queued.task_id, "another token", only_queued=True)
    assert worker.snapshot().busy_slots == 1
    gate.go.set()
    assert _sent(submitted, 1, worker) == [running.task_id]
    assert sandbox.ran == [running.task_id]
    assert worker.counters.tasks_cancelled == 1
    _nothing_failed(worker)


def test_a_running_task_cancelled_is_stopped_and_sends_nothing(gated, caplog):
    worker, ledger, sandbox, submitted = gated
    task = _assign(worker, ledger, 1)
    gate = sandbox.next()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker_service.worker"):
        assert worker.cancel(task.task_id, "t") is True
    assert gate.go.is_set()  # the cancel reached the run (the pool kills its sandbox)
    assert worker.snapshot().busy_slots == 0
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged == [("INFO", f"task {task.task_id} cancelled while running")]
    assert worker.cancel(task.task_id, "t") is True  # a repeat: the same answer
    later = _assign(worker, ledger, 2)
    gate = sandbox.next()  # its turn comes once the cancelled run's thread has ended
    assert gate.task_id == later.task_id
    gate.go.set()
    assert _sent(submitted, 1, worker) == [later.task_id]
    assert worker.counters.tasks_cancelled == 1  # the repeat counts nothing more
    assert (worker.counters.tasks_done, worker.counters.submitted) == (1, 1)
    _nothing_failed(worker)


@pytest.mark.parametrize("gated", [False], indirect=True)
def test_the_slot_is_free_when_cancel_returns_though_the_run_has_not_noticed(gated):
    """The run goes on after the cancel (a killed sandbox takes a moment to
    be seen dead) and even returns a result: the slot was free at once, the
    result is never sent, and the run's end frees nothing more."""
    worker, ledger, sandbox, submitted = gated
    worker.capacity = worker.slots  # one slot, one place for a late copy
    task = _assign(worker, ledger, 1)
    stuck = sandbox.next()
    assert worker.cancel(task.task_id, "t") is True
    assert not stuck.go.is_set()
    assert worker.snapshot().busy_slots == 0
    second, third = _assign(worker, ledger, 2), _assign(worker, ledger, 3)  # a slot, a queue place
    with pytest.raises(NoFreeSlot):
        _assign(worker, ledger, 4)
    stuck.go.set()
    gate = sandbox.next()  # the cancelled run's thread has ended
    assert gate.task_id == second.task_id
    assert worker.snapshot().busy_slots == 2
    gate.go.set()
    sandbox.next().go.set()
    assert _sent(submitted, 2, worker) == [second.task_id, third.task_id]
    assert worker.counters.tasks_cancelled == 1
    assert (worker.counters.tasks_done, worker.counters.submitted) == (2, 2)
    _nothing_failed(worker)


def test_a_cancel_once_the_result_is_sent_is_false_and_harmless(stand_in):
    worker, ledger, _, submitted = stand_in
    task = _assign(worker, ledger, 1)
    assert _sent(submitted, 1, worker) == [task.task_id]
    assert worker.cancel(task.task_id, "t") is False
    assert worker.cancel(task.task_id, "t") is False
    assert worker.counters.tasks_cancelled == 0
    assert worker.counters.tasks_done == 1


def test_a_cancel_once_the_task_was_abandoned_is_false(stand_in):
    worker, ledger, _, _ = stand_in
    given_up = threading.Event()

    def refused(task, worker_id, ciphertext, cancel=None):
        given_up.set()
        raise ResultNotDelivered("refused")

    worker._submit = refused
    task = _assign(worker, ledger, 1)
    assert given_up.wait(10) and worker.wait_idle(10)
    assert worker.cancel(task.task_id, "t") is False
    assert (worker.counters.tasks_dropped, worker.counters.tasks_cancelled) == (1, 0)


def test_a_cancel_with_another_token_or_for_an_unknown_task_is_unknown_task(gated):
    worker, ledger, sandbox, submitted = gated
    task = _assign(worker, ledger, 1, token="right")
    gate = sandbox.next()
    tries = [(task.task_id, t) for t in ("wrong", "", "righ", "right ", "rïght")]
    for task_id, token in [*tries, (f"{2:032x}", "right")]:
        with pytest.raises(UnknownTask):
            worker.cancel(task_id, token)
    assert not gate.go.is_set()
    assert worker.snapshot().busy_slots == 1
    gate.go.set()
    assert _sent(submitted, 1, worker) == [task.task_id]
    assert worker.counters.tasks_cancelled == 0


def test_a_cancelled_task_assigned_again_is_accepted_and_not_run(gated):
    worker, ledger, sandbox, submitted = gated
    task = _assign(worker, ledger, 1)
    sandbox.next()
    assert worker.cancel(task.task_id, "t") is True
    worker.assign(task)  # the same request again (a lost reply): accepted, not run
    assert worker.snapshot().busy_slots == 0
    other_rows = _task(1, FOREMAN_A, pack_functions(counting), rows=encode_pairs([("k", "x")]))
    with pytest.raises(TaskConflict, match="at most once"):
        worker.assign(other_rows)
    later = _assign(worker, ledger, 2)
    gate = sandbox.next()
    assert gate.task_id == later.task_id
    gate.go.set()
    assert _sent(submitted, 1, worker) == [later.task_id]
    assert sandbox.ran == [task.task_id, later.task_id]
    assert ledger.asked == [task.task_id, later.task_id]


def looping(key, value):
    while True:
        pass
    yield key, value


class ArmedCancellation(Cancellation):
    """Says when the pool has attached a sandbox to it (entered `on_cancel`)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = threading.Event()

    @contextlib.contextmanager
    def on_cancel(self, action):
        with super().on_cancel(action):
            self.armed.set()
            yield


def test_the_pool_kills_a_cancelled_tasks_sandbox_at_once_and_runs_the_next_task():
    pool = SandboxPool(SandboxLimits(task_timeout=60), size=1)
    payload, rows = pack_functions(looping), encode_pairs([("k", 1)])
    cancel, outcome = ArmedCancellation(), queue.Queue()

    def run():
        try:
            outcome.put(pool.run("loop", payload, 1, rows, cancel=cancel))
        except Cancelled as error:
            outcome.put(error)

    try:
        threading.Thread(target=run, daemon=True).start()
        assert cancel.armed.wait(30)
        assert cancel.cancel() is True
        assert isinstance(outcome.get(timeout=10), Cancelled)  # long before the 60 s timeout
        assert cancel.cancel() is False
        with pytest.raises(Cancelled):  # a cancelled task never starts
            pool.run("loop", payload, 1, rows, cancel=cancel)
        counted = pool.run("count", pack_functions(counting), 1, rows, cancel=Cancellation())
        assert counted.ok  # in a new sandbox
        assert pool._live == 1  # that one, idle: the killed one is not counted
    finally:
        pool.close()


# -- the queue ---------------------------------------------------------------------


def test_the_queue_holds_many_tasks_but_a_bounded_amount_of_rows(gated, monkeypatch):
    """Queued tasks beyond the running slot are taken (the worker registers
    them as slots), but never more rows than MAX_QUEUED_ROWS_BYTES."""
    worker, ledger, sandbox, _submitted = gated
    assert worker.capacity == 1 + worker_module.QUEUED_PER_SLOT > 2
    big = encode_pairs([("task", "x" * 400)])
    monkeypatch.setattr(worker_module, "MAX_QUEUED_ROWS_BYTES", 3 * len(big))
    first = _assign(worker, ledger, 1)  # running: its rows count too
    stuck = sandbox.entered.get(timeout=10)
    queued = [_assign(worker, ledger, n, rows=big) for n in (2, 3)]
    with pytest.raises(NoFreeSlot, match="queue is full"):
        _assign(worker, ledger, 4, rows=big)
    small = [_assign(worker, ledger, n) for n in (5, 6, 7)]  # small rows still fit
    assert worker.snapshot().busy_slots == 1 + len(queued) + len(small)
    stuck.go.set()
    assert first.task_id == stuck.task_id
    for _ in range(len(queued) + len(small)):
        gate = sandbox.entered.get(timeout=10)
        gate.go.set()
    assert worker.wait_idle(10)


def test_a_result_not_delivered_drops_that_foremans_closed_queued_tasks(gated):
    """A foreman killed with tasks queued here: once a result of its cannot
    be delivered, its queued tasks the discovery service no longer has are
    dropped, unrun, in one confirmation; those still open stay, and so does
    one a settle left this worker late for (its commitment is still judged:
    dropped, it would hold its slot there for the late window)."""
    worker, ledger, sandbox, _submitted = gated
    payload = pack_functions(counting)

    def undeliverable(task, worker_id, ciphertext, cancel=None):
        raise ResultNotDelivered("the foreman is gone")

    worker._submit = undeliverable
    tasks = [_task(n, FOREMAN_A, payload) for n in range(1, 6)]
    for task in tasks:
        ledger.owners[task.task_id] = FOREMAN_A
        worker.assign(task)
    running = sandbox.entered.get(timeout=10)
    for closed in tasks[2:]:
        del ledger.owners[closed.task_id]
    ledger.late.add(tasks[4].task_id)  # settled without this worker's result
    asked = len(ledger.asked)
    running.go.set()  # its result cannot be delivered; the slot takes task 1
    next_up = sandbox.entered.get(timeout=10)
    assert next_up.task_id == tasks[1].task_id
    with worker._idle:  # the undelivered result, then the two closed ones dropped
        assert worker._idle.wait_for(lambda: worker.counters.tasks_dropped >= 3, 10)
    assert set(ledger.asked[asked:]) <= {t.task_id for t in tasks[1:]}
    assert {t.task_id for t in tasks[2:]} <= set(ledger.asked[asked:])
    next_up.go.set()
    sandbox.entered.get(timeout=10).go.set()  # the late one runs
    assert worker.wait_idle(10)
    assert worker.counters.tasks_dropped == 5  # three undelivered, two dropped unrun
    assert sandbox.ran == [tasks[0].task_id, tasks[1].task_id, tasks[4].task_id]
