"""A foreman stopped mid-job (docs/protocol.md section 9). SIGINT or SIGTERM:
it settles its open tasks and exits within 2 s. SIGKILL: no refund of its
own, so the discovery service's foreman lease does it. Either way its
credits come back and every worker's slots are free, as both the discovery
service and the workers report them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest

from ec262.discovery_client import DiscoveryClient
from ec262.identity import load_identity
from ec262.local_cluster import LocalCluster
from ec262.processes import ServerProcess
from ec262.v1 import worker_pb2, worker_pb2_grpc
from tests.job_harness import books, identity_files
from tests.processes import ROOT

pytestmark = pytest.mark.slow

LEASE = 3  # seconds: short, so the test is


def _busy(cluster: LocalCluster) -> tuple[int, int]:
    """(busy slots the discovery service counts, busy slots the workers report)."""
    import grpc

    ledger = worker_side = 0
    for path in identity_files(cluster):
        with DiscoveryClient(cluster.address, load_identity(path)) as client:
            ledger += client.get_client().busy_slots
    for worker in cluster.workers:
        with grpc.insecure_channel(worker.address) as channel:
            status = worker_pb2_grpc.WorkerStub(channel).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=10
            )
            worker_side += status.busy_slots
    return ledger, worker_side


def in_background(cluster: LocalCluster, run) -> tuple[threading.Thread, dict]:
    """`run()` on a thread, returned once the job's first tasks are out;
    `outcome["result"]` is its result or its exception."""
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["result"] = run()
        except BaseException as error:
            outcome["result"] = error

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while _busy(cluster)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # watching for the job's tasks
    return runner, outcome


def _start_slow_job(cluster: LocalCluster, identity) -> subprocess.Popen:
    """A foreman process whose tasks take a second each, once they run."""
    foreman = subprocess.Popen(
        [sys.executable, "-m", "tests.foreman_script", cluster.address, str(identity),
         "1.0", "12"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert foreman.stdout.readline().strip() == "starting"
    deadline = time.monotonic() + 60
    while _busy(cluster)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # watching for the job's tasks, not waiting on them
    assert _busy(cluster)[0] > 0, "the job never started"
    return foreman


def _slots_free_within(
    cluster: LocalCluster, seconds: float, gone: Sequence[ServerProcess] = ()
) -> float:
    """Seconds until every slot is free (reading only the workers'
    identities: a call with the foreman's would renew its lease)."""
    started = time.monotonic()
    while _busy(cluster) != (0, 0) and time.monotonic() < started + seconds:
        time.sleep(0.1)  # watching the slots, not waiting for a fixed time
    busy = _busy(cluster)
    assert busy == (0, 0), f"slots still busy {seconds} s on: {busy}\n{_holders(cluster, gone)}"
    return time.monotonic() - started


_GIVING_UP = ("abandoned", "dropped", "gave up", "not sending", "refused", "cancelled")


def _holders(cluster: LocalCluster, gone: Sequence[ServerProcess] = ()) -> str:
    """Who holds the busy slots, for a failing test's message: each
    identity the discovery service counts busy, with the last lines its
    worker logged (the ledger itself is locked to its front-end)."""
    lines = []
    for path in identity_files(cluster):
        with DiscoveryClient(cluster.address, load_identity(path)) as client:
            info = client.get_client()
        if info.busy_slots == 0:
            continue
        lines.append(f"{path.name} {info.client_id}: {info.busy_slots} busy")
        for worker in [*cluster.workers, *gone]:
            if any(info.client_id in line for line in worker.lines[:50]):
                state = "killed" if worker.process.poll() is not None else "running"
                lines.append(f"  its worker at {worker.address} ({state}) last logged:")
                telling = [line for line in worker.lines if any(w in line for w in _GIVING_UP)]
                lines += [f"    {line.rstrip()}" for line in [*telling[-10:], *worker.lines[-8:]]]
    return "\n".join([*lines, *_ledger_rows(cluster)])


def _ledger_rows(cluster: LocalCluster) -> list[str]:
    """The open and late tasks in a SQLite ledger, read once its discovery
    service is stopped (it locks the file while it runs): this is only for
    a test that has failed."""
    import sqlite3

    args = list(cluster.discovery_args)
    if "--store" in args and args[args.index("--store") + 1].startswith("redis"):
        return _redis_rows(args[args.index("--store") + 1])
    path = cluster.directory / "ledger.sqlite3"
    if not path.exists():
        return []
    cluster.discovery.stop()
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT 'open', task_id, foreman_id, workers, expiry_unix FROM tasks UNION ALL"
            " SELECT 'late ' || sha256, task_id, foreman_id, worker_id, until_unix FROM late"
            " UNION ALL SELECT 'busy ' || busy_slots, client_id, slots, address, expiry_unix"
            " FROM clients WHERE busy_slots > 0"
        ).fetchall()
    now = time.time()
    return [f"ledger: {kind} {task} {foreman}: {workers}, {until - now:+.1f} s"
            for kind, task, foreman, workers, until in rows]  # fmt: skip


def _redis_rows(url: str) -> list[str]:
    """The open and late tasks, and the busy workers, in a Redis ledger."""
    from discovery_service.stores import open_store

    store = open_store(url)
    r, p, now, rows = store._redis, store.prefix, time.time(), []
    for key in r.scan_iter(match=f"{p}t:*"):
        workers, expiry = r.hmget(key, "workers", "expiry_unix")
        left = float(expiry) - now
        rows.append(f"ledger: open {key.decode()}: {workers.decode()}, {left:+.1f} s")
    for key in r.scan_iter(match=f"{p}l:*"):
        fields = r.hgetall(key).items()
        waiting = [f.decode() for f, sha in fields if f.startswith(b"w:") and not sha]
        rows.append(f"ledger: late {key.decode()}: {waiting}")
    for key in r.scan_iter(match=f"{p}c:*"):
        busy = int(r.hget(key, "busy_slots") or 0)
        if busy:
            rows.append(f"ledger: busy {busy} {key.decode()}")
    store.close()
    return rows


def _assert_nothing_in_escrow(cluster: LocalCluster, identity) -> None:
    balances = books(cluster.address, [identity, *identity_files(cluster)])
    issued = cluster.starting_credits * len(balances)
    assert sum(credits for credits, _, _ in balances.values()) == issued


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_foreman_settles_its_tasks_and_exits_within_two_seconds(tmp_path, how):
    with LocalCluster(workers=3, directory=str(tmp_path / "cluster")) as cluster:
        identity = tmp_path / "foreman.json"
        foreman = _start_slow_job(cluster, identity)
        stopped = time.monotonic()
        foreman.send_signal(how)
        try:
            foreman.wait(timeout=10)
        finally:
            foreman.kill()
        exited_after = time.monotonic() - stopped
        assert exited_after < 2, f"the foreman took {exited_after:.1f} s to stop"
        assert foreman.returncode != 0
        freed_after = _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)
        print(f"{how.name}: exited in {exited_after:.2f} s, slots free {freed_after:.1f} s later")


def test_a_killed_foreman_gives_back_its_credits_and_slots_within_the_lease(tmp_path):
    with LocalCluster(
        workers=3, directory=str(tmp_path / "cluster"),
        discovery_args=("--foreman-lease", str(LEASE)),
    ) as cluster:  # fmt: skip
        identity = tmp_path / "foreman.json"
        foreman = _start_slow_job(cluster, identity)
        foreman.send_signal(signal.SIGKILL)
        foreman.wait(timeout=10)
        freed_after = _slots_free_within(cluster, LEASE + 5)
        _assert_nothing_in_escrow(cluster, identity)
        print(f"slots and credits back {freed_after:.1f} s after SIGKILL (lease {LEASE} s)")


def test_a_job_survives_a_discovery_restart_mid_job(tmp_path):
    """The discovery service SIGKILLed mid-job and back on the same port and
    store 2 s later: the job still returns the right result (its RequestTasks
    and SettleTask calls are retried, safe to repeat), and nothing is left
    busy or in escrow. The old main lost the job with a raw UNAVAILABLE."""
    import ec262
    from ec262.processes import spawn_server
    from tests.job_harness import sequential, stdlib_text, sum_reducer, word_mapper

    with LocalCluster(workers=3, directory=str(tmp_path / "cluster")) as cluster:
        identity = tmp_path / "foreman.json"
        data = stdlib_text(2)
        job = ec262.Job(
            discovery=cluster.address, identity=identity, progress=False,
            chunk_bytes=8192, mapper=word_mapper, reducer=sum_reducer,
        )  # fmt: skip
        runner, outcome = in_background(cluster, lambda: job.run(data))
        assert runner.is_alive(), "the job ended before the fault"
        port = cluster.address.rsplit(":", 1)[1]
        cluster.discovery.process.send_signal(signal.SIGKILL)
        cluster.discovery.process.wait(timeout=10)
        time.sleep(2)  # the outage itself
        cluster.discovery = spawn_server(
            ["discovery", "--port", port, "--store",
             f"sqlite:///{cluster.directory / 'ledger.sqlite3'}",
             "--starting-credits", str(cluster.starting_credits)],
        )  # fmt: skip
        runner.join(120)
        assert not runner.is_alive()
        assert outcome["result"] == sequential(data, word_mapper, sum_reducer), outcome["result"]
        _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)
