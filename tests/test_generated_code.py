"""The committed ec262/v1 must be exactly what `make protos` writes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_protos(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos/ec262/v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "ec262/v1").iterdir()}
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in (ROOT / "ec262/v1").iterdir()
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    }
    assert sorted(fresh) == sorted(committed), "generated files differ: run `make protos`"
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} drifted from protos/: run `make protos` and commit"


def test_every_protocol_name_is_in_the_protos():
    from ec262.v1 import discovery_pb2, foreman_pb2, worker_pb2

    services = {
        discovery_pb2: (
            "Discovery",
            {
                "CreateClient",
                "RegisterWorker",
                "GetClient",
                "RequestTasks",
                "FetchKey",
                "SettleTask",
                "AddReplica",
                "CommitResult",
                # extra: the batch forms (docs/protocol.md section 2)
                "FetchKeys",
                "CommitResults",
                "SettleTasks",
            },
        ),
        worker_pb2: (
            "Worker",
            {"AssignTask", "CancelTask", "GetStatus", "AssignTasks", "CancelTasks"},
        ),
        foreman_pb2: ("Foreman", {"SubmitResult", "GetJob", "SubmitResults"}),
    }
    for module, (name, methods) in services.items():
        service = module.DESCRIPTOR.services_by_name[name]
        assert service.full_name == f"ec262.v1.{name}"
        assert {m.name for m in service.methods} == methods
    fields = {
        discovery_pb2.CreateClientResponse: {"client_id", "secret", "info"},
        discovery_pb2.RegisterWorkerRequest: {
            "address",
            "ttl_seconds",
            "slots",
            "runtime",
            "tls_certificate",
        },
        discovery_pb2.RequestTasksRequest: {"n", "exclude_workers", "runtime"},
        discovery_pb2.RequestTasksResponse: {"tasks", "credits"},
        discovery_pb2.TaskAssignment: {"task_id", "workers"},
        discovery_pb2.WorkerRef: {"client_id", "address", "tls_certificate"},
        discovery_pb2.CommitResultRequest: {"task_id", "ciphertext_sha256"},
        discovery_pb2.AddReplicaRequest: {"task_id", "exclude_workers"},
        worker_pb2.CancelTaskRequest: {"task_id", "submit_token"},
        worker_pb2.CancelTaskResponse: {"cancelled"},
        discovery_pb2.FetchKeyRequest: {"task_id"},
        discovery_pb2.FetchKeyResponse: {"key", "foreman_id"},
        discovery_pb2.SettleTaskRequest: {"task_id", "valid", "missing"},
        discovery_pb2.SettleTaskResponse: {"key", "credits", "quorum_sha256"},
        discovery_pb2.ClientInfo: {
            "client_id",
            "credits",
            "address",
            "expiry_unix",
            "slots",
            "tasks_completed",
            "tasks_failed",
        },
        worker_pb2.AssignTaskRequest: {
            "task_id",
            "job_id",
            "phase",
            "function",
            "function_sha256",
            "rows",
            "result_address",
            "foreman_id",
            "submit_token",
            "result_certificate",
        },
        worker_pb2.AssignTaskResponse: {"accepted"},
        foreman_pb2.JobStatus: {"verdicts"},
        foreman_pb2.TaskVerdict: {"task_id", "agreed", "disagreed", "late", "silent"},
        foreman_pb2.SubmitResultRequest: {"task_id", "worker_id", "submit_token", "ciphertext"},
    }
    for message, names in fields.items():
        assert names <= set(message.DESCRIPTOR.fields_by_name), message.DESCRIPTOR.full_name
    assert dict(worker_pb2.Phase.items()) == {"PHASE_UNSPECIFIED": 0, "MAP": 1, "REDUCE": 2}
