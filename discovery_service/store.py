"""The storage interface of the ledger, and the records it deals in.

A store does the credit-changing operations atomically: each method is one
transaction, so concurrent calls (threads, processes, or front-ends sharing
one Redis) can never overdraw an account, pay a task twice, or both refund
and pay it. Validation, id and key generation and the choice of workers stay
in `ledger.py`, so every store shares them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ec262 import replication as replicas
from ec262.errors import (
    InsufficientCredits,
    InvalidRequest,
    NoCommittedQuorum,
    SettleConflict,
    TooManyNewClients,
)


@dataclass(frozen=True, slots=True)
class ClientRecord:
    client_id: str
    credits: int
    address: str = ""
    expiry_unix: float = 0.0
    slots: int = 0
    busy_slots: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    runtime: str = ""
    tls_certificate: str = ""  # PEM, "" for a plaintext (loopback) worker
    trust: int = 0  # matching commitments in a row


@dataclass(frozen=True, slots=True)
class NewClientLimit:
    """At most `limit` new identities per `window` seconds from `network`."""

    network: str
    limit: int
    window: float

    def refused(self, oldest: float, now: float) -> TooManyNewClients:
        wait = max(1, int(oldest + self.window - now) + 1)
        return TooManyNewClients(
            f"{self.network} has made {self.limit} new identities in the last"
            f" {self.window / 3600:g} h, the most allowed; try again in {wait} s"
            " (or reuse an identity: one per person is enough)"
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live worker with at least one free slot. `network` is the /24
    (/48) of its address, resolved at registration (the host itself when it
    does not resolve)."""

    client_id: str
    address: str
    free_slots: int
    network: str = ""
    trusted: bool = False  # matching commitments in a row >= --trusted-after

    def spread_key(self, spread: str) -> str:
        """What two replicas of one task may not share (docs/protocol.md
        section 10): the network, or (`--diversity identity`) the address."""
        return (self.network or self.address) if spread == NETWORK else self.address


IDENTITY, NETWORK = "identity", "network"  # the --diversity modes
# Slots of one worker one RequestTasks may take: a worker claiming 1024
# slots must not take a whole batch (docs/protocol.md section 10).
MAX_SLOTS_PER_REQUEST = 16
# A task holds at most this many times its replication in workers at once
# (replacements and speculative replicas beside the ones it has).
MAX_WORKERS_PER_REPLICA = 2
# live_workers counts up to this many: a bigger pool answers this. It is
# read for a RequestTasks made short and a counting AddReplica, where a full
# count was a scan of the pool (10,000 workers: 18 ms on SQLite, 375 ms on
# Redis per call); what it decides (fewer than the replication, or every
# one of them barred from a task) never needs more.
LIVE_COUNT_CAP = 1024


@dataclass(frozen=True, slots=True)
class GroupRule:
    """How one task's workers are drawn: `size` of them, at most `cap`
    untrusted (None: no limit), and with `untrusted_first` the first among
    the untrusted ones when any is eligible (a spot check, so untrusted
    workers can earn trust beside trusted ones)."""

    size: int
    cap: int | None = None
    untrusted_first: bool = False


def untrusted_cap(replication: int, trusted_live: int) -> int | None:
    """How many untrusted workers one task may hold: replication - quorum
    while at least a quorum of trusted workers is live, else no limit
    (docs/protocol.md section 10)."""
    quorum = replicas.quorum(replication)
    return replication - quorum if trusted_live >= quorum else None


def trusted_enough(replication: int) -> int:
    """How many usable trusted workers a store need count for the trust rule
    of a task of this (full) replication: every rule only compares the count
    with a quorum of it or with adaptive replication's start
    (untrusted_cap, adaptive_rules, replica_cap), so counting stops here
    and a pool of thousands of trusted workers costs a few reads."""
    return max(replicas.quorum(replication), replicas.ADAPTIVE_START)


def task_replication(stored: int, service: int) -> tuple[int, bool]:
    """(full replication, adaptive) of a task from what the store kept
    (replicas.ADAPTIVE for an adaptive task; 0 for one made before tasks
    kept theirs: the service's)."""
    if stored == replicas.ADAPTIVE:
        return replicas.ADAPTIVE_FULL, True
    return stored or service, False


def replica_cap(full: int, adaptive: bool, trusted_live: int, untrusted_taken: int) -> int | None:
    """The untrusted workers a task may hold once AddReplica adds one: an
    adaptive task gets only trusted ones while 2 are live (its third
    decides between two trusted workers that disagree), any other task the
    trust rule's cap (untrusted_cap)."""
    if adaptive and trusted_live >= replicas.ADAPTIVE_START:
        return untrusted_taken
    return untrusted_cap(full, trusted_live)


def adaptive_rules(spot_checks: Sequence[bool], trusted_live: int) -> list[GroupRule]:
    """Adaptive replication's draw per task: 2 trusted workers, or on a spot
    check 3 with an untrusted one first; with fewer than 2 trusted workers
    live, full replication under the usual trust rule (docs/protocol.md
    section 10). The Redis store's assignment script does the same."""
    full, start = replicas.ADAPTIVE_FULL, replicas.ADAPTIVE_START
    if trusted_live < start:
        return [GroupRule(full, untrusted_cap(full, trusted_live))] * len(spot_checks)
    spot = GroupRule(full, full - replicas.quorum(full), untrusted_first=True)
    return [spot if checked else GroupRule(start, 0) for checked in spot_checks]


@dataclass(frozen=True, slots=True)
class WorkerRef:
    client_id: str
    address: str
    tls_certificate: str = ""  # filled in by the ledger (store.certificates)


@dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    workers: tuple[WorkerRef, ...]
    expiry_unix: float


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """What RequestTasks asks of a store, already validated."""

    foreman_id: str
    n: int
    replication: int
    exclude_workers: frozenset[str]
    runtime: str
    now: float
    task_expiry_unix: float
    request_id: str = ""  # "" when the foreman did not ask for repeat safety
    spread: str = IDENTITY  # --diversity
    trusted_after: int = 0  # --trusted-after; 0: no trust rule
    # Adaptive replication: per task, whether it is a spot check (`replication`
    # is then the full one, 3); empty: every task gets `replication` workers.
    spot_checks: tuple[bool, ...] = ()

    def rules(self, trusted_live: int) -> list[GroupRule]:
        """How each task's workers are drawn, given the trusted workers the
        request could use."""
        if self.spot_checks:
            return adaptive_rules(self.spot_checks, trusted_live)
        cap = untrusted_cap(self.replication, trusted_live) if self.trusted_after else None
        return [GroupRule(self.replication, cap)] * self.n


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """What AddReplica asks of a store, already validated: release some of
    the task's workers, then add one more (docs/protocol.md section 9)."""

    foreman_id: str
    task_id: str
    exclude_workers: frozenset[str]
    release_workers: frozenset[str]
    runtime: str
    now: float
    request_id: str = ""
    spread: str = IDENTITY  # --diversity
    trusted_after: int = 0  # --trusted-after; 0: no trust rule
    replication: int = 3  # the service's; a task made with another keeps its own

    def remembered_as(self) -> str:
        """How a repeat is recognised (kept in the `exclude` of a request)."""
        return (
            f"replica {self.task_id} {' '.join(sorted(self.exclude_workers))}"
            f" / {' '.join(sorted(self.release_workers))}"
        )


def not_assigned(task_id: str, what: str, strangers: Iterable[str]) -> InvalidRequest:
    return InvalidRequest(
        f"{what} names workers that are not assigned to task {task_id}:"
        f" {', '.join(sorted(strangers))}"
    )


def assignments_text(assignments: Sequence[Assignment]) -> str:
    """The tasks a request made, as a store remembers them for repeats:
    a line per task, `task id TAB worker ids TAB addresses` (space-separated;
    ids and addresses hold neither)."""
    return "\n".join(
        f"{a.task_id}\t{' '.join(w.client_id for w in a.workers)}"
        f"\t{' '.join(w.address for w in a.workers)}"
        for a in assignments
    )


def assignments_from_text(text: str, expiry_unix: float) -> list[Assignment]:
    made = []
    for line in text.split("\n") if text else []:
        task_id, ids, addresses = line.split("\t")
        workers = tuple(
            WorkerRef(w, a) for w, a in zip(ids.split(" "), addresses.split(" "), strict=True)
        )
        made.append(Assignment(task_id=task_id, workers=workers, expiry_unix=expiry_unix))
    return made


def request_mismatch(request: TaskRequest, n: int, exclude: str) -> InvalidRequest:
    return InvalidRequest(
        f"request_id {request.request_id!r} was used for another request (n={n},"
        f" {len(exclude.split())} excluded workers); a repeat must ask the same"
    )


@dataclass(frozen=True, slots=True)
class Settlement:
    key: bytes | None
    credits: int
    # Valid settles: what a quorum of the task's workers committed to and
    # those workers, who was paid now, and who is late: no commitment yet,
    # its credit in escrow until the late window ends (docs/protocol.md
    # section 10).
    quorum_sha256: str = ""
    agreeing: tuple[str, ...] = ()
    paid: tuple[str, ...] = ()
    late: tuple[str, ...] = ()


def settle_outcome(
    workers: Iterable[str],
    *,
    released: frozenset[str],
    commitments: dict[str, str],
    quorum_sha256: str,
) -> tuple[set[str], set[str], set[str]]:
    """Who a valid settle pays, who it counts failed and who is late (the
    rest are refunded: released). Commitments decide, not the foreman's
    `missing`: a worker that committed the quorum's result is paid even
    when the foreman released it (it did the work); one that committed
    another is failed unless released; one that has not committed is late,
    paid if its commitment matches within the late window, else failed
    when the window ends (docs/protocol.md section 10). The Redis store's
    settle script follows the same rule."""
    paid, failed, late = set(), set(), set()
    for worker in workers:
        committed = commitments.get(worker, "")
        if committed == quorum_sha256:
            paid.add(worker)
        elif worker in released:
            continue
        elif committed:
            failed.add(worker)
        else:
            late.add(worker)
    return paid, failed, late


def no_committed_quorum(task_id: str, quorum: int) -> NoCommittedQuorum:
    return NoCommittedQuorum(
        f"task {task_id} cannot be settled valid: fewer than {quorum} of its workers have"
        " committed to one result (CommitResult), so the result you agree on was not"
        " committed to; settle it invalid and run it again"
    )


COMMITTED, COMMIT_CONFLICT = "committed", "conflict"


def committed_quorum(
    commitments: dict[str, str], workers: Iterable[str], quorum: int
) -> tuple[str, tuple[str, ...]]:
    """The SHA-256 at least `quorum` of `workers` committed to, and those
    workers (sorted); ("", ()) when there is none. The Redis store does the
    same in its settle script."""
    by_sha: dict[str, list[str]] = {}
    for worker in workers:
        sha = commitments.get(worker)
        if sha:
            by_sha.setdefault(sha, []).append(worker)
    for sha, agreeing in sorted(by_sha.items()):
        if len(agreeing) >= quorum:
            return sha, tuple(sorted(agreeing))
    return "", ()


def settle_conflict(task_id: str, valid: bool, missing: str) -> SettleConflict:
    """The error for a settle that contradicts the one that took effect
    (`missing` as stored: sorted ids, space-separated)."""
    how = "valid" if valid else "invalid"
    also = f" with missing {missing.replace(' ', ', ')}" if valid and missing else ""
    return SettleConflict(
        f"task {task_id} was already settled {how}{also}; a settle that contradicts it is"
        " refused (the same settle again gets the same answer)"
    )


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """For audits: credits held by clients plus those held by open tasks
    must always equal what CreateClient handed out."""

    clients: int
    client_credits: int
    escrowed_credits: int
    open_tasks: int
    starting_credits_issued: int


def insufficient_credits(
    request: TaskRequest, balance: int, needed: int | None = None
) -> InsufficientCredits:
    """The error every store raises when a request costs more than the
    balance (`needed`: what its tasks' workers cost, when not n x replication)."""
    if needed is None or needed == request.n * request.replication:
        needed = request.n * request.replication
        what = f"{request.n} task(s) x {request.replication} workers"
    else:
        what = f"{request.n} task(s), {needed} workers in all (adaptive replication)"
    message = f"not enough credits: {what} need {needed} credits, the account has {balance}"
    return InsufficientCredits(needed, balance, message)


# Chooses, from the candidates, up to n groups of `replication` distinct workers.
# choose(candidates, n, replication, spread=..., taken=...): ledger.choose_workers.
ChooseWorkers = Callable[..., list[list[Candidate]]]
# Makes a new (task_id, key) pair.
NewTask = Callable[[], tuple[str, bytes]]


class LedgerStore(abc.ABC):
    """Durable state of the discovery service. Every method is atomic."""

    @abc.abstractmethod
    def create_client(
        self,
        client_id: str,
        secret_hash: bytes,
        credits: int,
        now: float,
        origin: NewClientLimit | None = None,
    ) -> ClientRecord:
        """Make the identity; with `origin`, only while its network made
        fewer than `origin.limit` in the last `origin.window` seconds
        (TooManyNewClients otherwise, nothing made)."""

    @abc.abstractmethod
    def secret_hash(self, client_id: str) -> bytes | None:
        """The stored hash, or None for an unknown client."""

    @abc.abstractmethod
    def get_client(self, client_id: str, now: float) -> ClientRecord | None: ...

    @abc.abstractmethod
    def register_worker(
        self,
        client_id: str,
        *,
        address: str,
        slots: int,
        runtime: str,
        expiry_unix: float,
        now: float,
        tls_certificate: str = "",
        network: str = "",
    ) -> ClientRecord:
        """Join or refresh the pool; busy slots and credits are kept.
        `network`: the address's /24 (/48), for the diversity rule."""

    @abc.abstractmethod
    def certificates(self, client_ids: Iterable[str]) -> dict[str, str]:
        """The TLS certificate each worker last registered (absent: none)."""

    @abc.abstractmethod
    def commit_result(self, worker_id: str, task_id: str, sha256: str, now: float) -> str | None:
        """Record a worker's commitment to its result for an open task it is
        assigned to, or for a settled one it is late for (within the late
        window: paid when it matches the quorum, else failed and refunded):
        COMMITTED (also for the same again), COMMIT_CONFLICT (another one
        was made), None (no such task of this worker's)."""

    @abc.abstractmethod
    def leave_pool(self, client_id: str, now: float) -> ClientRecord:
        """End the lease now; tasks already assigned keep their slots."""

    @abc.abstractmethod
    def assign_tasks(
        self, request: TaskRequest, choose: ChooseWorkers, new_task: NewTask
    ) -> tuple[list[Assignment], int]:
        """Make up to `n` tasks and charge `replication` credits for each one
        made (partial fill when workers run short). Returns the tasks and the
        foreman's balance after.

        The whole request must be affordable: with a balance below
        `n * replication` it raises InsufficientCredits and charges nothing,
        so a foreman never gets a surprise partial batch for lack of credits.
        """

    @abc.abstractmethod
    def ledger_id(self) -> str:
        """This ledger's id, made once (a random UUID) and kept with it:
        every front-end of the ledger answers the same."""

    @abc.abstractmethod
    def live_workers(
        self,
        foreman_id: str,
        runtime: str,
        now: float,
        spread: str = IDENTITY,
        cap: int = LIVE_COUNT_CAP,
    ) -> tuple[int, int]:
        """Live workers (of `runtime` unless empty) other than the foreman,
        and how many distinct spread keys (addresses, or networks) they have:
        no task can have more replicas than that. Both counted among the
        first `cap` such workers at most, so in O(cap), not O(pool)."""

    @abc.abstractmethod
    def fetch_key(self, worker_id: str, task_id: str, now: float) -> tuple[bytes, str] | None:
        """(key, foreman_id) for an open task this worker is assigned to, else None."""

    @abc.abstractmethod
    def is_late(self, worker_id: str, task_id: str, now: float) -> bool:
        """Whether a settle left this worker late for the task and its late
        window is open, with no commitment from it yet."""

    @abc.abstractmethod
    def settle_task(
        self,
        foreman_id: str,
        task_id: str,
        *,
        valid: bool,
        missing: frozenset[str],
        now: float,
        released: frozenset[str] = frozenset(),
        quorum: int = 2,
        late_until: float = 0.0,
    ) -> Settlement | None:
        """Pay or refund an open task of this foreman exactly once; None when
        there is no such task. Raises InvalidRequest, changing nothing, when
        `missing` or `released` names a worker not assigned to the task, and
        NoCommittedQuorum when a valid settle finds no `quorum` identical
        commitments. Released workers (valid settles only) are neither paid
        nor counted failed; their credit goes back and their slot is freed.
        Late workers (settle_outcome) keep their credit in escrow and their
        slot until they commit or `late_until` passes.

        A settle is remembered until the task's expiry: the owner repeating
        it (a retry after a lost reply) gets the same key and its current
        balance, and nothing moves; one that contradicts it (other
        validity or other missing workers) raises SettleConflict."""

    @abc.abstractmethod
    def add_replica(
        self, request: ReplicaRequest, choose: ChooseWorkers
    ) -> tuple[WorkerRef | None, int] | None:
        """Release `release_workers` from an open task of this foreman, then
        add one live worker with a free slot that is not already in the task,
        excluded or released, charging 1 credit into the task's escrow.
        Returns (the worker, or None when none is free; the balance after),
        or None when the foreman has no such open task. Raises
        InsufficientCredits or InvalidRequest changing nothing. A repeat of
        a request id returns the first answer and changes nothing."""

    @abc.abstractmethod
    def expire_tasks(self, now: float) -> int:
        """Refund and close every open task past its expiry, and every open
        task of a foreman whose lease ended; returns how many. Late workers
        whose window ended are counted failed and their credit refunded."""

    @abc.abstractmethod
    def renew_leases(self, expiries: Mapping[str, float]) -> None:
        """These clients called: each one's lease runs to at least its
        expiry (one write for all: the ledger gathers them between sweeps)."""

    @abc.abstractmethod
    def restart_leases(self, expiry_unix: float) -> None:
        """Every lease runs to at least `expiry_unix` (the service starts or
        resumes serving: nobody could call while it was away)."""

    @abc.abstractmethod
    def totals(self) -> LedgerTotals: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
