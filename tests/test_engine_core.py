"""The job engine's rules (docs/protocol.md section 9) on the pure core,
`foreman_service/core.py`: no sockets, no threads, a manual clock. Each
test drives a `Driver` (the core, a fake "now", every command it gave) with
real task keys and real sealed results, so a Deliver carries the real
decoded output, and asserts on exact commands and on the job's stats."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest

from ec262.encoding import encode_result
from ec262.envelope import ciphertext_sha256, seal
from ec262.errors import (
    JobFailed,
    NoCommittedQuorum,
    NotEnoughWorkers,
    RemoteError,
    ServiceUnavailable,
    UnknownTask,
)
from ec262.remote_errors import error_document
from foreman_service.core import (
    BUSY_POLL_SECONDS,
    FIRST_ROUND_PER_REQUEST,
    MAP,
    NOT_ENOUGH_WORKERS_SECONDS,
    PARALLEL_REQUESTS,
    POOL_COUNT_SECONDS,
    REDUCE,
    REPLICA_RETRY_SECONDS,
    SPECULATE_AFTER_SECONDS,
    UNREACHABLE_EXCLUDED_SECONDS,
    AddReplica,
    Assign,
    AssignAnswered,
    Cancel,
    Chunk,
    Deliver,
    EngineConfig,
    Fail,
    Granted,
    JobCore,
    ReplicaAdded,
    RequestFailed,
    RequestTasks,
    ResultArrived,
    Settle,
    Settled,
    SettleFailed,
    Withdraw,
    Withdrawn,
    WorkerLost,
)
from foreman_service.stats import JobStats

NONE: frozenset[str] = frozenset()
OUTPUT = {"apple": [1, 1], "pear": [1]}
WRONG = {"apple": [9]}
OTHER = {"apple": [7]}


def ws(*workers: str) -> frozenset[str]:
    return frozenset(workers)


def addr(worker: str) -> str:
    return f"{worker}.example:7000"


def key_of(task_id: str) -> bytes:
    """The task's key, as the discovery service's SettleTask would give it."""
    return hashlib.sha256(task_id.encode()).digest()[:16]


def sealed(task_id: str, output: dict | bytes) -> str:
    """A worker's result for the task: the canonical plaintext, sealed."""
    plaintext = output if isinstance(output, bytes) else encode_result(output)
    return seal(plaintext, key_of(task_id))


def only(commands: list, kind: type) -> list:
    return [c for c in commands if isinstance(c, kind)]


class Driver:
    """One JobCore on a manual clock, with deterministic tokens ("tok1", ...)
    and request ids ("req1", ...); task ids are "t0", "t1", ... in grant
    order. Every command is kept in `log`, every Assign in `assigns`.

    After every tick, until the job fails or stops, `wake_at()` must lie
    ahead: a time already past would spin the engine's loop (it sleeps
    until then, i.e. not at all).

    A worker asked to withdraw a replica at the quorum answers at once that
    it had started it (the rules of the late window apply), unless
    `withdrawn` says otherwise: True, that it dropped it unstarted; None,
    no answer (the test gives it, and sees the Withdraw commands). Those
    answered for it are in `withdrawals`."""

    def __init__(
        self,
        chunks: int = 1,
        *,
        replication: int = 3,
        phase: int = MAP,
        digest: str = "map-digest",
        adaptive: bool = False,
        withdrawn: bool | None = False,
        **config,
    ) -> None:
        self.now = 0.0
        self.withdrawn = withdrawn
        self.withdrawals: list[Withdraw] = []
        self.stats = JobStats()
        tokens, requests = itertools.count(1), itertools.count(1)
        self.core = JobCore(
            EngineConfig(**config),
            replication=replication,
            adaptive=adaptive,
            stats=self.stats,
            new_token=lambda: f"tok{next(tokens)}",
            new_request_id=lambda: f"req{next(requests)}",
        )
        self._task_numbers = itertools.count()
        self.log: list = []
        self.stopped = False
        self.granted: list[str] = []  # the task ids of the last grant
        self.assigns: dict[tuple[str, str], Assign] = {}
        self.first = self.start_phase(phase, chunks, digest)

    # -- the clock and the core -------------------------------------------------------

    def start_phase(self, phase: int, chunks: int, digest: str) -> list:
        self.chunks = [Chunk(phase, i, b'[["row",%d]]' % i) for i in range(chunks)]
        return self._ticked(self.core.start_phase(phase, self.chunks, digest, self.now))

    def at(self, now: float) -> Driver:
        assert now >= self.now, "the clock only goes forward"
        self.now = now
        return self

    def events(self, *events) -> list:
        """A batch of events, then one tick (as the engine's loop does)."""
        return self._ticked(self.core.handle_all(list(events), self.now))

    def tick(self) -> list:
        return self._ticked(self.core.tick(self.now))

    def stop(self) -> list:
        self.stopped = True
        return self._kept(self.core.stop())

    def _ticked(self, commands: list) -> list:
        commands = self._withdrawals_answered(commands)
        self._kept(commands)
        if not self.stopped and not only(self.log, Fail):
            assert self.core.wake_at() > self.now, "wake_at() is past: a busy loop"
        return commands

    def _withdrawals_answered(self, commands: list) -> list:
        asked = only(commands, Withdraw)
        if self.withdrawn is None or not asked:
            return commands
        self.withdrawals += asked
        answers = [Withdrawn(w.task_id, w.worker_id, self.withdrawn) for w in asked]
        rest = [c for c in commands if not isinstance(c, Withdraw)]
        return rest + self._withdrawals_answered(self.core.handle_all(answers, self.now))

    def wake(self) -> list:
        """Move the clock to `wake_at()` and tick."""
        return self.at(self.core.wake_at()).tick()

    def _kept(self, commands: list) -> list:
        self.log += commands
        for command in commands:
            if isinstance(command, Assign):
                self.assigns[command.task_id, command.worker_id] = command
        return commands

    # -- answers ------------------------------------------------------------------

    def request(self) -> RequestTasks:
        """The last RequestTasks the core gave."""
        return only(self.log, RequestTasks)[-1]

    def grant(
        self, request: RequestTasks | None, workers_per_task: list[list[str]], live: int = 10
    ) -> list:
        request = request or self.request()
        tasks = [
            (f"t{next(self._task_numbers)}", {w: addr(w) for w in workers})
            for workers in workers_per_task
        ]
        self.granted = [task_id for task_id, _ in tasks]
        return self.events(Granted(request.request_id, tasks, live_workers=live))

    def answer(self, task_id: str, worker: str, code: str = "OK") -> list:
        return self.events(AssignAnswered(task_id, worker, code))

    def accept_all(self, task_id: str) -> list:
        workers = [w for (t, w) in self.assigns if t == task_id]
        return self.events(*(AssignAnswered(task_id, w, "OK") for w in workers))

    def result(self, task_id: str, worker: str, ciphertext: str) -> list:
        return self.events(ResultArrived(task_id, worker, ciphertext))

    def results(self, task_id: str, **by_worker: dict | bytes | str) -> list:
        """Several results in one batch; a dict or bytes is sealed for the task."""
        return self.events(
            *(
                ResultArrived(task_id, w, out if isinstance(out, str) else sealed(task_id, out))
                for w, out in by_worker.items()
            )
        )

    def settle_answer(self, task_id: str, key: bytes | None = None) -> list:
        """The discovery service's answer: the key, and (as the workers
        commit before they send) the agreed result as the committed one,
        its senders paid and the replicas left at work late."""
        task = self.core._tasks.get(task_id)
        winner = task.winner if task else None
        if winner is None:
            return self.events(Settled(task_id, key or key_of(task_id)))
        agreeing = frozenset(r.worker_id for r in task.replicas.values() if r.result == winner)
        late = frozenset(r.worker_id for r in task.replicas.values() if r.state == "running")
        sha = ciphertext_sha256(winner)
        return self.events(
            Settled(task_id, key or key_of(task_id), sha, agreeing, paid=agreeing, late=late)
        )

    def added(self, task_id: str, worker: str | None, live: int = 0) -> list:
        """AddReplica's answer; with nobody found, `live` workers in the pool."""
        return self.events(ReplicaAdded(task_id, (worker, addr(worker)) if worker else None, live))

    def assign(self, task_id: str, worker: str, token: str, send_payload: bool = True) -> Assign:
        """The Assign the core is expected to give."""
        return Assign(task_id, self.chunk_of(task_id), worker, addr(worker), token, send_payload)

    def cancel(self, task_id: str, worker: str) -> Cancel:
        token = self.assigns[task_id, worker].token
        return Cancel(task_id, worker, addr(worker), token)

    def chunk_of(self, task_id: str) -> Chunk:
        return next(a.chunk for (t, _), a in self.assigns.items() if t == task_id)

    def running(self, workers: list[str], request: RequestTasks | None = None) -> str:
        """Grant one task to `workers`, all of whom take it; its id."""
        self.grant(request, [workers])
        [task_id] = self.granted
        self.accept_all(task_id)
        return task_id


# -- 1. requests and assignments ------------------------------------------------------


def test_a_phase_asks_for_one_batch_and_assigns_each_worker_with_its_own_token():
    d = Driver(chunks=3, batch=2)
    assert d.first == [RequestTasks("req1", 2, NONE)]
    first = d.grant(None, [["w1", "w2", "w3"], ["w1", "w4", "w5"]])
    assert first == [
        d.assign("t0", "w1", "tok1"),
        d.assign("t0", "w2", "tok2"),
        d.assign("t0", "w3", "tok3"),
        d.assign("t1", "w1", "tok4"),  # w1 has not answered yet: the payload again
        d.assign("t1", "w4", "tok5"),
        d.assign("t1", "w5", "tok6"),
    ]
    assert [a.chunk for a in first] == [d.chunks[0]] * 3 + [d.chunks[1]] * 3
    assert d.accept_all("t0") == []

    assert d.at(BUSY_POLL_SECONDS).tick() == [RequestTasks("req2", 1, NONE)]
    assert d.grant(None, [["w1", "w2", "w6"]]) == [
        d.assign("t2", "w1", "tok7", send_payload=False),  # it answered OK for this digest
        d.assign("t2", "w2", "tok8", send_payload=False),
        d.assign("t2", "w6", "tok9", send_payload=True),
    ]
    # w1 lost the function (restarted, cache evicted): the same assignment
    # again, with the payload; refused once more, it is a failed replica.
    assert d.answer("t2", "w1", "FAILED_PRECONDITION") == [d.assign("t2", "w1", "tok7", True)]
    assert d.answer("t2", "w1", "FAILED_PRECONDITION") == []
    assert d.stats.states["assigned"] == 3 and d.stats.map_tasks == 3


# -- 2. quorum, then grace ----------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "quorum_at", "grace"),
    [
        ({}, 2.0, 2.0),  # as long again as the quorum took
        ({}, 0.01, 0.05),  # grace_min
        ({}, 4.0, 3.0),  # grace_max
        ({"grace_fraction": 0.5}, 2.0, 1.0),
        ({"grace_max": 0.5}, 2.0, 0.5),
    ],
)
def test_after_the_quorum_the_last_replica_gets_its_grace_then_is_left_to_finish(
    config, quorum_at, grace
):
    """Not cancelled: the discovery service pays it if it commits the
    quorum's result within its late window (docs/protocol.md section 10)."""
    d = Driver(**config)
    task = d.running(["w1", "w2", "w3"])
    assert d.at(quorum_at / 2).results(task, w1=OUTPUT) == []
    assert d.at(quorum_at).results(task, w2=OUTPUT) == []
    assert d.core.wake_at() == pytest.approx(quorum_at + grace)
    assert d.at(quorum_at + grace * 0.99).tick() == []
    assert d.wake() == [Settle(task, True, NONE, NONE)]
    assert d.stats.missing_reports == 0 and d.stats.replicas_cancelled == 0
    assert d.core.cheaters == set() and d.stats.cheaters == set()
    assert d.stats.verdicts[task]["late"] == ["w3"]
    assert d.stats.credits_spent == 3  # the late one's credit waits for it
    assert d.settle_answer(task) == [Deliver(d.chunks[0], encode_result(OUTPUT))]
    assert d.stats.credits_spent == 3


def test_a_third_result_matching_within_the_grace_settles_at_once():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    assert d.at(1).results(task, w1=OUTPUT, w2=OUTPUT) == []
    assert d.core.wake_at() == 2.0
    assert d.at(1.5).results(task, w3=OUTPUT) == [Settle(task, True, NONE, NONE)]
    assert d.stats.credits_spent == 3 and d.stats.replicas_cancelled == 0


def test_a_replica_still_queued_at_the_quorum_is_withdrawn_and_released_at_once():
    """With queues at the workers the last replica is often not started
    when the quorum forms: it is asked to drop the task if unstarted, and
    the settle waits for that answer (never past it: a replica dropped but
    left late would hold its worker's slot for the late window and then
    count failed). Dropped, it is released with its credit, and the settle
    goes without waiting out the grace."""
    d = Driver(withdrawn=None)
    task = d.running(["w1", "w2", "w3"])
    token = d.assigns[task, "w3"].token
    assert d.at(1).results(task, w1=OUTPUT, w2=OUTPUT) == [Withdraw(task, "w3", addr("w3"), token)]
    assert d.core.wake_at() == math.inf  # only the answer settles it
    assert d.at(3).tick() == []  # past the grace: it still waits for the answer
    assert d.events(Withdrawn(task, "w3", True)) == [Settle(task, True, NONE, ws("w3"))]
    assert d.stats.replicas_withdrawn == 1 and d.stats.replicas_cancelled == 0
    assert d.stats.credits_spent == 2  # w3's came back
    assert d.stats.verdicts[task] == {
        "agreed": ["w1", "w2"],
        "disagreed": [],
        "late": [],
        "silent": [],
    }
    assert d.settle_answer(task) == [Deliver(d.chunks[0], encode_result(OUTPUT))]
    assert d.stats.credits_spent == 2


def test_a_replica_that_had_started_keeps_its_grace_and_is_left_late():
    d = Driver(withdrawn=None)
    task = d.running(["w1", "w2", "w3"])
    assert only(d.at(1).results(task, w1=OUTPUT, w2=OUTPUT), Withdraw)
    assert d.at(1.5).events(Withdrawn(task, "w3", False)) == []  # at work: its grace
    assert d.core.wake_at() == 2.0
    assert d.wake() == [Settle(task, True, NONE, NONE)]
    assert d.stats.verdicts[task]["late"] == ["w3"] and d.stats.replicas_withdrawn == 0


def test_a_withdrawn_replicas_result_or_a_late_answer_changes_nothing_it_should_not():
    """Its result arriving first (it had started and finished): compared as
    any, and the answer after it ignored; an answer after the settle is
    ignored too."""
    d = Driver(withdrawn=None)
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT)
    assert d.at(1.1).results(task, w3=OUTPUT) == [Settle(task, True, NONE, NONE)]
    assert d.events(Withdrawn(task, "w3", True)) == []
    assert d.stats.replicas_withdrawn == 0 and d.stats.credits_spent == 3
    d.settle_answer(task)
    assert d.events(Withdrawn(task, "w3", True)) == []


def test_a_replica_that_never_answered_its_assign_gets_no_grace():
    """A frozen worker does not answer AssignTask: the quorum of the others
    settles at once (a grace would add to every such task's time)."""
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    [task] = d.granted
    d.answer(task, "w1")
    d.answer(task, "w2")
    assert d.at(1).results(task, w1=OUTPUT, w2=OUTPUT) == [
        d.cancel(task, "w3"),
        Settle(task, True, NONE, ws("w3")),
    ]
    assert d.stats.replicas_cancelled == 1 and d.stats.missing_reports == 0


# -- 3. a disagreeing replica -------------------------------------------------------


def test_a_disagreeing_replica_is_reported_missing_and_excluded_later():
    d = Driver(chunks=2, batch=1)
    task = d.running(["w1", "w2", "w3"])
    assert d.at(0.1).results(task, w1=OUTPUT, w3=WRONG, w2=OUTPUT) == [
        Settle(task, True, ws("w3"), NONE)
    ]
    assert d.stats.missing_reports == 1 and d.stats.cheaters == {"w3"}
    assert d.core.cheaters == {"w3"}
    assert d.stats.credits_spent == 2
    assert d.at(0.2).settle_answer(task) == [
        Deliver(d.chunks[0], encode_result(OUTPUT)),
        RequestTasks("req2", 1, ws("w3")),
    ]


# -- 4. no quorum possible: retries, the attempt limit, relaxed exclusions -----------


def test_no_quorum_possible_retries_elsewhere_until_the_attempt_limit():
    d = Driver(max_attempts=3)
    groups = [["w1", "w2", "w3"], ["w4", "w5", "w6"], ["w7", "w8", "w9"]]
    excluded: set[str] = set()
    for attempt, workers in enumerate(groups):
        assert d.request().exclude == excluded
        task = d.running(workers)
        d.at(attempt + 0.5)
        assert d.results(task, **{workers[0]: OUTPUT, workers[1]: WRONG}) == []
        commands = d.results(task, **{workers[2]: OTHER})
        assert commands[0] == Settle(task, False)
        excluded |= set(workers)
        if attempt < 2:
            assert commands[1:] == [RequestTasks(f"req{attempt + 2}", 1, frozenset(excluded))]
            assert d.chunks[0].attempts == attempt + 1
    assert len(commands) == 2 and isinstance(commands[1], Fail)
    error = commands[1].error
    assert type(error) is JobFailed and error.chunk == "map chunk 0"
    assert str(error) == "no quorum for map chunk 0 after 3 attempts (last: no quorum possible)"
    assert d.stats.tasks_invalid == 3 and d.stats.retries == 2
    assert d.stats.retry_reasons == {"no quorum possible": 2}
    assert d.stats.credits_spent == 0
    assert d.at(10).tick() == []  # failed: nothing more


def test_a_starving_retried_chunk_drops_its_exclusions_so_a_majority_can_outvote():
    d = Driver()  # relax_after: min(5, max(1, 0.05 x 120 s)) = 5 s
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=WRONG)
    assert d.results(task, w3=OTHER)[1:] == [RequestTasks("req2", 1, ws("w1", "w2", "w3"))]
    assert d.settle_answer(task) == []
    starved_at = d.now
    while True:
        request = d.request()
        if not request.exclude:
            break
        assert d.now - starved_at <= 5.0
        assert request.exclude == ws("w1", "w2", "w3")
        assert d.grant(request, [], live=6) == []  # the three others are busy
        assert len(d.wake()) == 1
    assert d.now - starved_at > 5.0
    assert d.chunks[0].suspects == set()
    retry = d.running(["w1", "w2", "w4"], request)
    assert d.at(d.now + 1).results(retry, w1=OUTPUT, w2=WRONG, w4=OUTPUT) == [
        Settle(retry, True, ws("w2"), NONE)
    ]
    assert d.settle_answer(retry) == [Deliver(d.chunks[0], encode_result(OUTPUT))]
    assert d.core.phase_done


def test_fresh_chunks_go_without_the_cheaters_only_while_excluding_them_starves():
    """A cheater's exclusion is dropped for one request at a time once it
    has left requests empty for relax_after; the next request tries it
    again, so the cheater is not let back for the rest of the job."""
    d = Driver(chunks=3, batch=1)
    task = d.running(["w1", "w2", "w3"])
    assert d.at(0.1).results(task, w1=OUTPUT, w2=OUTPUT, w3=WRONG)[0] == Settle(
        task, True, ws("w3"), NONE
    )
    d.at(0.2).settle_answer(task)
    starved_at = d.now
    while d.request().exclude:
        request = d.request()
        assert request.exclude == ws("w3")
        d.grant(request, [], live=6)  # nobody but the cheater is free
        if d.request() is request:  # not relaxed yet: the next try after a backoff
            d.wake()
    assert d.now - starved_at > 5.0  # relax_after: min(5, max(1, 0.05 x 120 s))
    relaxed = d.request()
    assert relaxed.exclude == frozenset()
    second = d.running(["w3", "w4", "w5"], relaxed)
    assert d.request().exclude == frozenset(), "no new request while this one runs"
    d.at(d.now + 0.1).results(second, w3=OUTPUT, w4=OUTPUT, w5=OUTPUT)
    d.at(d.now + 0.1).settle_answer(second)
    assert d.request().exclude == ws("w3"), "the exclusion is tried again"


# -- 5. the deadline ---------------------------------------------------------------


def test_no_quorum_by_the_deadline_settles_invalid_and_retries():
    d = Driver(task_timeout=4.0)  # before the 5 s speculation
    task = d.running(["w1", "w2", "w3"])
    assert d.at(1).results(task, w1=OUTPUT, w2=WRONG) == []
    assert d.core.wake_at() == 4.0
    assert d.at(3.99).tick() == []
    assert d.wake() == [
        d.cancel(task, "w3"),
        Settle(task, False),
        RequestTasks("req2", 1, ws("w1", "w2")),  # those who answered
    ]
    assert d.stats.retry_reasons == {"deadline passed": 1}
    assert d.chunks[0].attempts == 1 and d.stats.credits_spent == 0


# -- 6. opening the agreed result -------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "output", "delivered"),
    [
        (MAP, OUTPUT, encode_result(OUTPUT)),  # canonical text, for the shuffle
        (MAP, {"error": [1, 2]}, encode_result({"error": [1, 2]})),  # not an error document
        (REDUCE, {"apple": 2, "pear": 1}, {"apple": 2, "pear": 1}),
    ],
)
def test_a_valid_settle_delivers_the_decrypted_output(phase, output, delivered):
    d = Driver(phase=phase)
    task = d.running(["w1", "w2", "w3"])
    assert d.at(1).results(task, w1=output, w2=output, w3=output) == [Settle(task, True)]
    assert d.settle_answer(task) == [Deliver(d.chunks[0], delivered)]
    assert d.stats.tasks_validated == 1 and d.stats.states["validated"] == 1
    assert d.core.phase_done


@pytest.mark.parametrize("phase", [MAP, REDUCE])
def test_an_agreed_error_document_fails_the_job_with_the_remote_error(phase):
    frames = ['File "job.py", line 3, in mapper']
    document = error_document("ZeroDivisionError", "division by zero", frames)
    d = Driver(phase=phase)
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=document, w2=document, w3=document)
    [fail] = d.settle_answer(task)
    error = fail.error
    assert isinstance(error, RemoteError)
    assert (error.type_name, error.remote_message, error.remote_traceback) == (
        "ZeroDivisionError",
        "division by zero",
        frames,
    )
    assert error.chunk == d.chunks[0].label
    assert d.at(2).tick() == [] and d.stats.tasks_validated == 0


@pytest.mark.parametrize(
    ("phase", "garbage"),
    [
        (MAP, seal(encode_result(OUTPUT), bytes(16))),  # sealed under another key
        (MAP, "not a ciphertext"),
        (REDUCE, b"not json"),  # decrypts, does not decode
        # Colluders agreeing on what is no map output (docs/protocol.md
        # section 10): found here, never by the shuffle.
        (MAP, b"5"),  # not a list
        (MAP, b'{"k": [1]}'),  # an object, not pairs
        (MAP, b'[["k",5]]'),  # a value that is not a list of values
        (MAP, b'[["k",[1]],["j",{"a":1}]]'),
        (MAP, b'[["k"]]'),  # not a pair
        (MAP, b'[["k",' + b"[" * 5000 + b"]" * 5000 + b"]]"),  # 5,000 levels deep
        (REDUCE, b'[["k",' + b"[" * 5000 + b"]" * 5000 + b"]]"),
        (REDUCE, b'"a string"'),
        # Flat-looking, so the shuffle's byte split would take it: not JSON.
        (MAP, b'[["k",[garbage]]]'),
        (MAP, b'[["k",[1,,2]]]'),
    ],
)
def test_an_agreed_result_that_does_not_open_makes_cheaters_and_a_retry(phase, garbage):
    d = Driver(phase=phase)
    task = d.running(["w1", "w2", "w3"])
    if isinstance(garbage, bytes):
        garbage = sealed(task, garbage)
    d.at(1).results(task, w1=garbage, w2=garbage, w3=garbage)
    assert d.settle_answer(task) == [RequestTasks("req2", 1, ws("w1", "w2", "w3"))]
    assert d.core.cheaters == {"w1", "w2", "w3"} == d.stats.cheaters
    assert d.chunks[0].attempts == 1 and d.stats.tasks_validated == 0
    assert d.stats.retry_reasons == {
        "the agreed result does not decrypt, decode or have an output's shape": 1
    }
    assert not only(d.log, Deliver) and not only(d.log, Fail)


# -- 7. credits -------------------------------------------------------------------


def test_credits_follow_escrow_refunds_and_replicas():
    d = Driver(chunks=2, batch=2)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"]])
    assert d.stats.credits_spent == 6  # replication per granted task
    d.events(*(AssignAnswered(t, w, "OK") for (t, w) in d.assigns if w != "w3"))
    assert only(d.answer("t0", "w3", "RESOURCE_EXHAUSTED"), AddReplica)
    assert d.stats.credits_spent == 5  # released at discovery
    assert d.added("t0", "w7") == [d.assign("t0", "w7", "tok7")]
    assert d.stats.credits_spent == 6  # +1 per replica added
    assert d.at(1).results("t0", w1=OUTPUT, w7=OUTPUT, w2=WRONG) == [
        Settle("t0", True, ws("w2"), NONE)
    ]
    assert d.stats.credits_spent == 5  # the missing one refunded
    assert d.results("t1", w4=OUTPUT, w5=WRONG, w6=OTHER)[0] == Settle("t1", False)
    assert d.stats.credits_spent == 2  # an invalid settle refunds all
    retry = d.running(["w8", "w9", "w10"])
    assert d.stats.credits_spent == 5
    d.at(2).results(retry, w8=OUTPUT, w9=OUTPUT)
    assert d.wake() == [Settle(retry, True, NONE, NONE)]
    assert d.stats.credits_spent == 5  # paid: w1 and w7, w8 and w9; w10's waits for it


def test_the_late_replicas_credit_counts_as_spent_until_the_discovery_service_says():
    """A late replica's credit waits in escrow for it; what the discovery
    service paid and left late is what the job spent."""
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT)
    assert d.wake() == [Settle(task, True, NONE, NONE)]
    assert d.stats.credits_spent == 3  # w3's waits for it
    # w3 had committed another result, unseen here: failed, its credit refunded.
    d.events(
        Settled(
            task,
            key_of(task),
            ciphertext_sha256(sealed(task, OUTPUT)),
            ws("w1", "w2"),
            paid=ws("w1", "w2"),
            late=NONE,
        )
    )
    assert d.stats.credits_spent == 2


def test_replicas_not_yet_started_or_frozen_are_cancelled_at_the_settle_not_left_late():
    """Left at work after the settle are only replicas that took the task
    and answer: one whose AssignTask is still under way, or timed out, is
    cancelled and released (never counted failed)."""
    d = Driver(replication=5)  # quorum 3
    d.grant(None, [["w1", "w2", "w3", "w4", "w5"]])
    for worker in ("w1", "w2", "w3", "w4"):
        d.answer("t0", worker)  # w5's AssignTask is still under way
    d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT, w3=OUTPUT)
    assert d.wake() == [d.cancel("t0", "w5"), Settle("t0", True, NONE, ws("w5"))]  # w4 late
    assert d.stats.verdicts["t0"]["late"] == ["w4"]

    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    d.answer("t0", "w3", "DEADLINE_EXCEEDED")  # frozen, perhaps with the task taken
    d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT)
    assert d.wake() == [d.cancel("t0", "w3"), Settle("t0", True, NONE, ws("w3"))]
    assert d.stats.verdicts["t0"]["silent"] == ["w3"]


def test_a_valid_settle_refused_for_want_of_commitments_settles_invalid_and_retries():
    """The agreeing results were never committed to (their senders skipped
    CommitResult): no key. The task is settled invalid, everyone refunded,
    and run again without those who answered; the one accused of
    disagreeing with them is cleared."""
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    assert d.at(1).results(task, w1=OUTPUT, w2=OUTPUT, w3=WRONG) == [
        Settle(task, True, ws("w3"), NONE)
    ]
    assert d.stats.cheaters == ws("w3")
    refused = NoCommittedQuorum("fewer than 2 of its workers have committed to one result")
    commands = d.events(SettleFailed(task, refused))
    assert commands[0] == Settle(task, False)
    assert only(commands, RequestTasks) == [RequestTasks("req2", 1, ws("w1", "w2", "w3"))]
    assert d.stats.cheaters == set() and d.core.cheaters == set()
    assert d.stats.credits_spent == 0 and d.stats.tasks_invalid == 1
    assert d.stats.retry_reasons == {"no quorum of its workers committed to the agreed result": 1}
    assert d.stats.verdicts[task] == {
        "agreed": [], "disagreed": ["w3", "w1", "w2"], "late": [], "silent": []
    }  # fmt: skip
    assert d.events(Settled(task, None)) == []
    assert not only(d.log, Fail)


# -- 7b. adaptive replication ------------------------------------------------------


def test_an_adaptive_task_of_two_agreeing_workers_settles_at_once_and_saves_a_credit():
    d = Driver(chunks=2, batch=2, adaptive=True)
    d.grant(None, [["w1", "w2"], ["w3", "w4", "w5"]])  # the second is a spot check
    d.accept_all("t0")
    d.accept_all("t1")
    assert d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT) == [Settle("t0", True, NONE, NONE)]
    assert d.stats.credits_saved == 1 and d.stats.credits_spent == 5
    assert d.results("t1", w3=OUTPUT, w4=OUTPUT, w5=OUTPUT) == [Settle("t1", True, NONE, NONE)]
    assert d.stats.credits_saved == 1  # a spot check costs the full replication
    assert "Adaptive replication saved 1 credits" in d.stats.summary()
    # 0.9 x (3 x 0.1^2 - 2 x 0.1^3) + 0.1 x (1 - 0.9^2)
    assert "at most 4.42%" in d.stats.summary()


def test_two_adaptive_workers_that_disagree_get_a_third_which_decides():
    d = Driver(adaptive=True)
    d.grant(None, [["w1", "w2"]])
    d.accept_all("t0")
    assert d.at(1).results("t0", w1=OUTPUT, w2=WRONG) == [AddReplica("t0", "req2", NONE, NONE)]
    assert d.stats.adaptive_escalations == 1 and not only(d.log, Settle)
    assert d.at(1.1).added("t0", "w3") == [d.assign("t0", "w3", "tok3")]
    d.answer("t0", "w3")
    assert d.at(2).results("t0", w3=OUTPUT) == [Settle("t0", True, ws("w2"), NONE)]
    assert d.stats.cheaters == ws("w2") and d.stats.credits_saved == 0
    assert d.settle_answer("t0") == [Deliver(d.chunks[0], encode_result(OUTPUT))]


def test_an_adaptive_task_whose_second_worker_is_late_gets_a_third_as_a_speculation():
    d = Driver(adaptive=True)
    d.grant(None, [["w1", "w2"]])
    d.accept_all("t0")
    assert d.at(1).results("t0", w1=OUTPUT) == []
    assert d.core.wake_at() == SPECULATE_AFTER_SECONDS
    assert d.wake() == [AddReplica("t0", "req2", NONE, NONE)]
    d.at(5.1).added("t0", "w3")
    d.answer("t0", "w3")
    assert d.at(6).results("t0", w3=OUTPUT) == []  # the quorum; w2 gets its grace
    assert only(d.wake(), Settle) == [Settle("t0", True, NONE, NONE)]  # w2 left late
    assert d.stats.credits_saved == 0


def test_an_adaptive_task_that_has_its_third_already_asks_for_no_fourth():
    """A speculative third (the second was late) is the full replication:
    when the three disagree the task is retried, not given a fourth."""
    d = Driver(adaptive=True)
    d.grant(None, [["w1", "w2"]])
    d.accept_all("t0")
    d.at(1).results("t0", w1=OUTPUT)
    assert d.wake() == [AddReplica("t0", "req2", NONE, NONE)]  # w2 late
    d.at(5.1).added("t0", "w3")
    d.answer("t0", "w3")
    assert d.at(6).results("t0", w2=WRONG, w3=OTHER)[0] == Settle("t0", False)
    assert d.stats.adaptive_escalations == 0 and d.stats.retries == 1


def test_when_the_third_adaptive_worker_does_not_settle_it_either_the_task_is_retried():
    d = Driver(adaptive=True)
    d.grant(None, [["w1", "w2"]])
    d.accept_all("t0")
    d.at(1).results("t0", w1=OUTPUT, w2=WRONG)
    d.at(1.1).added("t0", "w3")
    d.answer("t0", "w3")
    commands = d.at(2).results("t0", w3=OTHER)
    assert commands[0] == Settle("t0", False)
    assert d.stats.adaptive_escalations == 1 and d.stats.retries == 1


# -- 8. replicas that never started ------------------------------------------------


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "UNAVAILABLE"])
def test_a_replica_that_never_started_is_released_and_replaced(code):
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    # Either way the replacement is never w3 again (released from the task, it
    # could be drawn anew; a dead one is also kept out of other requests).
    assert d.answer("t0", "w3", code) == [AddReplica("t0", "req2", ws("w3"), ws("w3"))]
    assert d.chunks[0].attempts == 0 and d.stats.replicas_released == 1

    assert d.at(0.1).added("t0", None) == []  # no worker free yet
    assert d.core.wake_at() == pytest.approx(0.1 + REPLICA_RETRY_SECONDS)
    assert d.at(0.59).tick() == []
    assert d.wake() == [AddReplica("t0", "req3", ws("w3"), NONE)]
    assert d.at(0.7).added("t0", "w4") == [d.assign("t0", "w4", "tok4")]
    assert d.stats.replicas_added == 1
    d.answer("t0", "w4")

    assert d.at(1).results("t0", w1=OUTPUT, w4=OUTPUT) == []
    assert d.wake() == [Settle("t0", True, NONE, NONE)]  # w2 took it: left to finish
    assert d.chunks[0].attempts == 0 and d.stats.missing_reports == 0
    assert d.stats.credits_spent == 3  # w1 and w4, and w2's for when it commits
    assert d.settle_answer("t0") == [Deliver(d.chunks[0], encode_result(OUTPUT))]


def test_a_replacement_that_found_nobody_is_asked_again_when_a_task_of_ours_settles():
    """Our settle frees its workers' slots: the replica asked for in vain
    goes again at once, not after REPLICA_RETRY_SECONDS."""
    d = Driver(chunks=2, batch=2)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"]])
    for worker in ("w1", "w2", "w3", "w4", "w5"):
        d.answer("t0" if worker < "w4" else "t1", worker)
    d.answer("t1", "w6", "RESOURCE_EXHAUSTED")
    assert d.at(0.1).added("t1", None) == []
    assert d.at(0.2).results("t0", w1=OUTPUT, w2=OUTPUT, w3=OUTPUT) == [
        Settle("t0", True, NONE, NONE)
    ]
    commands = d.at(0.3).settle_answer("t0")
    assert only(commands, AddReplica) == [AddReplica("t1", "req3", ws("w6"), NONE)]


# -- 9. unreachable workers ----------------------------------------------------------


def test_an_unreachable_worker_is_left_out_for_a_while_unless_that_starves_a_request():
    d = Driver(chunks=4, batch=1)
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w3", "UNAVAILABLE")
    until = UNREACHABLE_EXCLUDED_SECONDS

    def asked(commands: list) -> list:
        return [(r.n, r.exclude) for r in only(commands, RequestTasks)]

    assert asked(d.at(1).tick()) == [(1, ws("w3"))]
    # Nobody else free: the same request again at once, without it (a
    # small pool must not wait out the relax time for a dead worker).
    assert asked(d.grant(None, [], live=4)) == [(1, NONE)]
    d.grant(None, [["w3", "w4", "w5"]])
    commands = d.at(until - 0.01).tick()
    assert asked(commands) == [(1, ws("w3"))]
    # Not asked for as a replica meanwhile (t1's replicas are silent) ...
    assert [a.exclude for a in only(commands, AddReplica) if a.task_id == "t1"] == [ws("w3")]
    d.added("t1", None)
    # ... and a candidate again once the time is over.
    assert [a.exclude for a in only(d.wake(), AddReplica) if a.task_id == "t1"] == [NONE]


# -- 10. speculative replicas ----------------------------------------------------------


def test_a_silent_replica_gets_a_speculative_one_and_is_left_late_at_the_settle():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    assert d.at(1).results(task, w1=OUTPUT, w2=WRONG) == []
    assert d.core.wake_at() == SPECULATE_AFTER_SECONDS  # w3 is silent, nothing completed yet
    assert d.at(4.99).tick() == []
    assert d.wake() == [AddReplica(task, "req2", NONE, NONE)]
    assert d.stats.speculative_replicas == 1
    assert d.at(5.1).added(task, "w4") == [d.assign(task, "w4", "tok4")]
    d.answer(task, "w4")
    assert d.at(6).results(task, w4=OUTPUT) == []  # the quorum: w1 and w4
    assert d.core.wake_at() == 9.0  # grace: min(3 s, the 6 s the quorum took)
    assert d.wake() == [Settle(task, True, ws("w2"), NONE)]
    assert d.stats.credits_spent == 3  # w1 and w4, w3 if it commits: 3 + 1 added - w2
    assert d.settle_answer(task) == [Deliver(d.chunks[0], encode_result(OUTPUT))]


@pytest.mark.unchecked_ticks
def test_a_tick_visits_the_tasks_an_event_touched_not_every_open_task(monkeypatch):
    """A job with many tasks open (a large pool) pays per event for the
    tasks it concerns: one result is one visit, not one per open task."""
    d = Driver(chunks=300, batch=300)
    d.grant(None, [["w1", "w2", "w3"]] * d.request().n)
    for task_id in d.granted:
        d.accept_all(task_id)
    opened = d.core.open_tasks
    assert opened >= 64
    visited = []
    decide = d.core._decide
    monkeypatch.setattr(
        d.core, "_decide", lambda task, *a: visited.append(task.task_id) or decide(task, *a)
    )
    d.at(1).result(d.granted[7], "w1", sealed(d.granted[7], OUTPUT))
    assert visited == [d.granted[7]]
    visited.clear()
    assert d.at(SPECULATE_AFTER_SECONDS - 0.01).tick() == []
    assert visited == []  # nothing due: nothing visited
    assert len(only(d.wake(), AddReplica)) == opened  # then every silent task, when its time comes
    assert len(visited) == opened


@pytest.mark.parametrize(("took", "after"), [(1.0, 5.0), (4.0, 12.0)])
def test_speculation_waits_three_times_the_median_task_time(took, after):
    d = Driver(chunks=2, batch=2)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"]])
    d.accept_all("t0")
    d.accept_all("t1")
    assert d.at(took).results("t0", w1=OUTPUT, w2=OUTPUT, w3=OUTPUT) == [Settle("t0", True)]
    assert d.core.speculate_after() == after
    assert d.core.wake_at() == after  # t1's replicas, assigned at 0, all silent
    assert only(d.at(after - 0.01).tick(), AddReplica) == []
    assert d.wake() == [AddReplica("t1", "req2", NONE, NONE)]
    assert d.stats.speculative_replicas == 3


def test_a_replica_still_wanted_when_the_quorum_forms_is_not_asked_for():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT)
    assert d.at(5).tick() == [AddReplica(task, "req2", NONE, NONE)]
    assert d.stats.speculative_replicas == 2  # w2 and w3 silent
    assert d.at(5.1).added(task, "w4") == [
        d.assign(task, "w4", "tok4"),
        AddReplica(task, "req3", NONE, NONE),  # the second one
    ]
    assert d.at(5.2).added(task, None) == []  # asks again at 5.7 ...
    assert d.at(5.5).results(task, w4=OUTPUT) == []  # ... but the quorum is there
    assert d.core.wake_at() == 8.5  # its grace: 3 s
    assert d.at(6).tick() == []
    assert d.wake() == [Settle(task, True, NONE, NONE)]  # w2 and w3 late


def test_a_worker_drawn_again_after_its_release_is_named_released_at_the_settle():
    """A replica released with an AddReplica is no longer the task's at the
    discovery service, so the foreman excludes it from that task's later
    AddReplicas. Should one draw it anyway, it is the task's worker again
    there: it is not assigned twice, the settle names it released (left out,
    it would be late: its slot held for the late window, then failed) and
    another replica is asked for (a make chaos run with its Redis store
    frozen left two workers so)."""
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    [add] = only(d.answer("t0", "w3", "RESOURCE_EXHAUSTED"), AddReplica)
    assert "w3" in add.exclude and add.release == ws("w3")
    # Drawn again regardless: not assigned, and another asked for at once.
    [again] = d.at(0.1).added("t0", "w3")
    assert isinstance(again, AddReplica) and "w3" in again.exclude and again.release == NONE
    d.at(0.7).added("t0", "w4")
    d.answer("t0", "w4")
    d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT, w4=OUTPUT)
    [settle] = only(d.log, Settle)
    assert settle == Settle("t0", True, NONE, ws("w3"))


def test_replicas_whose_assign_timed_out_are_let_go_once_replaced():
    """A discovery outage makes every AssignTask time out (the workers'
    FetchKey hangs). Kept, such replicas would hold the slots of a small
    pool for nothing; once a speculative replica replaces one it is
    cancelled and released with the next AddReplica (measured: a job stuck
    until the task timeout after a 20 s discovery freeze, 1 run in 4)."""
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    assert d.at(5).tick() == [AddReplica("t0", "req2", NONE, NONE)]  # all three silent
    assert d.stats.speculative_replicas == 3
    commands = d.at(10).events(
        *(AssignAnswered("t0", w, "DEADLINE_EXCEEDED") for w in ("w1", "w2", "w3"))
    )
    assert commands == [d.cancel("t0", w) for w in ("w1", "w2", "w3")]
    assert d.at(10.5).added("t0", "w4") == [
        d.assign("t0", "w4", "tok4"),
        AddReplica("t0", "req3", ws("w1", "w2", "w3"), ws("w1", "w2", "w3")),
    ]
    assert d.stats.replicas_cancelled == 3 and d.stats.credits_spent == 1  # 3 + 1 - 3


def _let_go_all_but_w4(d: Driver) -> None:
    """A task of w1-w3 whose AssignTasks all time out (a frozen store
    behind the discovery service): all three are let go once replaced,
    and w4 is their first replacement. The grant made every task asked
    for, so it did not count the pool."""
    d.grant(None, [["w1", "w2", "w3"]], live=0)
    d.at(5).tick()  # all three silent: speculative replicas asked for
    d.at(10).events(*(AssignAnswered("t0", w, "DEADLINE_EXCEEDED") for w in ("w1", "w2", "w3")))
    assert d.at(10.5).added("t0", "w4")[-1] == AddReplica(
        "t0", "req3", ws("w1", "w2", "w3"), ws("w1", "w2", "w3")
    )


def test_a_task_whose_let_go_workers_leave_no_quorum_in_the_pool_goes_again_at_once():
    """Each let-go worker stays excluded from its task (it runs a task id at
    most once): in a pool of 4, w4 alone is left to it, and one worker
    makes no quorum. The chunk goes again at once, as a new task any
    worker may take, not after the task timeout (measured: a 20 s Redis
    freeze held a job for the 120 s task timeout, make chaos)."""
    d = Driver(task_timeout=120)
    _let_go_all_but_w4(d)
    commands = d.at(10.6).added("t0", None, live=4)
    assert commands == [d.cancel("t0", "w4"), Settle("t0", False), RequestTasks("req4", 1, NONE)]
    # Not suspects (the next request excludes nobody): they sent nothing to judge.
    assert d.stats.retry_reasons == {"no worker left that it may take": 1}
    assert d.stats.credits_spent == 0  # 3 + 1 escrowed; 3 released, then 1 refunded


def test_add_replicas_ask_for_the_pool_count_once_every_few_seconds():
    """An empty answer counts the pool only when asked (a scan of every
    live worker at the discovery service): once per POOL_COUNT_SECONDS."""
    d = Driver(chunks=2, batch=2)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"]])
    [first] = d.answer("t0", "w3", "RESOURCE_EXHAUSTED")
    [second] = d.answer("t1", "w6", "RESOURCE_EXHAUSTED")
    assert (first.count_live, second.count_live) == (True, False)
    d.at(0.1).added("t0", None)
    [retry] = d.wake()
    assert retry.task_id == "t0" and not retry.count_live
    d.at(POOL_COUNT_SECONDS - 0.01).added("t0", None)
    d.at(POOL_COUNT_SECONDS).added("t1", None)
    [again], [later] = d.wake(), d.wake()  # each half a second after its answer
    assert (again.task_id, again.count_live, later.task_id, later.count_live) == (
        "t0", True, "t1", False,
    )  # fmt: skip


def test_a_worker_found_gone_is_not_counted_against_the_pool():
    """w4 gone (likely dead, so not in the pool's count of 4 either): the
    4 live may include one the task can still draw."""
    d = Driver(task_timeout=120)
    _let_go_all_but_w4(d)
    d.at(10.55).events(WorkerLost("w4"))
    assert d.at(10.6).added("t0", None, live=4) == []
    assert not only(d.log, Settle)


def test_a_task_short_of_workers_in_a_larger_pool_keeps_asking_for_one():
    d = Driver(task_timeout=120)
    _let_go_all_but_w4(d)
    assert d.at(10.6).added("t0", None, live=5) == []  # w5 is busy, or may be
    assert d.wake() == [AddReplica("t0", "req4", ws("w1", "w2", "w3"), NONE)]
    assert d.now == 10.6 + REPLICA_RETRY_SECONDS and not only(d.log, Settle)


# -- 11. an AddReplica under way ----------------------------------------------------


def test_a_quorum_waits_for_the_add_replica_under_way_and_releases_its_worker():
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    assert only(d.answer("t0", "w3", "RESOURCE_EXHAUSTED"), AddReplica)
    assert d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT) == []  # quorum, nobody live
    assert d.at(3).tick() == []  # well after the grace: still waiting for the answer
    assert d.core.wake_at() == math.inf  # only that answer moves it: no busy loop
    assert d.added("t0", "w4") == [
        d.assign("t0", "w4", "tok4"),
        d.cancel("t0", "w4"),
        Settle("t0", True, NONE, ws("w4")),  # added to the task: released, not paid
    ]
    assert d.stats.credits_spent == 2


def test_a_quorum_settles_once_the_add_replica_finds_nobody():
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    d.answer("t0", "w3", "UNAVAILABLE")
    assert d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT) == []
    assert d.at(1.2).added("t0", None) == [Settle("t0", True, NONE, NONE)]
    assert d.stats.credits_spent == 2


# -- 12. too few workers ------------------------------------------------------------


def starve(d: Driver, live: int) -> tuple[list[float], BaseException]:
    """Answer every request with no task until the core fails; the times
    of the requests and the error."""
    times = []
    while True:
        times.append(d.now)
        commands = d.grant(None, [], live=live)
        if commands:
            [fail] = commands
            return times, fail.error
        assert d.wake() == [RequestTasks(f"req{len(times) + 1}", 1, NONE)]


def test_too_few_live_workers_fail_the_job_only_after_some_seconds():
    d = Driver()
    times, error = starve(d, live=2)
    # Backoff from 50 ms, doubling, at most 1 s apart.
    assert times == pytest.approx([0, 0.05, 0.15, 0.35, 0.75, 1.55, 2.55, 3.55, 4.55, 5.55])
    assert times[-2] <= NOT_ENOUGH_WORKERS_SECONDS < times[-1]
    assert isinstance(error, NotEnoughWorkers)
    assert (error.live, error.needed, error.chunk) == (2, 3, "map chunk 0")
    assert d.stats.credits_spent == 0
    assert d.at(10).tick() == []


def test_busy_workers_fail_the_job_only_after_the_task_timeout():
    d = Driver(task_timeout=10.0)
    times, error = starve(d, live=5)
    assert times[-2] <= 10.0 < times[-1] == pytest.approx(10.55)
    assert type(error) is JobFailed
    assert str(error).startswith("no workers available for map chunk 0 for 10 s")


# -- 13. pacing of requests --------------------------------------------------------


def test_a_settle_asks_for_the_next_tasks_at_once():
    d = Driver(chunks=2, batch=1)
    assert d.at(5).tick() == []  # the first request is still under way
    assert d.events(Granted("req0", [("t9", {"w9": addr("w9")})], 10)) == []  # not ours
    task = d.running(["w1", "w2", "w3"])
    assert d.core.wake_at() == 5 + BUSY_POLL_SECONDS
    assert d.at(5.1).results(task, w1=OUTPUT, w2=OUTPUT, w3=OUTPUT) == [Settle(task, True)]
    assert d.at(5.15).settle_answer(task) == [
        Deliver(d.chunks[0], encode_result(OUTPUT)),
        RequestTasks("req2", 1, NONE),
    ]


def test_a_request_filled_in_part_asks_again_at_once():
    """A request cut short (by the slots one request may take of a worker)
    goes again at once, not after the busy poll: on a network a poll's wait
    is what many small tasks cost (issue 16). An empty answer backs off."""
    d = Driver(chunks=3, batch=3)
    assert d.first == [RequestTasks("req1", 3, NONE)]
    commands = d.grant(None, [["w1", "w2", "w3"]])
    assert only(commands, RequestTasks) == [
        RequestTasks("req2", 1, NONE),
        RequestTasks("req3", 1, NONE),
    ]
    assert only(d.grant(None, []), RequestTasks) == []  # req3: empty; req2 still out
    req2 = only(d.log, RequestTasks)[-2]
    assert only(d.grant(req2, []), RequestTasks) == []  # req2: empty too
    assert d.core.wake_at() > d.now  # backed off


def test_after_a_request_cut_short_the_next_round_goes_as_several_at_once():
    """Each request of a round asks what the fullest request cut short made;
    each answer's tasks are assigned at once, and the round is paced (asked
    again, or the phase over) only when its last request is answered: on a
    network the round costs one round trip, not one per request."""
    d = Driver(chunks=12, batch=64)
    assert d.first == [RequestTasks("req1", 12, NONE)]
    round_ = only(d.grant(None, [["w1", "w2", "w3"]] * 2), RequestTasks)
    assert round_ == [RequestTasks(f"req{n}", 2, NONE) for n in (2, 3, 4, 5)]
    # Answered out of order: req4 first, cut short; its task is assigned now.
    commands = d.grant(round_[2], [["w4", "w5", "w6"]])
    assert [(a.task_id, a.worker_id) for a in only(commands, Assign)] == [
        (d.granted[0], w) for w in ("w4", "w5", "w6")
    ]
    assert only(commands, RequestTasks) == []
    assert only(d.grant(round_[0], [["w1", "w2", "w3"]] * 2), RequestTasks) == []
    assert only(d.grant(round_[3], [["w1", "w2", "w3"]] * 2), RequestTasks) == []
    assert d.core.wake_at() > d.now  # no request due while req3 is out
    # The last answer closes the round: cut short, so the next goes at once,
    # for the 5 chunks not made yet, 2 per request.
    commands = d.grant(round_[1], [])
    assert only(commands, RequestTasks) == [
        RequestTasks("req6", 2, NONE), RequestTasks("req7", 2, NONE), RequestTasks("req8", 1, NONE)
    ]  # fmt: skip
    assert d.core.open_tasks == 2 + 1 + 2 + 2
    # An answer to a request of a round gone (repeated, or not ours) is ignored.
    assert d.grant(round_[0], [["w7", "w8", "w9"]]) == []
    assert d.core.open_tasks == 7


def test_a_large_first_batch_goes_as_a_round_before_any_request_was_cut_short():
    """Before any answer says how many tasks one request makes, a batch of
    more than FIRST_ROUND_PER_REQUEST chunks goes as several requests at
    once: on a network, learning that size first cost a job a round trip
    (issue 16). A smaller batch still goes as one request."""
    chunks = 2 * FIRST_ROUND_PER_REQUEST + 3
    d = Driver(chunks=chunks, batch=64)
    per = FIRST_ROUND_PER_REQUEST
    assert d.first == [
        RequestTasks("req1", per, NONE),
        RequestTasks("req2", per, NONE),
        RequestTasks("req3", 3, NONE),
    ]
    for request in d.first:
        commands = d.grant(request, [["w1", "w2", "w3"]] * request.n)
    assert d.core.open_tasks == chunks and not d.core._pending
    assert only(commands, RequestTasks) == []  # every chunk made: nothing more to ask
    big = Driver(chunks=PARALLEL_REQUESTS * 20, batch=64)  # the batch, split in 4
    assert [r.n for r in big.first] == [16, 16, 16, 16]
    assert Driver(chunks=FIRST_ROUND_PER_REQUEST, batch=64).first == [
        RequestTasks("req1", FIRST_ROUND_PER_REQUEST, NONE)
    ]


def test_tasks_a_round_is_granted_as_another_of_its_requests_fails_are_given_back():
    """The job fails on one request of a round (RESOURCE_EXHAUSTED, say);
    another answered in the same batch of events is not assigned, and the
    stop settles its tasks invalid, so their credits come back at once."""
    d = Driver(chunks=3, batch=3)
    d.grant(None, [["w1", "w2", "w3"]])
    second, third = only(d.log, RequestTasks)[1:]
    granted = Granted(third.request_id, [("t9", {w: addr(w) for w in ("w4", "w5", "w6")})], 10)
    commands = d.events(RequestFailed(second.request_id, RuntimeError("no credit")), granted)
    assert only(commands, Fail) and only(commands, Assign) == []
    assert Settle("t9", False) in d.stop()


def test_a_phase_is_not_done_while_a_request_of_its_round_is_out():
    d = Driver(chunks=3, batch=3)
    d.grant(None, [["w1", "w2", "w3"]])
    second, third = only(d.log, RequestTasks)[1:]
    d.grant(second, [["w4", "w5", "w6"]])
    for task_id in list(d.core._tasks):
        d.accept_all(task_id)
        d.results(task_id, **{w: OUTPUT for (t, w) in d.assigns if t == task_id})
        d.settle_answer(task_id)
    assert d.core.open_tasks == 0
    assert not d.core.phase_done  # third is still out: its chunk waits for it
    d.grant(third, [["w7", "w8", "w9"]])
    [task_id] = d.granted
    d.accept_all(task_id)
    d.results(task_id, w7=OUTPUT, w8=OUTPUT, w9=OUTPUT)
    d.settle_answer(task_id)
    assert d.core.phase_done


def test_requests_are_paced_while_our_tasks_run_with_one_in_flight():
    d = Driver(chunks=3, batch=1)
    task = d.running(["w1", "w2", "w3"])
    assert d.at(BUSY_POLL_SECONDS - 0.01).tick() == []
    assert d.wake() == [RequestTasks("req2", 1, NONE)]
    assert d.now == BUSY_POLL_SECONDS
    # A settle while that request is under way asks nothing more.
    assert d.results(task, w1=OUTPUT, w2=OUTPUT, w3=OUTPUT) == [Settle(task, True)]
    assert d.settle_answer(task) == [Deliver(d.chunks[0], encode_result(OUTPUT))]
    d.running(["w4", "w5", "w6"])
    assert d.wake() == [RequestTasks("req3", 1, NONE)]
    assert d.now == 2 * BUSY_POLL_SECONDS
    # Empty answers while t1 runs: backoff, but never slower than the busy poll.
    gaps = []
    for _ in range(5):
        asked_at = d.now
        assert d.grant(None, [], live=6) == []
        assert len(d.wake()) == 1
        gaps.append(d.now - asked_at)
    assert gaps == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25])


# -- 14. failed calls ------------------------------------------------------------------


def test_a_failed_request_fails_the_job():
    d = Driver()
    error = ServiceUnavailable("discovery unreachable for 65 s")
    assert d.events(RequestFailed("req1", error)) == [Fail(error)]
    assert d.at(1).tick() == []


def test_a_failed_settle_is_ignored_only_for_an_expired_invalid_task():
    d = Driver(chunks=2, batch=2)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"]])
    d.at(1).results("t0", w1=OUTPUT, w2=WRONG, w3=OTHER)
    assert d.events(SettleFailed("t0", UnknownTask("t0"))) == []
    assert d.request() == RequestTasks("req2", 1, ws("w1", "w2", "w3"))  # the retry goes on
    d.results("t1", w4=OUTPUT, w5=OUTPUT, w6=OUTPUT)
    [fail] = d.events(SettleFailed("t1", UnknownTask("t1")))
    assert type(fail.error) is JobFailed
    assert str(fail.error).startswith("could not settle the task of map chunk 1: ")


def test_a_failed_invalid_settle_for_another_reason_fails_the_job():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=WRONG, w3=OTHER)
    [fail] = d.events(SettleFailed(task, ServiceUnavailable("gone")))
    assert type(fail.error) is JobFailed


# -- 15. stopping ---------------------------------------------------------------------


def test_stop_settles_open_tasks_and_cancels_every_replica_in_flight():
    d = Driver(chunks=2, batch=2, replication=5)
    d.grant(None, [["w1", "w2", "w3", "w4", "w5"], ["w6", "w7", "w8", "w9", "w10"]])
    d.accept_all("t0")
    d.events(*(AssignAnswered("t1", w, "OK") for w in ["w6", "w7", "w8"]))
    assert only(d.answer("t1", "w10", "RESOURCE_EXHAUSTED"), AddReplica)  # still under way
    d.at(1).results("t0", w1=OUTPUT, w2=OUTPUT, w3=OUTPUT, w4=WRONG)  # quorum of 3, in grace
    d.results("t1", w6=OUTPUT, w7=WRONG)
    assert d.stats.credits_spent == 9
    assert d.at(1.5).stop() == [
        Settle("t0", True, ws("w4"), NONE),  # w5 took it: paid if it commits in time
        d.cancel("t1", "w8"),
        d.cancel("t1", "w9"),
        Settle("t1", False),
    ]
    assert d.stats.credits_spent == 4  # w1, w2, w3 and w5's: the invalid task refunded
    assert d.stats.missing_reports == 1 and d.stats.replicas_cancelled == 2
    assert d.results("t1", w8=OUTPUT) == []
    assert d.added("t1", "w11") == []
    assert d.settle_answer("t0") == []
    assert d.at(100).tick() == []


# -- 16. results to ignore ------------------------------------------------------------


def test_results_from_strangers_repeats_and_after_the_settle_are_ignored():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    good = sealed(task, OUTPUT)
    assert (
        d.at(1).events(
            ResultArrived(task, "w9", good),  # not in the task
            ResultArrived(task, "w1", good),
            ResultArrived(task, "w1", good),  # a repeat counts once
            ResultArrived("t-other", "w2", good),
        )
        == []
    )
    assert d.core.wake_at() == SPECULATE_AFTER_SECONDS  # no quorum (it would be 2 s)
    assert d.at(1.5).result(task, "w2", good) == []
    assert d.wake() == [Settle(task, True, NONE, NONE)]
    late = sealed(task, WRONG)
    assert d.result(task, "w3", late) == []
    assert d.settle_answer(task) == [Deliver(d.chunks[0], encode_result(OUTPUT))]
    assert d.result(task, "w3", late) == []
    assert d.stats.cheaters == set() and d.stats.missing_reports == 0


def test_a_result_from_a_replica_released_from_the_task_is_ignored():
    d = Driver()
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.answer("t0", "w2")
    d.answer("t0", "w3", "UNAVAILABLE")
    d.added("t0", None)
    assert d.at(0.2).results("t0", w3=OUTPUT, w1=OUTPUT) == []  # w3 is not in the task now
    assert d.at(0.3).results("t0", w2=WRONG) == []  # no quorum yet: a replacement is due
    assert d.wake() == [AddReplica("t0", "req3", ws("w3"), NONE)]
    assert d.at(0.6).added("t0", "w4") == [d.assign("t0", "w4", "tok4")]
    assert d.at(0.7).results("t0", w4=OUTPUT) == [Settle("t0", True, ws("w2"), NONE)]


# -- 17. phases --------------------------------------------------------------------------


def test_phase_done_and_a_reduce_phase_after_the_map_phase():
    d = Driver(batch=1)
    assert not d.core.phase_done  # a request under way
    task = d.running(["w1", "w2", "w3"])
    assert not d.core.phase_done
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT, w3=WRONG)
    assert not d.core.phase_done  # settling
    d.settle_answer(task)
    assert d.core.phase_done

    assert d.start_phase(REDUCE, 2, "reduce-digest") == [RequestTasks("req2", 1, ws("w3"))]
    assert d.stats.phase == "reduce" and (d.stats.map_tasks, d.stats.reduce_tasks) == (1, 2)
    assert not d.core.phase_done
    # Knowing the map functions says nothing about the reduce function.
    assert d.grant(None, [["w1", "w2", "w4"]]) == [
        d.assign("t1", "w1", "tok4"),
        d.assign("t1", "w2", "tok5"),
        d.assign("t1", "w4", "tok6"),
    ]
    d.accept_all("t1")
    assert d.wake() == [RequestTasks("req3", 1, ws("w3"))]
    assert d.grant(None, [["w1", "w5", "w6"]]) == [
        d.assign("t2", "w1", "tok7", send_payload=False),
        d.assign("t2", "w5", "tok8"),
        d.assign("t2", "w6", "tok9"),
    ]
    d.accept_all("t2")
    d.at(2).results("t1", w1={"apple": 2}, w2={"apple": 2}, w4={"apple": 2})
    d.results("t2", w1={"pear": 1}, w5={"pear": 1}, w6={"pear": 1})
    assert d.settle_answer("t1") == [Deliver(d.chunks[0], {"apple": 2})]
    assert not d.core.phase_done
    assert d.settle_answer("t2") == [Deliver(d.chunks[1], {"pear": 1})]
    assert d.core.phase_done


def test_a_job_that_fails_names_the_workers_it_could_not_reach():
    """A wrong --advertise or a firewall shows as UNAVAILABLE answers; the
    JobFailed says so rather than only "no quorum" (docs/protocol.md
    section 8)."""
    d = Driver(max_attempts=1, task_timeout=5.0)
    d.grant(None, [["w1", "w2", "w3"]])
    d.answer("t0", "w1")
    d.events(
        AssignAnswered("t0", "w3", "UNAVAILABLE", "ipv4:198.51.100.13:7000: Connection refused")
    )
    d.events(
        AssignAnswered(
            "t0", "w2", "UNAVAILABLE", "failed to connect to all addresses; last error: x"
        )
    )
    for _ in range(20):
        if only(d.log, Fail):
            break
        for replica in only(d.log, AddReplica)[-1:]:
            d.added(replica.task_id, None)
        d.wake()
        for settle in only(d.log, Settle):
            if settle.task_id == "t0" and not settle.valid:
                d.settle_answer("t0")
    [fail] = only(d.log, Fail)
    assert isinstance(fail.error, JobFailed)
    assert fail.error.unreachable == {
        addr("w3"): "ipv4:198.51.100.13:7000: Connection refused",
        addr("w2"): "x",
    }
    assert "2 worker(s) unreachable from this foreman" in str(fail.error)
    assert addr("w3") in str(fail.error) and "Connection refused" in str(fail.error)


def test_the_worker_that_disagreed_with_a_malformed_quorum_is_no_cheater():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    garbage = sealed(task, b'[["pwned",999]]')
    d.at(1).results(task, w1=garbage, w2=garbage, w3=OUTPUT)
    [settle] = only(d.log, Settle)
    assert settle.valid and settle.missing == ws("w3")  # before the key shows the garbage
    d.settle_answer(task)
    assert d.core.cheaters == {"w1", "w2"} == d.stats.cheaters
    assert d.request().exclude >= ws("w1", "w2")  # the retry avoids the colluders


def starve_on_networks(d: Driver, *, live: int, networks: int) -> Fail:
    """Answer every request with no task, `live` workers on `networks`
    networks (network diversity), until the core fails; its Fail."""
    while not only(d.log, Fail):
        d.events(Granted(d.request().request_id, [], live, networks, "network"))
        if not only(d.log, Fail):
            d.wake()
    [fail] = only(d.log, Fail)
    return fail


def test_workers_all_on_one_network_fail_the_job_saying_so():
    """Live workers enough, but on fewer networks than replicas: with
    network diversity no task can be made (docs/protocol.md section 10)."""
    d = Driver()
    fail = starve_on_networks(d, live=5, networks=1)
    assert isinstance(fail.error, NotEnoughWorkers)
    assert (fail.error.live, fail.error.spots, fail.error.needed) == (5, 1, 3)
    assert "not enough networks" in str(fail.error) and "--diversity identity" in str(fail.error)
    assert d.now <= NOT_ENOUGH_WORKERS_SECONDS + 1.5 and d.stats.credits_spent == 0


def test_each_settled_task_has_a_verdict_on_every_replica():
    """docs/protocol.md section 10: agreed, disagreed, late, silent."""
    d = Driver(chunks=3, batch=3)
    d.grant(None, [["w1", "w2", "w3"], ["w4", "w5", "w6"], ["w7", "w8", "w9"]])
    t0, t1, t2 = d.granted
    d.accept_all(t0)
    d.at(1).results(t0, w1=OUTPUT, w2=OUTPUT, w3=WRONG)
    d.events(*(AssignAnswered(t1, w, "OK") for w in ("w4", "w5", "w6")))
    d.results(t1, w4=OUTPUT, w5=OUTPUT)  # w6 took the task and has not answered
    d.events(*(AssignAnswered(t2, w, "OK") for w in ("w7", "w8")))
    d.results(t2, w7=OUTPUT, w8=OUTPUT)  # w9 never answered its AssignTask
    while {t1, t2} - {s.task_id for s in only(d.log, Settle)}:
        d.wake()
    verdicts = d.stats.verdicts
    assert verdicts[t0] == {"agreed": ["w1", "w2"], "disagreed": ["w3"], "late": [], "silent": []}
    assert verdicts[t1] == {"agreed": ["w4", "w5"], "disagreed": [], "late": ["w6"], "silent": []}
    assert verdicts[t2] == {"agreed": ["w7", "w8"], "disagreed": [], "late": [], "silent": ["w9"]}


def test_a_task_without_quorum_has_everyone_who_answered_disagreeing():
    d = Driver(task_timeout=5.0)
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=WRONG, w3=OTHER)
    assert d.stats.verdicts[task] == {
        "agreed": [], "disagreed": ["w1", "w2", "w3"], "late": [], "silent": []
    }  # fmt: skip


def test_too_few_workers_is_said_as_such_even_on_few_networks():
    fail = starve_on_networks(Driver(), live=2, networks=1)
    assert fail.error.spots is None and "2 live worker(s)" in str(fail.error)
    assert "needs 3" in str(fail.error)


def test_a_result_its_workers_did_not_commit_to_is_retried_and_the_liars_are_cheaters():
    """docs/protocol.md section 10: the discovery service reports what a
    quorum of the task's workers committed to; the foreman takes a result
    only when that is what the agreeing replicas sent."""
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT, w3=WRONG)
    # w1 and w3 committed to WRONG's ciphertext, w2 to what it sent.
    wrong = sealed(task, WRONG)
    d.events(Settled(task, key_of(task), ciphertext_sha256(wrong), ws("w1", "w3")))
    assert not only(d.log, Deliver)
    assert d.stats.retry_reasons == {"the agreed result is not the one its workers committed to": 1}
    assert "w1" in d.core.cheaters and "w2" not in d.core.cheaters  # w1 sent one, committed another


def test_no_committed_quorum_means_no_result():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT, w3=OUTPUT)
    d.events(Settled(task, key_of(task), "", frozenset()))
    assert not only(d.log, Deliver)
    assert d.stats.retry_reasons == {"no quorum of its workers committed to the agreed result": 1}


def test_a_worker_that_sent_the_result_but_committed_another_is_a_cheater():
    d = Driver()
    task = d.running(["w1", "w2", "w3"])
    d.at(1).results(task, w1=OUTPUT, w2=OUTPUT, w3=OUTPUT)
    good = ciphertext_sha256(sealed(task, OUTPUT))
    d.events(Settled(task, key_of(task), good, ws("w1", "w2")))
    assert [c.output for c in only(d.log, Deliver)]  # the result stands
    assert d.core.cheaters == {"w3"}


def test_a_proved_map_output_is_delivered_with_its_split_and_an_unproved_one_without():
    """The shuffle must not split a proved output again (issue 16); an
    output whose values are not integers is decoded to be checked and comes
    without a split, the shuffle then splitting it itself."""
    for output, proved in [(OUTPUT, True), ({"apple": ["a.b"], "pear": [1.5]}, False)]:
        d = Driver()
        task = d.running(["w1", "w2", "w3"])
        d.results(task, w1=output, w2=output, w3=output)
        (delivered,) = d.settle_answer(task)
        assert delivered == Deliver(d.chunks[0], encode_result(output))
        if proved:
            assert delivered.rows.text == delivered.output
            assert [bytes(k) for k in delivered.rows.keys] == [b"apple", b"pear"]
        else:
            assert delivered.rows is None


# -- a worker found gone --------------------------------------------------------------


def test_a_lost_workers_unanswered_replicas_are_released_and_replaced_at_once():
    """A worker killed with tasks queued: its replicas are let go and
    replaced now (costing the chunk no attempt), not left to the deadline."""
    d = Driver(chunks=1)
    task = d.running(["w1", "w2", "w3"])
    [add] = only(d.events(WorkerLost("w2")), AddReplica)
    assert (add.task_id, add.release) == (task, frozenset({"w2"}))
    assert d.chunks[0].attempts == 0


def test_a_lost_worker_is_released_at_a_valid_settle_not_left_late():
    """Past the quorum its replica is not replaced, and the settle (at once:
    nobody is left to wait for) releases it, its credit back now, instead of
    leaving it to the late window."""
    d = Driver(chunks=1)
    task = d.running(["w1", "w2", "w3"])
    assert d.results(task, w1=OUTPUT, w3=OUTPUT) == []  # quorum; grace for w2
    commands = d.events(WorkerLost("w2"))
    assert only(commands, AddReplica) == []
    [settle] = only(commands, Settle)  # nobody left to wait for: at once
    assert settle.valid and settle.released == frozenset({"w2"})
    assert d.core.stats.verdicts[task]["late"] == []
