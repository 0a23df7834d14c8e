"""Workers that freeze, die or are momentarily full mid-job, and a discovery
service that freezes (docs/protocol.md section 9): the job still returns the
right result, not after the whole task timeout, and afterwards no slot is
left busy, as the workers and the discovery service both report them.

Measured on the old main: one worker frozen by SIGSTOP made a 4 s job take
34 s; 2 of 4 workers killed made it take 128 s (the whole task timeout)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import ec262
from ec262.local_cluster import LocalCluster
from tests.job_harness import sequential, sum_reducer
from tests.test_foreman_faults import (
    _assert_nothing_in_escrow,
    _slots_free_within,
    in_background,
)

pytestmark = pytest.mark.slow

# A task timeout far beyond what any of these jobs may take: a job that
# waited on it would fail the bound below.
TASK_TIMEOUT = 120
# A job must end this soon after an outage ends: well under the task
# timeout, which a task left with no worker it may take would wait for.
ENDS_AFTER_THAW_WITHIN = 30
RECORDS = {f"r{i:02d}": f"line {i} of the fault tests with words" for i in range(24)}


def split_words(key, line):
    for word in line.split():
        yield word, 1


def _run(cluster: LocalCluster, identity, **options) -> ec262.JobResult:
    return ec262.Job(
        discovery=cluster.address, identity=identity, progress=False, chunk_bytes=64,
        mapper=split_words, reducer=sum_reducer, task_timeout=TASK_TIMEOUT, **options,
    ).run(RECORDS)  # fmt: skip


def _timed(cluster: LocalCluster, identity) -> tuple[ec262.JobResult, float]:
    started = time.monotonic()
    result = _run(cluster, identity)
    return result, time.monotonic() - started


def job_in_background(cluster: LocalCluster, identity) -> tuple[threading.Thread, dict]:
    """This file's job, in the background (see `in_background`)."""
    return in_background(cluster, lambda: _run(cluster, identity))


def test_a_frozen_worker_delays_no_task_by_more_than_the_speculation_delay(tmp_path):
    with LocalCluster(workers=4, slots=1, directory=str(tmp_path / "c")) as cluster:
        identity = tmp_path / "foreman.json"
        frozen = cluster.workers[0].process
        frozen.send_signal(signal.SIGSTOP)  # still in the pool: its lease runs 60 s
        try:
            result, seconds = _timed(cluster, identity)
        finally:
            frozen.send_signal(signal.SIGCONT)
        assert result == sequential(RECORDS, split_words, sum_reducer)
        # 12 map tasks and a reduce; most include the frozen worker. Each may
        # wait for a speculative replica (5 s) at worst, never for the 120 s.
        assert seconds < 40, f"the job took {seconds:.1f} s"
        stats = result.stats
        assert stats.replicas_cancelled + stats.replicas_released >= 1
        assert stats.tasks_invalid == 0 and stats.retries == 0
        print(f"one worker frozen: job {seconds:.1f} s, {stats.replicas_cancelled} cancelled,"
              f" {stats.speculative_replicas} speculative")  # fmt: skip
        _slots_free_within(cluster, 5)  # the thawed worker drops what it was sent
        _assert_nothing_in_escrow(cluster, identity)


def test_two_of_four_workers_killed_still_finish_well_before_the_task_timeout(tmp_path):
    with LocalCluster(workers=4, slots=1, directory=str(tmp_path / "c")) as cluster:
        identity = tmp_path / "foreman.json"
        for worker in cluster.workers[:2]:
            worker.process.send_signal(signal.SIGKILL)  # in the pool until their lease ends
            worker.process.wait(timeout=10)
        cluster.workers = cluster.workers[2:]
        result, seconds = _timed(cluster, identity)
        assert result == sequential(RECORDS, split_words, sum_reducer)
        assert seconds < 40, f"the job took {seconds:.1f} s"
        stats = result.stats
        assert stats.replicas_released >= 1  # refused as unreachable: released, replaced
        assert stats.tasks_invalid == 0 and stats.retries == 0  # and no attempt spent
        print(f"2 of 4 workers dead: job {seconds:.1f} s, {stats.replicas_released} released")
        _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)


def test_after_a_job_every_slot_is_free_within_five_seconds(tmp_path):
    with LocalCluster(workers=4, slots=2, directory=str(tmp_path / "c")) as cluster:
        identity = tmp_path / "foreman.json"
        result = _run(cluster, identity)
        assert result == sequential(RECORDS, split_words, sum_reducer)
        _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)


def test_a_job_survives_its_discovery_service_frozen_for_twenty_seconds(tmp_path):
    """SIGSTOP: calls hang until their deadline (no connection refused), the
    workers' FetchKey gives up after 5 s, replicas are released and their
    replacements asked for again until the service is back."""
    with LocalCluster(workers=4, slots=1, directory=str(tmp_path / "c")) as cluster:
        identity = tmp_path / "foreman.json"
        runner, outcome = job_in_background(cluster, identity)
        discovery = cluster.discovery.process
        discovery.send_signal(signal.SIGSTOP)
        try:
            runner.join(20)  # the outage: the job must still be waiting, not failed
            assert runner.is_alive(), f"the job ended during the outage: {outcome}"
        finally:
            discovery.send_signal(signal.SIGCONT)
        runner.join(ENDS_AFTER_THAW_WITHIN)
        assert not runner.is_alive(), f"still running {ENDS_AFTER_THAW_WITHIN} s after the thaw"
        assert outcome["result"] == sequential(RECORDS, split_words, sum_reducer), outcome
        _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)


def test_the_next_job_on_a_cluster_runs_at_once_after_ctrl_c_on_one(tmp_path):
    """The old main: every job on the cluster failed for about 2 minutes
    after a Ctrl-C, the workers keeping the abandoned tasks' slots."""
    from tests.test_foreman_faults import _start_slow_job

    with LocalCluster(workers=3, slots=1, directory=str(tmp_path / "c")) as cluster:
        stopped = _start_slow_job(cluster, tmp_path / "first.json")
        stopped.send_signal(signal.SIGINT)
        try:
            stopped.wait(timeout=10)
        finally:
            stopped.kill()
        identity = tmp_path / "second.json"
        result, seconds = _timed(cluster, identity)
        assert result == sequential(RECORDS, split_words, sum_reducer)
        assert seconds < 20, f"the next job took {seconds:.1f} s"
        assert result.stats.retries == 0
        print(f"the next job after a Ctrl-C: {seconds:.1f} s")
        _slots_free_within(cluster, 5)
