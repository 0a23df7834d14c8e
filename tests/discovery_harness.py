"""Helpers for tests that talk to a real discovery server through the
generated stubs: identities, workers, and a clock the test moves."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from discovery_service.ledger import Ledger, LedgerConfig
from discovery_service.server import DiscoveryServer, build_server
from discovery_service.sqlite_store import SqliteStore
from discovery_service.stores import open_store
from ec262.auth import bearer_metadata
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc

RUNTIME = "cpython-3.11"
# What the harness's workers commit to when a test settles valid: the
# agreed result, or (for the workers it names missing) another.
AGREED_SHA256, OTHER_SHA256 = "a" * 64, "b" * 64


class ManualClock:
    """Time that moves only when the test says so: leases and task expiry
    are tested by moving it, never by sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@dataclass(frozen=True)
class Identity:
    client_id: str
    secret: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.client_id, self.secret)


class DiscoveryHarness:
    """A running discovery server and a stub connected to it."""

    def __init__(self, server: DiscoveryServer, clock: ManualClock, location: str = "") -> None:
        self.server = server
        self.clock = clock
        self.location = location
        self.address = f"127.0.0.1:{server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = discovery_pb2_grpc.DiscoveryStub(self.channel)
        self.identities: list[Identity] = []
        self.task_workers: dict[str, list[str]] = {}  # from requests and replicas
        self._next_port = 20000

    @classmethod
    def start(cls, path: str, config: LedgerConfig | None = None) -> DiscoveryHarness:
        """On a SQLite file (a path) or any store URL (e.g. redis://...)."""
        store = open_store(path) if "://" in path else SqliteStore(path)
        clock = ManualClock()
        ledger = Ledger(store, config or LedgerConfig(), clock=clock)
        return cls(build_server(ledger, sweep=False), clock, path)

    def restart(self) -> None:
        """Stop the server and start another on the same store and clock
        (a discovery service restarted), with its stub."""
        config = self.config
        self.stop()
        store = open_store(self.location) if "://" in self.location else SqliteStore(self.location)
        self.server = build_server(Ledger(store, config, clock=self.clock), sweep=False)
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = discovery_pb2_grpc.DiscoveryStub(self.channel)

    def sweep(self) -> int:
        """What the server's sweeper does every half second, at the test's time."""
        return self.server.ledger.sweep()

    def raw_ledger(self) -> bytes:
        """Everything the store holds, as bytes (to look for secrets)."""
        store = self.server.ledger.store
        if isinstance(store, SqliteStore):
            data = Path(store.path).read_bytes()
            wal = Path(store.path + "-wal")
            return data + (wal.read_bytes() if wal.exists() else b"")
        client = store._redis
        out = b""
        for key in client.scan_iter(match=store.prefix + "*"):
            value = client.hgetall(key) if client.type(key) == b"hash" else {}
            out += key + b"".join(k + v for k, v in value.items())
        return out

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0)

    @property
    def config(self) -> LedgerConfig:
        return self.server.ledger.config

    def client(self) -> Identity:
        response = self.stub.CreateClient(pb.CreateClientRequest())
        identity = Identity(response.client_id, response.secret)
        self.identities.append(identity)
        return identity

    def worker(self, *, slots: int = 1, ttl: int = 0, runtime: str = RUNTIME) -> Identity:
        identity = self.client()
        self._next_port += 1
        self.stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                address=f"127.0.0.1:{self._next_port}",
                ttl_seconds=ttl,
                slots=slots,
                runtime=runtime,
            ),
            metadata=identity.metadata,
        )
        return identity

    def info(self, identity: Identity) -> pb.ClientInfo:
        return self.stub.GetClient(pb.GetClientRequest(), metadata=identity.metadata)

    def credits(self, identity: Identity) -> int:
        return self.info(identity).credits

    def request(self, foreman: Identity, n: int = 1, **fields) -> pb.RequestTasksResponse:
        response = self.stub.RequestTasks(
            pb.RequestTasksRequest(n=n, **fields), metadata=foreman.metadata
        )
        for task in response.tasks:
            self.task_workers[task.task_id] = [w.client_id for w in task.workers]
        return response

    def identity(self, client_id: str) -> Identity:
        return next(i for i in self.identities if i.client_id == client_id)

    def commit(self, worker: Identity | str, task_id: str, sha256: str = AGREED_SHA256) -> None:
        if isinstance(worker, str):
            worker = self.identity(worker)
        self.stub.CommitResult(
            pb.CommitResultRequest(task_id=task_id, ciphertext_sha256=sha256),
            metadata=worker.metadata,
        )

    def fetch_key(self, worker: Identity, task_id: str) -> pb.FetchKeyResponse:
        return self.stub.FetchKey(pb.FetchKeyRequest(task_id=task_id), metadata=worker.metadata)

    def settle(
        self,
        foreman: Identity,
        task_id: str,
        *,
        valid: bool,
        missing=(),
        released=(),
        commit: bool = True,
    ) -> pb.SettleTaskResponse:
        """With `commit` (valid settles), the task's workers the harness
        knows commit first as its foreman sees them: those `missing` names
        to another result, the released ones not at all, the rest to the
        agreed one. A commitment already made (a real worker's) stands."""
        if valid and commit:
            self.commit_as_seen(task_id, missing=missing, released=released)
        return self.stub.SettleTask(
            pb.SettleTaskRequest(
                task_id=task_id, valid=valid, missing=list(missing), released=list(released)
            ),
            metadata=foreman.metadata,
        )

    def commit_as_seen(self, task_id: str, *, missing=(), released=()) -> None:
        for worker_id in self.task_workers.get(task_id, ()):
            if worker_id in released or worker_id not in {i.client_id for i in self.identities}:
                continue
            sha = OTHER_SHA256 if worker_id in missing else AGREED_SHA256
            try:
                self.commit(worker_id, task_id, sha)
            except grpc.RpcError as error:  # committed already, or released meanwhile
                if error.code() not in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                ):
                    raise

    def add_replica(self, foreman: Identity, task_id: str, **fields) -> pb.WorkerRef:
        worker = self.stub.AddReplica(
            pb.AddReplicaRequest(task_id=task_id, runtime=RUNTIME, **fields),
            metadata=foreman.metadata,
        )
        if worker.client_id:
            self.task_workers.setdefault(task_id, []).append(worker.client_id)
        return worker

    def total_credits(self) -> int:
        """Every identity's balance through GetClient, plus what open tasks
        hold in escrow (the store's audit)."""
        balances = sum(self.credits(identity) for identity in self.identities)
        return balances + self.server.ledger.store.totals().escrowed_credits

    def issued_credits(self) -> int:
        return len(self.identities) * self.config.starting_credits
