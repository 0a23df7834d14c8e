"""Whole jobs across latency (issue 16, item 3): the discovery service and
every worker behind its own delay line, 0, 10 and 50 ms each way. Latency
alone is no fault: the job is right, every task validated, nothing retried,
replaced or speculated, and the books balance with no task left open.
(What the latency costs in time is the latency bench's to say.)"""

from __future__ import annotations

import time
from collections import Counter

import pytest

import ec262
from discovery_service.stores import open_store
from ec262.identity import load_identities
from ec262.local_cluster import LOCAL_STARTING_CREDITS
from tests.delayed_cluster import delayed_cluster

WORKERS = 3


def words(key, line):
    for word in line.split():
        yield word, 1


def total(word, counts):
    return sum(counts)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_a_job_across_delay_lines_is_right_and_latency_alone_is_no_fault(tmp_path, delay):
    data = {f"l{n}": f"w{n % 7} w{n % 5} w{n % 3}" for n in range(96)}
    with delayed_cluster(delay, WORKERS, tmp_path) as cluster:
        job = ec262.Job(mapper=words, reducer=total, chunk_bytes=80)  # about 24 map tasks
        result = job.run(
            data, discovery=cluster.discovery, identity=tmp_path / "foreman.json", progress=False
        )
        # Every worker was reached through its line (it advertises it).
        assert all(line.connections >= 1 for line in cluster.worker_lines)
    stats = job.stats
    assert result == Counter(word for line in data.values() for word in line.split())
    # The lines are on the path: per phase, RequestTasks, AssignTasks and
    # SettleTasks come one after the other whatever the batching.
    assert stats.seconds >= 2 * 3 * (2 * delay)
    assert stats.map_tasks > WORKERS * 2  # more tasks than slots: requests and assignments overlap
    assert stats.tasks_validated == stats.map_tasks + stats.reduce_tasks
    assert (stats.retries, stats.tasks_invalid, stats.missing_reports) == (0, 0, 0)
    assert (stats.replicas_added, stats.speculative_replicas) == (0, 0)
    assert stats.cheaters_seen == 0
    store = open_store(cluster.ledger)
    try:
        totals = store.totals()
        (foreman,) = load_identities(tmp_path / "foreman.json")
        balance = store.get_client(foreman.client_id, time.time()).credits
    finally:
        store.close()
    assert totals.clients == WORKERS + 1
    assert totals.open_tasks == 0
    assert totals.client_credits + totals.escrowed_credits == totals.starting_credits_issued
    assert totals.escrowed_credits == 0  # every credit the job spent was paid to a worker
    assert stats.credits_spent >= 2 * stats.tasks_validated  # a quorum paid for each task
    assert balance == LOCAL_STARTING_CREDITS - stats.credits_spent
