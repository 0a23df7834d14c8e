"""A foreman killed mid-job (SIGKILL: no refund of its own) loses its open
tasks to the discovery service's foreman lease: within the lease and a few
seconds its credits are back and every worker's slots are free, as both the
discovery service and the workers report them (docs/protocol.md section 9)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from ec262.discovery_client import DiscoveryClient
from ec262.identity import load_identity
from ec262.local_cluster import LocalCluster
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


def test_a_killed_foreman_gives_back_its_credits_and_slots_within_the_lease(tmp_path):
    with LocalCluster(
        workers=3, directory=str(tmp_path / "cluster"),
        discovery_args=("--foreman-lease", str(LEASE)),
    ) as cluster:  # fmt: skip
        identity = tmp_path / "foreman.json"
        foreman = subprocess.Popen(
            [sys.executable, "-m", "tests.foreman_script", cluster.address, str(identity),
             "1.0", "12"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert foreman.stdout.readline().strip() == "starting"
            deadline = time.monotonic() + 60
            while _busy(cluster)[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # watching for the job's tasks, not waiting on them
            assert _busy(cluster)[0] > 0, "the job never started"
        finally:
            foreman.send_signal(signal.SIGKILL)
            foreman.wait(timeout=10)
        killed = time.monotonic()
        # Only the workers' identities are read until then: a call with the
        # foreman's own identity would renew its lease.
        while _busy(cluster) != (0, 0) and time.monotonic() < killed + LEASE + 5:
            time.sleep(0.1)  # watching the slots, not waiting for a fixed time
        freed_after = time.monotonic() - killed
        assert _busy(cluster) == (0, 0), "slots still busy a lease after the foreman died"
        assert freed_after < LEASE + 5
        balances = books(cluster.address, [identity, *identity_files(cluster)])
        issued = cluster.starting_credits * len(balances)
        assert sum(credits for credits, _, _ in balances.values()) == issued  # nothing in escrow
        print(f"slots and credits back {freed_after:.1f} s after SIGKILL (lease {LEASE} s)")
