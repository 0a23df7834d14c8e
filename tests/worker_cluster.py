"""A real discovery server plus real `ec262 worker` processes on loopback,
and a recording foreman: the cluster the worker tests run against."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from discovery_service.ledger import LedgerConfig
from ec262.encoding import encode_pairs
from ec262.identity import load_identity
from ec262.payload import digest, pack_functions
from ec262.v1 import worker_pb2, worker_pb2_grpc
from tests.discovery_harness import DiscoveryHarness, Identity
from tests.foreman_double import RecordingForeman, start_foreman
from tests.processes import ServerProcess, start_server


@dataclass
class WorkerProcess:
    server: ServerProcess
    identity_path: Path
    client_id: str = ""

    @property
    def address(self) -> str:
        return self.server.address

    def stub(self) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(self.address))


@dataclass
class Cluster:
    discovery: DiscoveryHarness
    workers: list[WorkerProcess]
    foreman_address: str
    recorder: RecordingForeman
    foreman: Identity
    channels: list[grpc.Channel] = field(default_factory=list)

    def by_id(self, client_id: str) -> WorkerProcess:
        return next(w for w in self.workers if w.client_id == client_id)

    def assign(
        self,
        worker: WorkerProcess,
        task_id: str,
        function,
        *,
        rows,
        phase=1,
        payload: bytes | None = None,
        send_payload: bool = True,
        token=None,
        combiner=None,
        foreman_id: str | None = None,
        result_address: str | None = None,
    ) -> worker_pb2.AssignTaskResponse:
        payload = payload if payload is not None else pack_functions(function, combiner)
        token = token or secrets.token_hex(8)
        self.recorder.expect(task_id, [worker.client_id], token)
        channel = grpc.insecure_channel(worker.address)
        self.channels.append(channel)
        return worker_pb2_grpc.WorkerStub(channel).AssignTask(
            worker_pb2.AssignTaskRequest(
                task_id=task_id,
                job_id="job-1",
                phase=phase,
                function=payload if send_payload else b"",
                function_sha256=digest(payload),
                rows=encode_pairs(rows),
                result_address=result_address or self.foreman_address,
                foreman_id=foreman_id or self.foreman.client_id,
                submit_token=token,
            ),
            timeout=10,
        )


@contextlib.contextmanager
def worker_process(discovery_address: str, identity: Path, *extra: str) -> Iterator[WorkerProcess]:
    args = [
        "worker",
        "-P",
        "0",
        "--discovery",
        discovery_address,
        "--identity",
        str(identity),
        "-v",
        *extra,
    ]
    with start_server(args) as server:
        server.wait_for("registered with discovery")
        loaded = load_identity(identity)
        assert loaded is not None
        yield WorkerProcess(server, identity, loaded.client_id)


@contextlib.contextmanager
def running_cluster(
    tmp_path: Path, workers: int = 3, *extra: str, config: LedgerConfig | None = None
) -> Iterator[Cluster]:
    discovery = DiscoveryHarness.start(
        str(tmp_path / "ledger.sqlite3"), config or LedgerConfig(starting_credits=1000)
    )
    server, address, recorder = start_foreman()
    try:
        with contextlib.ExitStack() as stack:
            processes = [
                stack.enter_context(
                    worker_process(discovery.address, tmp_path / f"worker{i}.json", *extra)
                )
                for i in range(workers)
            ]
            for process in processes:  # so the harness can commit for them (settle)
                loaded = load_identity(process.identity_path)
                discovery.identities.append(Identity(loaded.client_id, loaded.secret))
            cluster = Cluster(discovery, processes, address, recorder, discovery.client())
            yield cluster
            for channel in cluster.channels:
                channel.close()
    finally:
        server.stop(0)
        discovery.stop()
