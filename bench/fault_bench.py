"""Job time under worker faults, as a ratio to the same job with no fault
measured in the same run (docs/protocol.md section 9).

    .venv/bin/python bench/fault_bench.py [--rounds 3]

Each round starts a fresh local cluster of 4 workers (1 slot each) per
case and runs the same job (48 records, a map that sleeps 50 ms a record,
chunks of one record or two): `none` (the floor), `frozen` (one worker
SIGSTOPped before the job: still in the pool, its calls hang), `2 dead`
(two workers SIGKILLed before the job: in the pool until their lease
ends, their calls refused). The old main took 34 s (frozen, for a 4 s
job) and 128 s (2 of 4 dead: the whole task timeout).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import ec262
from ec262.local_cluster import LocalCluster

RECORDS = {f"r{i:02d}": f"record {i} of the fault bench" for i in range(48)}


def slow_split(key, line):
    import time

    time.sleep(0.05)
    for word in line.split():
        yield word, 1


def total(key, values):
    return sum(values)


def one_job(case: str) -> tuple[float, ec262.JobResult]:
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalCluster(workers=4, slots=1, directory=directory) as cluster,
    ):
        if case == "frozen":
            cluster.workers[0].process.send_signal(signal.SIGSTOP)
        elif case == "2 dead":
            for worker in cluster.workers[:2]:
                worker.process.send_signal(signal.SIGKILL)
                worker.process.wait(timeout=10)
            cluster.workers = cluster.workers[2:]
        started = time.monotonic()
        try:
            result = ec262.Job(
                discovery=cluster.address, identity=Path(directory) / "foreman.json",
                progress=False, chunk_bytes=64, mapper=slow_split, reducer=total,
            ).run(RECORDS)  # fmt: skip
        finally:
            if case == "frozen":
                cluster.workers[0].process.send_signal(signal.SIGCONT)
        return time.monotonic() - started, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = ["none", "frozen", "2 dead"]
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    extra: dict[str, str] = {}
    for _ in range(args.rounds):
        floor = None
        for case in cases:
            took, result = one_job(case)
            floor = floor or took
            seconds[case].append(took)
            ratios[case].append(took / floor)
            s = result.stats
            extra[case] = (
                f"released {s.replicas_released}, cancelled {s.replicas_cancelled},"
                f" speculative {s.speculative_replicas}, retries {s.retries}"
            )
    print(f"{'case':8} {'median s':>9} {'range s':>13} {'x no fault':>11}  last round")
    for case in cases:
        low, high = min(seconds[case]), max(seconds[case])
        print(
            f"{case:8} {statistics.median(seconds[case]):9.2f} {low:6.2f}-{high:<6.2f}"
            f" {statistics.median(ratios[case]):11.2f}  {extra[case]}"
        )


if __name__ == "__main__":
    main()
