"""The worker's calls out: the task key from discovery, the result to the
foreman. Both retry transient failures with backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from ec262.discovery_client import DiscoveryClient
from ec262.errors import ResultNotDelivered, ServiceUnavailable, UnknownTask
from ec262.limits import MAX_MESSAGE_BYTES
from ec262.retry import call_with_retry, is_transient
from ec262.v1 import foreman_pb2, foreman_pb2_grpc
from worker_service.tasks import Task

logger = logging.getLogger(__name__)

# How long AssignTask waits for the discovery service to confirm a task
# (the foreman's AssignTask deadline is longer).
KEY_DEADLINE = 5.0
SUBMIT_DEADLINE = 120.0
MAX_FOREMAN_CHANNELS = 16


def _attempt_seconds(ciphertext: str) -> float:
    """One SubmitResult attempt's deadline: 5 s, plus a second per MB to send."""
    return 5.0 + len(ciphertext) / 1e6


class KeyFetcher:
    def __init__(self, discovery: DiscoveryClient, stop: threading.Event) -> None:
        self._discovery = discovery
        self._stop = stop

    def __call__(self, task_id: str) -> tuple[bytes, str]:
        """(key, owning foreman); UnknownTask, or ServiceUnavailable when the
        discovery service does not answer in KEY_DEADLINE seconds."""
        try:
            response = call_with_retry(
                lambda: self._discovery.fetch_key(task_id),
                what=f"FetchKey({task_id})",
                deadline=time.monotonic() + KEY_DEADLINE,
                stop=self._stop,
            )
        except grpc.RpcError as error:
            if not is_transient(error):
                raise
            raise ServiceUnavailable(
                f"the discovery service {self._discovery.address} did not confirm task"
                f" {task_id} within {KEY_DEADLINE:g} s ({error.code().name}); try again"
            ) from None
        return response.key, response.foreman_id

    def still_assigned(self, task_id: str) -> bool:
        """Whether the discovery service still has the task open for this
        worker (True when it cannot tell: unreachable)."""
        try:
            self._discovery.fetch_key(task_id)
        except UnknownTask:
            return False
        except Exception as error:
            if is_transient(error):
                return True
            raise
        return True


class ResultSubmitter:
    """SubmitResult to each task's foreman, over one cached channel per
    foreman address (a job sends many tasks to the same foreman), retried
    while the foreman is unreachable and the task still open: once the
    discovery service no longer has it (settled, expired, its foreman gone),
    the worker gives up and its slot is free for the next task."""

    def __init__(
        self, stop: threading.Event, still_assigned: Callable[[str], bool] = lambda _: True
    ) -> None:
        self._stop = stop
        self._still_assigned = still_assigned
        self._lock = threading.Lock()
        self._channels: OrderedDict[str, grpc.Channel] = OrderedDict()

    def _stub(self, address: str) -> foreman_pb2_grpc.ForemanStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(
                    address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
                )
                self._channels[address] = channel
                while len(self._channels) > MAX_FOREMAN_CHANNELS:
                    _, old = self._channels.popitem(last=False)
                    old.close()
            self._channels.move_to_end(address)
            return foreman_pb2_grpc.ForemanStub(channel)

    def __call__(self, task: Task, worker_id: str, ciphertext: str) -> None:
        request = foreman_pb2.SubmitResultRequest(
            task_id=task.task_id,
            worker_id=worker_id,
            submit_token=task.submit_token,
            ciphertext=ciphertext,
        )
        stub = self._stub(task.result_address)
        try:
            call_with_retry(
                lambda: stub.SubmitResult(request, timeout=_attempt_seconds(ciphertext)),
                what=f"SubmitResult({task.task_id}) to {task.result_address}",
                deadline=time.monotonic() + SUBMIT_DEADLINE,
                stop=self._stop,
                retry_if=lambda error: is_transient(error) and self._still_assigned(task.task_id),
            )
        except grpc.RpcError as error:
            if is_transient(error):
                logger.warning(
                    "gave up sending task %s's result to %s (%s): the task is closed"
                    " or the foreman stayed unreachable",
                    task.task_id,
                    task.result_address,
                    error.code().name,
                )
            else:
                logger.warning(
                    "foreman %s refused task %s's result: %s %s",
                    task.result_address,
                    task.task_id,
                    error.code().name,
                    error.details(),
                )
            raise ResultNotDelivered(f"task {task.task_id}: {error.code().name}") from None

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
