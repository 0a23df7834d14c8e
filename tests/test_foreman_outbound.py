"""The foreman's outbound layer against a real gRPC worker server that
records what it is asked: a decision's cancels and withdrawals reach each
worker in one CancelTasks, and each withdrawal's answer becomes its event."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from ec262.discovery_client import DiscoveryClient
from ec262.errors import UnknownTask
from ec262.grpc_errors import item_status
from ec262.v1 import worker_pb2, worker_pb2_grpc
from foreman_service.core import Cancel, Withdraw, Withdrawn
from foreman_service.inbox import ResultInbox
from foreman_service.outbound import EventQueue, ForemanOutbound


class RecordingWorker(worker_pb2_grpc.WorkerServicer):
    """Answers each item: `dropped` task ids are cancelled, `unknown` ones
    NOT_FOUND, the rest not cancelled (already running)."""

    def __init__(self, dropped=(), unknown=()) -> None:
        self.calls: list[tuple[str, list[tuple[str, bool]]]] = []
        self.dropped, self.unknown = set(dropped), set(unknown)
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
        return worker_pb2.CancelTasksResponse(answers=[self._answer(t) for t in request.tasks])

    def CancelTask(self, request, context):
        with self.lock:
            self.calls.append(("CancelTask", [(request.task_id, request.only_queued)]))
        return worker_pb2.CancelTaskResponse(cancelled=request.task_id in self.dropped)


@pytest.fixture
def workers():
    servers, made = [], []
    for host in ("127.0.0.1", "127.0.0.2"):
        servicer = RecordingWorker(dropped={"t1", "t4"}, unknown={"t5"})
        server = grpc.server(futures.ThreadPoolExecutor(2))
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{host}:0")
        server.start()
        servers.append(server)
        made.append((servicer, f"{host}:{port}"))
    yield made
    for server in servers:
        server.stop(None)


def test_a_decisions_cancels_go_to_each_worker_in_one_call(workers):
    (first, first_address), (second, second_address) = workers
    events = EventQueue()
    discovery = DiscoveryClient("127.0.0.1:1")  # never called here
    outbound = ForemanOutbound(discovery, ResultInbox(), events, assign_timeout=5)
    try:
        outbound.execute_all(
            [
                Withdraw("t1", "w1", first_address, "a"),
                Cancel("t2", "w1", first_address, "b"),
                Withdraw("t3", "w2", second_address, "c"),
                Withdraw("t4", "w2", second_address, "d"),
                Withdraw("t5", "w1", first_address, "e"),
            ]
        )
        answered = []
        while len(answered) < 4:
            taken = events.take(timeout=10)
            assert taken, f"withdrawals unanswered; so far {answered}"
            answered += taken
    finally:
        outbound.close()
        discovery.close()
    assert first.calls == [("CancelTasks", [("t1", True), ("t2", False), ("t5", True)])]
    assert second.calls == [("CancelTasks", [("t3", True), ("t4", True)])]
    # t1 and t4 dropped unstarted, t3 running; t5's item failed, which may
    # mean it was dropped: the core treats it as dropped.
    assert sorted(answered, key=lambda e: e.task_id) == [
        Withdrawn("t1", "w1", True),
        Withdrawn("t3", "w2", False),
        Withdrawn("t4", "w2", True),
        Withdrawn("t5", "w1", True),
    ]
