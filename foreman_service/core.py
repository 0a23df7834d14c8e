"""The job engine's decisions, as a pure state machine (after dask's
`worker_state_machine`): events in, commands out, no sockets, no threads,
no clock of its own. `foreman_service/engine.py` drives it and
`foreman_service/outbound.py` carries its commands out and brings the
answers back as events. Every rule of docs/protocol.md section 9 that is
the foreman's lives here, so each is tested on a manual clock
(tests/test_engine_core.py).

One phase (map or reduce) runs at a time: its chunks become replicated
tasks; a task is settled valid once a quorum of identical ciphertexts has
arrived and the rest had their grace; settled invalid (and its chunk
retried on other workers) when no quorum is possible or its deadline
passes. Replicas that never started, or froze, are released from the task
(never counted failed); replicas still at work after the quorum and its
grace are left to finish: the discovery service pays them if they commit the
quorum's result within its late window (docs/protocol.md section 10). A
replica silent for longer than the job's usual task time gets a speculative
replica beside it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from ec262 import replication as replicas
from ec262.encoding import FlatRows, decode_result, valid_flat_rows
from ec262.envelope import ciphertext_sha256, open_sealed
from ec262.errors import (
    DecryptionError,
    EncodingError,
    InsufficientCredits,
    JobFailed,
    NoCommittedQuorum,
    NotEnoughWorkers,
    RemoteError,
    UnknownTask,
)
from ec262.remote_errors import is_error_document
from ec262.v1 import worker_pb2
from foreman_service.median import RunningMedian
from foreman_service.planning import DEFAULT_CHUNK_BYTES
from foreman_service.stats import JobStats

MAP, REDUCE = worker_pb2.MAP, worker_pb2.REDUCE
PHASE_NAMES = {MAP: "map", REDUCE: "reduce"}
# While tasks of ours run, their settles free slots and trigger the next
# request; this slower poll only catches slots freed by others and workers
# joining, without an empty RequestTasks after every assignment.
BUSY_POLL_SECONDS = 0.25
# Once a request comes back filled in part (by the slots one request may
# take of a worker, docs/protocol.md section 10), the next round of
# requests goes as up to this many at once, each for as many tasks as the
# fullest request made: on a network a round costs one round trip, however
# many requests it holds (a job of 56 tasks on 4 workers took 3 in series).
PARALLEL_REQUESTS = 4
# Before any request was cut short, how many a request of the first round
# asks for: a batch larger than this goes as up to PARALLEL_REQUESTS
# requests at once, not one (a job of 56 tasks on 4 workers paid a round
# trip to learn that one request makes 20); smaller batches go whole.
FIRST_ROUND_PER_REQUEST = 16
# How long fewer live workers than a task needs are borne before
# NotEnoughWorkers (a worker restarting comes back sooner).
NOT_ENOUGH_WORKERS_SECONDS = 5.0
# A replica silent this long (or 3 x the job's median task time, if longer)
# gets a speculative replica beside it (docs/protocol.md section 9).
SPECULATE_AFTER_SECONDS = 5.0
SPECULATE_MEDIAN_FACTOR = 3.0
# How often a task whose AddReplica found no free worker asks again.
REPLICA_RETRY_SECONDS = 0.5
POOL_COUNT_SECONDS = 5.0  # the most often a job has AddReplica count the pool

# A worker whose AssignTask found nobody listening is left out of requests
# and replacements for this long (a killed worker stays in the pool until
# its lease ends).
UNREACHABLE_EXCLUDED_SECONDS = 30.0

# AssignTask answers that mean the replica never started: it is released
# from the task and replaced, and costs the job no attempt.
NEVER_STARTED = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})


@dataclass(frozen=True)
class EngineConfig:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    task_timeout: float = 120.0  # no quorum by then: settle invalid, retry
    max_attempts: int = 4  # per chunk, then JobFailed
    # After quorum, the remaining replicas get as long again as the quorum
    # took (honest replicas run the same code on the same rows), within
    # [grace_min, grace_max] seconds, for their results to be compared here;
    # then the task is settled and they are left to the late window.
    grace_fraction: float = 1.0
    grace_min: float = 0.05
    grace_max: float = 3.0
    batch: int = 64  # tasks asked for in one RequestTasks
    assign_timeout: float = 10.0
    # RequestTasksRequest.replication: 0 the discovery's default, 1-99, or
    # -1 adaptive (ec262/replication.py).
    replication: int = 0

    def replication_with(self, service: int, service_adaptive: bool) -> tuple[int, bool]:
        """(full replication, adaptive) of this job, given the discovery
        service's default (ClientInfo)."""
        if self.replication == replicas.DEFAULT:
            return service or replicas.ADAPTIVE_FULL, service_adaptive
        if self.replication == replicas.ADAPTIVE:
            return replicas.ADAPTIVE_FULL, True
        return self.replication, False


@dataclass
class _Round:
    """The requests one `_maybe_request` sent, paced as one when the last
    is answered (its chunks, tasks made, and the last answer cut short)."""

    requests: dict[str, list[Chunk]]
    exclude: frozenset[str]
    asked: list[Chunk]
    made: list = field(default_factory=list)
    most_made: int = 0  # by one request
    short: Granted | None = None


def _short(detail: str) -> str:
    """gRPC's connection error, without its boilerplate."""
    detail = detail.removeprefix("failed to connect to all addresses; last error: ")
    return detail[:160]


# -- events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    """RequestTasks answered: (task id, {worker id: address}) per task made,
    in the order of the request's chunks."""

    request_id: str
    tasks: list[tuple[str, dict[str, str]]]
    live_workers: int = 0
    live_networks: int = 0  # their distinct addresses or networks; 0: not said
    diversity: str = ""  # the discovery service's --diversity


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    error: BaseException


@dataclass(frozen=True)
class AssignAnswered:
    """`code` is the gRPC status name ("OK" when the worker took the task)."""

    task_id: str
    worker_id: str
    code: str
    detail: str = ""


@dataclass(frozen=True)
class WorkerLost:
    """The connection to a worker ended and it cannot be reached again."""

    worker_id: str


@dataclass(frozen=True)
class ResultArrived:
    task_id: str
    worker_id: str
    ciphertext: str


@dataclass(frozen=True)
class ReplicaAdded:
    """AddReplica answered: the new worker, or None when none was free
    (then `live_workers`: the live workers of the pool, busy or not)."""

    task_id: str
    worker: tuple[str, str] | None
    live_workers: int = 0


@dataclass(frozen=True)
class ReplicaFailed:
    task_id: str
    error: BaseException


@dataclass(frozen=True)
class Settled:
    """SettleTask answered. For a valid settle, what a quorum of the task's
    workers committed to at the discovery service, and who they are
    (docs/protocol.md section 10)."""

    task_id: str
    key: bytes | None
    quorum_sha256: str = ""
    agreeing: frozenset[str] = frozenset()
    paid: frozenset[str] | None = None  # who the discovery service paid, when it says
    late: frozenset[str] = frozenset()  # not committed yet: paid if they do in time


@dataclass(frozen=True)
class SettleFailed:
    task_id: str
    error: BaseException


@dataclass(frozen=True)
class Withdrawn:
    """A Withdraw answered: `dropped` when the worker dropped the replica
    unstarted, or may have (the call failed: its answer may be what was
    lost, and a replica released while at work loses its worker nothing)."""

    task_id: str
    worker_id: str
    dropped: bool


Event = (
    Granted
    | RequestFailed
    | AssignAnswered
    | WorkerLost
    | ResultArrived
    | ReplicaAdded
    | ReplicaFailed
    | Settled
    | SettleFailed
    | Withdrawn
)


# -- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class RequestTasks:
    request_id: str
    n: int
    exclude: frozenset[str]


@dataclass(frozen=True)
class Assign:
    """AssignTask; the result inbox expects `token` from this worker first."""

    task_id: str
    chunk: Chunk
    worker_id: str
    address: str
    token: str
    send_payload: bool


@dataclass(frozen=True)
class Cancel:
    task_id: str
    worker_id: str
    address: str
    token: str


@dataclass(frozen=True)
class Withdraw:
    """CancelTask for a replica only if its worker has not started it."""

    task_id: str
    worker_id: str
    address: str
    token: str


@dataclass(frozen=True)
class AddReplica:
    task_id: str
    request_id: str
    exclude: frozenset[str]
    release: frozenset[str]
    # Have an empty answer count the pool's live workers (up to
    # store.LIVE_COUNT_CAP of them read there).
    count_live: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Settle:
    """SettleTask; the inbox takes no more results for the task."""

    task_id: str
    valid: bool
    missing: frozenset[str] = frozenset()
    released: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Deliver:
    """A validated output, for the shuffle (map) or the result (reduce)."""

    chunk: Chunk
    output: Any
    rows: FlatRows | None = field(default=None, compare=False)  # a map output's split, if proved


@dataclass(frozen=True)
class Fail:
    error: BaseException


Command = RequestTasks | Assign | Cancel | AddReplica | Settle | Deliver | Fail


# -- state ----------------------------------------------------------------------


@dataclass(eq=False)
class Chunk:
    phase: int
    index: int
    rows: bytes
    attempts: int = 0
    suspects: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"{PHASE_NAMES[self.phase]} chunk {self.index}"


# A replica's life: assigning -> running -> answered; or released (never
# started, or let go after the quorum), or failed (refused the task).
VERDICTS = ("agreed", "disagreed", "late", "silent")
ASSIGNING, RUNNING, ANSWERED, RELEASED, FAILED = (
    "assigning",
    "running",
    "answered",
    "released",
    "failed",
)


@dataclass(eq=False)
class Replica:
    worker_id: str
    address: str
    token: str
    assigned_at: float
    state: str = ASSIGNING
    payload_sent: bool = False
    speculated: bool = False  # a replica was asked for beside it
    result: str | None = None
    answered_in: float = 0.0  # seconds from assignment to result
    assign_timed_out: bool = False  # AssignTask answered DEADLINE_EXCEEDED
    released_at_discovery: bool = False  # by AddReplica: not in the task any more
    withdrawing: bool = False  # a Withdraw under way: the settle waits for its answer


@dataclass(eq=False)
class Task:
    task_id: str
    chunk: Chunk
    replicas: dict[str, Replica]
    started: float
    deadline: float
    quorum_at: float | None = None
    to_release: set[str] = field(default_factory=set)  # for the next AddReplica
    replicas_wanted: int = 0  # replacements and speculative replicas to ask for
    add_in_flight: bool = False
    next_add_at: float = 0.0
    settling: Settle | None = None
    escalated: bool = False  # adaptive replication: the rest was asked for
    winner: str | None = None
    accused: frozenset[str] = frozenset()  # made cheaters by this task's quorum
    assumed_paid: int = 0  # workers the settle pays, as the foreman sees it
    pool_spent: bool = False  # no worker of the pool is left that it may take
    order: int = 0  # of its making in the job: a tick visits tasks in this order

    def live(self) -> list[Replica]:
        """Replicas that may still send a result."""
        return [r for r in self.replicas.values() if r.state in (ASSIGNING, RUNNING)]

    def votes(self) -> Counter:
        return Counter(r.result for r in self.replicas.values() if r.state == ANSWERED)


def open_output(phase: int, ciphertext: str, key: bytes) -> Any:
    """The agreed plaintext: a map output stays canonical text for the
    shuffle unless it is an error document; anything else is decoded.
    Raises DecryptionError or EncodingError for garbage, a map output whose
    values are not lists included: colluding replicas can agree on anything,
    and the shuffle, which merges map outputs as text without parsing them,
    must never be the one to find out (docs/protocol.md section 10). So
    every agreed output is proved JSON of a map output's shape here once:
    by bytes when its values are integers (`valid_flat_rows`), else by
    decoding it all, at about 30 ms per MB (the shuffle's byte split alone
    would pass `[["k",[garbage]]]`)."""
    plaintext = open_sealed(ciphertext, key)
    if phase == MAP and (proved := valid_flat_rows(plaintext)) is not None:
        return proved
    output = decode_result(plaintext)  # all of it: a flat-looking text may not be JSON
    if phase == MAP and not is_error_document(output):
        _check_map_output(output)
        return plaintext
    return output


def _check_map_output(output: dict) -> None:
    """A map output is `{key: [values]}`: each key's values in a list."""
    for key, values in output.items():
        if not isinstance(values, list):
            raise EncodingError(
                f"not a map output: the value of key {str(key)[:40]!r} is a"
                f" {type(values).__name__}, not a list of values"
            )


class JobCore:
    """The decisions of one job, phase after phase. `handle(event, now)` and
    `tick(now)` return the commands to carry out; `wake_at()` says when the
    next tick is due."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        replication: int,
        adaptive: bool = False,
        stats: JobStats | None = None,
        new_token: Callable[[], str] = lambda: secrets.token_urlsafe(18),
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        """`replication` is the full one; with `adaptive` (docs/protocol.md
        section 10) tasks may start with fewer workers (2 trusted ones) and
        get the rest only when those cannot make a quorum."""
        self.config = config
        self.replication = replication
        self.quorum = replicas.quorum(replication)
        self.adaptive = adaptive
        self.stats = stats or JobStats()
        self.stats.adaptive = adaptive
        self._new_token = new_token
        self._new_request_id = new_request_id
        self.cheaters: set[str] = set()
        self._holders: dict[str, set[str]] = {}  # payload digest -> workers holding it
        self._task_seconds = RunningMedian()  # assignment to matching result, per replica
        self._speculate_cache = (0, SPECULATE_AFTER_SECONDS)  # (len(_task_seconds), value)
        self._phase = MAP
        self._digest = ""
        # Chunks waiting for a task: fresh ones in order, and those retried
        # with suspects to keep out, apart (a request round takes from the
        # front of one; a scan of both for each round cost O(chunks left)).
        self._pending: deque[Chunk] = deque()
        self._suspected: deque[Chunk] = deque()
        self._tasks: dict[str, Task] = {}
        # A tick visits only the tasks an event touched (`_touched`) and those
        # a time of theirs has come for (`_due`: when each next has something
        # to decide by the clock alone); a visit of any other would decide
        # nothing. Visiting every open task on every tick cost a tiny-task job
        # a millisecond per tick with 40 open, and grows with the pool.
        self._touched: set[str] = set()
        self._due: dict[str, float] = {}
        # The same times in time order, (time, order, task id); an entry
        # whose time is no longer its task's `_due` is stale, dropped when
        # it comes up: a tick and wake_at cost O(log n), not O(n).
        self._wakeups: list[tuple[float, int, str]] = []
        # The tasks that may want a replica found none free (a superset:
        # left when found wanting none), which a settle sends to ask again.
        self._wanting: set[str] = set()
        self._made = itertools.count()
        self._round: _Round | None = None  # requests under way
        self._unused_grants: list[str] = []  # tasks granted after the job failed
        # Tasks one request can be expected to make (the most a request cut
        # short made; 0: none was yet): the size of each request of a round.
        self._per_request = 0
        # Live workers, as the last short answer (a request cut short, an
        # AddReplica that found nobody) counted them; 0: not known.
        self._live_pool = 0
        self._pool_counted_at = -math.inf  # when an AddReplica last asked for the count
        self._next_request_at = 0.0
        self._empty_requests = 0
        self._starved_since: float | None = None
        self._relaxed_at: dict[int, float] = {}  # id(chunk) -> when its exclusions went
        self._fresh_starved_since: float | None = None
        self._relax_fresh = False  # the next fresh request goes without exclusions
        self._without_unreachable = False  # ... without the unreachable workers
        self._suspects_turn = False
        self._unreachable: dict[str, float] = {}  # worker -> excluded until
        self.unreachable_seen: dict[str, str] = {}  # address -> why, for JobFailed
        self._failed = False

    # -- phases -------------------------------------------------------------------

    def start_phase(self, phase: int, chunks: list[Chunk], digest: str, now: float) -> list:
        self._phase, self._digest = phase, digest
        self._pending, self._suspected = deque(chunks), deque()
        self._next_request_at = now
        self._starved_since = None
        self.stats.phase = PHASE_NAMES[phase]
        if phase == MAP:
            self.stats.map_tasks = len(chunks)
        else:
            self.stats.reduce_tasks = len(chunks)
        return self.tick(now)

    @property
    def phase_done(self) -> bool:
        return not self._waiting() and not self._tasks and self._round is None

    def _waiting(self) -> bool:
        return bool(self._pending or self._suspected)

    @property
    def open_tasks(self) -> int:
        return len(self._tasks)

    # -- the clock ----------------------------------------------------------------

    def wake_at(self) -> float:
        """When a tick next has something to decide (inf: only events will)."""
        times = [math.inf]
        if self._round is None and self._waiting():
            times.append(self._next_request_at)
        wakeups = self._wakeups
        while wakeups and self._due.get(wakeups[0][2]) != wakeups[0][0]:
            heapq.heappop(wakeups)  # stale
        if wakeups:
            times.append(wakeups[0][0])
        return min(times)

    def _due_at(self, task: Task) -> float:
        """When `task` next has something to decide by the clock alone (inf:
        only an event can change it)."""
        if task.settling:
            return math.inf
        if task.quorum_at is not None:
            # Settled when its grace ends, or when its AddReplica or its
            # withdrawals are answered (events); its deadline, replicas
            # wanted and speculation no longer apply, and a time already
            # past would make the engine's loop spin.
            if not task.add_in_flight and not any(r.withdrawing for r in task.live()):
                return task.quorum_at + self._grace(task)
            return math.inf
        times = [task.deadline]
        if task.replicas_wanted and not task.add_in_flight:
            times.append(task.next_add_at)
        after = self.speculate_after()
        times.extend(r.assigned_at + after for r in task.live() if not r.speculated)
        return min(times)

    def speculate_after(self) -> float:
        """max(5 s, 3 x the median task time so far; 5 s before the first)."""
        if not self._task_seconds:
            return SPECULATE_AFTER_SECONDS
        count, after = self._speculate_cache
        if count != len(self._task_seconds):  # a median per call cost a job's loop 15 %
            median = self._task_seconds.median()
            after = max(SPECULATE_AFTER_SECONDS, SPECULATE_MEDIAN_FACTOR * median)
            if after != self._speculate_cache[1]:  # every replica's time moved
                self._touched.update(self._tasks)
            self._speculate_cache = (len(self._task_seconds), after)
        return after

    def tick(self, now: float) -> list:
        commands: list = []
        if self._failed:
            self._date(self._touched)  # settling now: nothing to wake for
            self._touched = set()
            return commands
        visits, self._touched = self._touched, set()
        wakeups = self._wakeups
        while wakeups and wakeups[0][0] <= now:
            at, _, task_id = heapq.heappop(wakeups)
            if self._due.get(task_id) == at:
                visits.add(task_id)
        tasks = [self._tasks[task_id] for task_id in visits if task_id in self._tasks]
        for task in sorted(tasks, key=attrgetter("order")):  # the same commands, in the same order
            self._speculate(task, now, commands)
            self._ask_replicas(task, now, commands)
            self._decide(task, now, commands)
        self.speculate_after()  # a settle moved the median: every task is touched
        self._date(visits | self._touched)  # after every visit: one may touch another task
        self._maybe_request(now, commands)
        return self._checked(commands)

    def _date(self, task_ids: set[str]) -> None:
        for task_id in task_ids:
            task = self._tasks.get(task_id)
            if task is None:
                self._due.pop(task_id, None)
                continue
            at = self._due_at(task)
            if self._due.get(task_id) != at:
                self._due[task_id] = at
                if at < math.inf:
                    heapq.heappush(self._wakeups, (at, task.order, task_id))

    def _want(self, task: Task, replicas: int = 1) -> None:
        task.replicas_wanted += replicas
        self._wanting.add(task.task_id)

    # -- events -------------------------------------------------------------------

    def handle_all(self, events: list, now: float) -> list:
        """Every event of a batch, then one tick."""
        commands: list = []
        for event in events:
            commands += self.handle(event, now)
        return commands + self.tick(now)

    def handle(self, event: Event, now: float) -> list:
        """One event's immediate commands (decisions that depend on time
        come from `tick`, which `handle_all` runs after a batch)."""
        commands: list = []
        task_id = getattr(event, "task_id", None)
        if task_id is not None:
            self._touched.add(task_id)
        if self._failed:
            if isinstance(event, Granted):
                self._keep_for_refund(event)
            return commands
        match event:
            case Granted():
                self._granted(event, now, commands)
            case RequestFailed():
                if self._round is not None:  # the job fails; its other requests may answer
                    self._round.requests.pop(event.request_id, None)
                commands.append(Fail(event.error))
            case AssignAnswered():
                self._assign_answered(event, now, commands)
            case WorkerLost():
                self._worker_lost(event, now)
            case ResultArrived():
                self._result(event, now)
            case ReplicaAdded():
                self._replica_added(event, now, commands)
            case ReplicaFailed():
                self._replica_failed(event, now)
            case Settled():
                self._settled(event, commands)
            case SettleFailed():
                self._settle_failed(event, commands)
            case Withdrawn():
                self._withdrawn(event)
        return self._checked(commands)

    def _checked(self, commands: list) -> list:
        if any(isinstance(c, Fail) for c in commands):
            self._failed = True
        return commands

    # -- requesting tasks ------------------------------------------------------------

    def _maybe_request(self, now: float, commands: list) -> None:
        if self._round is not None or now < self._next_request_at or not self._waiting():
            return
        fresh, suspect = self._pending, self._suspected
        use_suspect = bool(suspect) and (not fresh or self._suspects_turn)
        self._suspects_turn = not use_suspect
        relax_after = self._relax_after()
        if use_suspect:
            chunk = suspect[0]
            chunks = [chunk]
            since = self._relaxed_at.get(id(chunk))
            if since is not None and now - since > relax_after:
                chunk.suspects.clear()  # nobody else came: an honest majority still outvotes
                self._pending.append(self._suspected.popleft())  # a fresh chunk now
                self._relaxed_at.pop(id(chunk), None)
                exclude = frozenset()
            else:
                exclude = frozenset(chunk.suspects | self.cheaters)
        else:
            chunks = list(itertools.islice(fresh, self.config.batch))
            # Unreachable workers are left out while that leaves anyone to
            # ask: a request it leaves empty goes again at once without them
            # (waiting the 5 s relax time took a job with 2 of 4 workers
            # dead from 2.8 s to 8.4 s); a task they are in replaces them.
            exclude = frozenset(self.cheaters)
            if not self._without_unreachable:
                exclude |= self._unreachable_now(now)
            self._without_unreachable = False
            if self._relax_fresh:
                # The last request with these exclusions starved for long:
                # this one goes without them (an honest majority still
                # outvotes a cheater); the next one tries them again.
                self._relax_fresh = False
                exclude = frozenset()
        runs = [chunks]
        if not use_suspect:
            if self._per_request:
                per = min(self._per_request, self.config.batch)
                chunks = list(itertools.islice(fresh, per * PARALLEL_REQUESTS))
            else:
                per = max(FIRST_ROUND_PER_REQUEST, -(-len(chunks) // PARALLEL_REQUESTS))
            runs = [chunks[i : i + per] for i in range(0, len(chunks), per)]
        self._round = _Round({}, exclude, chunks)
        for run in runs:
            request_id = self._new_request_id()
            self._round.requests[request_id] = run
            commands.append(RequestTasks(request_id, len(run), exclude))

    def _relax_after(self) -> float:
        """How long exclusions may leave requests empty before they go."""
        return min(5.0, max(1.0, 0.05 * self.config.task_timeout))

    def _unreachable_now(self, now: float) -> set[str]:
        for worker_id in [w for w, until in self._unreachable.items() if until <= now]:
            del self._unreachable[worker_id]
        return set(self._unreachable)

    def _keep_for_refund(self, event: Granted) -> None:
        """A request of the round answered after the job failed (another
        request of it failed, in the same batch of events): its tasks are
        settled invalid by `stop`, so no credit waits for their lease."""
        if self._round is not None and self._round.requests.pop(event.request_id, None):
            self._unused_grants += [task_id for task_id, _ in event.tasks]

    def _granted(self, event: Granted, now: float, commands: list) -> None:
        """Each answer's tasks are assigned at once; the round is paced
        when its last request is answered."""
        round_ = self._round
        if round_ is None or event.request_id not in round_.requests:
            return
        chunks = round_.requests.pop(event.request_id)
        if event.live_workers:
            self._live_pool = event.live_workers
        made = list(zip(chunks, event.tasks, strict=False))
        for chunk, (task_id, workers) in made:
            if self._pending and self._pending[0] is chunk:  # a round takes from the front
                self._pending.popleft()
            elif self._suspected and self._suspected[0] is chunk:
                self._suspected.popleft()
            else:
                self._pending.remove(chunk)
            self._relaxed_at.pop(id(chunk), None)
            task = Task(
                task_id=task_id,
                chunk=chunk,
                replicas={},
                started=now,
                deadline=now + self.config.task_timeout,
                order=next(self._made),
            )
            self._tasks[task_id] = task
            self._touched.add(task_id)
            self.stats.states["assigned"] += 1
            self.stats.credits_spent += len(workers)  # escrowed; refunds come back below
            for worker_id, address in workers.items():
                self._assign(task, worker_id, address, now, commands)
        round_.made += made
        if len(made) < len(chunks):
            round_.short = event
            round_.most_made = max(round_.most_made, len(made))
        if round_.requests:
            return
        self._round = None
        if round_.short is not None and round_.most_made:
            self._per_request = max(self._per_request, round_.most_made)
        self._pace(now, round_.made, round_.asked, round_.exclude, round_.short, commands)

    def _pace(self, now, made, chunks, exclude, short: Granted | None, commands) -> None:
        """After a round: when to ask next. `short`: its last answer that
        made fewer tasks than asked."""
        if made:
            self._starved_since, self._empty_requests = None, 0
            if exclude and not chunks[0].suspects:
                self._fresh_starved_since = None
            # Filled in part: cut short by the free slots, or by the slots
            # one request may take of a worker (docs/protocol.md section
            # 10), which the next request may find again: ask at once (an
            # empty answer backs off below). Filled whole with chunks left
            # beyond the batch: ask when a settle of ours frees a slot, or
            # after a while for slots freed by others and workers joining.
            if not self._waiting() or len(made) < len(chunks):
                self._next_request_at = now
            else:
                self._next_request_at = now + BUSY_POLL_SECONDS
        else:
            self._empty_requests += 1
            delay = min(1.0, 0.025 * 2**self._empty_requests)
            if self._tasks:
                delay = min(delay, BUSY_POLL_SECONDS)
            self._next_request_at = now + delay
            self._starved_since = self._starved_since or now
            if chunks[0].suspects:
                self._relaxed_at.setdefault(id(chunks[0]), now)
            elif exclude - self.cheaters:
                self._without_unreachable = True  # at once, without them
                self._next_request_at = now
            elif exclude:
                self._fresh_starved_since = self._fresh_starved_since or now
                if now - self._fresh_starved_since > self._relax_after():
                    self._relax_fresh = True
                    self._next_request_at = now
        self._check_starved(now, short, commands)

    def _check_starved(self, now: float, short: Granted | None, commands: list) -> None:
        """`short`: the answer of a request that made fewer tasks than asked."""
        if self._starved_since is None:
            return
        waited = now - self._starved_since
        label = (self._pending or self._suspected)[0].label if self._waiting() else ""
        live = short.live_workers if short else None
        spots = short.live_networks if short else 0
        if live is not None and (live < self.replication or 0 < spots < self.replication):
            if waited > NOT_ENOUGH_WORKERS_SECONDS:
                commands.append(
                    Fail(
                        NotEnoughWorkers(
                            live,
                            self.replication,
                            chunk=label,
                            unreachable=self.unreachable_seen,
                            # The addresses (networks) fall short, not the workers.
                            spots=spots if live >= self.replication else None,
                            diversity=short.diversity,
                        )
                    )
                )
        elif not self._tasks and waited > self.config.task_timeout:
            commands.append(
                Fail(
                    JobFailed(
                        f"no workers available for {label} for {self.config.task_timeout:g} s"
                        f" (a task needs {self.replication} distinct live workers with a free"
                        " slot, other than this foreman)",
                        chunk=label,
                        unreachable=self.unreachable_seen,
                    )
                )
            )

    # -- assigning --------------------------------------------------------------------

    def _assign(self, task: Task, worker_id: str, address: str, now: float, commands) -> None:
        holders = self._holders.setdefault(self._digest, set())
        replica = Replica(worker_id, address, self._new_token(), assigned_at=now)
        replica.payload_sent = worker_id not in holders
        task.replicas[worker_id] = replica
        commands.append(
            Assign(
                task.task_id, task.chunk, worker_id, address, replica.token, replica.payload_sent
            )
        )

    def _assign_answered(self, event: AssignAnswered, now: float, commands: list) -> None:
        task = self._tasks.get(event.task_id)
        replica = task.replicas.get(event.worker_id) if task else None
        if replica is None or replica.state != ASSIGNING:
            return
        if event.code == "UNAVAILABLE":
            self._unreachable[event.worker_id] = now + UNREACHABLE_EXCLUDED_SECONDS
            self.unreachable_seen[replica.address] = _short(event.detail) or "UNAVAILABLE"
        if event.code == "OK":
            replica.state = RUNNING
            self._holders.setdefault(self._digest, set()).add(event.worker_id)
        elif event.code == "FAILED_PRECONDITION" and not replica.payload_sent:
            replica.payload_sent = True  # it no longer holds the function: send it
            commands.append(
                Assign(
                    task.task_id,
                    task.chunk,
                    replica.worker_id,
                    replica.address,
                    replica.token,
                    True,
                )
            )
        elif event.code in NEVER_STARTED:
            # Momentarily full, or unreachable: never started. Released
            # and replaced; the chunk spends no attempt on it.
            replica.state = RELEASED
            task.to_release.add(replica.worker_id)
            self._want(task)
            self.stats.replicas_released += 1
        elif event.code == "DEADLINE_EXCEEDED":
            # Frozen, or held up by a frozen discovery service, perhaps with
            # the task taken: it stays until the speculative replica rule
            # replaces it, and then it is let go.
            replica.state = RUNNING
            replica.assign_timed_out = True
            if replica.speculated:
                self._let_go_straggler(task, replica, commands)
        else:
            replica.state = FAILED

    def _worker_lost(self, event: WorkerLost, now: float) -> None:
        """A worker found gone: left out of requests for a while, and its
        replicas not yet answered released, and replaced where the task
        has no quorum yet, as if they had never started (the chunk spends
        no attempt on them)."""
        self._unreachable[event.worker_id] = now + UNREACHABLE_EXCLUDED_SECONDS
        for task in self._tasks.values():
            replica = task.replicas.get(event.worker_id)
            if task.settling or replica is None or replica.state not in (ASSIGNING, RUNNING):
                continue
            replica.state = RELEASED
            task.to_release.add(replica.worker_id)
            if task.quorum_at is None:
                self._want(task)
            self._touched.add(task.task_id)
            self.stats.replicas_released += 1

    # -- replicas ------------------------------------------------------------------

    def _speculate(self, task: Task, now: float, commands: list) -> None:
        if task.settling or task.quorum_at is not None:
            return
        after = self.speculate_after()
        for replica in task.live():
            if not replica.speculated and now >= replica.assigned_at + after:
                replica.speculated = True
                self._want(task)
                self.stats.speculative_replicas += 1
                if replica.assign_timed_out:
                    self._let_go_straggler(task, replica, commands)

    def _let_go_straggler(self, task: Task, replica: Replica, commands: list) -> None:
        """A replica whose AssignTask timed out and that a speculative one
        replaces: released with the next AddReplica, so its worker's slot
        is not held by a task it may never have taken (in a small pool
        those slots can be all there are)."""
        replica.state = RELEASED
        task.to_release.add(replica.worker_id)
        commands.append(Cancel(task.task_id, replica.worker_id, replica.address, replica.token))
        self.stats.replicas_cancelled += 1

    def _ask_replicas(self, task: Task, now: float, commands: list) -> None:
        if task.settling or task.add_in_flight or not task.replicas_wanted:
            return
        if task.quorum_at is not None or now < task.next_add_at:
            return
        task.add_in_flight = True
        release, task.to_release = frozenset(task.to_release), set()
        for worker_id in release:
            task.replicas[worker_id].released_at_discovery = True
            self.stats.credits_spent -= 1
        commands.append(
            AddReplica(
                task.task_id,
                self._new_request_id(),
                exclude=self._replica_exclusions(task, now),
                release=release,
                count_live=self._count_pool(now),
            )
        )

    def _count_pool(self, now: float) -> bool:
        """Whether this AddReplica asks for the pool's count, if it finds
        nobody: once every POOL_COUNT_SECONDS at most, as the discovery
        service reads up to 1024 workers for it."""
        if now - self._pool_counted_at < POOL_COUNT_SECONDS:
            return False
        self._pool_counted_at = now
        return True

    def _replica_exclusions(self, task: Task, now: float) -> frozenset[str]:
        """Never a worker that refused this task, nor one that cannot be
        reached just now (the discovery service skips the task's own
        workers, those released with the call included). Nor one this task
        let go before: released at the discovery service it is no longer
        the task's, so it could be drawn again, and a worker runs a task id
        at most once."""
        return frozenset(
            self.cheaters
            | task.chunk.suspects
            | {r.worker_id for r in task.replicas.values() if r.state in (FAILED, RELEASED)}
            | self._unreachable_now(now)
        )

    def _pool_spent(self, task: Task, now: float) -> bool:
        """Every live worker of the pool (as the last short answer counted
        them) is the task's or one it may not draw: no AddReplica can find
        it one, however long it waits. Its let-go stragglers stay excluded
        (a worker runs a task id at most once), so the chunk goes again as
        a new task, which any of them may take (measured: a 20 s Redis
        freeze let every worker of a 4-worker pool go from some map tasks,
        which then asked for a replica twice a second until the task
        timeout, 120 s, in 1 run of that chaos test in 5). Workers found gone
        lately are not counted against the pool: likely dead, they are not
        in its count either."""
        if not self._live_pool:
            return False
        # Its own workers (those released and failed among them) and the
        # others its AddReplica excludes, the unreachable ones left out.
        barred = set(task.replicas) | self.cheaters | task.chunk.suspects
        return len(barred - self._unreachable_now(now)) >= self._live_pool

    def _replica_added(self, event: ReplicaAdded, now: float, commands: list) -> None:
        task = self._tasks.get(event.task_id)
        if task is None:
            return
        task.add_in_flight = False
        if event.worker is None:
            self._live_pool = event.live_workers or self._live_pool
            if self._pool_spent(task, now):
                task.replicas_wanted = 0  # none is coming: decide with what there is
                task.pool_spent = True
            task.next_add_at = now + REPLICA_RETRY_SECONDS  # none free yet
            return
        worker_id, address = event.worker
        task.replicas_wanted = max(0, task.replicas_wanted - 1)
        self.stats.credits_spent += 1
        self.stats.replicas_added += 1
        old = task.replicas.get(worker_id)
        if old is not None and old.released_at_discovery and not task.settling:
            # Drawn again after this task released it (its exclusions say
            # not to; a discovery service that ignores them): the task's
            # worker again there, it is named released at the settle, never
            # left to the late window, and another replica is asked for.
            old.released_at_discovery = False
            self._want(task)
            return
        if task.settling or old is not None:
            return  # settled meanwhile (not possible in order) or a repeat
        self._assign(task, worker_id, address, now, commands)

    def _replica_failed(self, event: ReplicaFailed, now: float) -> None:
        task = self._tasks.get(event.task_id)
        if task is None:
            return
        task.add_in_flight = False
        if isinstance(event.error, InsufficientCredits | UnknownTask):
            task.replicas_wanted = 0  # no replica is coming: decide with what there is
        else:
            task.next_add_at = now + REPLICA_RETRY_SECONDS

    # -- results and decisions ---------------------------------------------------------

    def _result(self, event: ResultArrived, now: float) -> None:
        task = self._tasks.get(event.task_id)
        replica = task.replicas.get(event.worker_id) if task else None
        if replica is None or replica.state not in (ASSIGNING, RUNNING) or task.settling:
            return
        replica.state = ANSWERED
        replica.result = event.ciphertext
        replica.answered_in = now - replica.assigned_at

    def _grace(self, task: Task) -> float:
        """As long again as the quorum took, for replicas at work; a replica
        that has not even answered its AssignTask by then (frozen, or slow
        to start) gets none: a grace for it would add to the time of every
        task a frozen worker is in (bench/fault_bench.py: 1.7 x the job
        time without one, 2.2 x with grace_min, 2.4 x with the full grace)."""
        config = self.config
        if not any(r.state == RUNNING for r in task.replicas.values()):
            return 0.0
        took = (task.quorum_at or task.started) - task.started
        return min(config.grace_max, max(config.grace_min, config.grace_fraction * took))

    def _decide(self, task: Task, now: float, commands: list) -> None:
        if task.settling:
            return
        votes = task.votes()
        winner, count = votes.most_common(1)[0] if votes else (None, 0)
        live = task.live()
        if count >= self.quorum:
            if task.quorum_at is None:
                task.quorum_at = now
                self._withdraw_unstarted(task, commands)
            if any(r.withdrawing for r in live):
                return  # a replica dropped unstarted is released, never left late
            if live and now < task.quorum_at + self._grace(task):
                return
            if task.add_in_flight:
                return  # its worker joins the task first; then it is released too
            self._settle_valid(task, winner, commands)
            return
        if now >= task.deadline:
            self._settle_invalid(task, "deadline passed", commands)
        elif count + len(live) + task.replicas_wanted < self.quorum and not task.add_in_flight:
            missing = self._short_of_full(task)
            if missing:
                self._escalate(task, missing, now, commands)
            else:
                self._settle_invalid(
                    task,
                    "no worker left that it may take" if task.pool_spent else "no quorum possible",
                    commands,
                )

    def _withdraw_unstarted(self, task: Task, commands: list) -> None:
        """At the quorum, the replicas a valid settle would leave late are
        asked to drop the task if they have not started it: with workers
        holding queues, the last replica of a task is often still queued,
        and run it would spend a volunteer's CPU and the foreman's credit
        on a result nobody compares (docs/protocol.md section 10)."""
        for replica in task.live():
            if self._may_answer_late(replica):
                replica.withdrawing = True
                commands.append(
                    Withdraw(task.task_id, replica.worker_id, replica.address, replica.token)
                )

    def _withdrawn(self, event: Withdrawn) -> None:
        task = self._tasks.get(event.task_id)
        replica = task.replicas.get(event.worker_id) if task else None
        if replica is None or not replica.withdrawing:
            return
        replica.withdrawing = False
        if event.dropped and replica.state == RUNNING and not task.settling:
            replica.state = RELEASED  # released by the settle: slot and credit back
            self.stats.replicas_withdrawn += 1

    def _short_of_full(self, task: Task) -> int:
        """Adaptive replication: the workers a task that has not escalated
        yet lacks for the full replication (replacements and speculative
        replicas count)."""
        if not self.adaptive or task.escalated:
            return 0
        held = sum(1 for r in task.replicas.values() if r.state != RELEASED)
        return max(0, self.replication - held)

    def _escalate(self, task: Task, missing: int, now: float, commands: list) -> None:
        """Adaptive replication: the task's workers disagree (or one refused):
        the rest of the full replication is asked for, at once and once."""
        self._want(task, missing)
        task.escalated = True
        task.next_add_at = now
        self.stats.adaptive_escalations += 1
        self._ask_replicas(task, now, commands)

    def _let_go(self, task: Task, commands: list, *, keep_working: bool = False) -> frozenset[str]:
        """Cancel the replicas still working; all of them, and those released
        before that the discovery service still counts, are released. With
        `keep_working` (a valid settle), replicas that took the task and
        answer are left to finish: late, they are paid if they commit the
        quorum's result in time (an honest slow worker is never punished)."""
        released = set()
        for replica in task.replicas.values():
            if keep_working and self._may_answer_late(replica):
                continue
            if replica.state in (ASSIGNING, RUNNING):
                commands.append(
                    Cancel(task.task_id, replica.worker_id, replica.address, replica.token)
                )
                replica.state = RELEASED
                self.stats.replicas_cancelled += 1
            if replica.state == RELEASED and not replica.released_at_discovery:
                released.add(replica.worker_id)
        return frozenset(released)

    def _may_answer_late(self, replica: Replica) -> bool:
        """A replica a valid settle leaves at work: it took the task, and
        its worker was not found gone since (a worker killed with tasks
        queued would otherwise hold their credits for the late window)."""
        return (
            replica.state == RUNNING
            and not replica.assign_timed_out
            and replica.worker_id not in self._unreachable
        )

    def _record_verdict(self, task: Task, winner: str | None) -> None:
        """Which replicas agreed with the quorum, disagreed (all that
        answered, when there was none), were late (took the task, no result
        yet) or silent (never took it, or froze): docs/protocol.md section
        10. Replicas that never started (full, unreachable) and were
        replaced are in none of them."""
        verdict: dict[str, list[str]] = {kind: [] for kind in VERDICTS}
        for replica in task.replicas.values():
            if replica.state == ANSWERED:
                kind = "agreed" if winner is not None and replica.result == winner else "disagreed"
            elif self._may_answer_late(replica):
                kind = "late"
            elif replica.state in (ASSIGNING, FAILED, RUNNING) or replica.assign_timed_out:
                kind = "silent"
            else:
                continue
            verdict[kind].append(replica.worker_id)
        self.stats.verdicts[task.task_id] = verdict

    def _settle_valid(self, task: Task, winner: str, commands: list) -> None:
        self._record_verdict(task, winner)
        agreeing = {r.worker_id for r in task.replicas.values() if r.result == winner}
        disagreeing = frozenset(
            r.worker_id
            for r in task.replicas.values()
            if r.state == ANSWERED and r.result != winner
        )
        failed = frozenset(r.worker_id for r in task.replicas.values() if r.state == FAILED)
        released = self._let_go(task, commands, keep_working=True)
        task.winner = winner
        task.settling = Settle(task.task_id, True, disagreeing | failed, released)
        commands.append(task.settling)
        for replica in task.replicas.values():
            if replica.worker_id in agreeing:
                self._task_seconds.add(replica.answered_in)
        stats = self.stats
        stats.missing_reports += len(disagreeing | failed)
        stats.credits_spent -= len(disagreeing | failed | released)
        counted = sum(1 for r in task.replicas.values() if not r.released_at_discovery)
        task.assumed_paid = counted - len(disagreeing | failed | released)
        if self.adaptive:  # against full replication: what this task did not cost
            stats.credits_saved += max(0, self.replication - (counted - len(released)))
        if disagreeing:
            task.accused = disagreeing - self.cheaters
            stats.cheaters |= disagreeing
            self.cheaters |= disagreeing

    def _settle_invalid(self, task: Task, reason: str, commands: list) -> None:
        self._record_verdict(task, None)
        self._let_go(task, commands)
        task.settling = Settle(task.task_id, False)
        commands.append(task.settling)
        kept = [r for r in task.replicas.values() if not r.released_at_discovery]
        self.stats.credits_spent -= len(kept)
        self.stats.tasks_invalid += 1
        self.stats.states["invalid"] += 1
        self._retry(task, reason, commands)

    def _retry(self, task: Task, reason: str, commands: list) -> None:
        chunk = task.chunk
        chunk.attempts += 1
        if chunk.attempts >= self.config.max_attempts:
            commands.append(
                Fail(
                    JobFailed(
                        f"no quorum for {chunk.label} after {chunk.attempts} attempts"
                        f" (last: {reason})",
                        chunk=chunk.label,
                        unreachable=self.unreachable_seen,
                    )
                )
            )
            return
        # A replica whose AssignTask timed out sent nothing to judge: frozen,
        # or held up by the discovery service, like one found unreachable.
        chunk.suspects |= {
            r.worker_id
            for r in task.replicas.values()
            if r.state in (ANSWERED, FAILED) or (r.speculated and not r.assign_timed_out)
        }
        self.stats.retries += 1
        self.stats.retry_reasons[reason] += 1
        (self._suspected if chunk.suspects else self._pending).append(chunk)

    def _settled(self, event: Settled, commands: list) -> None:
        task = self._tasks.pop(event.task_id, None)
        if task is None or task.settling is None:
            return
        self._next_request_at = 0.0  # its workers' slots are free: ask at once
        for task_id in list(self._wanting):
            waiting = self._tasks.get(task_id)
            if waiting is None or not waiting.replicas_wanted:
                self._wanting.discard(task_id)
                continue
            waiting.next_add_at = 0.0  # and for the replicas that found none free
            self._touched.add(task_id)
        if not task.settling.valid:
            return
        if event.paid is not None:  # commitments, not this foreman's lists, decided
            # Late workers' credits stay in escrow for them: spent unless
            # they never commit (then refunded to the account).
            self.stats.credits_spent += len(event.paid | event.late) - task.assumed_paid
        # Who sent the agreed result without having committed to it at the
        # discovery service lied to one side (docs/protocol.md section 10).
        sent = {r.worker_id for r in task.replicas.values() if r.result == task.winner}
        committed_to_it = event.quorum_sha256 == ciphertext_sha256(task.winner)
        liars = sent - event.agreeing if committed_to_it else sent & event.agreeing
        self.cheaters |= liars
        self.stats.cheaters |= liars
        if not committed_to_it:
            # Not what a quorum of the task's workers committed to.
            reason = (
                "the agreed result is not the one its workers committed to"
                if event.quorum_sha256
                else "no quorum of its workers committed to the agreed result"
            )
            self._retry(task, reason, commands)
            return
        try:
            output = open_output(task.chunk.phase, task.winner, event.key or b"")
        except (DecryptionError, EncodingError):
            # The agreeing workers sent the same garbage: they were paid, but
            # their result is useless; run the chunk again without them.
            # Those who disagreed with them were right: no longer suspects.
            self._overturn(task, cheaters=sent)
            self._retry(
                task,
                "the agreed result does not decrypt, decode or have an output's shape",
                commands,
            )
            return
        if isinstance(output, dict) and is_error_document(output):
            error = output["error"]
            commands.append(
                Fail(
                    RemoteError(
                        error["type"],
                        error["message"],
                        error["traceback"],
                        chunk=task.chunk.label,
                        output=str(error.get("output", "")),
                    )
                )
            )
            return
        self.stats.tasks_validated += 1
        self.stats.states["validated"] += 1
        if isinstance(output, FlatRows):
            commands.append(Deliver(task.chunk, output.text, rows=output))
        else:
            commands.append(Deliver(task.chunk, output))

    def _settle_failed(self, event: SettleFailed, commands: list) -> None:
        task = self._tasks.pop(event.task_id, None)
        if task is None or task.settling is None:
            return
        if isinstance(event.error, UnknownTask) and not task.settling.valid:
            return  # expired meanwhile: the discovery service refunded it already
        if isinstance(event.error, NoCommittedQuorum) and task.settling.valid:
            self._uncommitted_quorum(task, commands)
            return
        commands.append(
            Fail(
                JobFailed(
                    f"could not settle the task of {task.chunk.label}: {event.error}",
                    chunk=task.chunk.label,
                )
            )
        )

    def _uncommitted_quorum(self, task: Task, commands: list) -> None:
        """The agreeing results were never committed to at the discovery
        service (their senders skipped CommitResult, or committed another):
        no key. Settled invalid instead (everyone refunded), and run again
        without the workers that answered; those it accused of disagreeing
        with an uncommitted result are cleared."""
        self._tasks[task.task_id] = task
        self._overturn(task)
        task.settling = Settle(task.task_id, False)
        commands.append(task.settling)
        self.stats.credits_spent -= task.assumed_paid
        self.stats.tasks_invalid += 1
        self.stats.states["invalid"] += 1
        self._retry(task, "no quorum of its workers committed to the agreed result", commands)

    def _overturn(self, task: Task, *, cheaters: frozenset[str] | set[str] = frozenset()) -> None:
        """The quorum a settle stood on does not stand: in the verdict its
        agreeing replicas move to disagreed, those it accused of disagreeing
        are cleared, and `cheaters` (its agreeing workers, when what they
        agreed on is no result) are made cheaters."""
        verdict = self.stats.verdicts.get(task.task_id)
        if verdict is not None:
            verdict["disagreed"] += verdict["agreed"]
            verdict["agreed"] = []
        self.cheaters = (self.cheaters - task.accused) | cheaters
        self.stats.cheaters = (self.stats.cheaters - task.accused) | cheaters
        task.accused = frozenset()

    # -- stopping ---------------------------------------------------------------------

    def stop(self) -> list:
        """The job ends early (failed, Ctrl-C, SIGTERM): settle every open
        task (valid where a quorum already arrived, so those who did the
        work are paid; else invalid) and cancel every replica in flight."""
        self._failed = True
        commands: list = []
        for task in list(self._tasks.values()):
            if task.settling:
                continue
            votes = task.votes()
            winner, count = votes.most_common(1)[0] if votes else (None, 0)
            if count >= self.quorum and not task.add_in_flight:
                self._settle_valid(task, winner, commands)
            else:
                self._let_go(task, commands)
                task.settling = Settle(task.task_id, False)
                commands.append(task.settling)
                # Refunded, as by any invalid settle (those released at
                # discovery were refunded then).
                kept = [r for r in task.replicas.values() if not r.released_at_discovery]
                self.stats.credits_spent -= len(kept)
        commands += [Settle(task_id, False) for task_id in self._unused_grants]
        self._unused_grants = []
        self._pending.clear()
        self._suspected.clear()
        self._due.clear()  # every task settling: only events are awaited
        self._wakeups.clear()
        self._wanting.clear()
        return commands
