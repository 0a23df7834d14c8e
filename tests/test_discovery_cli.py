"""`ec262 discovery` as a real process: the listening line, reflection and
health, a clean stop on SIGINT/SIGTERM, and a ledger file that survives."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ec262.auth import bearer_metadata
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc
from tests.processes import start_server


def test_discovery_cli_serves_and_stops_on_sigterm(tmp_path):
    store = f"sqlite:///{tmp_path}/ledger.sqlite3"
    with start_server(["discovery", "--port", "0", "--store", store, "-v"]) as server:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "ec262.v1.Discovery"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for reply in replies for s in reply.list_services_response.service}
            assert {"ec262.v1.Discovery", "grpc.health.v1.Health"} <= names
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_ledger_survives_a_restart(tmp_path, sig):
    store = f"sqlite:///{tmp_path}/ledger.sqlite3"
    args = ["discovery", "--port", "0", "--store", store, "--starting-credits", "7"]
    with start_server(args) as server, grpc.insecure_channel(server.address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        identities = [stub.CreateClient(pb.CreateClientRequest()) for _ in range(4)]
        foreman, *workers = [bearer_metadata(i.client_id, i.secret) for i in identities]
        for number, worker in enumerate(workers):
            stub.RegisterWorker(
                pb.RegisterWorkerRequest(
                    address=f"127.0.0.1:{4000 + number}", runtime="cpython-3.11", ttl_seconds=3600
                ),
                metadata=worker,
            )
        task = stub.RequestTasks(pb.RequestTasksRequest(n=1), metadata=foreman).tasks[0]
        by_id = dict(zip((i.client_id for i in identities[1:]), workers, strict=True))
        for number, assigned in enumerate(task.workers):  # the first one to another result
            sha = ("b" if number == 0 else "a") * 64
            stub.CommitResult(
                pb.CommitResultRequest(task_id=task.task_id, ciphertext_sha256=sha),
                metadata=by_id[assigned.client_id],
            )
        stub.SettleTask(
            pb.SettleTaskRequest(
                task_id=task.task_id, valid=True, missing=[task.workers[0].client_id]
            ),
            metadata=foreman,
        )
        before = [stub.GetClient(pb.GetClientRequest(), metadata=md) for md in [foreman, *workers]]
        assert server.stop(sig) == 0
    with start_server(args) as server, grpc.insecure_channel(server.address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        after = [stub.GetClient(pb.GetClientRequest(), metadata=md) for md in [foreman, *workers]]
        assert after == before
        assert after[0].credits == 7 - 3 + 1  # paid 3, one refunded for the missing worker
        assert sorted(i.credits for i in after[1:]) == [7, 8, 8]
        assert server.stop(signal.SIGTERM) == 0


def test_a_bad_store_url_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ec262", "discovery", "--port", "0", "--store", "postgres://x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "unknown store URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_discovery_on_the_same_ledger_file_refuses_clearly(tmp_path):
    store = f"sqlite:///{tmp_path}/ledger.sqlite3"
    with start_server(["discovery", "--port", "0", "--store", store]) as server:
        result = subprocess.run(
            [sys.executable, "-m", "ec262", "discovery", "--port", "0", "--store", store],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "in use by another discovery process" in result.stderr
        assert "Traceback" not in result.stderr
        assert server.stop() == 0
