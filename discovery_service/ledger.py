"""The rules of the discovery service, in plain Python (no gRPC here).

`Ledger` checks every input, authenticates callers, makes ids and keys and
chooses workers; the store it is given does each credit change atomically.
The servicer turns protos into calls on this class and its exceptions into
status codes.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from discovery_service.draws import CandidateList, FreePool, draw_groups
from discovery_service.store import (
    COMMIT_CONFLICT,
    IDENTITY,
    MAX_SLOTS_PER_REQUEST,  # noqa: F401 - the choice's rule, imported from here too
    NETWORK,
    Assignment,
    Candidate,
    ClientRecord,
    GroupRule,
    LedgerStore,
    NewClientLimit,
    ReplicaRequest,
    Settlement,
    TaskRequest,
    WorkerRef,
)
from ec262 import auth
from ec262 import replication as replicas
from ec262.addresses import is_loopback, network_of, split_address
from ec262.errors import (
    AddressRefused,
    AuthenticationError,
    CommitConflict,
    InvalidRequest,
    LateTask,
    ServiceUnavailable,
    UnknownTask,
)
from ec262.ids import is_client_id, is_task_id
from ec262.tls import check_peer_certificate

logger = logging.getLogger(__name__)

KEY_BYTES = 16  # AES-128
MAX_TASKS_PER_REQUEST = 1000
MAX_LIST_LENGTH = 10_000
MAX_SLOTS = 1024
MAX_RUNTIME_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 64
MAX_VERIFIED_CREDENTIALS = 100_000
LEASE_RENEWAL_INTERVAL = 1.0  # seconds
SWEEP_INTERVAL = 0.5  # seconds between the server's sweeps of expired tasks and leases
NEW_CLIENT_WINDOW = 3600.0  # seconds: --max-new-clients is per sliding hour
DEFAULT_MAX_NEW_CLIENTS = 20  # off loopback; on loopback no limit
DEFAULT_LATE_WINDOW = 120.0  # seconds: --late-window
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUNTIME = re.compile(r"[a-z][a-z0-9_]*-[0-9]{1,4}\.[0-9]{1,4}")


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The service's policy; the CLI flags of `ec262 discovery` fill it."""

    starting_credits: int = 12
    replication: int = 3
    worker_ttl: int = 60
    task_ttl: int = 86_400
    max_worker_ttl: int = 86_400
    # A foreman silent this long loses its open tasks (refunded, slots freed).
    foreman_lease: int = 60
    # New identities per source /24 (/48) per NEW_CLIENT_WINDOW; 0: no limit.
    max_new_clients: int = 0
    # What replicas of one task may not share besides an identity and an
    # address: "network" adds the /24 (/48) (docs/protocol.md section 10).
    diversity: str = IDENTITY
    # A worker is trusted after this many matching commitments in a row;
    # while a quorum of trusted workers is live, a task holds at most
    # replication - quorum untrusted ones. 0 turns the rule off.
    trusted_after: int = 10
    # --replication adaptive: a request that names none gets adaptive
    # replication (`replication` is then 3, its full one).
    adaptive: bool = False
    # Seconds after a valid settle that a worker without a commitment yet
    # may still commit: paid if it matches the quorum, else (or silent
    # until then) counted failed (docs/protocol.md section 10).
    late_window: float = DEFAULT_LATE_WINDOW

    def __post_init__(self) -> None:
        if self.starting_credits < 0:
            raise ValueError("starting credits cannot be negative")
        if not 1 <= self.replication <= replicas.MAX_REPLICATION:
            raise ValueError(f"replication must be between 1 and {replicas.MAX_REPLICATION}")
        if self.adaptive and self.replication != replicas.ADAPTIVE_FULL:
            raise ValueError(f"adaptive replication's full replication is {replicas.ADAPTIVE_FULL}")
        if not 1 <= self.worker_ttl <= self.max_worker_ttl:
            raise ValueError(f"worker TTL must be between 1 and {self.max_worker_ttl} seconds")
        if self.task_ttl < 1:
            raise ValueError("task TTL must be at least 1 second")
        if self.diversity not in (IDENTITY, NETWORK):
            raise ValueError(f"--diversity is {IDENTITY} or {NETWORK}, not {self.diversity!r}")
        if self.trusted_after < 0:
            raise ValueError("--trusted-after cannot be negative (0 turns trust off)")
        if self.late_window < 0:
            raise ValueError("--late-window cannot be negative")
        if self.max_new_clients < 0:
            raise ValueError("--max-new-clients cannot be negative (0 means no limit)")
        if self.foreman_lease < 1:
            raise ValueError("the foreman lease must be at least 1 second")


def check_task_id(task_id: str, *, field: str = "task_id") -> str:
    if not is_task_id(task_id):
        shown = task_id if len(task_id) <= 40 else task_id[:40] + "..."
        raise InvalidRequest(f"{field} {shown!r} is not a task id (32 lowercase hex digits)")
    return task_id


def check_client_ids(ids: Iterable[str], *, field: str) -> frozenset[str]:
    ids = list(ids)
    if not ids:
        return frozenset()
    if len(ids) > MAX_LIST_LENGTH:
        raise InvalidRequest(f"{field} has {len(ids)} entries; at most {MAX_LIST_LENGTH} allowed")
    for client_id in ids:
        if is_client_id(client_id):
            continue
        shown = client_id if len(client_id) <= 40 else client_id[:40] + "..."
        raise InvalidRequest(f"{field} entry {shown!r} is not a client id (a lowercase UUID)")
    return frozenset(ids)


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidRequest(
            f"request_id must be 1 to {MAX_REQUEST_ID_LENGTH} printable characters"
        )
    return request_id


def check_runtime(runtime: str) -> str:
    if runtime and (len(runtime) > MAX_RUNTIME_LENGTH or not _RUNTIME.fullmatch(runtime)):
        shown = runtime[:MAX_RUNTIME_LENGTH]
        raise InvalidRequest(
            f"runtime {shown!r} is not of the form IMPLEMENTATION-MAJOR.MINOR, e.g. cpython-3.11"
        )
    return runtime


def choose_workers(
    candidates: Sequence[Candidate] | FreePool,
    n: int,
    replication: int,
    rng: random.Random | None = None,
    *,
    spread: str = IDENTITY,
    taken: frozenset[str] = frozenset(),
    untrusted_taken: int = 0,
    rules: Sequence[GroupRule] | None = None,
) -> list[list[Candidate]]:
    """Up to `n` groups of `replication` workers, drawn at random.

    The workers of one group never share an identity, an address or (with
    `spread="network"`) a /24 or /48, nor a spread key in `taken` (those of
    a task's other workers, for AddReplica): one operator's many identities
    can hold at most one replica of a task per network (docs/protocol.md
    section 10). A worker may serve several groups of one request, up to its
    free slots and at most MAX_SLOTS_PER_REQUEST, so one batch spreads over
    the pool. Each draw is uniform over the workers still eligible, so none
    is favoured by its lease or its place in the table. Stops at the first
    group it cannot fill: a task is never made short-handed.

    `rules` (one per group, TaskRequest.rules) replace n and replication
    when the trust rule applies or groups differ. A rule's cap (replication
    - quorum while at least a quorum of trusted workers is live) allows at
    most that many untrusted workers per group, `untrusted_taken` of them
    there already (AddReplica); the rest are drawn among trusted workers,
    or the group is not made, so a flood of new identities never forms a
    quorum. Adaptive replication's rules give 2 trusted workers, or a spot
    check's 3 with an untrusted one drawn first.

    `candidates` is a list, or a store's index of its free workers
    (draws.FreePool), drawn from by rejection without reading it whole
    (draws.draw_groups). The Redis store runs the same draws in Lua
    (`redis_store._DRAW`).
    """
    rng = rng or _worker_draws.generator()
    if rules is None:
        rules = [GroupRule(replication)] * n
    pool = CandidateList(candidates) if isinstance(candidates, Sequence) else candidates
    return draw_groups(
        pool, rules, rng, spread=spread, taken=taken, untrusted_taken=untrusted_taken
    )


class _ReseededRandom:
    """A fast generator for drawing workers, reseeded from the OS every few
    hundred requests: cheaper than SystemRandom's system call per draw (a
    twentieth of a cycle's cost), and never drawing long enough from one
    seed for an observer of assignments to model its state."""

    RESEED_EVERY = 256

    def __init__(self) -> None:
        self._rng = random.Random(os.urandom(32))
        self._uses = 0

    def generator(self) -> random.Random:
        self._uses += 1
        if self._uses >= self.RESEED_EVERY:
            self._rng.seed(os.urandom(32))
            self._uses = 0
        return self._rng


_worker_draws = _ReseededRandom()


class Ledger:
    """Identities, the worker pool, tasks and credits."""

    def __init__(
        self,
        store: LedgerStore,
        config: LedgerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config or LedgerConfig()
        self._clock = clock
        # Identities are never deleted and secrets never change, so a
        # credential once verified stays valid: remember the whole header
        # value and skip parsing, the store read and hashing on later calls.
        self._verified: dict[str, str] = {}
        # When this front-end last renewed each caller's lease: at most once
        # a second per caller, so a call costs no store write most times.
        self._renewed: dict[str, float] = {}
        self._due: dict[str, float] = {}  # lease expiries for the next sweep to write
        self._due_lock = threading.Lock()
        self._ledger_id: str | None = None
        self._store_was_down = False
        try:
            self.store.restart_leases(self._clock() + self._lease_span())
        except ServiceUnavailable:
            self._store_was_down = True  # restarted by the first sweep that reaches it

    # -- identities ---------------------------------------------------------

    def create_client(self, peer_host: str | None = None) -> tuple[ClientRecord, str]:
        """A new identity; from `peer_host`'s /24 (/48) at most
        `max_new_clients` an hour, when that is set."""
        client_id = str(uuid.uuid4())
        secret = auth.new_secret()
        network = network_of(peer_host) if peer_host else None
        origin = None
        if self.config.max_new_clients and network:
            origin = NewClientLimit(network, self.config.max_new_clients, NEW_CLIENT_WINDOW)
        record = self.store.create_client(
            client_id,
            auth.hash_secret(secret),
            self.config.starting_credits,
            self._clock(),
            origin,
        )
        logger.info("new client %s with %d credits", client_id, record.credits)
        return record, secret

    def authenticate(self, authorization: str | None) -> str:
        """The caller's client id, from the `authorization` metadata value;
        the call renews the caller's lease."""
        client_id = self._verified.get(authorization) if authorization else None
        if client_id is not None:
            self._renew(client_id)
            return client_id
        client_id, secret = auth.parse_bearer(authorization)
        stored = self.store.secret_hash(client_id)
        if stored is None or not auth.secret_matches(secret, stored):
            raise AuthenticationError("unknown client id or wrong secret")
        if len(self._verified) >= MAX_VERIFIED_CREDENTIALS:
            self._verified.clear()
        self._verified[authorization] = client_id
        self._renew(client_id)
        return client_id

    def _lease_span(self) -> float:
        # A renewal skipped within a second of the last one, or written by
        # the next sweep rather than now, must not shorten the lease, even
        # when another front-end's sweep runs first (docs/protocol.md
        # section 9).
        return self.config.foreman_lease + LEASE_RENEWAL_INTERVAL + SWEEP_INTERVAL

    def _renew(self, client_id: str) -> None:
        """Noted here and written by the next sweep, all in one write: a
        store round trip per call was what 10,000 workers calling now and
        then cost RequestTasks (bench/discovery_cycles.py --pool-scale).
        The expiry is the call's own, and the span has SWEEP_INTERVAL of
        slack for the wait, so a foreman's lease still runs from its last
        call."""
        now = self._clock()
        if now - self._renewed.get(client_id, -math.inf) < LEASE_RENEWAL_INTERVAL:
            return
        with self._due_lock:
            self._due[client_id] = now + self._lease_span()
        if len(self._renewed) >= MAX_VERIFIED_CREDENTIALS:
            self._renewed.clear()
        self._renewed[client_id] = now

    def flush_renewals(self) -> None:
        """Write the leases renewed since the last flush (kept for the next
        one if the store cannot take them now)."""
        with self._due_lock:
            due, self._due = self._due, {}
        if not due:
            return
        try:
            self.store.renew_leases(due)
        except Exception:
            with self._due_lock:
                for client_id, expiry in due.items():
                    self._due[client_id] = max(expiry, self._due.get(client_id, expiry))
            raise

    @property
    def ledger_id(self) -> str:
        """Read from the store once (every front-end of a ledger agrees)."""
        if self._ledger_id is None:
            self._ledger_id = self.store.ledger_id()
        return self._ledger_id

    def get_client(self, client_id: str) -> ClientRecord:
        record = self.store.get_client(client_id, self._clock())
        if record is None:
            raise AuthenticationError("unknown client id or wrong secret")
        return record

    # -- the worker pool ----------------------------------------------------

    def needs_probe(
        self, client_id: str, *, address: str, tls_certificate: str, peer_host: str | None
    ) -> bool:
        """Whether a registration's address must be shown to answer before
        it joins the pool (docs/protocol.md section 8): a non-loopback
        address that is new for this worker, or presented with a new
        certificate. Refuses at once what no foreman could use: a
        plaintext worker off loopback, a loopback address sent from
        another host."""
        host = split_address(address)[0]
        if tls_certificate:
            check_peer_certificate(tls_certificate)
        if is_loopback(host):
            if peer_host is not None and not is_loopback(peer_host):
                raise AddressRefused(
                    f"worker address {address} is loopback, but this registration came from"
                    f" {peer_host}: foremen elsewhere cannot reach it there; start the worker"
                    " with --advertise ADDRESS (one that reaches it from other machines)"
                )
            return False
        if not tls_certificate:
            raise AddressRefused(
                f"worker address {address} is not loopback but the worker sent no"
                " tls_certificate: off loopback every worker serves TLS"
            )
        record = self.store.get_client(client_id, self._clock())
        return (
            record is None
            or record.address != address
            or record.tls_certificate != tls_certificate
            or record.expiry_unix <= self._clock()
        )

    def register_worker(
        self,
        client_id: str,
        *,
        address: str,
        ttl_seconds: int,
        slots: int,
        runtime: str,
        tls_certificate: str = "",
        resolved: str | None = None,
    ) -> ClientRecord:
        """`resolved`: the IP address a host name in `address` resolved to
        (the servicer looks it up; its network is the diversity rule's)."""
        now = self._clock()
        if ttl_seconds < 0:
            record = self.store.leave_pool(client_id, now)
            logger.info("worker %s left the pool", client_id)
            return record
        host = split_address(address)[0]
        if tls_certificate:
            check_peer_certificate(tls_certificate)
        network = network_of(resolved or host) or host.lower()
        if ttl_seconds > self.config.max_worker_ttl:
            raise InvalidRequest(
                f"ttl_seconds {ttl_seconds} is too long; at most {self.config.max_worker_ttl}"
                " (heartbeat more often instead)"
            )
        if slots < 0 or slots > MAX_SLOTS:
            raise InvalidRequest(
                f"slots must be between 1 and {MAX_SLOTS} (0 means 1), not {slots}"
            )
        check_runtime(runtime)
        record = self.store.register_worker(
            client_id,
            address=address,
            slots=slots or 1,
            runtime=runtime,
            expiry_unix=now + (ttl_seconds or self.config.worker_ttl),
            now=now,
            tls_certificate=tls_certificate,
            network=network,
        )
        logger.debug(
            "worker %s at %s, %d slot(s), lease to %.0f",
            client_id,
            address,
            record.slots,
            record.expiry_unix,
        )
        return record

    # -- tasks --------------------------------------------------------------

    def request_tasks(
        self,
        foreman_id: str,
        *,
        n: int,
        exclude_workers: Sequence[str],
        runtime: str,
        request_id: str = "",
        replication: int = replicas.DEFAULT,
    ) -> tuple[list[Assignment], int]:
        if n < 0 or n > MAX_TASKS_PER_REQUEST:
            raise InvalidRequest(
                f"n must be between 1 and {MAX_TASKS_PER_REQUEST} (0 means 1), not {n}"
            )
        check_request_id(request_id)
        workers_per_task, adaptive = self.replication_for(replication)
        n = n or 1
        now = self._clock()
        request = TaskRequest(
            foreman_id=foreman_id,
            n=n,
            replication=workers_per_task,
            exclude_workers=check_client_ids(exclude_workers, field="exclude_workers"),
            runtime=check_runtime(runtime),
            now=now,
            task_expiry_unix=now + self.config.task_ttl,
            request_id=request_id,
            spread=self.config.diversity,
            trusted_after=self.config.trusted_after,
            spot_checks=self._spot_checks(n) if adaptive else (),
        )
        tasks, credits = self.store.assign_tasks(request, choose_workers, _new_task)
        tasks = self._with_certificates(tasks)
        logger.debug(
            "foreman %s asked %d task(s), got %d; %d credits left",
            foreman_id,
            request.n,
            len(tasks),
            credits,
        )
        return tasks, credits

    def replication_for(self, asked: int) -> tuple[int, bool]:
        """(full replication, adaptive) for RequestTasksRequest.replication:
        0 the service's default, 1-99 that many, -1 adaptive."""
        if asked == replicas.DEFAULT:
            return self.config.replication, self.config.adaptive
        if asked == replicas.ADAPTIVE:
            return replicas.ADAPTIVE_FULL, True
        if not 1 <= asked <= replicas.MAX_REPLICATION:
            raise InvalidRequest(
                f"replication must be 0 (the service's), 1-{replicas.MAX_REPLICATION} or"
                f" {replicas.ADAPTIVE} (adaptive), not {asked}"
            )
        return asked, False

    @staticmethod
    def _spot_checks(n: int) -> tuple[bool, ...]:
        """Which of n adaptive tasks run at full replication: each with
        probability SPOT_CHECK_RATE, drawn here so no worker can tell."""
        rng = _worker_draws.generator()
        return tuple(rng.random() < replicas.SPOT_CHECK_RATE for _ in range(n))

    def _with_certificates(self, tasks: list[Assignment]) -> list[Assignment]:
        """Each worker's registered certificate, for the foreman to check it
        by (docs/protocol.md section 8)."""
        pems = self.store.certificates(w.client_id for t in tasks for w in t.workers)
        if not pems:
            return tasks
        return [
            replace(
                task,
                workers=tuple(
                    replace(w, tls_certificate=pems.get(w.client_id, "")) for w in task.workers
                ),
            )
            for task in tasks
        ]

    def live_workers(self, foreman_id: str, runtime: str) -> tuple[int, int]:
        """Workers in the pool (of `runtime`, when set) other than the
        foreman, busy or not, and the distinct addresses (or, with network
        diversity, networks) among them: fewer than the replication means no
        task can be made for it until more join."""
        return self.store.live_workers(
            foreman_id, check_runtime(runtime), self._clock(), self.config.diversity
        )

    def fetch_key(self, worker_id: str, task_id: str) -> tuple[bytes, str]:
        check_task_id(task_id)
        found = self.store.fetch_key(worker_id, task_id, self._clock())
        if found is None:
            if self.store.is_late(worker_id, task_id, self._clock()):
                raise LateTask(
                    f"task {task_id} was settled without your result: commit it"
                    " before your late window ends to be paid"
                )
            raise UnknownTask(f"no open task {task_id} is assigned to you")
        return found

    def add_replica(
        self,
        foreman_id: str,
        task_id: str,
        *,
        exclude_workers: Sequence[str],
        release_workers: Sequence[str],
        runtime: str,
        request_id: str = "",
    ) -> tuple[WorkerRef | None, int]:
        """One more worker for an open task (docs/protocol.md section 9):
        the foreman releases the replicas that never started or that it
        cancelled, and gets a replacement; None when no worker is free."""
        check_task_id(task_id)
        check_request_id(request_id)
        request = ReplicaRequest(
            foreman_id=foreman_id,
            task_id=task_id,
            exclude_workers=check_client_ids(exclude_workers, field="exclude_workers"),
            release_workers=check_client_ids(release_workers, field="release_workers"),
            runtime=check_runtime(runtime),
            now=self._clock(),
            request_id=request_id,
            spread=self.config.diversity,
            trusted_after=self.config.trusted_after,
            replication=self.config.replication,
        )
        found = self.store.add_replica(request, choose_workers)
        if found is None:
            raise UnknownTask(f"you have no open task {task_id} to add a replica to")
        worker, credits = found
        if worker is not None:
            pem = self.store.certificates([worker.client_id]).get(worker.client_id, "")
            worker = replace(worker, tls_certificate=pem)
        logger.debug(
            "task %s: released %s, added %s",
            task_id,
            sorted(request.release_workers) or "none",
            worker.client_id if worker else "none (no free worker)",
        )
        return worker, credits

    def settle_task(
        self,
        foreman_id: str,
        task_id: str,
        *,
        valid: bool,
        missing: Sequence[str],
        released: Sequence[str] = (),
    ) -> Settlement:
        check_task_id(task_id)
        missing_ids = check_client_ids(missing, field="missing")
        released_ids = check_client_ids(released, field="released")
        if missing_ids & released_ids:
            raise InvalidRequest(
                "a worker cannot be both missing and released: "
                + ", ".join(sorted(missing_ids & released_ids))
            )
        now = self._clock()
        settlement = self.store.settle_task(
            foreman_id,
            task_id,
            valid=valid,
            missing=missing_ids,
            now=now,
            released=released_ids,
            quorum=replicas.quorum(self.config.replication),
            late_until=now + self.config.late_window,
        )
        if settlement is None:
            raise UnknownTask(f"you have no open task {task_id} to settle")
        logger.debug(
            "task %s settled %s by %s (missing: %s)",
            task_id,
            "valid" if valid else "invalid",
            foreman_id,
            sorted(missing_ids) or "none",
        )
        return settlement

    def commit_result(self, worker_id: str, task_id: str, sha256: str) -> None:
        """A worker's commitment to the result it is about to send
        (docs/protocol.md section 10): once per task, never changed."""
        check_task_id(task_id)
        if not _SHA256.fullmatch(sha256):
            raise InvalidRequest("ciphertext_sha256 must be 64 lowercase hex digits")
        made = self.store.commit_result(worker_id, task_id, sha256, self._clock())
        if made is None:
            raise UnknownTask(
                f"no open task {task_id} is assigned to you (nor a settled one whose late"
                " window is still open)"
            )
        if made == COMMIT_CONFLICT:
            raise CommitConflict(
                f"you committed another result to task {task_id} already; a commitment"
                " cannot change"
            )

    def expire_tasks(self) -> int:
        return self.store.expire_tasks(self._clock())

    def resume(self) -> None:
        """The service did not run for a while (frozen): the next sweep
        restarts every lease first, as after a store outage."""
        self._store_was_down = True

    def sweep(self) -> int:
        """Run by the server every SWEEP_INTERVAL: close expired tasks and
        those of foremen whose lease ended. After the store was unreachable
        every lease restarts (nobody could call meanwhile)."""
        try:
            if self._store_was_down:
                self.store.restart_leases(self._clock() + self._lease_span())
                self._renewed.clear()
                self._store_was_down = False
                logger.info("serving again; every foreman's lease starts again")
            self.flush_renewals()
            return self.expire_tasks()
        except ServiceUnavailable:
            self._store_was_down = True
            return 0


def _new_task() -> tuple[str, bytes]:
    """A random task id and key from one system call."""
    raw = os.urandom(16 + KEY_BYTES)
    return raw[:16].hex(), raw[16:]
