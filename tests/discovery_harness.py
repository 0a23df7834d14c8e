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
        return self.stub.RequestTasks(
            pb.RequestTasksRequest(n=n, **fields), metadata=foreman.metadata
        )

    def fetch_key(self, worker: Identity, task_id: str) -> pb.FetchKeyResponse:
        return self.stub.FetchKey(pb.FetchKeyRequest(task_id=task_id), metadata=worker.metadata)

    def settle(
        self, foreman: Identity, task_id: str, *, valid: bool, missing=(), released=()
    ) -> pb.SettleTaskResponse:
        return self.stub.SettleTask(
            pb.SettleTaskRequest(
                task_id=task_id, valid=valid, missing=list(missing), released=list(released)
            ),
            metadata=foreman.metadata,
        )

    def add_replica(self, foreman: Identity, task_id: str, **fields) -> pb.WorkerRef:
        return self.stub.AddReplica(
            pb.AddReplicaRequest(task_id=task_id, runtime=RUNTIME, **fields),
            metadata=foreman.metadata,
        )

    def total_credits(self) -> int:
        """Every identity's balance through GetClient, plus what open tasks
        hold in escrow (the store's audit)."""
        balances = sum(self.credits(identity) for identity in self.identities)
        return balances + self.server.ledger.store.totals().escrowed_credits

    def issued_credits(self) -> int:
        return len(self.identities) * self.config.starting_credits
