"""Tiny tasks (issue 16, item 4): wall time per task of ec262 at replication
3 beside Dask distributed running the same tasks once and three times, each
in no-op RPCs measured either side of it, in one run.

    make bench-tiny   or   .venv/bin/python bench/tiny_bench.py [--records 300] [--rounds 3]

A tiny task maps one record (`job_bench.tiny`, which yields it back) or
reduces one group (`job_bench.total`), so what a task costs is what the
system adds around it. The rows:
  ec262      a local cluster of 3 workers (kept up for every round), one job
             of `--records` one-record map tasks and its reduce tasks at
             replication 3: every task run by 3 workers, paid on 2 agreeing
  Dask x1    distributed.LocalCluster(2 worker processes, 1 thread each):
             the same number of map tasks and reduce tasks, the reduce phase
             submitted once the map phase is gathered, as ec262's waits
  Dask x3    the same with every task submitted 3 times (pure=False) and the
             3 answers compared on the client: the work replication 3 does,
             without its commitments, keys, sandbox or credits
Each row's unit is the no-op RPC (a health Check to an ec262 worker,
sequential) measured right before and after it. The Dask cluster lives only
while its rows run; the idle ec262 cluster's CPU during them is printed (it
shares the 2 cores). Dask is skipped, saying so, when it is not installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_bench import BenchCluster, agreed, cpu_by_role, tiny, total


def reduce_groups(records: dict, groups: int) -> list[list[tuple[str, list]]]:
    """The map output's keys dealt into `groups` reduce tasks, each key's
    values a one-item list (as ec262's shuffle hands them)."""
    keys = sorted(records)
    return [[(key, [records[key]]) for key in keys[i::groups]] for i in range(groups)]


def dask_map(item: tuple[str, int]) -> list:
    return list(tiny(*item))


def dask_reduce(group: list[tuple[str, list]]) -> dict:
    return {key: total(key, values) for key, values in group}


def dask_rows(records: dict, reduce_tasks: int):
    """(run, close): run(copies) computes the tiny job on a Dask
    LocalCluster with every task submitted `copies` times; None, None when
    Dask is not installed."""
    try:
        from dask.distributed import Client
        from dask.distributed import LocalCluster as DaskCluster
    except ImportError:
        return None, None
    cluster = DaskCluster(n_workers=2, threads_per_worker=1, processes=True)
    client = Client(cluster)
    items = list(records.items())
    groups = reduce_groups(records, reduce_tasks)

    def run(copies: int) -> dict:
        mapped = client.gather(
            client.map(dask_map, [item for item in items for _ in range(copies)], pure=False)
        )
        if copies > 1:
            mapped = [agreed(mapped[i : i + copies]) for i in range(0, len(mapped), copies)]
        reduced = client.gather(
            client.map(dask_reduce, [g for g in groups for _ in range(copies)], pure=False)
        )
        if copies > 1:
            reduced = [agreed(reduced[i : i + copies]) for i in range(0, len(reduced), copies)]
        assert sorted(pair for output in mapped for pair in output) == sorted(items)
        result: dict = {}
        for output in reduced:
            result.update(output)
        return result

    def close() -> None:
        client.close()
        cluster.close()

    return run, close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    records = {f"k{i}": i for i in range(args.records)}
    per_task: dict[str, list[float]] = defaultdict(list)  # in no-op RPCs
    milliseconds: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)  # ms per task, by role
    idle_share: list[float] = []  # CPU seconds per second
    dask_missing = False
    cluster = BenchCluster(3)
    try:
        for round_number in range(args.rounds):
            floor_before = cluster.noop_floor()
            result, elapsed, stats = cluster.run(records, mapper=tiny, reducer=total, chunk_bytes=1)
            floor = (floor_before + cluster.noop_floor()) / 2
            assert result == records
            tasks = stats.map_tasks + stats.reduce_tasks
            per_task["ec262 replication 3"].append(elapsed / tasks / floor)
            milliseconds["ec262 replication 3"].append(elapsed / tasks * 1000)
            for role, seconds in stats.cpu.items():
                cpu[role].append(seconds / tasks * 1000)
            run, close = dask_rows(records, stats.reduce_tasks)
            if run is None:
                dask_missing = True
                continue
            try:
                run(1)  # the workers import the functions
                for copies in (1, 3):
                    floor_before = cluster.noop_floor()
                    ec262_before = cpu_by_role()
                    started = time.perf_counter()
                    assert run(copies) == records
                    elapsed = time.perf_counter() - started
                    ec262_after = cpu_by_role()
                    floor = (floor_before + cluster.noop_floor()) / 2
                    name = f"Dask distributed, each task x{copies}"
                    per_task[name].append(elapsed / tasks / floor)
                    milliseconds[name].append(elapsed / tasks * 1000)
                    idle = sum(
                        ec262_after[role] - ec262_before.get(role, 0.0)
                        for role in ec262_after
                        if not role.startswith("foreman")
                    )
                    idle_share.append(idle / elapsed)
            finally:
                close()
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        cluster.close()
    print(
        f"\n{args.records} one-record map tasks and their reduce tasks ({tasks} tasks),"
        f" median of {args.rounds} rounds; unit: a no-op RPC measured either side of each row"
    )
    print(f"  {'':36} {'ms per task':>12} {'no-op RPCs per task':>20} {'(min-max)':>12}")
    for name, ratios in per_task.items():
        print(
            f"  {name:36} {statistics.median(milliseconds[name]):12.2f}"
            f" {statistics.median(ratios):20.2f}"
            f" {f'{min(ratios):.2f}-{max(ratios):.2f}':>12}"
        )
    ours, three = per_task["ec262 replication 3"], per_task.get("Dask distributed, each task x3")
    if three:
        ratio = [a / b for a, b in zip(ours, three, strict=True)]
        print(
            f"  ec262 replication 3 / Dask x3, round by round: {statistics.median(ratio):.2f}"
            f" ({min(ratio):.2f}-{max(ratio):.2f}); issue 16's target for ec262: <= 3 no-op RPCs"
        )
        print(
            "  the idle ec262 cluster's CPU during the Dask rows (cores):"
            f" {statistics.median(idle_share):.2f}"
        )
    if dask_missing:
        print("  Dask: not installed (make bench-tiny installs it)")
    print(
        "  ec262 CPU ms per task: "
        + ", ".join(f"{role} {statistics.median(values):.2f}" for role, values in cpu.items())
    )
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
