"""Discovery task cycles per second, measured against gRPC's own floor.

Why: a cycle (RequestTasks(n=1), FetchKey and CommitResult by each of the
three workers, SettleTask) is what each task of a MapReduce job costs the
discovery service, so cycles/s bounds how fast jobs are handed out. (A
valid settle needs a quorum of commitments, docs/protocol.md section 10,
so the workers commit as real ones do.) On a small machine the Python gRPC
stack, not the ledger, is the physical limit, so a bare cycles/s says
little. This script measures in the same run, with the same client
processes, the floor (the health service's no-op Check through the same
server) and reports ratio = cycles/s / (no-op calls/s / 8): 1.0 would mean
the ledger's work is free and a cycle costs just its eight RPCs. Target:
ratio >= 0.8 and p99 cycle latency <= 10 ms at 1 client process.

It starts the real server (`python -m ec262 discovery`, SQLite file ledger)
on loopback and drives it from 1, 2 and 4 spawned client *processes* (one
channel per front-end each, sync stubs), so a client's GIL is never what
gets measured. Per client count it runs a floor phase, then a cycle phase
(interleaved, so noise hits both alike), prints one table and writes
bench/results/discovery_cycles.json.

`--store redis` puts the ledger in Redis instead: the script starts its own
redis-server (loopback, no persistence, stopped at the end) and gives the
server a fresh key prefix. `--frontends N` (Redis only: a SQLite ledger file
belongs to one process) starts N servers on that one ledger; every client
then alternates front-ends cycle by cycle (RequestTasks on one, the
FetchKeys and SettleTask on the next), so every cycle crosses front-ends,
and the floor's calls go round-robin too. Server CPU is the sum over the
front-ends; Redis's own CPU is reported beside it. `--compare` runs SQLite
with one front-end, Redis with one and Redis with two in one invocation and
prints one combined table.

`--pool-scale` measures what the size of the pool costs (issue 16, item 5):
per store (SQLite and Redis), one ledger with 30 live workers and one with
10,000 (`--pool-sizes`), registered through the ledger's own code before
the servers start (identities the clients hold, so any of them can fetch
a key it is assigned) and each credential used once through the server
(as registration and heartbeats would), both servers up at once and
measured round by round in turn; it reports cycles/s with the large pool
over cycles/s with the small one (target >= 0.9). The clients' channels go
without HPACK's dynamic table there (POOL_CHANNEL_OPTIONS says why).

`--profile` instead runs one 1-process phase against a server whose every
thread runs under its own cProfile (`python -m cProfile` would see only the
main thread, which just waits for SIGTERM) and prints where the server's
time goes.

    .venv/bin/python bench/discovery_cycles.py [--duration 5] [--repeat 3]
    .venv/bin/python bench/discovery_cycles.py --synchronous FULL
    .venv/bin/python bench/discovery_cycles.py --store redis --frontends 2
    .venv/bin/python bench/discovery_cycles.py --compare  # ~2 min
    .venv/bin/python bench/discovery_cycles.py --pool-scale  # ~3 min
    .venv/bin/python bench/discovery_cycles.py --profile [--store redis]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import multiprocessing
import os
import platform
import pstats
import queue
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ec262 import tls
from ec262.auth import bearer_metadata
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STARTING_CREDITS = 10**9  # a cycle nets the foreman nothing, but never run out
RUNTIME = "cpython-3.11"
WORKER_SLOTS = 1000
WORKER_TTL = 3600
RPCS_PER_CYCLE = 8  # RequestTasks, 3 x FetchKey, 3 x CommitResult, SettleTask
COMMITTED_SHA256 = "c" * 64  # what every worker of a cycle commits to: a quorum
POOL_SIZES = (30, 10_000)  # --pool-scale: live workers in the small and the large pool
SEEDED_PORTS = 40_000  # seeded workers' addresses (never dialled), above the clients'
# --pool-scale: the clients act as every worker over one channel, where real
# workers each have their own connection. HPACK's dynamic table (4 KB)
# would keep 30 workers' authorization headers, not 10,000: a saving of
# the bench's one channel, not of the service, so both pools go without.
POOL_CHANNEL_OPTIONS = (("grpc.http2.hpack_table_size.encoder", 0),)
SERVE_PROFILED = "--serve-profiled"  # internal: this script as the profiled server
_LISTENING = re.compile(r"listening on (\S+):(\d+)(?: \(tls sha256:[0-9a-f]{64}\))?\s*$")

Metadata = tuple[tuple[str, str], ...]
# Processes whose CPU a phase reads at its window's edges, summed per group:
# "server" (every front-end) and, with Redis, "redis".
CpuPids = Mapping[str, Sequence[int]]


# -- the server ---------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    address: str
    log: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid


def server_command(
    store_url: str, profile_to: Path | None, tls_files: tuple[Path, Path] | None = None
) -> list[str]:
    """`tls_files` (certificate, key) serves TLS with them, on loopback too."""
    tls_args = []
    if tls_files:
        tls_args = ["--tls", "--tls-cert", str(tls_files[0]), "--tls-key", str(tls_files[1])]
    args = [
        "discovery",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--store",
        store_url,
        "--starting-credits",
        str(STARTING_CREDITS),
        *tls_args,
    ]
    if profile_to is None:
        return [sys.executable, "-m", "ec262", *args]
    return [sys.executable, str(Path(__file__).resolve()), SERVE_PROFILED, str(profile_to), *args]


def start_server(command: list[str], timeout: float = 30.0) -> Server:
    """Start the server and wait for its `listening on HOST:PORT` line; a
    thread keeps draining stderr so a chatty server can never block."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True, name="server-stderr").start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        if match := _LISTENING.search(line):
            return Server(process, f"{match[1]}:{match[2]}", log)
    process.kill()
    process.wait()
    raise RuntimeError("discovery server did not announce its port:\n" + "".join(log))


def stop_servers(servers: Sequence[Server]) -> None:
    """SIGTERM to each, and insist on a clean exit (status 0) of all."""
    for server in servers:
        server.process.send_signal(signal.SIGTERM)
    errors = []
    for server in servers:
        try:
            code = server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            errors.append(f"discovery server {server.address} ignored SIGTERM for 30 s")
            continue
        if code != 0:
            errors.append(
                f"discovery server {server.address} exited {code}:\n" + "".join(server.log)
            )
    if errors:
        raise RuntimeError("\n".join(errors))


def kill_servers(servers: Sequence[Server]) -> None:
    for server in servers:
        server.process.kill()
        server.process.wait()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: CpuPids) -> dict[str, float]:
    return {group: sum(map(process_cpu_seconds, members)) for group, members in pids.items()}


# -- one client process ---------------------------------------------------------


def create_identity(stub: discovery_pb2_grpc.DiscoveryStub) -> tuple[str, str]:
    response = stub.CreateClient(pb.CreateClientRequest())
    return response.client_id, response.secret


def register_worker(stub: discovery_pb2_grpc.DiscoveryStub, port: int) -> tuple[str, str]:
    client_id, secret = create_identity(stub)
    stub.RegisterWorker(
        pb.RegisterWorkerRequest(
            address=f"127.0.0.1:{port}", ttl_seconds=WORKER_TTL, slots=WORKER_SLOTS, runtime=RUNTIME
        ),
        metadata=bearer_metadata(client_id, secret),
    )
    return client_id, secret


def floor_step(healths: Sequence[health_pb2_grpc.HealthStub], first: int) -> Callable[[], None]:
    """A no-op call, to the front-ends in turn (starting at `first`)."""
    request = health_pb2.HealthCheckRequest()
    if len(healths) == 1:
        check = healths[0].Check

        def step() -> None:
            check(request)

        return step
    turn = first

    def step_round_robin() -> None:
        nonlocal turn
        healths[turn % len(healths)].Check(request)
        turn += 1

    return step_round_robin


def cycle_step(
    stubs: Sequence[discovery_pb2_grpc.DiscoveryStub],
    first: int,
    foreman: Metadata,
    workers: dict[str, Metadata],
) -> Callable[[], None]:
    """One full task cycle, each FetchKey and CommitResult with the
    credentials of a worker the service actually assigned. With several
    front-ends, cycle j sends RequestTasks to front-end (first + j) % N and
    the rest to the next one, so every cycle crosses front-ends."""
    request = pb.RequestTasksRequest(n=1, runtime=RUNTIME)
    turn = first

    def step() -> None:
        nonlocal turn
        ask = stubs[turn % len(stubs)]
        rest = stubs[(turn + 1) % len(stubs)]
        turn += 1
        tasks = ask.RequestTasks(request, metadata=foreman).tasks
        if len(tasks) != 1:
            raise RuntimeError(f"RequestTasks(n=1) gave {len(tasks)} tasks; add workers")
        task_id = tasks[0].task_id
        fetch = pb.FetchKeyRequest(task_id=task_id)
        commit = pb.CommitResultRequest(task_id=task_id, ciphertext_sha256=COMMITTED_SHA256)
        for worker in tasks[0].workers:
            rest.FetchKey(fetch, metadata=workers[worker.client_id])
        for worker in tasks[0].workers:
            rest.CommitResult(commit, metadata=workers[worker.client_id])
        rest.SettleTask(pb.SettleTaskRequest(task_id=task_id, valid=True), metadata=foreman)

    return step


def run_phase(
    step: Callable[[], None], duration: float, warmup: float, cpu_pids: CpuPids | None
) -> dict:
    """Call `step` back to back for warmup + duration seconds. Counted (and
    timed) are the steps that start and end inside the window; the CPU of
    the `cpu_pids` groups is read at the window's edges when given."""
    perf_counter = time.perf_counter
    window_start = perf_counter() + warmup
    window_end = window_start + duration
    latencies: list[float] = []
    total = 0
    cpu_start: dict[str, float] | None = None
    client_start = None
    while (started := perf_counter()) < window_end:
        if client_start is None and started >= window_start:
            client_start = time.process_time()
            cpu_start = cpu_seconds(cpu_pids) if cpu_pids else None
            started = perf_counter()
        step()
        total += 1
        ended = perf_counter()
        if started >= window_start and ended <= window_end:
            latencies.append(ended - started)
    cpu = None
    if cpu_pids and cpu_start is not None:
        cpu = {group: t - cpu_start[group] for group, t in cpu_seconds(cpu_pids).items()}
    return {
        "count": len(latencies),
        "total": total,
        "latencies": latencies,
        "client_cpu": time.process_time() - (client_start or time.process_time()),
        "cpu": cpu,
    }


def client_process(
    index: int,
    addresses: Sequence[str],
    cpu_pids: CpuPids,
    workers_per_client: int,
    barriers: dict[int, Barrier],
    conn: Connection,
    certificate: bytes | None = None,
    channel_options: Sequence[tuple[str, object]] = (),
) -> None:
    """Entry point of a spawned client: one channel per front-end (TLS to
    `certificate` when given), make identities, then run phases on command.
    Client 0 also reads the CPU time of the servers (and of Redis)."""
    try:
        with contextlib.ExitStack() as stack:
            channels = [
                stack.enter_context(tls.channel(a, certificate, channel_options)) for a in addresses
            ]
            for channel in channels:
                grpc.channel_ready_future(channel).result(timeout=30)
            _serve_phases(index, channels, cpu_pids, workers_per_client, barriers, conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _serve_phases(
    index: int,
    channels: Sequence[grpc.Channel],
    cpu_pids: CpuPids,
    workers_per_client: int,
    barriers: dict[int, Barrier],
    conn: Connection,
) -> None:
    stubs = [discovery_pb2_grpc.DiscoveryStub(channel) for channel in channels]
    # Identities live in the shared ledger: any front-end can make them.
    home = stubs[index % len(stubs)]
    foreman = bearer_metadata(*create_identity(home))
    base_port = 30000 + 100 * index
    own = [register_worker(home, base_port + i) for i in range(workers_per_client)]
    conn.send(("ready", own))
    kind, everyone = conn.recv()
    assert kind == "workers"
    workers = {client_id: bearer_metadata(client_id, secret) for client_id, secret in everyone}
    healths = [health_pb2_grpc.HealthStub(channel) for channel in channels]
    steps = {
        "floor": floor_step(healths, index),
        "cycles": cycle_step(stubs, index, foreman, workers),
    }
    while (message := conn.recv())[0] == "run":
        _, phase, clients, duration, warmup = message
        barriers[clients].wait(timeout=120)
        pids = cpu_pids if index == 0 else None
        conn.send(("result", run_phase(steps[phase], duration, warmup, pids)))


# -- the client pool ------------------------------------------------------------


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    clients: int
    rate: float  # steps per second, all clients together
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # per step, all front-ends together
    client_cpu_us: float  # per step, all client processes together
    count: int
    total: int  # including warm-up
    redis_cpu_us: float | None = None  # per step, the redis-server process


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data."""
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarize(phase: str, duration: float, results: list[dict]) -> PhaseResult:
    latencies = sorted(x for r in results for x in r["latencies"])
    count = len(latencies)
    if not count:
        raise RuntimeError(f"{phase}: nothing completed inside the window")
    cpu = results[0]["cpu"]
    return PhaseResult(
        phase=phase,
        clients=len(results),
        rate=count / duration,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        server_cpu_us=cpu["server"] / count * 1e6,
        client_cpu_us=sum(r["client_cpu"] for r in results) / count * 1e6,
        count=count,
        total=sum(r["total"] for r in results),
        redis_cpu_us=cpu["redis"] / count * 1e6 if "redis" in cpu else None,
    )


class ClientPool:
    """`size` spawned client processes; `run` drives the first k of them.
    `seeded`: (id, secret) of workers already in the ledger, which every
    client can act as when the service assigns them."""

    def __init__(
        self,
        addresses: Sequence[str],
        cpu_pids: CpuPids,
        size: int,
        workers_per_client: int,
        counts: Sequence[int],
        certificate: bytes | None = None,
        seeded: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._certificate = certificate
        self._seeded = list(seeded)
        self._channel_options = list(channel_options)
        try:
            self._start(addresses, cpu_pids, size, workers_per_client, counts)
        except BaseException:
            self.close()
            raise

    def _start(
        self,
        addresses: Sequence[str],
        cpu_pids: CpuPids,
        size: int,
        workers_per_client: int,
        counts: Sequence[int],
    ) -> None:
        context = multiprocessing.get_context("spawn")
        barriers = {k: context.Barrier(k) for k in set(counts)}
        pids = {group: list(members) for group, members in cpu_pids.items()}
        for index in range(size):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=client_process,
                args=(
                    index,
                    list(addresses),
                    pids,
                    workers_per_client,
                    barriers,
                    child_end,
                    self._certificate,
                    self._channel_options,
                ),
                name=f"bench-client-{index}",
            )
            process.start()
            child_end.close()
            self._conns.append(parent_end)
            self._processes.append(process)
        everyone = [cred for conn in self._conns for cred in self._receive(conn, "ready")]
        everyone += self._seeded
        for conn in self._conns:
            conn.send(("workers", everyone))

    def _receive(self, conn: Connection, expected: str, timeout: float = 120.0) -> object:
        if not conn.poll(timeout):
            raise RuntimeError(f"a client process sent no {expected!r} within {timeout} s")
        kind, payload = conn.recv()
        if kind == "error":
            raise RuntimeError(f"a client process failed:\n{payload}")
        return payload

    def run(self, phase: str, clients: int, duration: float, warmup: float) -> PhaseResult:
        active = self._conns[:clients]
        for conn in active:
            conn.send(("run", phase, clients, duration, warmup))
        timeout = duration + warmup + 120
        results = [self._receive(conn, "result", timeout) for conn in active]
        return summarize(phase, duration, results)  # type: ignore[arg-type]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


@contextlib.contextmanager
def running(
    commands: Sequence[list[str]],
    redis_pid: int | None,
    size: int,
    workers_per_client: int,
    counts: Sequence[int],
    certificate: bytes | None = None,
    seeded: Sequence[tuple[str, str]] = (),
    channel_options: Sequence[tuple[str, object]] = (),
) -> Iterator[tuple[list[Server], ClientPool]]:
    """The front-ends (one per command) and the client processes; clients
    stop before the servers. The pool reads the front-ends' CPU, summed,
    and Redis's when `redis_pid` is given."""
    servers: list[Server] = []
    try:
        for command in commands:
            servers.append(start_server(command))
        cpu_pids: dict[str, list[int]] = {"server": [server.pid for server in servers]}
        if redis_pid is not None:
            cpu_pids["redis"] = [redis_pid]
        addresses = [server.address for server in servers]
        pool = ClientPool(
            addresses,
            cpu_pids,
            size,
            workers_per_client,
            counts,
            certificate,
            seeded,
            channel_options,
        )
        try:
            yield servers, pool
        finally:
            pool.close()
    except BaseException:
        kill_servers(servers)
        raise
    stop_servers(servers)


def store_url(directory: str, synchronous: str, name: str = "ledger") -> str:
    url = f"sqlite:///{directory}/{name}.sqlite3"
    return url + "?synchronous=FULL" if synchronous == "FULL" else url


class Stores(contextlib.ExitStack):
    """Fresh ledgers: SQLite files in one temporary directory, or fresh key
    prefixes on one redis-server that this script starts on first use
    (loopback, random port, no persistence) and stops on exit."""

    def __init__(self, directory: Path | None, synchronous: str) -> None:
        super().__init__()
        self._directory = directory
        self._synchronous = synchronous
        self._temporary: str | None = None
        self._redis = None
        self._made = 0

    def url(self, store: str) -> str:
        self._made += 1
        if store == "sqlite":
            if self._temporary is None:
                self._temporary = self.enter_context(
                    tempfile.TemporaryDirectory(prefix="ec262-bench-", dir=self._directory)
                )
            return store_url(self._temporary, self._synchronous, f"ledger-{self._made}")
        return self._redis_server().url(f"bench{self._made}-{uuid.uuid4().hex[:8]}:")

    def _redis_server(self):  # -> tests.redis_server.RedisServer
        if self._redis is None:
            if str(REPO) not in sys.path:  # bench/ is on the path, not the repo root
                sys.path.insert(0, str(REPO))
            from tests.redis_server import RedisServer

            self._redis = RedisServer()
            self.callback(self._redis.stop)
        return self._redis

    @property
    def redis_pid(self) -> int | None:
        return self._redis.process.pid if self._redis is not None else None

    @property
    def redis_version(self) -> str | None:
        if self._redis is None:
            return None
        binary = self._redis.process.args[0]
        return subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()


# -- the benchmark -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    clients: int
    floor: PhaseResult
    cycles: PhaseResult

    @property
    def ratio(self) -> float:
        return self.cycles.rate / (self.floor.rate / RPCS_PER_CYCLE)

    @property
    def server_cpu_ratio(self) -> float:
        """Server CPU of a cycle over that of RPCS_PER_CYCLE no-op calls."""
        return self.cycles.server_cpu_us / (RPCS_PER_CYCLE * self.floor.server_cpu_us)


def median_row(rows: list[Row]) -> Row:
    """Field by field median over repeats."""

    def median_of(results: list[PhaseResult]) -> PhaseResult:
        first = results[0]
        numeric = ("rate", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")
        values = {f: statistics.median(getattr(r, f) for r in results) for f in numeric}
        redis = [r.redis_cpu_us for r in results if r.redis_cpu_us is not None]
        count, total = sum(r.count for r in results), sum(r.total for r in results)
        return PhaseResult(
            first.phase,
            first.clients,
            count=count,
            total=total,
            redis_cpu_us=statistics.median(redis) if redis else None,
            **values,
        )

    return Row(
        rows[0].clients, median_of([r.floor for r in rows]), median_of([r.cycles for r in rows])
    )


@dataclass(frozen=True)
class Config:
    store: str  # "sqlite" or "redis"
    frontends: int
    tls: bool = False
    pool: int = 0  # --pool-scale: live workers in the ledger (0: just the clients')

    @property
    def label(self) -> str:
        plural = "s" if self.frontends > 1 else ""
        return f"{self.store}, {self.frontends} front-end{plural}{', TLS' if self.tls else ''}"


COMPARED = (Config("sqlite", 1), Config("redis", 1), Config("redis", 2))
TLS_COMPARED = (Config("sqlite", 1), Config("sqlite", 1, tls=True))


def benchmark(
    args: argparse.Namespace, stores: Stores, config: Config, repeats: Sequence[int] | None = None
) -> dict:
    """`repeats`: which of the rounds to run here (all by default), so that
    configurations can take turns round by round."""
    counts = sorted(set(args.clients))
    rows: dict[int, list[Row]] = {k: [] for k in counts}
    url = stores.url(config.store)
    tls_files, certificate = None, None
    if config.tls:
        directory = Path(tempfile.mkdtemp(prefix="bench-tls-"))
        tls_files = (directory / "cert.pem", directory / "key.pem")
        certificate = tls.load_or_create(*tls_files, ["localhost"]).certificate_pem
    commands = [server_command(url, None, tls_files) for _ in range(config.frontends)]
    redis_pid = stores.redis_pid if config.store == "redis" else None
    size = max(counts)
    with running(commands, redis_pid, size, args.workers_per_client, counts, certificate) as (
        _,
        pool,
    ):
        for repeat in range(args.repeat) if repeats is None else repeats:
            for k in counts:
                floor = pool.run("floor", k, args.duration, args.warmup)
                cycles = pool.run("cycles", k, args.duration, args.warmup)
                rows[k].append(Row(k, floor, cycles))
                print(
                    f"  {config.label}, repeat {repeat + 1}/{args.repeat}, {k} process(es): "
                    f"{floor.rate:,.0f} no-op/s, {cycles.rate:,.0f} cycles/s, "
                    f"ratio {rows[k][-1].ratio:.2f}, p99 {cycles.p99_ms:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "config": config,
        "store_url": url,
        "server_commands": commands,
        "rows": {k: (median_row(v), v) for k, v in rows.items()},
    }


def seed_pool(url: str, count: int) -> list[tuple[str, str]]:
    """`count` live workers registered in the ledger at `url` through the
    ledger's own code (no server runs on it yet), each at an address of its
    own; their (id, secret), for the clients to act as them."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from discovery_service.ledger import Ledger, LedgerConfig
    from discovery_service.stores import open_store

    store = open_store(url)
    try:
        ledger = Ledger(store, LedgerConfig(max_worker_ttl=WORKER_TTL))
        seeded = []
        for i in range(count):
            record, secret = ledger.create_client()
            ledger.register_worker(
                record.client_id,
                address=f"127.0.0.1:{SEEDED_PORTS + i}",
                ttl_seconds=WORKER_TTL,
                slots=WORKER_SLOTS,
                runtime=RUNTIME,
            )
            seeded.append((record.client_id, secret))
        return seeded
    finally:
        store.close()


def warm_credentials(address: str, seeded: Sequence[tuple[str, str]]) -> None:
    """One call as each seeded worker, as a real worker's registration and
    heartbeats make: the server verifies a credential once and then keeps
    it (Ledger.authenticate), which the timed phases should not pay for
    10,000 workers and not for 30."""
    request = pb.GetClientRequest()
    with grpc.insecure_channel(address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        for client_id, secret in seeded:
            stub.GetClient(request, metadata=bearer_metadata(client_id, secret))


def pool_scale(args: argparse.Namespace, stores: Stores) -> list[dict]:
    """Per store, a ledger per pool size, all of one store's servers up at
    once and measured in turn round by round (so drift hits each alike)."""
    counts = sorted(set(args.clients))
    own = args.workers_per_client * max(counts)
    outcomes = []
    for store in args.pool_stores:
        ledgers = []
        for pool_size in args.pool_sizes:
            url = stores.url(store)
            started = time.perf_counter()
            seeded = seed_pool(url, pool_size - own)
            print(
                f"  {store}: {pool_size - own:,} workers seeded in"
                f" {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            ledgers.append((pool_size, url, seeded))
        redis_pid = stores.redis_pid if store == "redis" else None
        with contextlib.ExitStack() as stack:
            pools = []
            for pool_size, url, seeded in ledgers:
                command = server_command(url, None)
                servers, pool = stack.enter_context(
                    running(
                        [command], redis_pid, max(counts), args.workers_per_client, counts,
                        seeded=seeded, channel_options=POOL_CHANNEL_OPTIONS,
                    )
                )  # fmt: skip
                warm_credentials(servers[0].address, seeded)
                pools.append((pool_size, url, command, pool, {k: [] for k in counts}))
            for repeat in range(args.repeat):
                for pool_size, _, _, pool, rows in pools:
                    for k in counts:
                        floor = pool.run("floor", k, args.duration, args.warmup)
                        cycles = pool.run("cycles", k, args.duration, args.warmup)
                        rows[k].append(Row(k, floor, cycles))
                        print(
                            f"  {store}, {pool_size:,} workers, repeat {repeat + 1}/{args.repeat},"
                            f" {k} process(es): {cycles.rate:,.0f} cycles/s,"
                            f" p99 {cycles.p99_ms:.2f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
        for pool_size, url, command, _, rows in pools:
            outcomes.append(
                {
                    "config": Config(store, 1, pool=pool_size),
                    "store_url": url,
                    "server_commands": [command],
                    "rows": {k: (median_row(v), v) for k, v in rows.items()},
                }
            )
    return outcomes


def pool_table(outcomes: list[dict]) -> str:
    """Cycles/s per pool size, and each over the smallest pool's of its store."""
    lines = ["store    workers procs  cycles/s  x smallest  p50 ms  p99 ms  srv us/cycle  ratio"]
    smallest: dict[tuple[str, int], float] = {}
    for outcome in outcomes:
        config: Config = outcome["config"]
        for k, (row, _) in outcome["rows"].items():
            c = row.cycles
            base = smallest.setdefault((config.store, k), c.rate)
            lines.append(
                f"{config.store:<8} {config.pool:>7,} {k:>5} {c.rate:>9,.0f} {c.rate / base:>11.2f}"
                f" {c.p50_ms:>7.2f} {c.p99_ms:>7.2f} {c.server_cpu_us:>13.0f} {row.ratio:>6.2f}"
            )
    lines += [
        "x smallest: cycles/s over those with the smallest pool, same store and processes,",
        "same run (target >= 0.9 at 10,000 workers); ratio: cycles/s over the floor as above.",
    ]
    return "\n".join(lines)


def _merged(outcomes: list[dict]) -> dict:
    """One configuration's rounds, run apart, as one outcome with medians."""
    rows: dict[int, list[Row]] = {}
    for outcome in outcomes:
        for k, (_, repeats) in outcome["rows"].items():
            rows.setdefault(k, []).extend(repeats)
    return {**outcomes[0], "rows": {k: (median_row(v), v) for k, v in rows.items()}}


def _us(value: float | None, width: int) -> str:
    return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"


def table(rows: list[Row]) -> str:
    redis = any(row.cycles.redis_cpu_us is not None for row in rows)
    lines = [
        "      floor: health Check          | cycle: RequestTasks + 3 x FetchKey + SettleTask",
        "procs  no-op/s  p50 us  srv us/op  | cycles/s  ratio  p50 ms  p99 ms"
        "  srv us  cli us  srv x" + ("  redis us" if redis else ""),
    ]
    for row in rows:
        f, c = row.floor, row.cycles
        lines.append(
            f"{row.clients:>5} {f.rate:>8,.0f} {f.p50_ms * 1e3:>7.0f} {f.server_cpu_us:>10.0f}  |"
            f" {c.rate:>8,.0f} {row.ratio:>6.2f} {c.p50_ms:>7.2f} {c.p99_ms:>7.2f}"
            f" {c.server_cpu_us:>7.0f} {c.client_cpu_us:>7.0f} {row.server_cpu_ratio:>6.2f}"
            + (f" {_us(c.redis_cpu_us, 9)}" if redis else "")
        )
    lines += [
        f"ratio = cycles/s / (no-op/s / {RPCS_PER_CYCLE}), target >= 0.8;"
        " p99 at 1 process target <= 10 ms.",
        "srv us, cli us: CPU microseconds per call or cycle of the server(s, summed over",
        "front-ends) / of all clients; srv x = server CPU per cycle / server CPU of"
        f" {RPCS_PER_CYCLE} no-op calls.",
    ]
    if redis:
        lines.append("redis us: CPU microseconds of the redis-server process per cycle.")
    return "\n".join(lines)


def compare_table(outcomes: list[dict]) -> str:
    lines = [
        "store   front-ends procs  floor calls/s  cycles/s  ratio  p50 ms  p99 ms"
        "  srv us/cycle  redis us/cycle",
    ]
    for outcome in outcomes:
        config: Config = outcome["config"]
        for row, _ in outcome["rows"].values():
            f, c = row.floor, row.cycles
            store = f"{config.store}{'+tls' if config.tls else ''}"
            lines.append(
                f"{store:<11} {config.frontends:>6} {row.clients:>5} {f.rate:>14,.0f}"
                f" {c.rate:>9,.0f} {row.ratio:>6.2f} {c.p50_ms:>7.2f} {c.p99_ms:>7.2f}"
                f" {c.server_cpu_us:>13.0f} {_us(c.redis_cpu_us, 15)}"
            )
    lines += [
        "floor: health Check through the same front-end(s);"
        f" ratio = cycles/s / (floor/s / {RPCS_PER_CYCLE}).",
        "srv us/cycle: CPU of all front-end processes together per cycle; redis us/cycle:",
        "CPU of the redis-server process per cycle. With 2 front-ends every cycle crosses them.",
    ]
    return "\n".join(lines)


def phase_json(result: PhaseResult) -> dict:
    return {k: v for k, v in vars(result).items() if k not in ("phase", "clients")}


def row_json(row: Row) -> dict:
    return {
        "clients": row.clients,
        "ratio": row.ratio,
        "server_cpu_ratio": row.server_cpu_ratio,
        "floor": phase_json(row.floor),
        "cycles": phase_json(row.cycles),
    }


def write_json(
    path: Path, args: argparse.Namespace, command: str, stores: Stores, outcomes: list[dict]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeat": args.repeat,
            "synchronous": args.synchronous,
            "workers_per_client": args.workers_per_client,
            "ledger_dir": str(args.dir or tempfile.gettempdir()),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
            "redis_server": stores.redis_version,
        },
        "configurations": [
            {
                "store": outcome["config"].store,
                "tls": outcome["config"].tls,
                "frontends": outcome["config"].frontends,
                "pool_workers": outcome["config"].pool or None,
                "store_url": outcome["store_url"],
                "server_commands": [shlex.join(c) for c in outcome["server_commands"]],
                "results": [
                    {**row_json(median), "repeats": [row_json(r) for r in repeats]}
                    for median, repeats in outcome["rows"].values()
                ],
            }
            for outcome in outcomes
        ],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# -- profiling the server ------------------------------------------------------------


def serve_profiled(out: str, argv: list[str]) -> int:
    """Run `ec262 ARGV` with a cProfile in every thread it starts (CPU time
    of that thread, so idle waits cost nothing), merged into OUT when the
    server stops. The main thread, which only starts up and then waits for
    SIGTERM, is left out so imports do not count."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    from ec262.cli import main

    code = main(argv)
    with lock:
        stats = [pstats.Stats(profile) for profile in profiles]
    merged = stats[0]
    merged.add(*stats[1:])
    merged.dump_stats(out)
    return code


# Where a function's own time belongs, first match on "file:function" wins.
# gRPC's Cython calls are invisible to cProfile, so C-core's work (socket
# I/O, HTTP/2) shows as own time of the grpc/*.py functions that call it.
BUCKETS = (
    (
        "auth: parse_bearer, uuid, sha256",
        r"ec262/auth\.py|/uuid\.py|sha256|compare_digest|/hmac\.py",
    ),
    ("SQLite statements (C)", r"sqlite3\."),
    ("Redis client (redis-py, its socket I/O)", r"/redis/"),
    ("randomness (SystemRandom, urandom)", r"/random\.py|/secrets\.py|urandom|getrandbits"),
    ("logging", r"/logging/"),
    ("ledger + store (Python)", r"discovery_service/(ledger|sqlite_store|redis_store|store)\.py"),
    ("servicer + protobuf", r"servicer\.py|grpc_errors\.py|_pb2|_upb|FromString|ToString"),
    ("gRPC server + its thread pool", r"grpc|concurrent/futures|/queue\.py"),
)
# Helpers whose time belongs to whoever called them (builtins, locks, ...).
_NEUTRAL = re.compile(r"^~:|threading\.py|contextlib\.py|functools\.py|<string>|<frozen|/re/")

Key = tuple[str, int, str]


def attribute(entries: dict, key: Key, depth: int = 0) -> dict[str, float]:
    """Fractions of a function's own time per bucket: its own bucket, or
    (for a neutral helper) its callers', weighted by the time spent on
    behalf of each."""
    text = f"{key[0]}:{key[2]}"
    direct = next((name for name, pattern in BUCKETS if re.search(pattern, text)), None)
    if direct or not _NEUTRAL.search(text) or depth > 8:
        return {direct or "other": 1.0}
    callers = entries[key][4]
    weights = {caller: edge[2] or edge[1] for caller, edge in callers.items()}
    total = sum(weights.values())
    if not total:
        return {"other": 1.0}
    shares: dict[str, float] = {}
    for caller, weight in weights.items():
        for name, part in attribute(entries, caller, depth + 1).items():
            shares[name] = shares.get(name, 0.0) + part * weight / total
    return shares


def short_name(key: Key) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    return f"{'/'.join(parts[-2:])}:{line}({name})"


def print_profile(path: Path, steps: int, step_name: str, top: int) -> None:
    entries = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in entries.values())
    per = 1e6 / steps
    print(f"\nserver thread CPU under the profiler: {total * per:.0f} us per {step_name}")
    buckets: dict[str, float] = {}
    for key, (_, _, tt, _, _) in entries.items():
        for name, part in attribute(entries, key).items():
            buckets[name] = buckets.get(name, 0.0) + tt * part
    print(f"\nown time by area, helpers charged to their callers ({steps} {step_name}s)")
    for name, tt in sorted(buckets.items(), key=lambda item: -item[1]):
        print(f"  {tt / total:6.1%} {tt * per:8.1f} us/{step_name}  {name}")
    for sort, column in (("tottime", 2), ("cumtime", 3)):
        ranked = sorted(entries.items(), key=lambda item: -item[1][column])[:top]
        print(f"\ntop {top} by {sort}: us per {step_name} own, cumulative; calls per {step_name}")
        for key, (_, nc, tt, ct, _) in ranked:
            print(f"  {tt * per:8.1f} {ct * per:8.1f} {nc / steps:6.2f}  {short_name(key)}")


def profile(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_redis" if args.store == "redis" else ""
    out = RESULTS / f"discovery_server_{args.profile_phase}{suffix}.prof"
    with Stores(args.dir, args.synchronous) as stores:
        command = server_command(stores.url(args.store), out)
        with running([command], stores.redis_pid, 1, args.workers_per_client, [1]) as (_, pool):
            result = pool.run(args.profile_phase, 1, args.duration, args.warmup)
    step_name = "cycle" if args.profile_phase == "cycles" else "call"
    print(f"server: {shlex.join(command)}")
    print(
        f"under the profiler, 1 process: {result.rate:,.0f} {args.profile_phase}/s"
        f" (p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms)"
    )
    if result.redis_cpu_us is not None:
        print(f"redis-server CPU (not profiled): {result.redis_cpu_us:.0f} us per {step_name}")
    print_profile(out, result.total, step_name, args.top)
    print(f"\nprofile written to {out} (open with python -m pstats)")


# -- command line ----------------------------------------------------------------------


def client_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, help="seconds measured per phase (default 5; 3 with --compare)"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds excluded per phase")
    parser.add_argument(
        "--repeat", type=int, help="rounds, the table shows medians (default 3; 1 with --compare)"
    )
    parser.add_argument(
        "--clients", type=client_counts, help="e.g. 1,2,4 (the default; 1 with --pool-scale)"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "redis"),
        default="sqlite",
        help="the ledger: a SQLite file, or a redis-server this script starts",
    )
    parser.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="discovery server processes on the one ledger (more than 1: Redis only)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="SQLite x 1, Redis x 1 and Redis x 2 front-ends in one run, one table",
    )
    parser.add_argument(
        "--tls-compare",
        action="store_true",
        help="SQLite plaintext and SQLite over TLS, taking turns round by round; one table"
        " and the cost of TLS",
    )
    parser.add_argument(
        "--pool-scale",
        action="store_true",
        help="cycles/s with --pool-sizes live workers, per store, and the ratio to the smallest",
    )
    parser.add_argument(
        "--pool-sizes",
        type=client_counts,
        default=list(POOL_SIZES),
        help="live workers per ledger with --pool-scale (default 30,10000)",
    )
    parser.add_argument(
        "--pool-stores",
        type=lambda text: text.split(","),
        default=["sqlite", "redis"],
        help="stores measured by --pool-scale (default sqlite,redis)",
    )
    parser.add_argument(
        "--synchronous", choices=("NORMAL", "FULL"), default="NORMAL", help="SQLite only"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the ledger file goes (default: system temp)"
    )
    parser.add_argument("--workers-per-client", type=int, default=3)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="default bench/results/discovery_cycles[_redis_Nfe|_compare].json",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the server over a 1-process phase instead"
    )
    parser.add_argument("--profile-phase", choices=("cycles", "floor"), default="cycles")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = [1] if args.pool_scale else [1, 2, 4]
    if args.workers_per_client * max(args.clients) < 3:
        parser.error("need at least 3 workers in all (the replication)")
    if args.frontends < 1:
        parser.error("--frontends must be at least 1")
    if args.frontends > 1 and args.store == "sqlite" and not args.compare:
        parser.error(
            "--frontends > 1 needs --store redis: a SQLite ledger file is held by one process"
        )
    if (args.compare or args.tls_compare or args.pool_scale) and (
        args.profile or args.store != "sqlite" or args.frontends != 1
    ):
        parser.error(
            "--compare, --tls-compare and --pool-scale pick the stores and front-ends themselves"
        )
    if args.pool_scale:
        if set(args.pool_stores) - {"sqlite", "redis"}:
            parser.error("--pool-stores lists sqlite and/or redis")
        if min(args.pool_sizes) < args.workers_per_client * max(args.clients):
            parser.error("every pool size must hold at least the clients' own workers")
    if args.profile and args.frontends != 1:
        parser.error("--profile profiles one front-end")
    if args.duration is None:
        args.duration = 3.0 if args.compare else 5.0
    if args.repeat is None:
        args.repeat = 1 if args.compare else 3
    if args.json is None:
        if args.pool_scale:
            name = "discovery_cycles_pool"
        elif args.tls_compare:
            name = "discovery_cycles_tls"
        elif args.compare:
            name = "discovery_cycles_compare"
        elif args.store == "redis":
            name = f"discovery_cycles_redis_{args.frontends}fe"
        else:
            name = "discovery_cycles"
        args.json = RESULTS / f"{name}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [SERVE_PROFILED]:
        return serve_profiled(argv[1], argv[2:])
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    if args.profile:
        profile(args)
        print(f"\ncommand: {command}")
        return 0
    configs = COMPARED if args.compare else (Config(args.store, args.frontends),)
    if args.tls_compare:
        configs = TLS_COMPARED
    with Stores(args.dir, args.synchronous) as stores:
        if args.pool_scale:
            outcomes = pool_scale(args, stores)
        elif args.tls_compare:  # taking turns, so the machine's drift hits both alike
            rounds = [
                [benchmark(args, stores, config, [r]) for config in configs]
                for r in range(args.repeat)
            ]
            outcomes = [_merged([turns[i] for turns in rounds]) for i in range(len(configs))]
        else:
            outcomes = [benchmark(args, stores, config) for config in configs]
        write_json(args.json, args, command, stores, outcomes)
    print()
    for outcome in outcomes:
        for server in outcome["server_commands"]:
            print(f"server ({outcome['config'].label}): {shlex.join(server)}")
    settings = f"{args.duration:g} s per phase, median of {args.repeat}"
    if args.pool_scale:
        print(f"SQLite synchronous={args.synchronous}, {settings}")
        print(pool_table(outcomes))
    elif args.tls_compare:
        print(f"SQLite synchronous={args.synchronous}, {settings}")
        print(compare_table(outcomes))
        plain, secure = (o["rows"] for o in outcomes)
        for k in plain:
            cycles = secure[k][0].cycles.rate / plain[k][0].cycles.rate
            floor = secure[k][0].floor.rate / plain[k][0].floor.rate
            print(
                f"TLS at {k} process(es): {cycles:.2f} x the plaintext cycles/s"
                f" ({floor:.2f} x its no-op floor); goal at least 0.80 (TLS costs at most 25 %)"
            )
    elif args.compare:
        print(f"SQLite synchronous={args.synchronous}, {settings}")
        print(compare_table(outcomes))
    else:
        config = configs[0]
        detail = f", synchronous={args.synchronous}" if config.store == "sqlite" else ""
        print(f"{config.label}{detail}, {settings}")
        print(table([median for median, _ in outcomes[0]["rows"].values()]))
    print(f"\ncommand: {command}\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
