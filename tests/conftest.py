from __future__ import annotations

import math
import uuid

import grpc
import pytest
from hypothesis import settings

from discovery_service.ledger import LedgerConfig
from tests.discovery_harness import DiscoveryHarness
from tests.redis_server import RedisServer

# The same generated examples on every run: a failure reproduces, and CI
# never goes red by the luck of the draw. (Explore freely with
# `--hypothesis-profile=explore`.)
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_location(request, tmp_path):
    """Where a test's ledger lives: a SQLite file, or a fresh prefix in Redis.
    The discovery contract tests run once against each."""

    def location(name: str = "ledger") -> str:
        if request.param == "sqlite":
            return str(tmp_path / f"{name}.sqlite3")
        server = request.getfixturevalue("redis_server")
        return server.url(f"t{uuid.uuid4().hex[:12]}-{name}:")

    return location


@pytest.fixture
def discovery(store_location):
    """A real discovery server on 127.0.0.1:<ephemeral> (SQLite or Redis)."""
    harness = DiscoveryHarness.start(store_location())
    yield harness
    harness.stop()


@pytest.fixture
def discovery_factory(store_location):
    """Start discovery servers with a chosen config; all stopped after."""
    started: list[DiscoveryHarness] = []

    def start(config: LedgerConfig | None = None, name: str = "ledger") -> DiscoveryHarness:
        harness = DiscoveryHarness.start(store_location(name), config)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.fixture(autouse=True)
def every_tick_leaves_no_task_undecided(request, monkeypatch):
    """A JobCore tick visits only the tasks an event touched or a time of
    theirs has come for. After each tick of every job a test runs in this
    process, a visit of every open task must decide nothing more, no
    task's wake-up may be later than its own state says, the chunks
    waiting for a task are in the queue their suspects say, and a settle
    would find every task that wants a replica."""
    from foreman_service.core import JobCore

    if request.node.get_closest_marker("unchecked_ticks"):
        return

    tick = JobCore.tick

    def checked(core: JobCore, now: float) -> list:
        commands = tick(core, now)
        if core._failed:
            return commands
        missed: list = []
        for task in list(core._tasks.values()):
            core._speculate(task, now, missed)
            core._ask_replicas(task, now, missed)
            core._decide(task, now, missed)
        assert missed == [], f"a tick at {now} left these undecided: {missed}"
        dues = []
        for task_id, task in core._tasks.items():
            due = core._due_at(task)
            assert due > now, f"task {task_id} was due at {due} and not decided at {now}"
            assert core._due.get(task_id, math.inf) <= due, f"task {task_id} would wake late"
            dues.append(due)
        assert core.wake_at() <= min(dues, default=math.inf), "the loop would wake late"
        assert not any(c.suspects for c in core._pending), "a chunk with suspects among the fresh"
        assert all(c.suspects for c in core._suspected), "a chunk without suspects kept apart"
        wanting = {t for t, task in core._tasks.items() if task.replicas_wanted}
        assert wanting <= core._wanting, f"a settle would not send {wanting - core._wanting} to ask"
        return commands

    monkeypatch.setattr(JobCore, "tick", checked)
