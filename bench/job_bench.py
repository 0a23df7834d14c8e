"""Job benchmark (not a test): word count and per-task overhead of ec262
jobs on a local cluster (discovery + 3 worker processes), beside the same
functions run sequentially and with multiprocessing.Pool(2), and beside the
no-op gRPC floor, all measured in one run.

Run: make bench   or   .venv/bin/python bench/job_bench.py [--megabytes 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from ec262.collector import BULK_GC_THRESHOLDS as SANDBOX_GC_THRESHOLDS
from ec262.encoding import decode_pairs, decode_result, encode_result
from ec262.envelope import open_sealed, seal
from ec262.local_cluster import LocalCluster
from foreman_service.planning import input_rows, plan_job
from foreman_service.shuffle import Shuffle
from worker_service.mapreduce import run_map, run_reduce

WORD = re.compile(r"[A-Za-z_]+")


def words(path, text):
    for word in WORD.findall(text):
        yield word.lower(), 1


def total(word, counts):
    return sum(counts)


def add_up(word, counts):
    yield word, sum(counts)


def tiny(key, value):
    yield key, value


def stdlib_text(megabytes: float) -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = {}, 0
    while size < megabytes * 1e6:  # repeat the library if it is smaller than asked
        for path in sorted(root.rglob("*.py")):
            if "site-packages" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            texts[f"{len(texts)}:{path.relative_to(root)}"] = text
            size += len(text)
            if size >= megabytes * 1e6:
                break
    return texts


def sequential(data: dict) -> tuple[dict, float]:
    """The same functions in one process, as a person would loop over them."""
    started = time.perf_counter()
    grouped: defaultdict[str, list] = defaultdict(list)
    for key, value in data.items():
        for word, count in words(key, value):
            grouped[word].append(count)
    result = {word: total(word, counts) for word, counts in grouped.items()}
    return result, time.perf_counter() - started


def _map_part(items):
    return run_map(words, items)


def _reduce_part(items):
    return run_reduce(total, items)


def with_pool(data: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    items = list(data.items())
    parts = [items[i::8] for i in range(8)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        grouped: dict = {}
        for output in pool.map(_map_part, parts):
            for key, values in output.items():
                grouped.setdefault(key, []).extend(values)
        keys = list(grouped.items())
        result: dict = {}
        for output in pool.map(_reduce_part, [keys[i::8] for i in range(8)]):
            result.update(output)
    return result, time.perf_counter() - started


class BenchCluster:
    """A local cluster (discovery + 3 workers) kept up for every round of
    one replication setting, so rounds time jobs, not cluster start-up."""

    def __init__(self, replication: int) -> None:
        self._stack = contextlib.ExitStack()
        self.folder = self._stack.enter_context(tempfile.TemporaryDirectory())
        self.cluster = self._stack.enter_context(
            LocalCluster(workers=3, directory=self.folder, replication=replication)
        )
        self._jobs: dict[tuple, ec262.Job] = {}

    def close(self) -> None:
        self._stack.close()

    def run(
        self,
        data: dict,
        *,
        mapper=words,
        reducer=total,
        combiner=None,
        chunk_bytes: int = 1 << 20,
    ) -> tuple[dict, float, object]:
        """(result, seconds, stats with .cpu by role) of one job; the first
        job of a configuration is preceded by a one-record job that starts
        its sandboxes (not timed)."""
        config = (mapper, reducer, combiner, chunk_bytes)
        job = self._jobs.get(config)
        if job is None:
            job = self._jobs[config] = ec262.Job(
                mapper=mapper,
                reducer=reducer,
                combiner=combiner,
                discovery=self.cluster.address,
                identity=Path(self.folder) / "foreman.json",
                chunk_bytes=chunk_bytes,
                progress=False,
            )
            job.run(dict([next(iter(data.items()))]))
        cpu_before = cpu_by_role()
        started = time.perf_counter()
        result = job.run(data)
        elapsed = time.perf_counter() - started
        cpu_after = cpu_by_role()
        job.stats.cpu = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
        return result, elapsed, job.stats

    def noop_floor(self) -> float:
        return noop_floor(self.cluster.workers[0].address)


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this machine's ec262 processes, by role."""
    roles: dict[str, float] = {"foreman (this process)": time.process_time()}
    for role, seconds in cpu_by_process().values():
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """(role, CPU seconds so far) of each other live ec262 process."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = (
            "discovery"
            if "ec262 discovery" in command
            else "worker servers"
            if "ec262 worker" in command
            else "sandboxes"
            if "worker_service.sandbox.zygote" in command
            else None
        )
        if role:
            found[int(pid)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return found


def agreed(answers: list) -> object:
    """The answer at least 2 of a task's copies gave (the foreman's quorum),
    for the peers that run each task several times; the answer itself when
    there is one copy."""
    if len(answers) == 1:
        return answers[0]
    for answer in answers:
        if answers.count(answer) >= 2:
            return answer
    raise AssertionError(f"no two of {len(answers)} copies agree")


def noop_floor(address: str, calls: int = 1000) -> float:
    """Seconds per no-op RPC (health Check) to a worker of the cluster."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(50):
            stub.Check(request)
        started = time.perf_counter()
        for _ in range(calls):
            stub.Check(request)
        return (time.perf_counter() - started) / calls


def where_the_time_goes(data: dict, replication: int, floor: float) -> None:
    """The CPU cost of each step of the r=`replication` word count, run
    in this process with the job's own code, chunking and data: what each
    replica's sandbox does, what the foreman does, and the RPCs a task
    costs at the measured no-op floor. A model to set beside the measured
    CPU by role, not a measurement of the cluster itself."""
    clock = time.process_time
    costs: dict[str, float] = defaultdict(float)

    def timed(name, function, *args, **kwargs):
        started = clock()
        value = function(*args, **kwargs)
        costs[name] += clock() - started
        return value

    key = os.urandom(16)
    _expected, seq_time = sequential(data)
    plan = timed(
        "foreman: plan (encode the input rows)",
        plan_job,
        input_rows(data),
        balance=10**9,
        replication=replication,
    )
    thresholds = gc.get_threshold()
    gc.set_threshold(*SANDBOX_GC_THRESHOLDS)
    shuffle = Shuffle(len(plan.map_chunks))
    for index, chunk in enumerate(plan.map_chunks):
        rows = timed("replica: decode map input", decode_pairs, chunk)
        output = timed("replica: map (the user's function)", run_map, words, rows)
        text = timed("replica: sort + encode map output", encode_result, output)
        envelope = timed("replica: seal (AES-CBC + 2 HMAC)", seal, text, key)
        plaintext = timed("foreman: open one envelope per task", open_sealed, envelope, key)
        timed("foreman: shuffle (merge map outputs)", shuffle.add, index, plaintext)
    reduce_chunks = timed(
        "foreman: shuffle (cut reduce chunks)", shuffle.reduce_chunks, plan.reduce_chunks
    )
    for chunk in reduce_chunks:
        rows = timed("replica: decode reduce input", decode_pairs, chunk)
        output = timed("replica: reduce (the user's function)", run_reduce, total, rows)
        text = timed("replica: encode reduce output", encode_result, output)
        envelope = timed("replica: seal (AES-CBC + 2 HMAC)", seal, text, key)
        plaintext = timed("foreman: open one envelope per task", open_sealed, envelope, key)
        timed("foreman: decode reduce outputs", decode_result, plaintext)
    gc.set_threshold(*thresholds)
    tasks = len(plan.map_chunks) + len(reduce_chunks)
    # RequestTasks is batched; AssignTask, FetchKey and SubmitResult once per
    # replica; SettleTask once per task.
    rpcs = tasks * (3 * replication + 1) + 2
    print(
        f"\nwhere the CPU goes, replication {replication}, {tasks} tasks"
        f" (`--profile`; steps timed in one process; sequential run {seq_time:.2f} s):"
    )
    total_cpu = 0.0
    for name, seconds in sorted(costs.items()):
        each = seconds * (replication if name.startswith("replica") else 1)
        total_cpu += each
        times = f" x {replication} replicas" if name.startswith("replica") else ""
        print(f"  {name:42} {seconds:6.3f} s{times:14} = {each:6.3f} CPU s")
    rpc_cpu = rpcs * floor
    print(f"  {f'RPCs: ~{rpcs} at the no-op floor':42} {'':6}   {'':14} = {rpc_cpu:6.3f} CPU s")
    print(
        f"  modelled total {total_cpu + rpc_cpu:.2f} CPU s = {(total_cpu + rpc_cpu) / seq_time:.2f}"
        f" x the sequential run; on 2 cores at best {(total_cpu + rpc_cpu) / 2 / seq_time:.2f} x"
    )


SEQUENTIAL = "sequential, one process"
POOL = "multiprocessing.Pool(2)"
WORD_COUNT_ROWS = (
    # label, replication, combiner
    ("ec262 replication 3", 3, None),
    ("ec262 replication 1", 1, None),
    ("ec262 replication 3 + combiner", 3, add_up),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--tiny-tasks", type=int, default=2000)
    parser.add_argument("--tiny-rounds", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of (sequential, pool, each cluster job); the table shows medians",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also model where the CPU goes (each step timed in this process)",
    )
    args = parser.parse_args()
    data = stdlib_text(args.megabytes)
    size = sum(map(len, data.values())) / 1e6
    # A cluster per configuration: a worker keeps few idle sandboxes, and
    # jobs of other functions sharing it would evict each other's.
    clusters = {label: BenchCluster(replication) for label, replication, _ in WORD_COUNT_ROWS}
    times: dict[str, list[float]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)
    last_stats: dict[str, object] = {}
    try:
        for round_number in range(args.rounds):
            # Each job's ratio is to a sequential run made right before it:
            # this shared machine's speed drifts within seconds.
            for label, _replication, combiner in [*WORD_COUNT_ROWS, (POOL, None, None)]:
                expected, seq_time = sequential(data)
                times[SEQUENTIAL].append(seq_time)
                ratios[SEQUENTIAL].append(1.0)
                if label == POOL:
                    result, elapsed = with_pool(data)
                else:
                    result, elapsed, stats = clusters[label].run(data, combiner=combiner)
                    last_stats[label] = stats
                assert result == expected, label
                times[label].append(elapsed)
                ratios[label].append(elapsed / seq_time)
            print(
                f"round {round_number + 1}/{args.rounds}: "
                + ", ".join(
                    f"{label} {values[-1]:.2f} s ({ratios[label][-1]:.2f} x)"
                    for label, values in times.items()
                    if label != SEQUENTIAL
                ),
                file=sys.stderr,
            )
        labels = [SEQUENTIAL, POOL]
        labels += [label for label, _, _ in WORD_COUNT_ROWS]
        print(
            f"\nword count over {size:.1f} MB of standard-library source ({len(data)} files),"
            f" median of {args.rounds} rounds; each ratio is to a sequential run made right"
            " before that job"
        )
        print(
            f"  {'':34} {'seconds':>8} {'x sequential':>13} {'(min-max)':>12} {'best/best':>9}"
            "  tasks (map+reduce), phases of the last round"
        )
        for label in labels:
            stats = last_stats.get(label)
            detail = ""
            if stats:
                phases = stats.phase_seconds
                detail = (
                    f"{stats.map_tasks}+{stats.reduce_tasks}, map {phases.get('map', 0):.2f} s,"
                    f" reduce {phases.get('reduce', 0):.2f} s"
                )
            spread = f"{min(ratios[label]):.2f}-{max(ratios[label]):.2f}"
            print(
                f"  {label:34} {statistics.median(times[label]):8.2f}"
                f" {statistics.median(ratios[label]):13.2f} {spread:>12}"
                f" {min(times[label]) / min(times[SEQUENTIAL]):9.2f}  {detail}"
            )
            if stats:
                cpu = ", ".join(f"{role} {value:.2f}" for role, value in stats.cpu.items())
                print(f"  {'':34} CPU s: {cpu}; all {sum(stats.cpu.values()):.2f}")
        tiny_data = {f"k{i}": i for i in range(args.tiny_tasks)}
        tiny_cluster = clusters[WORD_COUNT_ROWS[0][0]]
        tiny_rounds = []  # (seconds per task, floor seconds per no-op RPC)
        for _ in range(args.tiny_rounds):
            floor_before = tiny_cluster.noop_floor()
            result, elapsed, stats = tiny_cluster.run(
                tiny_data, mapper=tiny, reducer=total, chunk_bytes=1
            )
            assert result == {k: v for k, v in tiny_data.items()}
            floor = (floor_before + tiny_cluster.noop_floor()) / 2  # either side of the job
            tiny_rounds.append((elapsed / (stats.map_tasks + stats.reduce_tasks), floor))
    finally:
        for cluster in clusters.values():
            cluster.close()
    tasks = stats.map_tasks + stats.reduce_tasks
    tiny_ratios = [per_task / floor for per_task, floor in tiny_rounds]
    per_task = statistics.median(per_task for per_task, _ in tiny_rounds)
    floor = statistics.median(floor for _, floor in tiny_rounds)
    print(
        f"\n{tasks} tiny tasks ({stats.map_tasks} map + {stats.reduce_tasks} reduce),"
        f" replication 3, median of {len(tiny_rounds)} rounds: {per_task * 1000:.2f} ms per task"
    )
    print(
        f"  no-op gRPC floor (health Check to a worker, sequential, either side of each"
        f" job): {floor * 1000:.3f} ms"
    )
    print(
        f"  per validated task: {statistics.median(tiny_ratios):.2f} no-op RPCs of wall time"
        f" ({min(tiny_ratios):.2f}-{max(tiny_ratios):.2f}; issue 16's target <= 3)"
    )
    if args.profile:
        for replication in (3, 1):
            where_the_time_goes(data, replication, floor)
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
