"""The stores' index of free workers (issue 16, item 5): it stays what the
clients' rows say through every operation, draws from it stay uniform over
the eligible workers, a lapsed lease is never chosen, and a RequestTasks or
an AddReplica reads a bounded amount of it whatever the pool's size.

Through `Ledger` on a real SQLite file and a real redis-server, without
gRPC; the clock is moved, never waited for; nothing is timed."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import sqlite3
import uuid
from collections import Counter

import pytest

from discovery_service import draws
from discovery_service.draws import CandidateList, draw_groups
from discovery_service.ledger import Ledger, LedgerConfig, choose_workers
from discovery_service.redis_store import RedisStore
from discovery_service.sqlite_store import SqliteStore
from discovery_service.store import IDENTITY, NETWORK, Candidate, GroupRule
from discovery_service.stores import open_store
from ec262.errors import NoCommittedQuorum, UnknownTask
from tests.discovery_harness import AGREED_SHA256, OTHER_SHA256, ManualClock

RUNTIME = "cpython-3.11"


@pytest.fixture(params=["sqlite", "redis"])
def open_ledger(request, tmp_path):
    """Make Ledgers on a fresh SQLite file or Redis prefix, with a clock."""
    opened = []

    def make(config: LedgerConfig | None = None) -> Ledger:
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / f"ledger-{len(opened)}.sqlite3")
        else:
            server = request.getfixturevalue("redis_server")
            store = open_store(server.url(f"t{uuid.uuid4().hex[:12]}:"))
        ledger = Ledger(store, config or LedgerConfig(starting_credits=10**6), clock=ManualClock())
        opened.append(store)
        return ledger

    yield make
    for store in opened:
        store.close()


_hosts = itertools.count()


def _worker(ledger: Ledger, *, slots: int = 1, ttl: int = 60) -> str:
    """A live worker at an address of its own."""
    record, _ = ledger.create_client()
    n = next(_hosts)
    address = f"10.{n // 62500 % 250}.{n // 250 % 250}.{n % 250 + 1}:7000"
    ledger.register_worker(
        record.client_id, address=address, ttl_seconds=ttl, slots=slots, runtime=RUNTIME
    )
    return record.client_id


def _foreman(ledger: Ledger) -> str:
    return ledger.create_client()[0].client_id


# -- what the index must hold -----------------------------------------------------


def _sqlite_index(store: SqliteStore, now: float) -> set[str]:
    db = store._db
    positions = dict(db.execute("SELECT pos, client_id FROM free_pool"))
    assert sorted(positions) == list(range(len(positions))), "positions are dense"
    free = set(positions.values())
    query = "SELECT client_id FROM clients WHERE pooled AND busy_slots < slots"
    assert free == {c for (c,) in db.execute(query)}
    rows = db.execute("SELECT client_id, pooled, expiry_unix FROM clients").fetchall()
    # Pooled from registration to leave or to a read that found it lapsed.
    assert all(expiry > 0 for _, pooled, expiry in rows if pooled)
    assert all(pooled for _, pooled, expiry in rows if expiry > now)
    return free


def _redis_index(store: RedisStore, now: float) -> set[str]:
    r, p = store._redis, store.prefix

    def zset(name: str) -> dict[str, float]:
        return {k.decode(): v for k, v in r.zrange(p + name, 0, -1, withscores=True)}

    pool, free, trust = zset("pool"), zset("free"), zset("trust")
    clients = {
        c: r.hgetall(f"{p}c:{c}") for c in set(pool) | set(free) | set(trust)
    }  # fmt: skip
    busy = {c: int(h[b"busy_slots"]) < int(h[b"slots"]) for c, h in clients.items()}
    assert set(free) == {c for c in pool if busy[c]}
    assert all(free[c] == pool[c] for c in free), "scored by the lease"
    for c, lease in pool.items():
        h = clients[c]
        assert lease == float(h[b"expiry_unix"])
        assert trust[c] == int(h.get(b"trust", 0))
        assert zset("trust:" + h[b"runtime"].decode())[c] == trust[c]
    # Left, or lapsed and not met by a read since.
    assert all(float(clients[c][b"expiry_unix"]) <= now for c in set(trust) - set(pool))
    return set(free)


def index_of(ledger: Ledger) -> set[str]:
    """The workers the store's index lists as free, checked against the
    clients' own rows."""
    store, now = ledger.store, ledger._clock()
    if isinstance(store, SqliteStore):
        return _sqlite_index(store, now)
    return _redis_index(store, now)


def _slots_held(ledger: Ledger) -> Counter:
    """For each worker, the slots its tasks hold, read from the tasks
    themselves: open tasks it is assigned to, and settled ones it is late
    for without a commitment yet."""
    store, held = ledger.store, Counter()
    if isinstance(store, SqliteStore):
        for (workers,) in store._db.execute("SELECT workers FROM tasks"):
            held.update(workers.split())
        held.update(w for (w,) in store._db.execute("SELECT worker_id FROM late WHERE sha256 = ''"))
        return held
    r, p = store._redis, store.prefix  # the tasks' own expiry sets list them
    for task_id in r.zrange(f"{p}texp", 0, -1):
        held.update((r.hget(f"{p}t:{task_id.decode()}", "workers") or b"").decode().split())
    for task_id in r.zrange(f"{p}lexp", 0, -1):
        held.update(
            field.decode()[2:] for field, sha in r.hgetall(f"{p}l:{task_id.decode()}").items()
            if field.startswith(b"w:") and sha == b""
        )  # fmt: skip
    return held


def _assert_busy_slots_are_held(ledger: Ledger, ids: list[str]) -> None:
    now, held = ledger._clock(), _slots_held(ledger)
    busy = {c: ledger.store.get_client(c, now).busy_slots for c in ids}
    assert busy == {c: held[c] for c in ids}, "a busy slot no task holds, or the reverse"


def _live_free(ledger: Ledger, ids: list[str]) -> set[str]:
    now = ledger._clock()
    records = [ledger.store.get_client(c, now) for c in ids]
    return {r.client_id for r in records if r.expiry_unix > now and r.busy_slots < r.slots}


# -- the index through every operation -----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_the_index_follows_the_clients_through_a_random_walk(open_ledger, seed):
    """Register, leave, assign, commit, settle (valid, invalid, with late
    workers), add replicas with releases, leases and tasks expiring, late
    windows ending: after each step the index is exactly the pooled workers
    with a free slot, and holds every live one."""
    rng = random.Random(seed)
    ledger = open_ledger(
        LedgerConfig(starting_credits=10**6, task_ttl=50, late_window=20, trusted_after=2)
    )
    clock: ManualClock = ledger._clock
    foreman = _foreman(ledger)
    workers = [_worker(ledger, slots=rng.randint(1, 3), ttl=rng.randint(5, 40)) for _ in range(8)]
    open_tasks: dict[str, list[str]] = {}
    for _ in range(120):
        step = rng.random()
        if step < 0.15:
            w = rng.choice(workers)
            ledger.register_worker(
                w, address=f"127.0.0.1:{workers.index(w) + 1}", ttl_seconds=rng.randint(5, 40),
                slots=rng.randint(1, 3), runtime=RUNTIME,
            )  # fmt: skip
        elif step < 0.2:
            ledger.register_worker(
                rng.choice(workers), address="", ttl_seconds=-1, slots=0, runtime=""
            )
        elif step < 0.45:
            tasks, _ = ledger.request_tasks(
                foreman, n=rng.randint(1, 3), exclude_workers=[], runtime=RUNTIME,
                replication=rng.choice([1, 2, 3]),
            )  # fmt: skip
            open_tasks.update({t.task_id: [w.client_id for w in t.workers] for t in tasks})
        elif step < 0.7 and open_tasks:
            task_id = rng.choice(sorted(open_tasks))
            assigned = open_tasks.pop(task_id)
            try:
                for w in assigned[: len(assigned) // 2 + 1]:
                    ledger.commit_result(w, task_id, AGREED_SHA256)
                try:
                    ledger.settle_task(foreman, task_id, valid=rng.random() < 0.8, missing=[])
                except NoCommittedQuorum:  # replicas released below its quorum
                    ledger.settle_task(foreman, task_id, valid=False, missing=[])
            except UnknownTask:  # expired meanwhile
                continue
            late = assigned[len(assigned) // 2 + 1 :]
            for w in late:  # a late commitment, matching or not
                if rng.random() < 0.5:
                    sha = AGREED_SHA256 if rng.random() < 0.5 else OTHER_SHA256
                    with contextlib.suppress(UnknownTask):
                        ledger.commit_result(w, task_id, sha)
        elif step < 0.8 and open_tasks:
            task_id = rng.choice(sorted(open_tasks))
            release = [w for w in open_tasks[task_id] if rng.random() < 0.5]
            try:
                added, _ = ledger.add_replica(
                    foreman, task_id, exclude_workers=[], release_workers=release, runtime=RUNTIME
                )
            except UnknownTask:
                open_tasks.pop(task_id)
                continue
            kept = [w for w in open_tasks[task_id] if w not in release]
            open_tasks[task_id] = kept + ([added.client_id] if added else [])
        else:
            clock.advance(rng.choice([1, 5, 15, 30]))
            ledger.sweep()
        assert _live_free(ledger, workers) <= index_of(ledger)
        _assert_busy_slots_are_held(ledger, workers)


def test_a_worker_that_fills_its_slots_leaves_the_index_and_comes_back(open_ledger):
    ledger = open_ledger()
    foreman = _foreman(ledger)
    workers = [_worker(ledger) for _ in range(3)]
    assert index_of(ledger) == set(workers)
    tasks, _ = ledger.request_tasks(foreman, n=1, exclude_workers=[], runtime=RUNTIME)
    assert index_of(ledger) == set()
    for w in workers:
        ledger.commit_result(w, tasks[0].task_id, AGREED_SHA256)
    ledger.settle_task(foreman, tasks[0].task_id, valid=True, missing=[])
    assert index_of(ledger) == set(workers)
    ledger.register_worker(workers[0], address="", ttl_seconds=-1, slots=0, runtime="")
    assert index_of(ledger) == set(workers[1:])


# -- lapsed leases -------------------------------------------------------------------


def test_a_worker_whose_lease_passed_is_never_chosen_though_still_listed(open_ledger):
    ledger = open_ledger()
    foreman = _foreman(ledger)
    short = _worker(ledger, slots=100, ttl=5)
    others = [_worker(ledger, slots=100, ttl=600) for _ in range(3)]
    ledger._clock.advance(10)  # no sweep, no read: the index still lists it
    assert short in index_of(ledger)
    chosen = Counter()
    for _ in range(30):
        tasks, _ = ledger.request_tasks(foreman, n=1, exclude_workers=[], runtime=RUNTIME)
        chosen.update(w.client_id for t in tasks for w in t.workers)
    assert short not in chosen
    assert set(chosen) == set(others)
    assert short not in index_of(ledger)  # the draw that met it took it out


def test_a_lapsed_worker_that_registers_again_is_drawn_again(open_ledger):
    ledger = open_ledger()
    foreman = _foreman(ledger)
    workers = [_worker(ledger, ttl=5) for _ in range(3)]
    ledger._clock.advance(10)
    assert ledger.request_tasks(foreman, n=1, exclude_workers=[], runtime=RUNTIME)[0] == []
    assert index_of(ledger) == set()
    for i, w in enumerate(workers):
        ledger.register_worker(
            w, address=f"127.0.0.1:{i + 1}", ttl_seconds=60, slots=1, runtime=RUNTIME
        )
    tasks, _ = ledger.request_tasks(foreman, n=1, exclude_workers=[], runtime=RUNTIME)
    assert {w.client_id for w in tasks[0].workers} == set(workers)


# -- uniform draws ----------------------------------------------------------------


def _chi_square(counts: Counter, keys: list[str], draws_made: int) -> float:
    expected = draws_made / len(keys)
    return sum((counts[k] - expected) ** 2 / expected for k in keys)


# The 0.999 quantile of chi-square with k - 1 degrees of freedom, roughly
# (Wilson-Hilferty): a uniform draw stays under it, a skewed one does not.
def _chi_square_bound(k: int) -> float:
    df = k - 1
    return df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("attempts", [0, 1, draws.DRAW_ATTEMPTS])
def test_each_pick_is_uniform_over_the_eligible_workers(attempts):
    """With every pick sampled (64 attempts), with the exact listing at
    once (0) and with a mix (1): the same uniform distribution over the
    workers still eligible once a first worker holds its network."""
    candidates = [
        Candidate(f"w{i}", f"10.0.{i % 4}.{i}:1", 1, f"10.0.{i % 4}.0/24") for i in range(24)
    ]
    rng = random.Random(7)
    firsts, seconds = Counter(), Counter()
    trials = 6000
    for _ in range(trials):
        (group,) = draw_groups(
            CandidateList(candidates), [GroupRule(2)], rng, spread=NETWORK,
            taken=frozenset({"10.0.3.0/24"}), attempts=attempts,
        )  # fmt: skip
        firsts[group[0].client_id] += 1
        if group[0].client_id == "w0":
            seconds[group[1].client_id] += 1
    eligible = [c.client_id for c in candidates if c.network != "10.0.3.0/24"]
    assert set(firsts) == set(eligible)
    assert _chi_square(firsts, eligible, trials) < _chi_square_bound(len(eligible))
    after_w0 = [c.client_id for c in candidates if c.network not in ("10.0.0.0/24", "10.0.3.0/24")]
    assert set(seconds) == set(after_w0)
    assert _chi_square(seconds, after_w0, sum(seconds.values())) < _chi_square_bound(len(after_w0))


def test_a_capped_group_draws_its_trusted_workers_uniformly_among_few():
    """Two trusted workers among 200 (a short listing of the class), the
    cap allowing one untrusted: every group holds both trusted ones and an
    untrusted one drawn uniformly."""
    candidates = [Candidate(f"w{i}", f"h:{i}", 5, trusted=i < 2) for i in range(200)]
    rng = random.Random(3)
    untrusted = Counter()
    for _ in range(4000):
        (group,) = draw_groups(CandidateList(candidates), [GroupRule(3, 1)], rng, spread=IDENTITY)
        assert sum(c.trusted for c in group) == 2
        untrusted.update(c.client_id for c in group if not c.trusted)
    keys = [f"w{i}" for i in range(2, 200)]
    assert _chi_square(untrusted, keys, 4000) < _chi_square_bound(len(keys))


def test_the_stores_draw_uniformly_from_their_index(open_ledger):
    """RequestTasks(n=1, replication=1) over 30 workers, each settled
    before the next: every worker about as often (seeded draws)."""
    ledger = open_ledger()
    store = ledger.store
    if isinstance(store, RedisStore):
        store._random = random.Random(11)
    choose = functools.partial(choose_workers, rng=random.Random(11))
    foreman = _foreman(ledger)
    workers = [_worker(ledger, slots=2) for _ in range(30)]
    counts = Counter()
    trials = 1500
    for _ in range(trials):
        tasks, _ = _request(ledger, foreman, choose, n=1, replication=1)
        (task,) = tasks
        counts[task.workers[0].client_id] += 1
        ledger.settle_task(foreman, task.task_id, valid=False, missing=[])
    assert set(counts) == set(workers)
    assert _chi_square(counts, workers, trials) < _chi_square_bound(len(workers))


def _request(ledger: Ledger, foreman: str, choose, *, n: int, replication: int, exclude=()):
    """Ledger.request_tasks with `choose` for the draw (a seeded one)."""
    from discovery_service.ledger import _new_task
    from discovery_service.store import TaskRequest

    now = ledger._clock()
    request = TaskRequest(
        foreman_id=foreman, n=n, replication=replication, exclude_workers=frozenset(exclude),
        runtime=RUNTIME, now=now, task_expiry_unix=now + 600,
        trusted_after=ledger.config.trusted_after,
    )  # fmt: skip
    return ledger.store.assign_tasks(request, choose, _new_task)


# -- bounded work, whatever the pool ---------------------------------------------------


def _sqlite_steps(store: SqliteStore, action) -> int:
    """SQLite virtual machine instructions `action` runs (counted by a
    progress handler every 10): the work of its statements, not time."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 10
        return 0

    store._db.set_progress_handler(count, 10)
    try:
        action()
    finally:
        store._db.set_progress_handler(None, 0)
    return steps


def _redis_commands(store: RedisStore, action) -> int:
    """Redis commands `action` runs, its scripts' own included (INFO
    commandstats counts what a script calls)."""

    def total() -> int:
        stats = store._redis.info("commandstats")
        scripts = ("cmdstat_info", "cmdstat_evalsha", "cmdstat_eval", "cmdstat_script")
        return sum(v["calls"] for k, v in stats.items() if k not in scripts)

    before = total()
    action()
    return total() - before


def _work(ledger: Ledger, action) -> int:
    store = ledger.store
    if isinstance(store, SqliteStore):
        return _sqlite_steps(store, action)
    return _redis_commands(store, action)


def _pool_of(open_ledger, size: int, *, trusted: bool) -> tuple[Ledger, str]:
    ledger = open_ledger(LedgerConfig(starting_credits=10**6, trusted_after=1))
    store = ledger.store
    foreman = _foreman(ledger)
    for _ in range(size):
        _worker(ledger, slots=4)
    if trusted:  # every worker past --trusted-after, as after a long run
        if isinstance(store, SqliteStore):
            with store._lock:
                store._db.execute("UPDATE clients SET trust = 5")
        else:
            for key in store._redis.scan_iter(match=f"{store.prefix}c:*"):
                store._redis.hset(key, "trust", 5)
            store._redis.delete(f"{store.prefix}pool_index")  # rebuilt by the next draw
    return ledger, foreman


def _work_of_a_request_and_a_replica(open_ledger, size: int, trusted: bool) -> tuple[int, int]:
    ledger, foreman = _pool_of(open_ledger, size, trusted=trusted)
    store = ledger.store
    if isinstance(store, RedisStore):
        store._random = random.Random(5)
    choose = functools.partial(choose_workers, rng=random.Random(5))
    _request(ledger, foreman, choose, n=1, replication=3)  # rebuilds Redis's index once
    made = []
    asked = _work(
        ledger, lambda: made.extend(_request(ledger, foreman, choose, n=4, replication=3)[0])
    )
    assert len(made) == 4
    task = made[0]
    replica = _work(
        ledger,
        lambda: ledger.add_replica(
            foreman, task.task_id, exclude_workers=[],
            release_workers=[task.workers[0].client_id], runtime=RUNTIME,
        ),
    )  # fmt: skip
    return asked, replica


@pytest.mark.parametrize("trusted", [False, True])
def test_request_tasks_and_add_replica_do_not_read_the_whole_pool(open_ledger, trusted):
    """The work of one RequestTasks(n=4) and one AddReplica with 5,000
    workers is about that with 30 (an O(pool) scan would be ~160 times
    it): statements' VM instructions on SQLite, commands on Redis."""
    asked_small, replica_small = _work_of_a_request_and_a_replica(open_ledger, 30, trusted)
    asked_large, replica_large = _work_of_a_request_and_a_replica(open_ledger, 5000, trusted)
    print(f"work with 30 / 5,000 workers: {asked_small} / {asked_large} (RequestTasks),"
          f" {replica_small} / {replica_large} (AddReplica)")  # fmt: skip
    assert asked_large < 2 * asked_small + 200
    assert replica_large < 2 * replica_small + 200


def test_the_live_count_stops_at_its_cap_whatever_the_pool(open_ledger):
    """A RequestTasks made short and a counting AddReplica report the live
    workers; counted up to a cap, their work is O(cap), not O(pool) (the
    full count was 375 ms per call on Redis with 10,000 workers). Below the
    cap the count is exact: a lapsed worker and the caller are not in it."""
    work, counts = [], []
    for size in (40, 400):
        ledger = open_ledger()
        foreman = _foreman(ledger)
        for _ in range(size):
            _worker(ledger)
        _worker(ledger, ttl=5)  # its lease passes below
        ledger._clock.advance(10)

        def count(cap: int, ledger=ledger, foreman=foreman) -> tuple[int, int]:
            return ledger.store.live_workers(foreman, RUNTIME, ledger._clock(), cap=cap)

        counts.append((count(10_000), count(25)))
        work.append(_work(ledger, lambda count=count: count(25)))
    assert counts == [((40, 40), (25, 25)), ((400, 400), (25, 25))]
    print(f"work of a count capped at 25, 40 / 400 workers: {work[0]} / {work[1]}")
    assert work[1] < 1.5 * work[0] + 200


# -- an older ledger file ---------------------------------------------------------


def test_a_schema_7_ledger_gets_its_index_on_open(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(SqliteStore(path), LedgerConfig(), clock=ManualClock())
    workers = [_worker(ledger) for _ in range(5)]
    ledger.register_worker(workers[0], address="", ttl_seconds=-1, slots=0, runtime="")
    ledger.store.close()
    db = sqlite3.connect(path)
    for trigger in ("free_pool_join", "free_pool_leave", "free_pool_dense"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE free_pool")
    db.execute("DROP INDEX clients_by_trust")
    db.execute("ALTER TABLE clients DROP COLUMN pooled")
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    reopened = Ledger(SqliteStore(path), LedgerConfig(), clock=ManualClock())
    try:
        assert index_of(reopened) == set(workers[1:])
    finally:
        reopened.store.close()


def test_lease_renewals_wait_for_the_sweep_and_go_in_one_write(open_ledger, monkeypatch):
    """Both stores. Every authenticated call renews its caller's lease,
    but a pool of workers calling now and then must not cost a store round
    trip each: the renewals are noted and the next sweep writes them all at
    once, each with its own call's expiry, before it ends any lease."""
    ledger = open_ledger(LedgerConfig(starting_credits=10**6, foreman_lease=60))
    clients = [ledger.create_client() for _ in range(50)]
    writes: list[dict] = []
    real = ledger.store.renew_leases
    monkeypatch.setattr(
        ledger.store, "renew_leases", lambda due: (writes.append(dict(due)), real(due))
    )
    called_at = ledger._clock()
    for record, secret in clients:
        assert ledger.authenticate(f"Bearer {record.client_id}:{secret}") == record.client_id
    assert writes == []
    ledger.sweep()
    assert len(writes) == 1 and set(writes[0]) == {r.client_id for r, _ in clients}
    assert set(writes[0].values()) == {called_at + ledger._lease_span()}
    ledger.sweep()
    assert len(writes) == 1  # nothing new to write
