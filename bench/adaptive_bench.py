"""Adaptive replication on a real local cluster (docs/protocol.md section
10): credits per validated task and job time, beside replication 3 on the
same cluster in the same run, rounds taking turns.

    .venv/bin/python bench/adaptive_bench.py [--megabytes 1] [--rounds 3]

4 honest workers, `--trusted-after 2`; a first job earns them trust. The
goal was at most 2.2 credits per validated task in a trusted pool (3 with
full replication).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from ec262.local_cluster import LocalCluster
from tests.job_harness import sequential, stdlib_text, sum_reducer, word_mapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=32 * 1024)
    args = parser.parse_args()
    data = stdlib_text(args.megabytes)
    expected = sequential(data, word_mapper, sum_reducer)
    flags = ("--trusted-after", "2", "--starting-credits", "1000000")
    runs: dict[str, list[tuple[float, float, int]]] = {"3": [], "adaptive": []}
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalCluster(workers=4, directory=directory, discovery_args=flags) as cluster,
    ):
        job = ec262.Job(mapper=word_mapper, reducer=sum_reducer, chunk_bytes=args.chunk_bytes)

        def run(replication):
            started = time.monotonic()
            result = job.run(
                data,
                discovery=cluster.address,
                identity=cluster.foreman_identity,
                progress=False,
                replication=replication,
            )
            assert result == expected
            stats = result.stats
            tasks = stats.map_tasks + stats.reduce_tasks
            return time.monotonic() - started, stats.credits_spent / tasks, tasks

        run(3)  # the workers earn trust
        for _ in range(args.rounds):
            runs["3"].append(run(3))
            runs["adaptive"].append(run("adaptive"))
    print(f"word count over {args.megabytes} MB, median of {args.rounds} rounds taking turns")
    print(f"{'replication':>12} {'seconds':>8} {'credits/task':>13} {'tasks':>6}")
    for name, rows in runs.items():
        seconds = statistics.median(r[0] for r in rows)
        credits = statistics.median(r[1] for r in rows)
        print(f"{name:>12} {seconds:>8.2f} {credits:>13.2f} {rows[0][2]:>6}")
    ratio = statistics.median(r[0] for r in runs["adaptive"]) / statistics.median(
        r[0] for r in runs["3"]
    )
    print(f"adaptive / replication 3 job time: {ratio:.2f}")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
