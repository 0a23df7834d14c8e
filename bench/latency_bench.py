"""Latency between the parties (issue 16, item 3): one job of small tasks
with 0, 10 and 50 ms added each way by tests/delay_line.py, in front of the
discovery service and of each worker (which advertise their line).

    .venv/bin/python bench/latency_bench.py [--tasks 56] [--delays 0,10,50]

Reported per delay: the job's seconds, and the round trips it paid in
series per task: (seconds - seconds at 0 ms) / (2 x delay) / tasks. The
target is <= 0.2 round trips per task in series at 50 ms.

Beside it, the floor: the same job cut to one task per phase, with the same
parties behind the same lines. It pays only what the protocol puts in
series (connect, GetClient, RequestTasks, AssignTasks and its FetchKeys,
CommitResults, SettleTasks, per phase), with no task waiting for another,
so its round trips in series are the least any job pays here; the big
job's round trips beyond them are what its tasks cost one another.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from tests.delayed_cluster import delayed_cluster


def words(key, line):
    for word in line.split():
        yield word, 1


def total(word, counts):
    return sum(counts)


def run_at(
    delay: float, tasks: int, workers: int, directory: Path, name: str = "job"
) -> tuple[float, int]:
    with delayed_cluster(delay, workers, directory, name) as cluster:
        data = {f"l{n}": f"w{n % 7} w{n % 5} w{n % 3}" for n in range(tasks * 4)}
        job = ec262.Job(mapper=words, reducer=total, chunk_bytes=80)
        run = lambda: job.run(  # noqa: E731
            data, discovery=cluster.discovery,
            identity=directory / f"foreman-{name}-{delay}.json", progress=False,
        )  # fmt: skip
        run()  # connections made, payloads cached
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
        assert result == Counter(w for line in data.values() for w in line.split())
        return seconds, job.stats.tasks_validated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=56)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--delays", default="0,10,50", help="ms one way")
    args = parser.parse_args()
    delays = [int(d) / 1000 for d in args.delays.split(",")]
    with tempfile.TemporaryDirectory(prefix="ec262-latency-") as tmp:
        measured, floor = {}, {}
        for d in delays:  # each delay's floor right after its job: the same moment's machine
            measured[d] = run_at(d, args.tasks, args.workers, Path(tmp))
            floor[d] = run_at(d, 1, args.workers, Path(tmp), name="floor")
    base, floor_base = measured[min(delays)][0], floor[min(delays)][0]
    print(f"one job, {args.workers} workers x 2 slots, replication 3; delay added each way")
    print(
        f"{'ms one way':>11} {'seconds':>8} {'tasks':>6} {'round trips in series':>22}"
        f" {'per task':>9} | {'floor: 1 task/phase, s':>22} {'round trips':>12}"
        f" {'floor per task':>15}"
    )
    for delay, (seconds, done) in measured.items():
        trips = (seconds - base) / (2 * delay) if delay else 0.0
        floor_trips = (floor[delay][0] - floor_base) / (2 * delay) if delay else 0.0
        print(
            f"{delay * 1000:>11.0f} {seconds:>8.2f} {done:>6} {trips:>22.1f} {trips / done:>9.2f}"
            f" | {floor[delay][0]:>22.2f} {floor_trips:>12.1f} {floor_trips / done:>15.2f}"
        )
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
