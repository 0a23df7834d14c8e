"""The foreman core's CPU per event as a job grows: with many tasks open (a
large pool), many decided (a long job) and many chunks waiting (a large
input), on the core alone (no gRPC, a manual clock).

    make bench-core   or   .venv/bin/python bench/core_bench.py [--open 40,400,4000]
        [--decided 100,1000,10000] [--pending 1000,10000,100000] [--rounds 3]

The tables, each in microseconds of CPU of `handle_all` (the events, then a
tick) and `wake_at`, as the engine's loop calls them:
  open tasks, per event    a result for each open task, one per batch
  open tasks, per settle   the discovery service's answer to a valid settle
  job tasks, per quorum    every task of a job of that many reaches its
                           quorum (its second matching result), the replicas'
                           times unsorted, as on a real pool
  waiting, per grant       rounds of requests answered in full and their
                           tasks taken, with that many chunks still waiting
and each over the same with the fewest: the target is about 1 (what a task
costs does not grow with the others open, done or waiting).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ec262.envelope import ciphertext_sha256
from foreman_service.core import (
    PARALLEL_REQUESTS,
    Assign,
    AssignAnswered,
    Granted,
    RequestTasks,
    ResultArrived,
    Settle,
    Settled,
    Withdraw,
    Withdrawn,
)
from tests.test_engine_core import OUTPUT, Driver, addr, key_of, only, sealed

WORKERS = ["w1", "w2", "w3"]


def opened(count: int) -> Driver:
    """A core with `count` tasks open, every replica running. A replica
    withdrawn at the quorum was not started: its task settles then."""
    d = Driver(chunks=count, batch=count, withdrawn=True)
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


def handled(core, events: list, now: float) -> list:
    """`handle_all`, with the withdrawals it asks for answered at once as
    dropped unstarted (so a quorum's task settles), as the engine's loop
    takes their answers: the commands of both."""
    commands = core.handle_all(events, now)
    withdrawn = [Withdrawn(w.task_id, w.worker_id, True) for w in only(commands, Withdraw)]
    return commands + core.handle_all(withdrawn, now) if withdrawn else commands


def per_settle(count: int, measured: int = 200) -> float:
    """Seconds of CPU per Settled event (the discovery service's answer to
    a valid settle) with `count` tasks open."""
    d = opened(count)
    core, now = d.core, d.now + 1.0
    tasks = list(core._tasks)[:measured]
    measured = len(tasks)
    pairs = WORKERS[:2]
    for task_id in tasks:
        handled(core, [ResultArrived(task_id, w, sealed(task_id, OUTPUT)) for w in pairs], now)
    answers = [
        Settled(
            t,
            key_of(t),
            ciphertext_sha256(core._tasks[t].winner),
            frozenset(pairs),
            frozenset(pairs),
        )
        for t in tasks
    ]
    started = time.process_time()
    for answer in answers:
        core.handle_all([answer], now)
        core.wake_at()
    elapsed = time.process_time() - started
    assert core.stats.tasks_validated == measured, "a settle was not taken"
    return elapsed / measured


def per_quorum(count: int) -> float:
    """Seconds of CPU per quorum over a job of `count` tasks: every task's
    first result within a second, in a random order, then its second (the
    quorum) within the next, in another, so the replica times the foreman
    keeps come unsorted, as on a real pool (and all before speculation)."""
    rng = random.Random(count)
    d = opened(count)
    core, start, settles = d.core, d.now, []

    def results(worker: str) -> list[ResultArrived]:
        tasks = list(core._tasks)
        rng.shuffle(tasks)
        return [ResultArrived(t, worker, sealed(t, OUTPUT)) for t in tasks]

    def answer(results: list[ResultArrived], second: float) -> None:
        for number, result in enumerate(results):
            settles.extend(only(handled(core, [result], start + second + number / count), Settle))
            core.wake_at()

    answer(results("w1"), 0.0)
    quorums = results("w2")
    started = time.process_time()
    answer(quorums, 1.0)
    elapsed = time.process_time() - started
    assert len(settles) == count and all(s.valid for s in settles), "a task did not settle valid"
    return elapsed / count


def per_granted(pending: int, rounds: int = 50) -> float:
    """Seconds of CPU per task granted over `rounds` rounds of requests
    (each answered in full, its tasks taken), `pending` chunks waiting."""
    d = Driver(chunks=pending + rounds * PARALLEL_REQUESTS * 64, batch=64)
    core, now, numbers = d.core, d.now, itertools.count()
    requests, made = only(d.first, RequestTasks), 0
    started = time.process_time()
    for _ in range(rounds):
        assigns = []
        for request in requests:
            tasks = [(f"t{next(numbers)}", {w: addr(w) for w in WORKERS}) for _ in range(request.n)]
            made += len(tasks)
            assigns += only(core.handle_all([Granted(request.request_id, tasks, 10)], now), Assign)
        core.handle_all([AssignAnswered(a.task_id, a.worker_id, "OK") for a in assigns], now)
        now = max(now, core.wake_at())
        requests = only(core.tick(now), RequestTasks)
        assert requests, "no next round"
    return (time.process_time() - started) / made


def table(title: str, unit: str, measured: dict[int, list[float]]) -> None:
    smallest = statistics.median(measured[min(measured)])
    print(f"\n{title:>11} {unit:>17} {'x smallest':>11}")
    for n, values in measured.items():
        value = statistics.median(values)
        print(f"{n:>11} {value * 1e6:>17.1f} {value / smallest:>11.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", default="40,400,4000", help="counts of open tasks")
    parser.add_argument("--decided", default="100,1000,10000", help="tasks of the decided jobs")
    parser.add_argument("--pending", default="1000,10000,100000", help="chunks waiting")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    open_counts = {int(n): [] for n in args.open.split(",")}
    settle_counts = {int(n): [] for n in args.open.split(",")}
    decided_counts = {int(n): [] for n in args.decided.split(",")}
    pending_counts = {int(n): [] for n in args.pending.split(",")}
    for _ in range(args.rounds):
        for n, values in open_counts.items():
            values.append(per_event(n))
        for n, values in settle_counts.items():
            values.append(per_settle(n))
        for n, values in decided_counts.items():
            values.append(per_quorum(n))
        for n, values in pending_counts.items():
            values.append(per_granted(n))
    print(f"foreman core, median of {args.rounds} rounds")
    table("open tasks", "us CPU per event", open_counts)
    table("open tasks", "us CPU per settle", settle_counts)
    table("job tasks", "us CPU per quorum", decided_counts)
    table("waiting", "us CPU per grant", pending_counts)
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
