"""The foreman's outbound layer against a real gRPC worker server that
records what it is asked: a decision's cancels and withdrawals reach each
worker in one CancelTasks, and each withdrawal's answer becomes its event;
against the real discovery service, a decision's settles share one
SettleTasks."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from ec262.discovery_client import DiscoveryClient
from ec262.errors import UnknownTask
from ec262.grpc_errors import item_status
from ec262.identity import Identity
from ec262.v1 import worker_pb2, worker_pb2_grpc
from foreman_service.core import (
    AddReplica,
    Cancel,
    Granted,
    ReplicaAdded,
    RequestTasks,
    Settle,
    Settled,
    Withdraw,
    Withdrawn,
)
from foreman_service.inbox import ResultInbox
from foreman_service.outbound import EventQueue, ForemanOutbound


class RecordingWorker(worker_pb2_grpc.WorkerServicer):
    """Answers each item: `dropped` task ids are cancelled, `unknown` ones
    NOT_FOUND, the rest not cancelled (already running)."""

    def __init__(self, dropped=(), unknown=(), answered=None) -> None:
        """`answered`: how many items a reply answers (a broken worker's
        short reply); all when None."""
        self.calls: list[tuple[str, list[tuple[str, bool]]]] = []
        self.dropped, self.unknown = set(dropped), set(unknown)
        self.answered = answered
        self.lock = threading.Lock()

    def _answer(self, item):
        if item.task_id in self.unknown:
            return worker_pb2.CancelTaskAnswer(status=item_status(UnknownTask("no such task")))
        cancelled = item.task_id in self.dropped
        return worker_pb2.CancelTaskAnswer(
            status=item_status(None), response=worker_pb2.CancelTaskResponse(cancelled=cancelled)
        )

    def CancelTasks(self, request, context):
        with self.lock:
            self.calls.append(("CancelTasks", [(t.task_id, t.only_queued) for t in request.tasks]))
        answers = [self._answer(t) for t in request.tasks][: self.answered]
        return worker_pb2.CancelTasksResponse(answers=answers)

    def CancelTask(self, request, context):
        with self.lock:
            self.calls.append(("CancelTask", [(request.task_id, request.only_queued)]))
        return worker_pb2.CancelTaskResponse(cancelled=request.task_id in self.dropped)


@pytest.fixture
def serve():
    """serve(servicer, host) -> address; every server stopped at the end."""
    servers = []

    def start(servicer: RecordingWorker, host: str) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{host}:0")
        server.start()
        servers.append(server)
        return f"{host}:{port}"

    yield start
    for server in servers:
        server.stop(None)


@pytest.fixture
def workers(serve):
    made = []
    for host in ("127.0.0.1", "127.0.0.2"):
        servicer = RecordingWorker(dropped={"t1", "t4"}, unknown={"t5"})
        made.append((servicer, serve(servicer, host)))
    return made


def withdrawals_answered(commands: list, count: int) -> list[Withdrawn]:
    """Carry out one decision's `commands`; the first `count` events."""
    events = EventQueue()
    discovery = DiscoveryClient("127.0.0.1:1")  # never called here
    outbound = ForemanOutbound(discovery, ResultInbox(), events, assign_timeout=5)
    try:
        outbound.execute_all(commands)
        answered: list = []
        while len(answered) < count:
            taken = events.take(timeout=10)
            assert taken, f"withdrawals unanswered; so far {answered}"
            answered += taken
        return sorted(answered, key=lambda event: event.task_id)
    finally:
        outbound.close()
        discovery.close()


def test_a_decisions_cancels_go_to_each_worker_in_one_call(workers):
    (first, first_address), (second, second_address) = workers
    answered = withdrawals_answered(
        [
            Withdraw("t1", "w1", first_address, "a"),
            Cancel("t2", "w1", first_address, "b"),
            Withdraw("t3", "w2", second_address, "c"),
            Withdraw("t4", "w2", second_address, "d"),
            Withdraw("t5", "w1", first_address, "e"),
        ],
        4,
    )
    assert first.calls == [("CancelTasks", [("t1", True), ("t2", False), ("t5", True)])]
    assert second.calls == [("CancelTasks", [("t3", True), ("t4", True)])]
    # t1 and t4 dropped unstarted, t3 running; t5's item failed, which may
    # mean it was dropped: the core treats it as dropped.
    assert answered == [
        Withdrawn("t1", "w1", True),
        Withdrawn("t3", "w2", False),
        Withdrawn("t4", "w2", True),
        Withdrawn("t5", "w1", True),
    ]


def test_items_a_short_reply_leaves_unanswered_count_as_dropped(serve):
    """A worker that answers fewer items than it was sent: the ones it
    answered are taken at their word, the rest count as dropped (as a failed
    call's do), and every withdrawal still gets its event."""
    broken = RecordingWorker(answered=1)
    address = serve(broken, "127.0.0.1")
    answered = withdrawals_answered(
        [Withdraw("t1", "w1", address, "a"), Withdraw("t2", "w1", address, "b")], 2
    )
    assert broken.calls == [("CancelTasks", [("t1", True), ("t2", True)])]
    assert answered == [Withdrawn("t1", "w1", False), Withdrawn("t2", "w1", True)]


@pytest.mark.parametrize("count_live", [True, False])
def test_an_add_replica_that_finds_nobody_says_how_many_are_live_when_asked(discovery, count_live):
    """The real discovery service: every worker but the task's own is
    excluded, so none is added; the answer counts the pool only when the
    command asked (docs/protocol.md section 9)."""
    foreman = discovery.client()
    workers = [discovery.worker(slots=2) for _ in range(4)]
    task = discovery.request(foreman).tasks[0]
    others = sorted({w.client_id for w in workers} - {w.client_id for w in task.workers})
    events = EventQueue()
    client = DiscoveryClient(
        discovery.address, Identity(foreman.client_id, foreman.secret, discovery.address)
    )
    outbound = ForemanOutbound(client, ResultInbox(), events, assign_timeout=5)
    try:
        outbound.execute_all(
            [AddReplica(task.task_id, "add-1", frozenset(others), frozenset(), count_live)]
        )
        answered = events.take(timeout=10)
    finally:
        outbound.close()
        client.close()
    assert answered == [ReplicaAdded(task.task_id, None, 4 if count_live else 0)]


class GatedSettles(DiscoveryClient):
    """Notes the task ids of each SettleTasks; the first call waits at a
    gate, so the test knows one place of the batcher is taken."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settle_calls: list[list[str]] = []
        self.first_out = threading.Event()
        self.gate = threading.Event()

    def settle_tasks(self, requests):
        self.settle_calls.append([r.task_id for r in requests])
        if len(self.settle_calls) == 1:
            self.first_out.set()
            assert self.gate.wait(10)
        return super().settle_tasks(requests)


def test_settles_decided_together_share_one_call(discovery):
    """One place of the settle batcher is taken (a lone settle under way):
    the three settles of the next decision go together in the other, not
    the first alone with the rest waiting for an answer, a round trip on a
    network (issue 16). Each still gets its own Settled event."""
    foreman = discovery.client()
    for _ in range(4):
        discovery.worker(slots=4)
    tasks = [t.task_id for t in discovery.request(foreman, n=4).tasks]
    assert len(tasks) == 4
    events = EventQueue()
    client = GatedSettles(
        discovery.address, Identity(foreman.client_id, foreman.secret, discovery.address)
    )
    outbound = ForemanOutbound(client, ResultInbox(), events, assign_timeout=5)
    settled: list = []
    try:
        outbound.execute_all([Settle(tasks[0], False)])
        assert client.first_out.wait(10)
        outbound.execute_all([Settle(task_id, False) for task_id in tasks[1:]])
        while len(settled) < 3:  # answered while the first call waits
            taken = events.take(timeout=10)
            assert taken, f"settles unanswered; so far {settled}"
            settled += taken
        client.gate.set()
        while len(settled) < 4:
            taken = events.take(timeout=10)
            assert taken, f"the first settle unanswered; so far {settled}"
            settled += taken
    finally:
        client.gate.set()
        outbound.close()
        client.close()
    assert client.settle_calls == [tasks[:1], tasks[1:]]
    assert all(isinstance(event, Settled) for event in settled)
    assert sorted(event.task_id for event in settled) == sorted(tasks)


def test_a_grants_worker_ids_are_one_string_per_worker(discovery):
    """The real discovery service grants 4 tasks on the same 3 workers: each
    worker's id is one string object in all of them, not a copy per task
    (a job keeps them in every task's replicas and verdicts)."""
    foreman = discovery.client()
    workers = {discovery.worker(slots=4).client_id for _ in range(3)}
    events = EventQueue()
    client = DiscoveryClient(
        discovery.address, Identity(foreman.client_id, foreman.secret, discovery.address)
    )
    outbound = ForemanOutbound(client, ResultInbox(), events, assign_timeout=5)
    try:
        outbound.execute_all([RequestTasks("req-1", 4, frozenset())])
        [granted] = events.take(timeout=10)
    finally:
        outbound.close()
        client.close()
    assert isinstance(granted, Granted) and len(granted.tasks) == 4
    ids = [worker_id for _, by_worker in granted.tasks for worker_id in by_worker]
    assert set(ids) == workers
    assert len({id(worker_id) for worker_id in ids}) == 3
