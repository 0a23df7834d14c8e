"""Long fault runs (`make chaos`; not in `make test`, which runs a
representative subset: tests/test_worker_faults.py, tests/test_foreman_faults.py,
tests/test_redis_frontends.py). Each job must return the right result and
leave the books balanced and every slot free (docs/protocol.md section 9)."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

import ec262
from ec262.local_cluster import LocalCluster
from tests.job_harness import sequential, sum_reducer
from tests.test_foreman_faults import _assert_nothing_in_escrow, _slots_free_within
from tests.test_worker_faults import (
    ENDS_AFTER_THAW_WITHIN,
    RECORDS,
    TASK_TIMEOUT,
    job_in_background,
    split_words,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

EXPECTED = sequential(RECORDS, split_words, sum_reducer)


def slow_split(key, line):
    import time

    time.sleep(0.2)  # long enough for the chaos to land mid-task
    yield from ((word, 1) for word in line.split())


def _alive(cluster: LocalCluster) -> None:
    """Forget the workers that died (a killed one cannot report slots)."""
    cluster.workers = [w for w in cluster.workers if w.process.poll() is None]


def test_a_job_survives_a_sixty_second_discovery_outage(tmp_path):
    with LocalCluster(workers=4, slots=1, directory=str(tmp_path / "c")) as cluster:
        identity = tmp_path / "foreman.json"
        runner, outcome = job_in_background(cluster, identity)
        discovery = cluster.discovery.process
        discovery.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        try:
            runner.join(60)
            assert runner.is_alive(), f"the job ended during the outage: {outcome}"
        finally:
            discovery.send_signal(signal.SIGCONT)
        runner.join(ENDS_AFTER_THAW_WITHIN)
        assert not runner.is_alive(), f"still running {ENDS_AFTER_THAW_WITHIN} s after the outage"
        print(f"60 s outage: the job ended {time.monotonic() - started - 60:.1f} s after it")
        assert outcome["result"] == EXPECTED, outcome
        _slots_free_within(cluster, 5)
        _assert_nothing_in_escrow(cluster, identity)


def test_jobs_in_a_row_while_workers_freeze_thaw_and_die(tmp_path):
    """A soak: a seeded chaos thread stops, resumes, kills and replaces
    workers while jobs run one after another on the same cluster. A killed
    worker's replicas left at work after their settles hold its slots until
    the late window ends (3 s here) and are then counted failed."""
    rng = random.Random(262)
    window = ("--late-window", "3")
    with LocalCluster(
        workers=5, slots=1, directory=str(tmp_path / "c"), discovery_args=window
    ) as cluster:
        stop, idle, leave = threading.Event(), threading.Event(), threading.Event()
        frozen: list = []
        killed: list = []  # their logs, should a slot stay held

        def chaos() -> None:
            while not stop.wait(rng.uniform(0.2, 1.0)):
                live = [w for w in cluster.workers if w.process.poll() is None]
                action = rng.choice(["freeze", "thaw", "kill"])
                awake = [w for w in live if w not in frozen]
                if action == "freeze" and len(awake) > 3:  # 3 awake make a task
                    victim = rng.choice(awake)
                    victim.process.send_signal(signal.SIGSTOP)
                    frozen.append(victim)
                elif action == "thaw" and frozen:
                    frozen.pop(0).process.send_signal(signal.SIGCONT)
                elif action == "kill" and len(awake) > 3:
                    victim = rng.choice(awake)
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait(timeout=10)
                    cluster.workers.remove(victim)
                    killed.append(victim)
                    cluster.add_workers(1)
            idle.set()
            # Workers started here die with this thread (their parent-death
            # signal is the thread's, a Linux rule): it waits for the end.
            leave.wait()

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        try:
            for round_ in range(8):
                identity = tmp_path / f"foreman{round_}.json"
                started = time.monotonic()
                result = ec262.Job(
                    discovery=cluster.address, identity=identity, progress=False,
                    chunk_bytes=64, mapper=slow_split, reducer=sum_reducer,
                    task_timeout=TASK_TIMEOUT,
                ).run(RECORDS)  # fmt: skip
                assert result == EXPECTED
                print(f"round {round_}: {time.monotonic() - started:.1f} s,"
                      f" {result.stats.replicas_released} released,"
                      f" {result.stats.replicas_cancelled} cancelled,"
                      f" {result.stats.speculative_replicas} speculative")  # fmt: skip
        finally:
            stop.set()
            assert idle.wait(30), "the chaos thread did not stop"
            for worker in frozen:
                worker.process.send_signal(signal.SIGCONT)
        try:
            _alive(cluster)
            _slots_free_within(cluster, 10, killed)
        finally:
            leave.set()
            thread.join(10)


def test_a_job_survives_its_redis_store_frozen_for_twenty_seconds(tmp_path):
    """The ledger's redis-server SIGSTOPped mid-job: every discovery call is
    UNAVAILABLE (Redis's socket timeout) until it thaws; nothing is lost."""
    import uuid

    from tests.redis_server import RedisServer

    redis = RedisServer()
    try:
        store = redis.url(f"chaos{uuid.uuid4().hex[:8]}:")
        with LocalCluster(
            workers=4, slots=1, directory=str(tmp_path / "c"), discovery_args=("--store", store)
        ) as cluster:
            identity = tmp_path / "foreman.json"
            runner, outcome = job_in_background(cluster, identity)
            redis.process.send_signal(signal.SIGSTOP)
            try:
                runner.join(20)
                assert runner.is_alive(), f"the job ended during the outage: {outcome}"
            finally:
                redis.process.send_signal(signal.SIGCONT)
            thawed = time.monotonic()
            runner.join(ENDS_AFTER_THAW_WITHIN)
            assert not runner.is_alive(), (
                f"still running {ENDS_AFTER_THAW_WITHIN} s after the thaw (the task timeout"
                f" is {TASK_TIMEOUT} s)"
            )
            assert outcome["result"] == EXPECTED, outcome
            print(
                f"20 s Redis freeze: the job ended {time.monotonic() - thawed:.1f} s after it;"
                f" retries {dict(outcome['result'].stats.retry_reasons)}"
            )
            _slots_free_within(cluster, 5)
            _assert_nothing_in_escrow(cluster, identity)
    finally:
        redis.stop()
