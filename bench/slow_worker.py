"""What an honest worker 0.3 s slower than the rest earns (docs/protocol.md
section 10, the late window), measured on a real local cluster: 3 honest
workers and one `--adversary slow` (honest, each result 0.3 s late).

    .venv/bin/python bench/slow_worker.py [--megabytes 0.5] [--chunk-bytes 8192]

Prints, for the slow worker: the tasks it took, how many it was late for
(no result at the settle), how many the discovery service paid and counted
failed once its late commitments were in, and the job's time beside the
same job on a cluster of 4 honest workers (the floor, in the same run).
The issue measured against the old main: unpaid and counted failed on 76 %
of its tasks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from ec262.identity import load_identity
from ec262.local_cluster import LocalCluster
from tests.job_harness import identity_files, settled_books, stdlib_text, sum_reducer, word_mapper


def run(adversaries: list[str], data: dict, chunk_bytes: int) -> tuple[float, dict, str, dict]:
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalCluster(
            workers=4 - len(adversaries), adversaries=adversaries, directory=directory
        ) as cluster,
    ):
        job = ec262.Job(mapper=word_mapper, reducer=sum_reducer, chunk_bytes=chunk_bytes)
        started = time.monotonic()
        result = job.run(
            data, discovery=cluster.address, identity=cluster.foreman_identity, progress=False
        )
        seconds = time.monotonic() - started
        slow = load_identity(Path(directory) / "worker3.json").client_id if adversaries else ""
        books = settled_books(cluster.address, identity_files(cluster))
        return seconds, result.stats.verdicts, slow, books


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=0.5)
    parser.add_argument("--chunk-bytes", type=int, default=8192)
    args = parser.parse_args()
    data = stdlib_text(args.megabytes)
    floor, _, _, _ = run([], data, args.chunk_bytes)
    seconds, verdicts, slow, books = run(["slow"], data, args.chunk_bytes)
    took = sum(1 for v in verdicts.values() if slow in v["agreed"] + v["late"])
    late = sum(1 for v in verdicts.values() if slow in v["late"])
    _, completed, failed = books[slow]
    print(f"{len(verdicts)} tasks; the slow worker took {took}, late at the settle for {late}")
    print(f"paid {completed} ({completed / max(1, took):.0%}), counted failed {failed}")
    ratio = seconds / floor
    print(f"job {seconds:.2f} s beside {floor:.2f} s with 4 honest workers: {ratio:.2f} x")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
