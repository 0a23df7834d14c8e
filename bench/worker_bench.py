"""Worker benchmark (not a test): what the worker adds to a task.

Measures, in one run:
  1. the envelope: seal and open MB/s on a large plaintext;
  2. a warm sandbox: one trivial map task through SandboxPool.run (pipe
     round trip, decode, run, encode), per task;
  3. a cold sandbox: a task for a function no sandbox holds yet (fork from
     the zygote, lock down, load the payload, run), every layer on; then
     the same with each layer switched off in turn, interleaved, so each
     layer's cost is the difference;
  4. the warm per-task overhead inside the worker: Worker.assign -> key ->
     sandbox -> seal -> submit, with the key source and submitter in process
     (no RPC), so only the worker's own work is timed;
  5. end to end on loopback: AssignTask to a real worker process until its
     SubmitResult arrives at a foreman, beside the no-op floor (health Check
     to the same worker) and that floor times the 3 RPCs a task costs.

Run: .venv/bin/python bench/worker_bench.py [--tasks 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ec262.encoding import encode_pairs
from ec262.envelope import open_sealed, seal
from ec262.payload import digest, pack_functions
from worker_service.sandbox.policy import LAYERS, SandboxLimits
from worker_service.sandbox.pool import SandboxPool
from worker_service.tasks import checked_task
from worker_service.worker import Worker, one_by_one

ROWS = encode_pairs([("doc", "the quick brown fox")])
KEY = bytes(range(16))
BENCH_FOREMAN = "00000000-0000-4000-8000-000000000000"


def trivial_map(key, text):
    yield key, len(text)


def bench_envelope(megabytes: int = 32, repeats: int = 5) -> tuple[float, float]:
    plaintext = os.urandom(megabytes * 1024 * 1024)
    seal_times, open_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        text = seal(plaintext, KEY)
        middle = time.perf_counter()
        assert open_sealed(text, KEY) == plaintext
        seal_times.append(middle - started)
        open_times.append(time.perf_counter() - middle)
    size = len(plaintext) / 1e6
    return size / min(seal_times), size / min(open_times)


def bench_warm(pool: SandboxPool, tasks: int) -> list[float]:
    payload = pack_functions(trivial_map)
    name = digest(payload)
    pool.run(name, payload, 1, ROWS)  # warm it
    times = []
    for _ in range(tasks):
        started = time.perf_counter()
        result = pool.run(name, None, 1, ROWS)
        times.append(time.perf_counter() - started)
        assert result.ok
    return times


def bench_cold(pool: SandboxPool, count: int, tag: str = "") -> list[float]:
    times = []
    for number in range(count):
        namespace: dict = {}
        exec(
            f"def cold_{number}(key, text):\n    yield key, {str(number) + tag!r}", namespace
        )  # distinct digests
        payload = pack_functions(namespace[f"cold_{number}"])
        started = time.perf_counter()
        result = pool.run(digest(payload), payload, 1, ROWS)
        times.append(time.perf_counter() - started)
        assert result.ok, result
    return times


# Each row switches off one layer of the sandbox (worker_service/sandbox/
# __init__.py lists them); its cost is the full stack's time minus the row's.
LAYER_ROWS = (
    ("every layer on", frozenset()),
    ("without the cgroup", frozenset({"cgroup"})),
    ("without namespaces and the view", frozenset({"namespaces", "filesystem"})),
    ("without the file system view", frozenset({"filesystem"})),
    ("without the own uid (so no namespaces)", frozenset({"uid"})),
    ("without capability dropping", frozenset({"capabilities"})),
    ("without Landlock", frozenset({"landlock"})),
    ("without seccomp", frozenset({"seccomp"})),
    ("without the audit hook", frozenset({"audit_hook"})),
    ("every layer off (the old main's fork)", frozenset(LAYERS)),
)


def bench_layers(rounds: int, per_round: int, warm_tasks: int) -> list[tuple[str, float, float]]:
    """(row, cold p50 ms, warm p50 ms) per LAYER_ROWS entry, measured in
    interleaved rounds so the machine's drift hits every row alike."""
    pools = [
        SandboxPool(dataclasses.replace(SandboxLimits(), layers_off=off), size=per_round + 2)
        for _, off in LAYER_ROWS
    ]
    cold: list[list[float]] = [[] for _ in LAYER_ROWS]
    warm: list[list[float]] = [[] for _ in LAYER_ROWS]
    try:
        for pool in pools:
            pool.run("warmup", pack_functions(trivial_map), 1, ROWS)  # the zygote
        for number in range(rounds):
            for index, pool in enumerate(pools):
                cold[index] += bench_cold(pool, per_round, tag=f"{number}_{index}")
                warm[index] += bench_warm(pool, warm_tasks)
    finally:
        for pool in pools:
            pool.close()
    return [(name, ms(cold[i]), ms(warm[i])) for i, (name, _) in enumerate(LAYER_ROWS)]


def bench_worker_core(pool: SandboxPool, tasks: int) -> list[float]:
    done = threading.Semaphore(0)
    finished: dict[str, float] = {}

    def submit(task, worker_id, ciphertext, cancel=None):
        finished[task.task_id] = time.perf_counter()
        done.release()

    worker = Worker(
        slots=1,
        sandbox=pool,
        fetch_keys=one_by_one(lambda task_id: (KEY, BENCH_FOREMAN)),
        submit=submit,
        client_id=lambda: "bench",
    )
    payload = pack_functions(trivial_map)
    times = []
    for number in range(tasks + 20):
        task = checked_task(
            task_id=f"{number:032x}",
            job_id="bench",
            phase=1,
            function=payload if number == 0 else b"",
            function_sha256=digest(payload),
            rows=ROWS,
            result_address="127.0.0.1:1",
            foreman_id=BENCH_FOREMAN,
            submit_token="t",
        )
        started = time.perf_counter()
        worker.assign(task)
        done.acquire()
        if number >= 20:
            times.append(finished[task.task_id] - started)
    worker.close()
    return times


def bench_end_to_end(tasks: int) -> tuple[list[float], list[float]]:
    from discovery_service.ledger import LedgerConfig
    from tests.worker_cluster import running_cluster

    # One worker, so tasks are made with replication 1.
    config = LedgerConfig(replication=1, starting_credits=10**6)
    with (
        tempfile.TemporaryDirectory() as folder,
        running_cluster(Path(folder), 1, config=config) as cluster,
    ):
        discovery = cluster.discovery
        worker = cluster.workers[0]
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(worker.address))
        floor = []
        for _ in range(tasks):
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest())
            floor.append(time.perf_counter() - started)
        ledger = discovery.server.ledger
        object.__setattr__(
            ledger, "config", type(ledger.config)(replication=1, starting_credits=10**6)
        )
        times = []
        payload = pack_functions(trivial_map)
        for number in range(tasks):
            task = discovery.request(cluster.foreman, n=1).tasks[0]
            started = time.perf_counter()
            cluster.assign(
                worker,
                task.task_id,
                None,
                payload=payload,
                rows=[("doc", "x")],
                send_payload=number == 0,
            )
            cluster.recorder.wait_for(task.task_id, 1)
            times.append(time.perf_counter() - started)
            discovery.settle(cluster.foreman, task.task_id, valid=True)
        return times, floor


def ms(values: list[float], q: float = 0.5) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--layer-rounds", type=int, default=10)
    args = parser.parse_args()
    seal_rate, open_rate = bench_envelope()
    pool = SandboxPool(SandboxLimits(), size=args.cold + 4)
    try:
        started = time.perf_counter()
        pool.run("warmup", pack_functions(trivial_map), 1, ROWS)  # starts the zygote too
        first = time.perf_counter() - started
        warm = bench_warm(pool, args.tasks)
        cold = bench_cold(pool, args.cold)
        core = bench_worker_core(pool, args.tasks)
    finally:
        pool.close()
    layers = bench_layers(args.layer_rounds, 5, 200)
    e2e, floor = bench_end_to_end(min(args.tasks, 500))
    rows = [
        ("envelope seal", f"{seal_rate:8.0f} MB/s", "target >= 100 MB/s"),
        ("envelope open", f"{open_rate:8.0f} MB/s", "target >= 100 MB/s"),
        ("warm sandbox run, p50", f"{ms(warm):8.3f} ms", f"p99 {ms(warm, 0.99):.3f} ms"),
        ("first sandbox, zygote start included", f"{first * 1000:8.1f} ms", "once per worker"),
        (
            "cold sandbox start+run, p50",
            f"{ms(cold):8.1f} ms",
            f"max {max(cold) * 1000:.1f} ms; target <= 300 ms",
        ),
        (
            "worker overhead per task, p50",
            f"{ms(core):8.3f} ms",
            f"p99 {ms(core, 0.99):.3f} ms; mean {statistics.mean(core) * 1000:.3f} ms;"
            " target <= 2 ms",
        ),
        (
            "end to end on loopback, p50",
            f"{ms(e2e):8.3f} ms",
            f"p99 {ms(e2e, 0.99):.3f} ms ({1 / statistics.mean(e2e):.0f} tasks/s, 1 slot)",
        ),
        (
            "no-op RPC floor (health Check), p50",
            f"{ms(floor):8.3f} ms",
            f"x3 RPCs per task = {3 * ms(floor):.3f} ms;"
            f" e2e / that = {ms(e2e) / (3 * ms(floor)):.2f}",
        ),
    ]
    print(f"\nworker benchmark ({args.tasks} tasks, {args.cold} cold starts)")
    for name, value, note in rows:
        print(f"  {name:38} {value}   {note}")
    full_cold, full_warm = layers[0][1], layers[0][2]
    print(f"\nwhat each sandbox layer costs ({args.layer_rounds} interleaved rounds)")
    print(f"  {'':38} {'cold p50':>9} {'its cost':>9} {'warm p50':>9} {'its cost':>9}")
    for name, cold_ms, warm_ms in layers:
        print(
            f"  {name:38} {cold_ms:7.2f}ms {full_cold - cold_ms:+7.2f}ms"
            f" {warm_ms:7.3f}ms {full_warm - warm_ms:+7.3f}ms"
        )
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
