"""The SQLite store's index of its worker pool, so a draw reads O(picks) rows.

Why: RequestTasks read every live worker twice (the trust rule's count and
the candidates) and then filtered the list per task (issue 16, item 5).
Three structures, kept by the database itself so no code path that changes
a worker's slots can forget them:

- `clients.pooled`: 1 from a worker's registration until it leaves, or
  until a read finds its lease passed (then set to 0 there and then: a
  lapsed worker is never chosen, and leaves the indexes below the first
  time a draw meets it, so dead workers cost once, not every request).
- `free_pool`: the pooled workers with a free slot, at dense positions 0 ..
  n - 1, for a uniform draw by position in O(log n). Triggers on `clients`
  add a worker when it becomes pooled-and-free and take it out when it
  stops being so; a trigger on `free_pool` fills the hole a removal leaves
  with the last position, so positions stay dense.
- a partial index on trust over the pooled workers: the trust rule's count
  stops after the few trusted workers it needs, and a trust class with few
  members is listed from an index range. One index only, on trust alone:
  every valid settle changes its workers' trust, and each index on it
  costs that write again (a second one on (runtime, trust) made a settle
  in a pool of 10,000 cost twice what it does in a pool of 30). The
  runtime is checked on the row, so a count for a runtime few trusted
  workers run reads past the others: slower in that case, never wrong.

`FreeWorkers` is the draws.FreePool that `draws.draw_groups` samples.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from discovery_service.store import Candidate

_POOLED = "pooled = 1"  # the partial indexes' condition, written the same in every query
POOL_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS free_pool (  -- pooled clients with a free slot
    pos       INTEGER PRIMARY KEY,  -- dense: 0 .. count - 1
    client_id TEXT NOT NULL UNIQUE
)""",
    f"CREATE INDEX IF NOT EXISTS clients_by_trust ON clients (trust) WHERE {_POOLED}",
    """CREATE TRIGGER IF NOT EXISTS free_pool_join
AFTER UPDATE OF pooled, slots, busy_slots ON clients
WHEN NEW.pooled = 1 AND NEW.busy_slots < NEW.slots
    AND NOT (OLD.pooled = 1 AND OLD.busy_slots < OLD.slots)
BEGIN
    INSERT INTO free_pool (pos, client_id)
    VALUES ((SELECT coalesce(max(pos) + 1, 0) FROM free_pool), NEW.client_id);
END""",
    """CREATE TRIGGER IF NOT EXISTS free_pool_leave
AFTER UPDATE OF pooled, slots, busy_slots ON clients
WHEN OLD.pooled = 1 AND OLD.busy_slots < OLD.slots
    AND NOT (NEW.pooled = 1 AND NEW.busy_slots < NEW.slots)
BEGIN
    DELETE FROM free_pool WHERE client_id = NEW.client_id;
END""",
    # One row at a time only (a trigger of a DELETE of several rows could
    # move a row the statement was about to delete).
    """CREATE TRIGGER IF NOT EXISTS free_pool_dense AFTER DELETE ON free_pool
BEGIN
    UPDATE free_pool SET pos = OLD.pos
    WHERE pos = (SELECT max(pos) FROM free_pool) AND pos > OLD.pos;
END""",
)

_COLUMNS = (
    "c.client_id, c.address, c.slots - c.busy_slots, c.network, c.trust, c.runtime, c.expiry_unix"
)


def unpool(db: sqlite3.Connection, client_ids: Iterable[str], now: float) -> None:
    """Workers found with their lease passed leave the pool (and, by the
    triggers, `free_pool`) until they register again."""
    db.executemany(
        "UPDATE clients SET pooled = 0 WHERE client_id = ? AND expiry_unix <= ?",
        [(client_id, now) for client_id in client_ids],
    )


def trusted_usable(
    db: sqlite3.Connection,
    *,
    now: float,
    foreman_id: str,
    runtime: str,
    trusted_after: int,
    exclude: frozenset[str],
    enough: int,
) -> int:
    """The trusted workers this request could use (live, of its runtime, not
    the foreman, not excluded), counted up to `enough` (store.trusted_enough:
    the rule only compares the count with that); 0 without a trust rule.
    Reads at most enough + len(exclude) + 1 rows beside lapsed ones (which
    leave the pool as they are met) and those of other runtimes."""
    if not trusted_after:
        return 0
    query = f"SELECT client_id, expiry_unix FROM clients WHERE {_POOLED} AND trust >= ?"
    args: tuple = (trusted_after,)
    if runtime:
        query += " AND runtime = ?"
        args += (runtime,)
    count, lapsed = 0, []
    cursor = db.execute(query, args)
    for client_id, expiry_unix in cursor:
        if expiry_unix <= now:
            lapsed.append(client_id)
        elif client_id != foreman_id and client_id not in exclude:
            count += 1
            if count >= enough:
                break
    cursor.close()
    unpool(db, lapsed, now)
    return count


class FreeWorkers:
    """draws.FreePool over `free_pool`, for one request in its transaction:
    positions stay put during the draw; `close` then un-pools the workers it
    met with their lease passed."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        now: float,
        foreman_id: str,
        runtime: str,
        exclude: frozenset[str],
        trusted_after: int,
    ) -> None:
        self._db = db
        self._now = now
        self._foreman_id = foreman_id
        self._runtime = runtime
        self._exclude = exclude
        self._trusted_after = trusted_after
        self._lapsed: set[str] = set()
        (self._size,) = db.execute("SELECT coalesce(max(pos) + 1, 0) FROM free_pool").fetchone()

    def size(self) -> int:
        return self._size

    def at(self, position: int) -> Candidate | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM free_pool f JOIN clients c ON c.client_id = f.client_id"
            " WHERE f.pos = ?",
            (position,),
        ).fetchone()
        return self._candidate(row) if row else None

    def members(self, trusted: bool | None, limit: int | None = None) -> list[Candidate] | None:
        ta = self._trusted_after
        if trusted is None:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM free_pool f JOIN clients c ON c.client_id = f.client_id"
            ).fetchall()
        elif not ta:  # no trust rule: nobody is trusted
            return [] if trusted else (None if limit is not None else self.members(None))
        else:
            query = (
                f"SELECT {_COLUMNS} FROM clients c WHERE {_POOLED}"
                f" AND trust {'>=' if trusted else '<'} ?"
            )
            args: tuple = (ta,)
            if self._runtime:
                query += " AND runtime = ?"
                args += (self._runtime,)
            if limit is not None:
                query += " LIMIT ?"
                args += (limit + 1,)
            rows = self._db.execute(query, args).fetchall()
            if limit is not None and len(rows) > limit:
                return None
        found = (self._candidate(row) for row in rows)
        return [c for c in found if c is not None and c.free_slots > 0]

    def _candidate(self, row: tuple) -> Candidate | None:
        client_id, address, free, network, trust, runtime, expiry_unix = row
        if expiry_unix <= self._now:
            self._lapsed.add(client_id)
            return None
        if (
            client_id == self._foreman_id
            or client_id in self._exclude
            or (self._runtime and runtime != self._runtime)
        ):
            return None
        ta = self._trusted_after
        return Candidate(client_id, address, free, network, bool(ta) and trust >= ta)

    def close(self) -> None:
        unpool(self._db, self._lapsed, self._now)
        self._lapsed.clear()
