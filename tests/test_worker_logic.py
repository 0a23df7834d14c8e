"""The worker's task logic without gRPC: the key source (the discovery
service's FetchKey) and the submitter are plain functions; the sandbox is a
real pool where a test needs one, a counting stand-in where it only asks
what ran."""

from __future__ import annotations

import logging
import threading

import pytest

from ec262.encoding import encode_pairs
from ec262.envelope import decrypt_data
from ec262.errors import FunctionNotCached, NoFreeSlot, PermissionDenied, TaskConflict, UnknownTask
from ec262.payload import digest, pack_functions
from worker_service import worker as worker_module
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.pool import SandboxPool, SandboxResult
from worker_service.tasks import checked_task
from worker_service.worker import Worker

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
        self.asked: list[str] = []

    def __call__(self, task_id: str) -> tuple[bytes, str]:
        self.asked.append(task_id)
        if task_id not in self.owners:
            raise UnknownTask(f"task {task_id} not found")
        return KEY, self.owners[task_id]


class CountingSandbox:
    def __init__(self) -> None:
        self.runs: list[tuple[str, bytes]] = []

    def run(self, digest, payload, phase, rows) -> SandboxResult:
        self.runs.append((digest, rows))
        return SandboxResult(True, b"[]")


class Submissions:
    def __init__(self) -> None:
        self.results: dict[str, dict] = {}
        self.done = threading.Semaphore(0)

    def __call__(self, task, worker_id, ciphertext) -> None:
        self.results[task.task_id] = decrypt_data(ciphertext, KEY)
        self.done.release()


def _task(number: int, foreman: str, payload: bytes, *, rows: bytes | None = None, send=True):
    return checked_task(
        task_id=f"{number:032x}",
        job_id="j",
        phase=1,
        function=payload if send else b"",
        function_sha256=digest(payload),
        rows=rows or encode_pairs([("k", "v")]),
        result_address="127.0.0.1:1",
        foreman_id=foreman,
        submit_token="t",
    )


@pytest.fixture
def stand_in():
    ledger, sandbox, submitted = Ledger(), CountingSandbox(), Submissions()
    worker = Worker(
        slots=1, sandbox=sandbox, fetch_key=ledger, submit=submitted, client_id=lambda: "w"
    )
    yield worker, ledger, sandbox, submitted
    worker.close()


def test_a_sandbox_is_reused_for_one_foreman_but_never_shared_with_another():
    pool = SandboxPool(SandboxLimits(task_timeout=10), size=4)
    ledger, submitted = Ledger(), Submissions()
    worker = Worker(
        slots=1, sandbox=pool, fetch_key=ledger, submit=submitted, client_id=lambda: "w"
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
    """One slot and one place in the queue: two offers being confirmed
    hold both, and a third is refused as busy."""
    worker, _, _, submitted = stand_in
    assert worker_module.QUEUED_PER_SLOT == 1
    payload = pack_functions(counting)
    asking, answer = threading.Semaphore(0), threading.Event()

    def slow_ledger(task_id):
        asking.release()
        assert answer.wait(10)
        return KEY, FOREMAN_A

    worker._fetch_key = slow_ledger
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
