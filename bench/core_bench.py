"""The foreman core's CPU per event with many tasks open (a job on a large
pool): a result arrives for each open task, one event per batch, as they
come from the wire, on the core alone (no gRPC, a manual clock).

    make bench-core   or   .venv/bin/python bench/core_bench.py [--open 40,400,4000] [--rounds 3]

Reported per count of open tasks: microseconds of CPU per event for
`handle_all` (the event, then a tick) and `wake_at`, as the engine's loop
calls them, and that over the same with the fewest tasks open: the target
is about 1 (a task's event costs the same however many others are open).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from foreman_service.core import RequestTasks, ResultArrived
from tests.test_engine_core import OUTPUT, Driver, only, sealed

WORKERS = ["w1", "w2", "w3"]


def opened(count: int) -> Driver:
    """A core with `count` tasks open, every replica running."""
    d = Driver(chunks=count, batch=count)
    answered: set[str] = set()
    while d.core.open_tasks < count:
        waiting = [r for r in only(d.log, RequestTasks) if r.request_id not in answered]
        if not waiting:
            d.wake()
            continue
        for request in waiting:
            answered.add(request.request_id)
            d.grant(request, [WORKERS] * request.n)
            for task_id in d.granted:
                d.accept_all(task_id)
    return d


def per_event(count: int) -> float:
    """Seconds of CPU per result event with `count` tasks open."""
    d = opened(count)
    events = [ResultArrived(t, "w1", sealed(t, OUTPUT)) for t in d.core._tasks]
    core, now = d.core, d.now + 1.0
    started = time.process_time()
    for event in events:
        core.handle_all([event], now)
        core.wake_at()
    return (time.process_time() - started) / len(events)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", default="40,400,4000", help="counts of open tasks")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.open.split(",")]
    measured: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            measured[n].append(per_event(n))
    smallest = statistics.median(measured[min(counts)])
    print(f"foreman core, one result event per batch, median of {args.rounds} rounds")
    print(f"{'open tasks':>11} {'us CPU per event':>17} {'x smallest':>11}")
    for n in counts:
        value = statistics.median(measured[n])
        print(f"{n:>11} {value * 1e6:>17.1f} {value / smallest:>11.2f}")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
