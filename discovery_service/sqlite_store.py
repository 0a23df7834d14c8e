"""The ledger in an embedded SQLite database (stdlib `sqlite3`).

One connection, serialised by a lock: the GIL would serialise the work
anyway, and one connection keeps SQLite's statement cache warm. Every
credit change is one `BEGIN IMMEDIATE` transaction. The file belongs to one
process while it serves (exclusive locking): several front-ends share a
Redis store, not a SQLite file. The database runs in WAL
mode; `synchronous=NORMAL` by default (a commit survives a crash of the
process, and the last commits before a power cut may be lost), `FULL` on
request for a commit that survives power loss too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from discovery_service.sqlite_pool import POOL_SCHEMA, FreeWorkers, trusted_usable
from discovery_service.store import (
    COMMIT_CONFLICT,
    COMMITTED,
    IDENTITY,
    LIVE_COUNT_CAP,
    MAX_WORKERS_PER_REPLICA,
    NETWORK,
    Assignment,
    Candidate,
    ChooseWorkers,
    ClientRecord,
    GroupRule,
    LedgerStore,
    LedgerTotals,
    NewClientLimit,
    NewTask,
    ReplicaRequest,
    Settlement,
    TaskRequest,
    WorkerRef,
    assignments_from_text,
    assignments_text,
    committed_quorum,
    insufficient_credits,
    no_committed_quorum,
    not_assigned,
    replica_cap,
    request_mismatch,
    settle_conflict,
    settle_outcome,
    task_replication,
    trusted_enough,
)
from ec262 import replication as replicas
from ec262.errors import InsufficientCredits, InvalidRequest

logger = logging.getLogger(__name__)

# A worker's books when a task of its is paid, or counted failed.
_PAY = "credits = credits + 1, tasks_completed = tasks_completed + 1, busy_slots = busy_slots - 1"
_FAIL = "tasks_failed = tasks_failed + 1, busy_slots = busy_slots - 1"

SCHEMA_VERSION = 8  # 2: settled.released; 3: clients.tls_certificate; 4: clients.network;
# 5: commitments, settled.quorum_sha256 and .agreeing; 6: late, settled.late;
# 7: tasks.replication; 8: clients.pooled, free_pool (sqlite_pool)
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client_id        TEXT PRIMARY KEY,
    secret_hash      BLOB NOT NULL,
    credits          INTEGER NOT NULL CHECK (credits >= 0),
    starting_credits INTEGER NOT NULL,
    address          TEXT NOT NULL DEFAULT '',
    runtime          TEXT NOT NULL DEFAULT '',
    tls_certificate  TEXT NOT NULL DEFAULT '',  -- PEM, a TLS worker's own
    network          TEXT NOT NULL DEFAULT '',  -- its address's /24 (/48), for diversity
    trust            INTEGER NOT NULL DEFAULT 0,  -- matching commitments in a row
    expiry_unix      REAL NOT NULL DEFAULT 0,
    slots            INTEGER NOT NULL DEFAULT 0,
    busy_slots       INTEGER NOT NULL DEFAULT 0 CHECK (busy_slots >= 0),
    tasks_completed  INTEGER NOT NULL DEFAULT 0,
    tasks_failed     INTEGER NOT NULL DEFAULT 0,
    created_unix     REAL NOT NULL,
    pooled           INTEGER NOT NULL DEFAULT 0  -- in the pool's indexes (sqlite_pool)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS clients_by_lease ON clients (expiry_unix);
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    foreman_id  TEXT NOT NULL,
    key         BLOB NOT NULL,
    escrow      INTEGER NOT NULL CHECK (escrow >= 0),
    expiry_unix REAL NOT NULL,
    workers     TEXT NOT NULL,  -- the assigned workers' ids, space-separated
    replication INTEGER NOT NULL DEFAULT 0  -- its own (-1 adaptive, 0 the service's)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_expiry ON tasks (expiry_unix);
CREATE INDEX IF NOT EXISTS tasks_by_foreman ON tasks (foreman_id);
CREATE TABLE IF NOT EXISTS meta (  -- facts about the ledger itself
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (  -- until when each client's calls keep its tasks
    foreman_id  TEXT PRIMARY KEY,
    expiry_unix REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expiry_unix);
CREATE TABLE IF NOT EXISTS settled (  -- settles remembered, for repeats
    task_id     TEXT PRIMARY KEY,
    foreman_id  TEXT NOT NULL,
    valid       INTEGER NOT NULL,
    missing     TEXT NOT NULL,  -- sorted ids, space-separated
    released    TEXT NOT NULL DEFAULT '',  -- sorted ids, space-separated
    key         BLOB,
    expiry_unix REAL NOT NULL,
    quorum_sha256 TEXT NOT NULL DEFAULT '',
    agreeing    TEXT NOT NULL DEFAULT '',  -- sorted ids, space-separated
    paid        TEXT NOT NULL DEFAULT '',  -- sorted ids, space-separated
    late        TEXT NOT NULL DEFAULT ''  -- sorted ids, space-separated
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late (  -- workers of settled tasks without a commitment at the settle
    task_id       TEXT NOT NULL,
    worker_id     TEXT NOT NULL,
    foreman_id    TEXT NOT NULL,
    quorum_sha256 TEXT NOT NULL,
    sha256        TEXT NOT NULL DEFAULT '',  -- '' until it commits: 1 credit in escrow
    until_unix    REAL NOT NULL,  -- the end of the late window
    PRIMARY KEY (task_id, worker_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS late_by_window ON late (until_unix);
CREATE TABLE IF NOT EXISTS commitments (  -- of open tasks' workers to their results
    task_id   TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    PRIMARY KEY (task_id, worker_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS settled_by_expiry ON settled (expiry_unix);
CREATE TABLE IF NOT EXISTS requests (  -- RequestTasks replies remembered, for repeats
    foreman_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    n           INTEGER NOT NULL,
    exclude     TEXT NOT NULL,  -- sorted ids, space-separated
    reply       TEXT NOT NULL,  -- store.assignments_text
    expiry_unix REAL NOT NULL,
    PRIMARY KEY (foreman_id, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_expiry ON requests (expiry_unix);
CREATE TABLE IF NOT EXISTS origins (  -- identities made per source network, for the limit
    network      TEXT NOT NULL,
    created_unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS origins_by_network ON origins (network, created_unix);
"""

_CLIENT_COLUMNS = (
    "client_id, credits, address, expiry_unix, slots, busy_slots,"
    " tasks_completed, tasks_failed, runtime, tls_certificate, trust"
)


def _client(row: tuple) -> ClientRecord:
    return ClientRecord(*row)


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


class SqliteStore(LedgerStore):
    """A LedgerStore in one SQLite file (or in memory with `:memory:`)."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, cached_statements=64
        )
        try:
            self._db.execute("PRAGMA busy_timeout = 1000")
            if self.path != ":memory:":
                # One front-end owns the file while it runs: exclusive locking
                # saves a lock round trip per transaction and makes a second
                # process on the same file fail at once instead of racing it.
                self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {synchronous}")
            self._open_schema()
        except sqlite3.OperationalError as error:
            self._db.close()
            if "locked" in str(error):
                raise OSError(
                    f"ledger {self.path} is in use by another discovery process"
                ) from None
            raise OSError(f"cannot open ledger {self.path}: {error}") from None
        logger.info("ledger in SQLite %s (synchronous=%s)", self.path, synchronous)

    def _open_schema(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has ledger schema {version}, newer than this "
                    f"ec262 understands ({SCHEMA_VERSION}); upgrade ec262"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version in (1,):
                db.execute("ALTER TABLE settled ADD COLUMN released TEXT NOT NULL DEFAULT ''")
            if version in (1, 2):
                db.execute(
                    "ALTER TABLE clients ADD COLUMN tls_certificate TEXT NOT NULL DEFAULT ''"
                )
            if version in (1, 2, 3):
                db.execute("ALTER TABLE clients ADD COLUMN network TEXT NOT NULL DEFAULT ''")
            if version in (1, 2, 3, 4):
                db.execute("ALTER TABLE clients ADD COLUMN trust INTEGER NOT NULL DEFAULT 0")
                for column in ("quorum_sha256", "agreeing", "paid"):
                    db.execute(f"ALTER TABLE settled ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            if version in (1, 2, 3, 4, 5):
                db.execute("ALTER TABLE settled ADD COLUMN late TEXT NOT NULL DEFAULT ''")
            if version in (1, 2, 3, 4, 5, 6):
                db.execute("ALTER TABLE tasks ADD COLUMN replication INTEGER NOT NULL DEFAULT 0")
            if version in (1, 2, 3, 4, 5, 6, 7):
                db.execute("ALTER TABLE clients ADD COLUMN pooled INTEGER NOT NULL DEFAULT 0")
            for statement in POOL_SCHEMA:
                db.execute(statement)
            if version in (1, 2, 3, 4, 5, 6, 7):  # the triggers fill free_pool
                db.execute("UPDATE clients SET pooled = 1 WHERE expiry_unix > 0")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            earliest = self._earliest_expiry(db)
        # The earliest expiry of any open or remembered task: until then no
        # sweep is needed.
        # The file has one front-end (several share Redis, not SQLite), so
        # this process sees every task made and can keep the mark itself.
        self._next_expiry = earliest

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- identities ---------------------------------------------------------

    def create_client(
        self,
        client_id: str,
        secret_hash: bytes,
        credits: int,
        now: float,
        origin: NewClientLimit | None = None,
    ) -> ClientRecord:
        with self._transaction() as db:
            if origin is not None:
                db.execute(
                    "DELETE FROM origins WHERE network = ? AND created_unix <= ?",
                    (origin.network, now - origin.window),
                )
                count, oldest = db.execute(
                    "SELECT count(*), min(created_unix) FROM origins WHERE network = ?",
                    (origin.network,),
                ).fetchone()
                if count >= origin.limit:
                    raise origin.refused(oldest, now)
                db.execute(
                    "INSERT INTO origins (network, created_unix) VALUES (?, ?)",
                    (origin.network, now),
                )
            db.execute(
                "INSERT INTO clients (client_id, secret_hash, credits, starting_credits,"
                " created_unix) VALUES (?, ?, ?, ?, ?)",
                (client_id, secret_hash, credits, credits, now),
            )
        return ClientRecord(client_id=client_id, credits=credits)

    def secret_hash(self, client_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT secret_hash FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return row[0] if row else None

    def get_client(self, client_id: str, now: float) -> ClientRecord | None:
        with self._transaction() as db:
            self._expire(db, now)
            return self._read_client(db, client_id)

    @staticmethod
    def _read_client(db: sqlite3.Connection, client_id: str) -> ClientRecord | None:
        row = db.execute(
            f"SELECT {_CLIENT_COLUMNS} FROM clients WHERE client_id = ?", (client_id,)
        ).fetchone()
        return _client(row) if row else None

    # -- the worker pool ----------------------------------------------------

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
        with self._transaction() as db:
            self._expire(db, now)
            db.execute(
                "UPDATE clients SET address = ?, slots = ?, runtime = ?, expiry_unix = ?,"
                " tls_certificate = ?, network = ?, pooled = 1 WHERE client_id = ?",
                (address, slots, runtime, expiry_unix, tls_certificate, network, client_id),
            )
            return self._require_client(db, client_id)

    def certificates(self, client_ids: Iterable[str]) -> dict[str, str]:
        ids = list(dict.fromkeys(client_ids))
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT client_id, tls_certificate FROM clients"
                f" WHERE client_id IN ({_placeholders(len(ids))}) AND tls_certificate != ''",
                ids,
            ).fetchall()
        return dict(rows)

    def leave_pool(self, client_id: str, now: float) -> ClientRecord:
        with self._transaction() as db:
            self._expire(db, now)
            db.execute(
                "UPDATE clients SET expiry_unix = 0, pooled = 0 WHERE client_id = ?", (client_id,)
            )
            return self._require_client(db, client_id)

    def _require_client(self, db: sqlite3.Connection, client_id: str) -> ClientRecord:
        record = self._read_client(db, client_id)
        if record is None:  # authenticated callers exist: this is a broken invariant
            raise RuntimeError(f"client {client_id} vanished from the ledger")
        return record

    # -- tasks --------------------------------------------------------------

    def assign_tasks(
        self, request: TaskRequest, choose: ChooseWorkers, new_task: NewTask
    ) -> tuple[list[Assignment], int]:
        exclude = " ".join(sorted(request.exclude_workers))
        with self._transaction() as db:
            self._expire(db, request.now)
            if request.request_id:
                seen = db.execute(
                    "SELECT n, exclude, reply, expiry_unix FROM requests"
                    " WHERE foreman_id = ? AND request_id = ?",
                    (request.foreman_id, request.request_id),
                ).fetchone()
                if seen is not None:
                    if (seen[0], seen[1]) != (request.n, exclude):
                        raise request_mismatch(request, seen[0], seen[1])
                    (balance,) = db.execute(
                        "SELECT credits FROM clients WHERE client_id = ?", (request.foreman_id,)
                    ).fetchone()
                    return assignments_from_text(seen[2], seen[3]), balance
            trusted = trusted_usable(
                db,
                now=request.now,
                foreman_id=request.foreman_id,
                runtime=request.runtime,
                trusted_after=request.trusted_after,
                exclude=request.exclude_workers,
                enough=trusted_enough(request.replication),
            )
            rules = request.rules(trusted)
            needed = sum(rule.size for rule in rules)
            # Check and charge the whole request in one statement; refund
            # below whatever partial fill leaves unused.
            charged = db.execute(
                "UPDATE clients SET credits = credits - ? WHERE client_id = ? AND credits >= ?"
                " RETURNING credits",
                (needed, request.foreman_id, needed),
            ).fetchone()
            if charged is None:
                (balance,) = db.execute(
                    "SELECT credits FROM clients WHERE client_id = ?", (request.foreman_id,)
                ).fetchone()
                raise insufficient_credits(request, balance, needed)
            free = FreeWorkers(
                db,
                now=request.now,
                foreman_id=request.foreman_id,
                runtime=request.runtime,
                exclude=request.exclude_workers,
                trusted_after=request.trusted_after,
            )
            groups = choose(
                free, request.n, request.replication, spread=request.spread, rules=rules
            )
            free.close()
            assignments: list[Assignment] = []
            rows = []
            busy: Counter[str] = Counter()
            for group in groups:
                task_id, key = new_task()
                ids = [worker.client_id for worker in group]
                busy.update(ids)
                rows.append(
                    (
                        task_id,
                        request.foreman_id,
                        key,
                        len(group),
                        request.task_expiry_unix,
                        " ".join(ids),
                        replicas.ADAPTIVE if request.spot_checks else request.replication,
                    )
                )
                assignments.append(
                    Assignment(
                        task_id=task_id,
                        workers=tuple(WorkerRef(w.client_id, w.address) for w in group),
                        expiry_unix=request.task_expiry_unix,
                    )
                )
            if rows:
                db.executemany(
                    "INSERT INTO tasks (task_id, foreman_id, key, escrow, expiry_unix, workers,"
                    " replication) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                if len(busy) == sum(len(group) for group in groups):  # each worker once
                    self._update_each(db, "busy_slots = busy_slots + 1", busy)
                else:
                    db.executemany(
                        "UPDATE clients SET busy_slots = busy_slots + ? WHERE client_id = ?",
                        [(count, worker_id) for worker_id, count in busy.items()],
                    )
                self._next_expiry = min(self._next_expiry, request.task_expiry_unix)
            spent = sum(len(group) for group in groups)
            balance = charged[0]
            if spent < needed:
                (balance,) = db.execute(
                    "UPDATE clients SET credits = credits + ? WHERE client_id = ?"
                    " RETURNING credits",
                    (needed - spent, request.foreman_id),
                ).fetchone()
            if request.request_id:
                db.execute(
                    "INSERT INTO requests (foreman_id, request_id, n, exclude, reply, expiry_unix)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (request.foreman_id, request.request_id, request.n, exclude,
                     assignments_text(assignments), request.task_expiry_unix),
                )  # fmt: skip
                self._next_expiry = min(self._next_expiry, request.task_expiry_unix)
            return assignments, balance

    def add_replica(
        self, request: ReplicaRequest, choose: ChooseWorkers
    ) -> tuple[WorkerRef | None, int] | None:
        remembered = request.remembered_as()
        with self._transaction() as db:
            self._expire(db, request.now)
            balance = self._balance(db, request.foreman_id)
            if request.request_id:
                seen = db.execute(
                    "SELECT exclude, reply FROM requests WHERE foreman_id = ? AND request_id = ?",
                    (request.foreman_id, request.request_id),
                ).fetchone()
                if seen is not None:
                    if seen[0] != remembered:
                        raise InvalidRequest(
                            f"request_id {request.request_id!r} was used for another request"
                        )
                    made = assignments_from_text(seen[1], 0.0)
                    return (made[0].workers[0] if made else None), balance
            row = db.execute(
                "SELECT escrow, workers, expiry_unix, replication FROM tasks"
                " WHERE task_id = ? AND foreman_id = ?",
                (request.task_id, request.foreman_id),
            ).fetchone()
            if row is None:
                return None
            escrow, worker_text, expiry_unix, stored = row
            replication, adaptive = task_replication(stored, request.replication)
            workers = worker_text.split()
            strangers = request.release_workers - set(workers)
            if strangers:
                raise not_assigned(request.task_id, "release_workers", strangers)
            kept = [w for w in workers if w not in request.release_workers]
            if balance + len(request.release_workers) < 1:
                raise InsufficientCredits(1, balance, "not enough credits: a replica costs 1")
            released = len(workers) - len(kept)
            self._update_each(db, "busy_slots = busy_slots - 1", request.release_workers)
            chosen = None
            if len(kept) < MAX_WORKERS_PER_REPLICA * replication:
                members = [
                    Candidate(*row[:4], bool(row[4]))
                    for row in db.execute(
                        "SELECT client_id, address, 0, network, ? > 0 AND trust >= ? FROM clients"
                        f" WHERE client_id IN ({_placeholders(len(kept))})",
                        (request.trusted_after, request.trusted_after, *kept),
                    )
                ]
                taken = frozenset(m.spread_key(request.spread) for m in members)
                trusted = trusted_usable(
                    db,
                    now=request.now,
                    foreman_id=request.foreman_id,
                    runtime=request.runtime,
                    trusted_after=request.trusted_after,
                    exclude=request.exclude_workers,
                    enough=trusted_enough(replication),
                )
                untrusted = sum(not m.trusted for m in members)
                cap = (
                    replica_cap(replication, adaptive, trusted, untrusted)
                    if request.trusted_after
                    else None
                )
                free = FreeWorkers(
                    db,
                    now=request.now,
                    foreman_id=request.foreman_id,
                    runtime=request.runtime,
                    exclude=request.exclude_workers | set(workers),
                    trusted_after=request.trusted_after,
                )
                group = choose(
                    free,
                    1,
                    1,
                    spread=request.spread,
                    taken=taken,
                    untrusted_taken=untrusted,
                    rules=[GroupRule(1, cap)],
                )
                free.close()
                if group:
                    chosen = WorkerRef(group[0][0].client_id, group[0][0].address)
                    kept.append(chosen.client_id)
                    self._update_each(db, "busy_slots = busy_slots + 1", [chosen.client_id])
            added = 1 if chosen else 0
            db.execute(
                "UPDATE tasks SET escrow = ?, workers = ? WHERE task_id = ?",
                (escrow - released + added, " ".join(kept), request.task_id),
            )
            (balance,) = db.execute(
                "UPDATE clients SET credits = credits + ? WHERE client_id = ? RETURNING credits",
                (released - added, request.foreman_id),
            ).fetchone()
            if request.request_id:
                reply = (
                    assignments_text([Assignment(request.task_id, (chosen,), expiry_unix)])
                    if chosen
                    else ""
                )
                db.execute(
                    "INSERT INTO requests (foreman_id, request_id, n, exclude, reply, expiry_unix)"
                    " VALUES (?, ?, 0, ?, ?, ?)",
                    (request.foreman_id, request.request_id, remembered, reply, expiry_unix),
                )
            return chosen, balance

    @staticmethod
    def _balance(db: sqlite3.Connection, client_id: str) -> int:
        (balance,) = db.execute(
            "SELECT credits FROM clients WHERE client_id = ?", (client_id,)
        ).fetchone()
        return balance

    def ledger_id(self) -> str:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('ledger_id', ?)",
                (str(uuid.uuid4()),),
            )
            (value,) = db.execute("SELECT value FROM meta WHERE name = 'ledger_id'").fetchone()
        return value

    def live_workers(
        self,
        foreman_id: str,
        runtime: str,
        now: float,
        spread: str = IDENTITY,
        cap: int = LIVE_COUNT_CAP,
    ) -> tuple[int, int]:
        """The first `cap` live workers by the lease index."""
        inner = (
            "SELECT CASE WHEN ? AND network != '' THEN network ELSE address END AS spot"
            " FROM clients WHERE expiry_unix > ? AND client_id != ?"
        )
        args: tuple = (spread == NETWORK, now, foreman_id)
        if runtime:
            inner += " AND runtime = ?"
            args += (runtime,)
        query = f"SELECT COUNT(*), COUNT(DISTINCT spot) FROM ({inner} LIMIT ?)"
        args += (cap,)
        with self._lock:
            workers, spots = self._db.execute(query, args).fetchone()
        return workers, spots

    def fetch_key(self, worker_id: str, task_id: str, now: float) -> tuple[bytes, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT key, foreman_id, workers FROM tasks WHERE task_id = ? AND expiry_unix > ?",
                (task_id, now),
            ).fetchone()
        if row is None or worker_id not in row[2].split():
            return None
        return row[0], row[1]

    def is_late(self, worker_id: str, task_id: str, now: float) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM late WHERE task_id = ? AND worker_id = ? AND sha256 = ''"
                " AND until_unix > ?",
                (task_id, worker_id, now),
            ).fetchone()
        return row is not None

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
        with self._transaction() as db:
            self._expire(db, now)
            row = db.execute(
                "SELECT key, escrow, workers, expiry_unix, replication FROM tasks"
                " WHERE task_id = ? AND foreman_id = ?",
                (task_id, foreman_id),
            ).fetchone()
            wanted = " ".join(sorted(missing)) if valid else ""
            let_go = " ".join(sorted(released)) if valid else ""
            if row is None:
                return self._repeated_settle(db, foreman_id, task_id, valid, wanted, let_go)
            key, escrow, worker_text, expiry_unix, stored = row
            if stored:
                quorum = replicas.quorum(task_replication(stored, 0)[0])
            workers = set(worker_text.split())
            for what, named in (("missing", missing), ("released", released)):
                if named - workers:
                    raise not_assigned(task_id, what, named - workers)
            sha, agreeing, paid, late = "", (), set(), set()
            if valid:
                commitments = dict(
                    db.execute(
                        "SELECT worker_id, sha256 FROM commitments WHERE task_id = ?", (task_id,)
                    ).fetchall()
                )
                sha, agreeing = committed_quorum(commitments, workers, quorum)
                if not sha:
                    raise no_committed_quorum(task_id, quorum)
                paid, failed, late = settle_outcome(
                    workers, released=released, commitments=commitments, quorum_sha256=sha
                )
                # Trust: matching commitments in a row; another resets it.
                self._update_each(db, "trust = trust + 1", agreeing)
                self._update_each(
                    db, "trust = 0", {w for w in workers if commitments.get(w, sha) != sha}
                )
                # Released: slot freed, credit back; late workers keep both.
                self._update_each(db, "busy_slots = busy_slots - 1", workers - paid - failed - late)
                self._update_each(db, _PAY, paid)
                self._update_each(db, _FAIL, failed)
                db.executemany(
                    "INSERT INTO late (task_id, worker_id, foreman_id, quorum_sha256, until_unix)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(task_id, worker, foreman_id, sha, late_until) for worker in late],
                )
                if late:
                    self._next_expiry = min(self._next_expiry, late_until)
                refund = escrow - len(paid) - len(late)
            else:
                self._update_each(db, "busy_slots = busy_slots - 1", workers)
                refund = escrow
            db.execute("DELETE FROM commitments WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            db.execute(
                "INSERT INTO settled (task_id, foreman_id, valid, missing, released, key,"
                " expiry_unix, quorum_sha256, agreeing, paid, late)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    foreman_id,
                    int(valid),
                    wanted,
                    let_go,
                    key if valid else None,
                    expiry_unix,
                    sha,
                    " ".join(agreeing),
                    " ".join(sorted(paid)),
                    " ".join(sorted(late)),
                ),
            )
            (credits,) = db.execute(
                "UPDATE clients SET credits = credits + ? WHERE client_id = ? RETURNING credits",
                (refund, foreman_id),
            ).fetchone()
            return Settlement(
                key=key if valid else None,
                credits=credits,
                quorum_sha256=sha,
                agreeing=agreeing,
                paid=tuple(sorted(paid)),
                late=tuple(sorted(late)),
            )

    def commit_result(self, worker_id: str, task_id: str, sha256: str, now: float) -> str | None:
        with self._transaction() as db:
            self._expire(db, now)
            row = db.execute("SELECT workers FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return self._commit_late(db, worker_id, task_id, sha256)
            if worker_id not in row[0].split():
                return None
            made = db.execute(
                "SELECT sha256 FROM commitments WHERE task_id = ? AND worker_id = ?",
                (task_id, worker_id),
            ).fetchone()
            if made is not None:
                return COMMITTED if made[0] == sha256 else COMMIT_CONFLICT
            db.execute(
                "INSERT INTO commitments (task_id, worker_id, sha256) VALUES (?, ?, ?)",
                (task_id, worker_id, sha256),
            )
            return COMMITTED

    def _commit_late(
        self, db: sqlite3.Connection, worker_id: str, task_id: str, sha256: str
    ) -> str | None:
        """A commitment for a settled task: a late worker's is judged now
        (paid when it matches the quorum, else failed and its credit
        refunded); a paid worker's repeat is answered as before."""
        row = db.execute(
            "SELECT foreman_id, quorum_sha256, sha256 FROM late"
            " WHERE task_id = ? AND worker_id = ?",
            (task_id, worker_id),
        ).fetchone()
        if row is None:
            done = db.execute(
                "SELECT quorum_sha256, paid FROM settled WHERE task_id = ?", (task_id,)
            ).fetchone()
            if done is None or worker_id not in done[1].split():
                return None
            return COMMITTED if done[0] == sha256 else COMMIT_CONFLICT
        foreman_id, quorum_sha256, made = row
        if made:
            return COMMITTED if made == sha256 else COMMIT_CONFLICT
        db.execute(
            "UPDATE late SET sha256 = ? WHERE task_id = ? AND worker_id = ?",
            (sha256, task_id, worker_id),
        )
        if sha256 == quorum_sha256:
            self._update_each(db, _PAY + ", trust = trust + 1", (worker_id,))
        else:
            self._update_each(db, _FAIL + ", trust = 0", (worker_id,))
            db.execute(
                "UPDATE clients SET credits = credits + 1 WHERE client_id = ?", (foreman_id,)
            )
        return COMMITTED

    @staticmethod
    def _repeated_settle(
        db: sqlite3.Connection,
        foreman_id: str,
        task_id: str,
        valid: bool,
        wanted: str,
        let_go: str,
    ) -> Settlement | None:
        done = db.execute(
            "SELECT valid, missing, released, key, quorum_sha256, agreeing, paid, late FROM settled"
            " WHERE task_id = ? AND foreman_id = ?",
            (task_id, foreman_id),
        ).fetchone()
        if done is None:
            return None
        if (bool(done[0]), done[1], done[2]) != (valid, wanted, let_go):
            raise settle_conflict(task_id, bool(done[0]), done[1])
        return Settlement(
            key=done[3] if valid else None,
            credits=SqliteStore._balance(db, foreman_id),
            quorum_sha256=done[4],
            agreeing=tuple(done[5].split()),
            paid=tuple(done[6].split()),
            late=tuple(done[7].split()),
        )

    @staticmethod
    def _update_each(db: sqlite3.Connection, assignments: str, client_ids: Iterable[str]) -> None:
        """One UPDATE for a set of clients (none when the set is empty). A
        client named twice would be updated once (SQL's IN), so that is an
        error, never a quiet undercount."""
        ids = tuple(client_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"clients named twice in one update: {sorted(ids)}")
        if ids:
            db.execute(
                f"UPDATE clients SET {assignments} WHERE client_id IN ({_placeholders(len(ids))})",
                ids,
            )

    def expire_tasks(self, now: float) -> int:
        with self._transaction() as db:
            return self._expire(db, now) + self._expire_leases(db, now)

    def renew_leases(self, expiries: Mapping[str, float]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO leases (foreman_id, expiry_unix) VALUES (?, ?) ON CONFLICT"
                " (foreman_id) DO UPDATE SET expiry_unix = MAX(expiry_unix, excluded.expiry_unix)",
                expiries.items(),
            )

    def restart_leases(self, expiry_unix: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE leases SET expiry_unix = ? WHERE expiry_unix < ?",
                (expiry_unix, expiry_unix),
            )

    def _expire_leases(self, db: sqlite3.Connection, now: float) -> int:
        """Refund the open tasks of foremen whose lease ended."""
        gone = db.execute(
            "DELETE FROM tasks WHERE foreman_id IN"
            " (SELECT foreman_id FROM leases WHERE expiry_unix <= ?)"
            " RETURNING foreman_id, escrow, workers, task_id",
            (now,),
        ).fetchall()
        db.execute("DELETE FROM leases WHERE expiry_unix <= ?", (now,))
        self._refund(db, gone)
        if gone:
            logger.info("%d task(s) of foremen whose lease ended went back to them", len(gone))
        return len(gone)

    def _refund(self, db: sqlite3.Connection, closed: list) -> None:
        """Escrow back to the foremen and slots back to the workers of tasks
        just deleted (rows of foreman_id, escrow, workers, task_id); their
        commitments go."""
        for foreman_id, escrow, worker_text, task_id in closed:
            db.execute("DELETE FROM commitments WHERE task_id = ?", (task_id,))
            self._update_each(db, "busy_slots = busy_slots - 1", worker_text.split())
            db.execute(
                "UPDATE clients SET credits = credits + ? WHERE client_id = ?",
                (escrow, foreman_id),
            )

    @staticmethod
    def _earliest_expiry(db: sqlite3.Connection) -> float:
        (earliest,) = db.execute(
            "SELECT MIN(e) FROM (SELECT MIN(expiry_unix) AS e FROM tasks"
            " UNION ALL SELECT MIN(expiry_unix) FROM settled"
            " UNION ALL SELECT MIN(until_unix) FROM late"
            " UNION ALL SELECT MIN(expiry_unix) FROM requests)"
        ).fetchone()
        return math.inf if earliest is None else earliest

    def _expire(self, db: sqlite3.Connection, now: float) -> int:
        """Refund the foremen of open tasks past their expiry and free the
        workers' slots. Called inside every transaction that reads balances
        or slots, so an expired task is never visible as open."""
        if now < self._next_expiry:
            return 0
        expired = db.execute(
            "DELETE FROM tasks WHERE expiry_unix <= ?"
            " RETURNING foreman_id, escrow, workers, task_id",
            (now,),
        ).fetchall()
        self._refund(db, expired)
        self._end_late_windows(db, now)
        db.execute("DELETE FROM settled WHERE expiry_unix <= ?", (now,))
        db.execute("DELETE FROM requests WHERE expiry_unix <= ?", (now,))
        self._next_expiry = self._earliest_expiry(db)
        if expired:
            logger.info("expired %d unsettled task(s); their credits went back", len(expired))
        return len(expired)

    def _end_late_windows(self, db: sqlite3.Connection, now: float) -> None:
        """Late workers whose window ended without a commitment are counted
        failed, and their credit goes back to the foreman."""
        ended = db.execute(
            "DELETE FROM late WHERE until_unix <= ? RETURNING worker_id, foreman_id, sha256",
            (now,),
        ).fetchall()
        silent = [(worker, foreman) for worker, foreman, sha in ended if not sha]
        # A worker may be late for several tasks whose windows end together
        # (a settle batch, a deep queue): each counts.
        db.executemany(
            "UPDATE clients SET tasks_failed = tasks_failed + ?, busy_slots = busy_slots - ?"
            " WHERE client_id = ?",
            [(count, count, worker) for worker, count in Counter(w for w, _ in silent).items()],
        )
        for foreman_id, count in Counter(foreman for _, foreman in silent).items():
            db.execute(
                "UPDATE clients SET credits = credits + ? WHERE client_id = ?", (count, foreman_id)
            )
        if silent:
            logger.info("%d late replica(s) never committed: counted failed", len(silent))

    # -- audit --------------------------------------------------------------

    def totals(self) -> LedgerTotals:
        with self._lock:
            clients, credits, issued = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(credits), 0), COALESCE(SUM(starting_credits), 0)"
                " FROM clients"
            ).fetchone()
            open_tasks, escrow = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(escrow), 0) FROM tasks"
            ).fetchone()
            (late,) = self._db.execute("SELECT COUNT(*) FROM late WHERE sha256 = ''").fetchone()
        return LedgerTotals(
            clients=clients,
            client_credits=credits,
            escrowed_credits=escrow + late,
            open_tasks=open_tasks,
            starting_credits_issued=issued,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
