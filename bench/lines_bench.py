"""Line-shaped input (issue 16's workload): a word count over one record per
line of text, ec262 beside the tightest sequential loop and beside Dask
distributed on the same data, in one run.

    make bench-lines   or   .venv/bin/python bench/lines_bench.py [--lines 300000] [--rounds 3]

The data: `--lines` lines of 3-18 words drawn from a Zipf vocabulary of
about 20,000 words (seeded). The mapper splits a line (no combiner unless
the row says so); the reducer sums. Every ratio is to a sequential run made
right before that system's run:
  sequential   for line in lines: for w in line.split(): d[w].append(1); then sums
  Dask         distributed.LocalCluster(2 workers, 1 thread each), one future
               per chunk of lines counting with a Counter, the Counters merged;
               and with every chunk counted 3 times and the copies compared
               (x3: the work replication 3 asks for, without its protocol)
  ec262        a local cluster of 3 worker processes, replication 3 and 1, and
               replication 3 with a combiner
  floor        what the sandboxes must compute whatever the protocol costs:
               one replica's decode + map + reduce + encode CPU (measured here,
               in one process), times the replication, over the 2 cores; and
               3 processes running those steps at once (the wall time the 3
               replicas' own work takes when they share the cores)
Dask is skipped, saying so, when it is not installed (`make bench-lines`
installs it into the bench's environment). The ec262 cluster runs only
while the ec262 rows do, then Dask's only while its row does: neither
system's idle processes share the 2 cores with the other's measurement.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from ec262.local_cluster import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_bench import agreed, cpu_by_process


def make_lines(count: int, seed: int = 16, vocabulary: int = 20_000) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{n}" for n in range(vocabulary)]
    weights = [1 / (rank + 1) for rank in range(vocabulary)]
    lines = []
    pool = rng.choices(words, weights, k=count * 11)
    at = 0
    for _ in range(count):
        length = rng.randint(3, 18)
        lines.append(" ".join(pool[at : at + length]))
        at += length
        if at + 18 > len(pool):
            at = 0
    return lines


def sequential(lines: list[str]) -> dict[str, int]:
    grouped: dict[str, list[int]] = defaultdict(list)
    for line in lines:
        for word in line.split():
            grouped[word].append(1)
    return {word: sum(ones) for word, ones in grouped.items()}


def split_line(key, line):
    for word in line.split():
        yield word, 1


def add_up(word, counts):
    yield word, sum(counts)


def total(word, counts):
    return sum(counts)


def count_chunk(chunk: list[str]) -> Counter:
    counts: Counter = Counter()
    for line in chunk:
        counts.update(line.split())
    return counts


def replica_chunks(data: dict) -> tuple[list[bytes], list[bytes]]:
    """The map chunks a job of `data` plans and the reduce chunks its
    shuffle makes: the bytes every replica's sandbox is given."""
    from ec262.encoding import decode_pairs, encode_result
    from foreman_service.planning import input_rows, plan_job
    from foreman_service.shuffle import Shuffle
    from worker_service.mapreduce import run_map

    plan = plan_job(input_rows(data), balance=10**9, replication=1)
    maps = [bytes(chunk) for chunk in plan.map_chunks]
    shuffle = Shuffle(len(maps))
    for index, chunk in enumerate(maps):
        shuffle.add(index, encode_result(run_map(split_line, decode_pairs(chunk))))
    return maps, [bytes(chunk) for chunk in shuffle.reduce_chunks(plan.reduce_chunks)]


def replica_steps(maps: list[bytes], reduces: list[bytes]) -> float:
    """The CPU seconds one replica of the whole job spends in the sandbox's
    own steps: decode each chunk, run the user's map (or reduce), encode
    the output, with the sandbox's collector pace. No RPC, no sealing, no
    foreman."""
    import gc

    from ec262.collector import BULK_GC_THRESHOLDS
    from ec262.encoding import decode_pairs, encode_result
    from worker_service.mapreduce import run_map, run_reduce

    before = gc.get_threshold()
    gc.set_threshold(*BULK_GC_THRESHOLDS)
    started = time.process_time()
    try:
        for chunk in maps:
            encode_result(run_map(split_line, decode_pairs(chunk)))
        for chunk in reduces:
            encode_result(run_reduce(total, decode_pairs(chunk)))
    finally:
        gc.set_threshold(*before)
    return time.process_time() - started


def replica_floor(maps: list[bytes], reduces: list[bytes], cores: int = 2) -> float:
    """One replica's `replica_steps` in this process, over the cores: times
    the replication, the least a validated job can take if its replicas
    cost on a busy machine what one costs alone."""
    return replica_steps(maps, reduces) / cores


def _replica_process(maps: list[bytes], reduces: list[bytes], start, done) -> None:
    start.wait()
    replica_steps(maps, reduces)
    done.put(None)


CONCURRENT_FLOOR_TIMEOUT = 600.0  # seconds; one replica's steps take about 1


def concurrent_floor(maps: list[bytes], reduces: list[bytes], replication: int) -> float:
    """The wall seconds of `replication` processes each running one
    replica's `replica_steps` at once, timed from their common start (the
    processes already spawned and waiting): what the replicas' own work
    costs when they share the cores, as the job's sandboxes do."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # not fork: this process holds gRPC threads
    start, done = context.Barrier(replication + 1), context.Queue()
    processes = [
        context.Process(target=_replica_process, args=(maps, reduces, start, done))
        for _ in range(replication)
    ]
    for process in processes:
        process.start()
    start.wait()
    began = time.perf_counter()
    for _ in processes:
        done.get(timeout=CONCURRENT_FLOOR_TIMEOUT)  # a replica process that died: queue.Empty
    seconds = time.perf_counter() - began
    for process in processes:
        process.join()
    return seconds


def timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def dask_runner(workers: int = 2):
    """A function running the word count on a Dask LocalCluster, or None."""
    try:
        from dask.distributed import Client
        from dask.distributed import LocalCluster as DaskCluster
    except ImportError:
        return None, None
    cluster = DaskCluster(n_workers=workers, threads_per_worker=1, processes=True)
    client = Client(cluster)

    def run(lines: list[str], copies: int = 1, chunk: int = 20_000) -> dict[str, int]:
        """Every chunk counted `copies` times (pure=False: each copy really
        runs); with copies, a chunk's Counter is the one at least 2 agree
        on, as the foreman's quorum is."""
        parts = [lines[i : i + chunk] for i in range(0, len(lines), chunk)]
        futures = client.map(count_chunk, [p for p in parts for _ in range(copies)], pure=False)
        counted = client.gather(futures)
        merged: Counter = Counter()
        for at in range(0, len(counted), copies):
            merged.update(agreed(counted[at : at + copies]))
        return dict(merged)

    def close() -> None:
        client.close()
        cluster.close()

    return run, close


def print_cpu(cpu: dict[str, list[dict[str, float]]], wall: dict[str, float]) -> None:
    """CPU seconds by process role: on 2 cores a job takes at least its
    CPU over 2, so this shows what a ratio is made of, and which part of it
    the sandboxes (the replicas' own work) alone account for."""
    roles = ["foreman (this process)", "discovery", "worker servers", "sandboxes"]
    print("\nCPU seconds by process role (medians of the rounds)")
    print(f"  {'':32} {'foreman':>8} {'discovery':>10} {'workers':>8} {'sandboxes':>10}"
          f" {'all / 2':>8} {'wall':>6}")  # fmt: skip
    for name, measured in cpu.items():
        median = {role: statistics.median(m.get(role, 0.0) for m in measured) for role in roles}
        print(f"  {name:32} {median[roles[0]]:>8.2f} {median[roles[1]]:>10.2f}"
              f" {median[roles[2]]:>8.2f} {median[roles[3]]:>10.2f}"
              f" {sum(median.values()) / 2:>8.2f} {wall[name]:>6.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lines = make_lines(args.lines)
    data = {f"l{n}": line for n, line in enumerate(lines)}
    expected = sequential(lines)
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    cpu: dict[str, list[dict[str, float]]] = defaultdict(list)

    def measure(name: str, run) -> None:
        floor, _ = timed(lambda: sequential(lines))
        before, foreman = cpu_by_process(), time.process_time()
        seconds, result = timed(run)
        after, foreman = cpu_by_process(), time.process_time() - foreman
        assert dict(result) == expected, name
        rows[name].append((seconds, seconds / floor))
        if name.startswith("ec262"):
            # By process, those that ended during the job not counted (a
            # sandbox evicted for another job's function).
            spent = {"foreman (this process)": foreman}
            for pid, (role, total) in after.items():
                start = before.get(pid, (role, 0.0))[1]
                spent[role] = spent.get(role, 0.0) + total - start
            cpu[name].append(spent)

    # Each system's processes live only while its own rows run: an idle
    # Dask cluster beside the ec262 jobs (scheduler and worker heartbeats,
    # memory monitors) took ec262 replication 3 from 4.5 x to 7.1 x on this
    # 2-core machine.
    maps, reduces = replica_chunks(data)
    with LocalCluster(workers=3) as cluster:
        jobs = {
            "ec262 replication 3": ec262.Job(mapper=split_line, reducer=total, replication=3),
            "ec262 replication 1": ec262.Job(mapper=split_line, reducer=total, replication=1),
            "ec262 replication 3 + combiner": ec262.Job(
                mapper=split_line, reducer=total, combiner=add_up, replication=3
            ),
        }
        for _ in range(args.rounds):
            for name, job in jobs.items():
                measure(name, lambda job=job: job.run(
                    data, discovery=cluster.address, identity=cluster.foreman_identity,
                    progress=False,
                ))  # fmt: skip
            floor, _ = timed(lambda: sequential(lines))
            rows["sequential"].append((floor, 1.0))
            one = replica_floor(maps, reduces)
            for replication in (3, 1):
                rows[f"floor: {replication} replica(s) of the sandbox steps / 2 cores"].append(
                    (replication * one, replication * one / floor)
                )
            floor, _ = timed(lambda: sequential(lines))
            together = concurrent_floor(maps, reduces, 3)
            rows["floor: 3 replicas' sandbox steps in 3 processes at once"].append(
                (together, together / floor)
            )
    dask_run, dask_close = dask_runner()
    if dask_run is not None:
        try:
            for _ in range(args.rounds):
                measure("Dask distributed, 2 workers", lambda: dask_run(lines))
                measure(
                    "Dask distributed, each chunk x3, 2 of 3 compared",
                    lambda: dask_run(lines, copies=3),
                )
        finally:
            dask_close()
    print(
        f"word count over {args.lines} lines ({sum(map(len, lines)) / 1e6:.1f} MB),"
        f" median of {args.rounds} rounds; each ratio is to a sequential run right before"
    )
    print(f"{'':56} {'seconds':>8} {'x sequential':>13}")
    for name, measured in rows.items():
        seconds = statistics.median(m[0] for m in measured)
        ratio = statistics.median(m[1] for m in measured)
        print(f"  {name:54} {seconds:>8.2f} {ratio:>13.2f}")
    if dask_run is None:
        print("  Dask: not installed (make bench-lines installs it)")
    print_cpu(cpu, {name: statistics.median(m[0] for m in rows[name]) for name in cpu})
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
