"""Several discovery front-ends on one Redis (issue 5): real processes, a
real redis-server, traffic spread over both front-ends."""

from __future__ import annotations

import random
import signal
import threading
import uuid

import grpc
import pytest

import ec262
from discovery_service.stores import open_store
from ec262.auth import bearer_metadata
from ec262.processes import spawn_server
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc
from tests.conftest import rpc_error
from tests.job_harness import sequential
from tests.processes import ROOT, start_server
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STARTING = 50


class FrontEnd:
    def __init__(self, server, url: str) -> None:
        self.server = server
        self.url = url
        self.channel = grpc.insecure_channel(server.address)
        self.stub = discovery_pb2_grpc.DiscoveryStub(self.channel)


@pytest.fixture
def frontends(redis_server):
    url = redis_server.url(f"fe{uuid.uuid4().hex[:10]}:")
    args = ["discovery", "--port", "0", "--store", url, "--starting-credits", str(STARTING)]
    servers = [spawn_server(args, cwd=str(ROOT)) for _ in range(2)]
    yield [FrontEnd(s, url) for s in servers]
    for server in servers:
        server.kill()


def identity(front: FrontEnd):
    made = front.stub.CreateClient(pb.CreateClientRequest())
    return made.client_id, bearer_metadata(made.client_id, made.secret)


def register(front: FrontEnd, metadata, port: int, slots: int = 1) -> None:
    front.stub.RegisterWorker(
        pb.RegisterWorkerRequest(
            address=f"127.0.0.1:{port}", ttl_seconds=600, slots=slots, runtime="cpython-3.11"
        ),
        metadata=metadata,
    )


def balance(front: FrontEnd, metadata) -> int:
    return front.stub.GetClient(pb.GetClientRequest(), metadata=metadata).credits


def test_workers_registered_through_one_front_end_are_assigned_through_the_other(frontends):
    a, b = frontends
    workers = {}
    for port in range(3):
        client_id, metadata = identity(a)
        register(a, metadata, 7000 + port)
        workers[client_id] = metadata
    _, foreman = identity(b)
    task = b.stub.RequestTasks(pb.RequestTasksRequest(n=1), metadata=foreman).tasks[0]
    assert {w.client_id for w in task.workers} == set(workers)
    keys = {
        a.stub.FetchKey(pb.FetchKeyRequest(task_id=task.task_id), metadata=md).key
        for md in workers.values()
    }
    for front, md in zip((a, b, a), workers.values(), strict=True):  # commitments from both
        front.stub.CommitResult(
            pb.CommitResultRequest(task_id=task.task_id, ciphertext_sha256="a" * 64), metadata=md
        )
    settled = a.stub.SettleTask(
        pb.SettleTaskRequest(task_id=task.task_id, valid=True), metadata=foreman
    )
    assert keys == {settled.key}
    assert balance(b, foreman) == STARTING - 3
    assert all(balance(b, md) == STARTING + 1 for md in workers.values())
    # the same settle through the other front-end: the same answer, nothing moves
    again = b.stub.SettleTask(
        pb.SettleTaskRequest(task_id=task.task_id, valid=True), metadata=foreman
    )
    assert (again.key, again.credits) == (settled.key, settled.credits)
    error = rpc_error(
        b.stub.SettleTask, pb.SettleTaskRequest(task_id=task.task_id, valid=False), metadata=foreman
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert balance(b, foreman) == STARTING - 3


def _hammer(frontends, foremen, workers, *, rounds: int, stop_after=None):
    """Threads of each foreman run task cycles over both front-ends, settling
    every task from both at once (the same settle, so every racer that is
    answered gets the same answer); returns the tasks made, settled and left
    open (no racer answered), and the credits the workers should have earned.
    Before a valid settle the task's workers commit (a worker named missing
    to another result), each through either front-end."""
    lock = threading.Lock()
    outcome = {"settled": 0, "made": 0, "open": [], "errors": [], "earned": 0}
    live = list(frontends)

    def front():
        with lock:
            return random.choice(live)

    def cycle(foreman_md) -> None:
        rng = random.Random()
        for _ in range(rounds):
            try:
                response = front().stub.RequestTasks(
                    pb.RequestTasksRequest(n=1), metadata=foreman_md, timeout=10
                )
            except grpc.RpcError as error:
                if error.code() in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.UNAVAILABLE,
                ):
                    continue
                raise
            for task in response.tasks:
                with lock:
                    outcome["made"] += 1
                missing = [task.workers[0].client_id] if rng.random() < 0.3 else []
                request = pb.SettleTaskRequest(
                    task_id=task.task_id, valid=rng.random() < 0.7, missing=missing
                )
                if request.valid and not _commit_all(front, workers, task, missing):
                    with lock:
                        outcome["open"].append((foreman_md, request, task, missing))
                    continue
                results = []

                def settle(target, request=request, results=results):
                    try:
                        target.stub.SettleTask(request, metadata=foreman_md, timeout=10)
                        results.append("ok")
                    except grpc.RpcError as error:
                        results.append(error.code())

                racers = [threading.Thread(target=settle, args=(f,)) for f in list(live) * 2]
                for racer in racers:
                    racer.start()
                for racer in racers:
                    racer.join()
                with lock:
                    refused = [r for r in results if r not in ("ok", grpc.StatusCode.UNAVAILABLE)]
                    if refused:
                        outcome["errors"].append(f"task {task.task_id}: {refused}")
                    if "ok" in results:
                        outcome["settled"] += 1
                        outcome["earned"] += (3 - len(missing)) if request.valid else 0
                    else:
                        outcome["open"].append((foreman_md, request, task, missing))
            if stop_after is not None:
                stop_after(live, lock)

    threads = [threading.Thread(target=cycle, args=(md,)) for md in foremen for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert not any(t.is_alive() for t in threads)
    return outcome


def _commit_all(front, workers, task, missing) -> bool:
    """False when a front-end died under a commitment (the task stays open)."""
    for worker in task.workers:
        sha = ("b" if worker.client_id in missing else "a") * 64
        try:
            front().stub.CommitResult(
                pb.CommitResultRequest(task_id=task.task_id, ciphertext_sha256=sha),
                metadata=workers[worker.client_id],
                timeout=10,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return False
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # made before the kill
                raise
    return True


def _books(front: FrontEnd, identities) -> int:
    return sum(balance(front, md) for md in identities)


def test_two_foremen_hammering_both_front_ends_conserve_credits(frontends):
    a, b = frontends
    workers = dict(identity(a) for _ in range(6))
    for port, metadata in enumerate(workers.values()):
        register(random.choice(frontends), metadata, 7100 + port, slots=4)
    foremen = [identity(b)[1] for _ in range(2)]
    outcome = _hammer(frontends, foremen, workers, rounds=15)
    assert outcome["errors"] == []
    assert outcome["made"] > 20
    assert outcome["settled"] == outcome["made"]
    everyone = [*workers.values(), *foremen]
    assert _books(a, everyone) == STARTING * len(everyone)
    # paid exactly once, though four racers settled each task
    assert _books(a, workers.values()) - STARTING * len(workers) == outcome["earned"]
    assert all(balance(b, md) >= 0 for md in everyone)
    assert all(
        b.stub.GetClient(pb.GetClientRequest(), metadata=md).busy_slots == 0
        for md in workers.values()
    )


def test_a_front_end_killed_mid_run_loses_nothing(frontends):
    a, b = frontends
    workers = dict(identity(a) for _ in range(6))
    for port, metadata in enumerate(workers.values()):
        register(b, metadata, 7200 + port, slots=4)
    foremen = [identity(b)[1] for _ in range(2)]
    killed = threading.Event()

    def kill_a(live, lock) -> None:
        with lock:
            if not killed.is_set():
                killed.set()
                a.server.process.send_signal(signal.SIGKILL)
                live.remove(a)

    outcome = _hammer(frontends, foremen, workers, rounds=12, stop_after=kill_a)
    assert killed.is_set()
    assert outcome["errors"] == []
    # Settles whose every reply was lost with the killed front-end either took
    # effect in Redis or not: retried, each now answers (docs/protocol.md
    # section 9), the same either way.
    for foreman_md, request, task, missing in outcome["open"]:
        if request.valid:
            _commit_all(lambda: b, workers, task, missing)
        b.stub.SettleTask(request, metadata=foreman_md)
    # A RequestTasks whose reply died with the front-end may have made a task
    # nobody heard of: its credits sit in escrow (and its workers' slots stay
    # busy) until it expires. So the books are: balances + escrow == issued.
    everyone = [*workers.values(), *foremen]
    store = open_store(a.url)
    try:
        totals = store.totals()
    finally:
        store.close()
    assert totals.starting_credits_issued == STARTING * len(everyone)
    assert totals.client_credits == _books(b, everyone)
    assert totals.client_credits + totals.escrowed_credits == totals.starting_credits_issued
    busy = sum(
        b.stub.GetClient(pb.GetClientRequest(), metadata=md).busy_slots for md in workers.values()
    )
    assert busy == 3 * totals.open_tasks


def split_words(key, line):
    for word in line.split():
        yield word, 1


def add(word, counts):
    return sum(counts)


def test_a_whole_job_with_its_calls_spread_over_both_front_ends(frontends, tmp_path):
    a, b = frontends
    data = {i: f"the quick brown fox {i % 7} jumps over the lazy dog" for i in range(40)}
    workers = []
    try:
        for number in range(3):  # workers talk to front-end B ...
            worker = spawn_server(
                [
                    "worker",
                    "-P",
                    "0",
                    "--discovery",
                    b.server.address,
                    "--identity",
                    str(tmp_path / f"w{number}.json"),
                    "-v",
                ],
                cwd=str(ROOT),
            )
            workers.append(worker)
        for worker in workers:
            worker.wait_for("registered with discovery")
        result = ec262.Job(
            mapper=split_words,
            reducer=add,
            discovery=a.server.address,
            identity=tmp_path / "foreman.json",
            progress=False,
            chunk_bytes=256,
        ).run(data)  # ... the foreman to A
        assert result == sequential(data, split_words, add)
        assert result.stats.tasks_validated >= 2
    finally:
        for worker in workers:
            worker.kill()


def test_an_unreachable_redis_is_a_clear_unavailable_and_changes_nothing(tmp_path):
    redis = RedisServer()
    url = redis.url("down:")
    with (
        start_server(["discovery", "--port", "0", "--store", url]) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        made = stub.CreateClient(pb.CreateClientRequest())
        metadata = bearer_metadata(made.client_id, made.secret)
        redis.stop()
        for call, request in (
            (stub.GetClient, pb.GetClientRequest()),
            (stub.RequestTasks, pb.RequestTasksRequest(n=1)),
            (stub.CreateClient, pb.CreateClientRequest()),
        ):
            error = rpc_error(call, request, metadata=metadata, timeout=20)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in error.details() and "unreachable" in error.details()
        assert server.stop() == 0


def test_a_client_given_both_front_ends_carries_on_when_one_dies(frontends, tmp_path):
    """`HOST:PORT,HOST:PORT`: calls move to the next front-end of the ledger
    when the current one is unreachable (docs/protocol.md section 9)."""
    from ec262.discovery_client import DiscoveryClient

    a, b = frontends
    with DiscoveryClient(f"{a.server.address},{b.server.address}") as client:
        identity = client.load_or_create_identity(tmp_path / "identity.json")
        before = client.get_client().credits
        a.server.process.send_signal(signal.SIGKILL)
        a.server.process.wait(timeout=10)
        assert client.get_client().credits == before  # answered by b
        assert client.addresses[client._current] == b.server.address
        assert client.identity == identity
