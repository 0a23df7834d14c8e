"""A tour of the discovery service: one task's life, from request to payment.

Starts `ec262 discovery` on an ephemeral port with an in-memory ledger, makes
a foreman and four workers, and walks one task through RequestTasks,
FetchKey and SettleTask (with one worker reported missing), printing the
books after each step. Runs until the full MapReduce demo (the foreman)
arrives; `make demo` calls it.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc

from ec262.auth import bearer_metadata
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc


def main() -> int:
    server = subprocess.Popen(
        [sys.executable, "-m", "ec262", "discovery", "--port", "0", "--store", "sqlite://:memory:"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stderr.readline()
        if not line.startswith("listening on "):
            print(f"discovery did not start: {line}{server.stderr.read()}", file=sys.stderr)
            return 1
        address = line.split()[2]
        print(f"discovery service {address} (in-memory ledger)")
        with grpc.insecure_channel(address) as channel:
            tour(discovery_pb2_grpc.DiscoveryStub(channel))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    return 0


def tour(stub: discovery_pb2_grpc.DiscoveryStub) -> None:
    def identity():
        made = stub.CreateClient(pb.CreateClientRequest())
        return made.client_id, bearer_metadata(made.client_id, made.secret)

    foreman_id, foreman = identity()
    workers = {}
    for port in range(11236, 11240):
        worker_id, metadata = identity()
        stub.RegisterWorker(
            pb.RegisterWorkerRequest(address=f"127.0.0.1:{port}", runtime="cpython-3.11"),
            metadata=metadata,
        )
        workers[worker_id] = metadata

    def books(title: str) -> None:
        print(f"\n{title}")
        rows = [("foreman", foreman)] + [
            (f"worker {i}", md) for i, md in enumerate(workers.values())
        ]
        for label, metadata in rows:
            info = stub.GetClient(pb.GetClientRequest(), metadata=metadata)
            print(
                f"  {label:9} {info.client_id[:8]}  credits {info.credits:3}"
                f"  busy {info.busy_slots}/{info.slots}  done {info.tasks_completed}"
                f"  failed {info.tasks_failed}"
            )

    books("a foreman and four workers join, 12 credits each:")
    task = stub.RequestTasks(pb.RequestTasksRequest(n=1), metadata=foreman).tasks[0]
    chosen = [w.client_id for w in task.workers]
    books(f"task {task.task_id[:8]}… goes to 3 random workers; the foreman pays 3 into escrow:")
    keys = {
        stub.FetchKey(pb.FetchKeyRequest(task_id=task.task_id), metadata=workers[w]).key
        for w in chosen
    }
    print(f"\nthe three workers fetch the same AES key: {len(keys) == 1}")
    cheater = chosen[2]
    settled = stub.SettleTask(
        pb.SettleTaskRequest(task_id=task.task_id, valid=True, missing=[cheater]),
        metadata=foreman,
    )
    print(
        f"the foreman settles with worker {cheater[:8]} missing and gets the key: "
        f"{settled.key in keys}"
    )
    books("two agreeing workers are paid; the cheater's credit goes back to the foreman:")
    try:
        stub.SettleTask(pb.SettleTaskRequest(task_id=task.task_id, valid=True), metadata=foreman)
    except grpc.RpcError as error:
        print(f"\nsettling twice: {error.code().name}: {error.details()}")
    try:
        stub.RequestTasks(pb.RequestTasksRequest(n=5), metadata=foreman)
    except grpc.RpcError as error:
        print(f"asking for 5 tasks: {error.code().name}: {error.details()}")
    print(
        f"\nthe foreman ({foreman_id[:8]}) could do more: MapReduce jobs arrive with the "
        "foreman (`ec262.run_job`)."
    )


if __name__ == "__main__":
    sys.exit(main())
