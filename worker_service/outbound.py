"""The worker's calls out: the task key from discovery, the result to the
foreman. Both retry transient failures with backoff; sending a result also
stops when its task is cancelled."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import grpc

from ec262 import tls
from ec262.defaults import MAX_MESSAGE_BYTES
from ec262.discovery_client import DiscoveryClient
from ec262.errors import CommitConflict, ResultNotDelivered, ServiceUnavailable, UnknownTask
from ec262.retry import call_with_retry, is_transient
from ec262.v1 import foreman_pb2, foreman_pb2_grpc
from worker_service.sandbox.pool import Cancellation, Cancelled
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


class _Attempts:
    """One result's SubmitResult attempts, as `call_with_retry` makes them,
    stoppable from another thread: once `cancel` runs, the attempt in
    flight is cancelled, no other starts, and `halt` ends the wait between
    two (the worker's stop sets `halt` too, which only ends the waits)."""

    def __init__(self, send: Callable[[], grpc.Future]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._cancelled = False
        self._in_flight: grpc.Future | None = None
        self.halt = threading.Event()

    def cancel(self) -> None:
        """The task's cancel action (quick: it runs under the task's lock)."""
        with self._lock:
            self._cancelled = True
            in_flight = self._in_flight
        self.halt.set()
        if in_flight is not None:
            in_flight.cancel()

    def __call__(self) -> object:
        with self._lock:
            if self._cancelled:
                raise Cancelled("the task was cancelled before this attempt")
            self._in_flight = future = self._send()
        try:
            return future.result()
        except grpc.FutureCancelledError:
            raise Cancelled("the task was cancelled during this attempt") from None
        finally:
            with self._lock:
                self._in_flight = None


class ResultSubmitter:
    """SubmitResult to each task's foreman, over one cached channel per
    foreman address (a job sends many tasks to the same foreman), retried
    while the foreman is unreachable and the task still open: once the
    discovery service no longer has it (settled, expired, its foreman gone),
    the worker gives up and its slot is free for the next task. A task's
    cancel ends its sending at once."""

    def __init__(
        self,
        stop: threading.Event,
        still_assigned: Callable[[str], bool] = lambda _: True,
        commit: Callable[[str, str], None] | None = None,
    ) -> None:
        """`commit(task_id, ciphertext)`: the commitment to the discovery
        service that comes before each result (docs/protocol.md section 10)."""
        self._stop = stop
        self._still_assigned = still_assigned
        self._commit = commit
        self._lock = threading.Lock()
        # (address, certificate): a foreman's result server at an address
        # is trusted only with the certificate its AssignTask named.
        self._channels: OrderedDict[tuple[str, str], grpc.Channel] = OrderedDict()
        self._halts: set[threading.Event] = set()
        self._stopped = False
        threading.Thread(target=self._relay_stop, name="submit-stop", daemon=True).start()

    def _relay_stop(self) -> None:
        """Each result waits between attempts on its own event, which its
        cancel sets; this sets them all when the worker stops, as waiting
        on `stop` itself did."""
        self._stop.wait()
        with self._lock:
            self._stopped = True
            for halt in self._halts:
                halt.set()

    @contextlib.contextmanager
    def _halted_on_stop(self, halt: threading.Event) -> Iterator[None]:
        with self._lock:
            if self._stopped:
                halt.set()
            self._halts.add(halt)
        try:
            yield
        finally:
            with self._lock:
                self._halts.discard(halt)

    def _stub(self, address: str, certificate: str) -> foreman_pb2_grpc.ForemanStub:
        key = (address, certificate)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                channel = tls.channel(
                    address,
                    certificate,
                    options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                )
                self._channels[key] = channel
                while len(self._channels) > MAX_FOREMAN_CHANNELS:
                    _, old = self._channels.popitem(last=False)
                    old.close()
            self._channels.move_to_end(key)
            return foreman_pb2_grpc.ForemanStub(channel)

    def __call__(
        self, task: Task, worker_id: str, ciphertext: str, cancel: Cancellation | None = None
    ) -> None:
        """Send the result; ResultNotDelivered when the worker gave up,
        Cancelled when `cancel` was flipped first."""
        request = foreman_pb2.SubmitResultRequest(
            task_id=task.task_id,
            worker_id=worker_id,
            submit_token=task.submit_token,
            ciphertext=ciphertext,
        )
        if self._commit is not None:
            self._committed(task, ciphertext)
        stub = self._stub(task.result_address, task.result_certificate)
        attempts = _Attempts(
            lambda: stub.SubmitResult.future(request, timeout=_attempt_seconds(ciphertext))
        )
        cancel = cancel if cancel is not None else Cancellation()
        try:
            with self._halted_on_stop(attempts.halt), cancel.on_cancel(attempts.cancel):
                call_with_retry(
                    attempts,
                    what=f"SubmitResult({task.task_id}) to {task.result_address}",
                    deadline=time.monotonic() + SUBMIT_DEADLINE,
                    stop=attempts.halt,
                    retry_if=lambda error: (
                        is_transient(error) and self._still_assigned(task.task_id)
                    ),
                )
        except grpc.RpcError as error:
            if cancel.cancelled:
                raise Cancelled(f"task {task.task_id} was cancelled while it was sent") from None
            if is_transient(error):
                logger.warning(
                    "gave up sending task %s's result to foreman %s (%s: %s): the task is"
                    " closed, or the foreman stayed unreachable from this worker",
                    task.task_id,
                    task.result_address,
                    error.code().name,
                    error.details(),
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

    def _committed(self, task: Task, ciphertext: str) -> None:
        """Commit (retried while the discovery service is unreachable and
        the task open), or ResultNotDelivered: a result whose commitment the
        discovery service refuses is never sent."""
        try:
            call_with_retry(
                lambda: self._commit(task.task_id, ciphertext),
                what=f"CommitResult({task.task_id})",
                deadline=time.monotonic() + SUBMIT_DEADLINE,
                stop=self._stop,
                retry_if=lambda error: is_transient(error) and self._still_assigned(task.task_id),
            )
        except (UnknownTask, CommitConflict) as error:
            logger.warning("not sending task %s's result: %s", task.task_id, error)
            raise ResultNotDelivered(f"task {task.task_id}: {error}") from None
        except Exception as error:
            if not is_transient(error):
                raise
            raise ResultNotDelivered(
                f"task {task.task_id}: the discovery service stayed unreachable for the commitment"
            ) from None

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
