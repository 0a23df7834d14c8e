"""The worker's calls out: the task key from discovery, the result to the
foreman. Both retry transient failures with backoff; sending a result also
stops when its task is cancelled."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import grpc

from ec262 import tls
from ec262.batching import Abandoned, Batcher, Pending
from ec262.defaults import BATCH_BYTES, MAX_MESSAGE_BYTES
from ec262.discovery_client import DiscoveryClient
from ec262.errors import (
    CommitConflict,
    Ec262Error,
    LateTask,
    ResultNotDelivered,
    ServiceUnavailable,
    UnknownTask,
)
from ec262.grpc_errors import ItemFailed, error_from_item
from ec262.retry import backoff_delays, call_with_retry, is_transient
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
    """The discovery service's confirmation of tasks (their keys), batched:
    the tasks of one AssignTasks, and those of AssignTasks arriving while a
    FetchKeys is under way, share one call."""

    def __init__(self, discovery: DiscoveryClient, stop: threading.Event) -> None:
        self._discovery = discovery
        self._stop = stop
        self._keys = Batcher(discovery.fetch_keys, name="keys")

    def __call__(self, task_ids: Sequence[str]) -> list[tuple[bytes, str] | Exception]:
        """Per task, in order: (key, owning foreman), or UnknownTask and the
        like, or ServiceUnavailable when the discovery service does not
        answer in KEY_DEADLINE seconds."""
        deadline = time.monotonic() + KEY_DEADLINE
        answers: dict[int, tuple[bytes, str] | Exception] = {}
        asking = list(enumerate(task_ids))
        for delay in backoff_delays():
            answered = self._keys.call_many([task_id for _, task_id in asking])
            waiting = [(i, task_id, p) for (i, task_id), p in zip(asking, answered, strict=True)]
            asking = []
            for i, task_id, pending in waiting:
                try:
                    response = pending.wait()
                except Exception as error:
                    if is_transient(error) and time.monotonic() < deadline:
                        asking.append((i, task_id))
                    else:
                        answers[i] = self._unconfirmed(task_id, error)
                    continue
                answers[i] = (response.key, response.foreman_id)
            if not asking:
                break
            if self._stop.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                for i, task_id in asking:
                    answers[i] = self._unconfirmed(task_id, ServiceUnavailable("stopping"))
                break
        return [answers[i] for i in range(len(task_ids))]

    def _unconfirmed(self, task_id: str, error: Exception) -> Exception:
        if not is_transient(error):
            return error
        code = error.code().name if isinstance(error, grpc.RpcError) else "UNAVAILABLE"
        return ServiceUnavailable(
            f"the discovery service {self._discovery.address} did not confirm task"
            f" {task_id} within {KEY_DEADLINE:g} s ({code}); try again"
        )

    def close(self) -> None:
        self._keys.close()

    def still_assigned(self, task_id: str) -> bool:
        """Whether the discovery service still takes this worker's
        commitment: the task open for it, or settled while it was late and
        its window open (True when it cannot tell: unreachable)."""
        try:
            self._discovery.fetch_key(task_id)
        except LateTask:
            return True
        except UnknownTask:
            return False
        except Exception as error:
            if is_transient(error):
                return True
            raise
        return True


class _Attempts:
    """One result's SubmitResult attempts, as `call_with_retry` makes them,
    stoppable from another thread: once `cancel` runs, the attempt waiting
    for its batch is withdrawn (or, sent already, no longer waited for), no
    other starts, and `halt` ends the wait between two (the worker's stop
    sets `halt` too, which only ends the waits)."""

    def __init__(self, send: Callable[[], Pending]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._cancelled = False
        self._in_flight: Pending | None = None
        self.halt = threading.Event()

    def cancel(self) -> None:
        """The task's cancel action (quick: it runs under the task's lock)."""
        with self._lock:
            self._cancelled = True
            in_flight = self._in_flight
        self.halt.set()
        if in_flight is not None:
            in_flight.abandon()

    def __call__(self) -> object:
        with self._lock:
            if self._cancelled:
                raise Cancelled("the task was cancelled before this attempt")
            self._in_flight = pending = self._send()
        try:
            return pending.wait()
        except Abandoned:
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
        self._batchers: OrderedDict[tuple[str, str], Batcher] = OrderedDict()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
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

    def _results_to(self, address: str, certificate: str) -> Batcher:
        """The SubmitResults batcher of one foreman's result server, over its
        own channel."""
        key = (address, certificate)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                channel = tls.channel(
                    address,
                    certificate,
                    options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
                )
                batcher = Batcher(
                    functools.partial(_submit_results, foreman_pb2_grpc.ForemanStub(channel)),
                    name="results",
                    max_bytes=BATCH_BYTES,
                    size=lambda request: len(request.ciphertext),
                )
                self._batchers[key] = batcher
                self._channels[key] = channel
                while len(self._batchers) > MAX_FOREMAN_CHANNELS:
                    old_key, old = self._batchers.popitem(last=False)
                    old.close()
                    self._channels.pop(old_key).close()
            self._batchers.move_to_end(key)
            return batcher

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
        results = self._results_to(task.result_address, task.result_certificate)
        attempts = _Attempts(lambda: results.submit(request))
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
        except (grpc.RpcError, Ec262Error, ItemFailed) as error:
            if cancel.cancelled:
                raise Cancelled(f"task {task.task_id} was cancelled while it was sent") from None
            code, details = _described(error)
            if is_transient(error):
                logger.warning(
                    "gave up sending task %s's result to foreman %s (%s: %s): the task is"
                    " closed, or the foreman stayed unreachable from this worker",
                    task.task_id,
                    task.result_address,
                    code,
                    details,
                )
            else:
                logger.warning(
                    "foreman %s refused task %s's result: %s %s",
                    task.result_address,
                    task.task_id,
                    code,
                    details,
                )
            raise ResultNotDelivered(f"task {task.task_id}: {code}") from None

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
            for batcher in self._batchers.values():
                batcher.close()
            for channel in self._channels.values():
                channel.close()
            self._batchers.clear()
            self._channels.clear()


class _Submitted:
    """A SubmitResults call under way (ec262.batching.Call): its answers
    once it ends; cancelled on the wire when all its tasks are."""

    def __init__(self, future: grpc.Future) -> None:
        self._future = future

    def result(self) -> list[Exception | None]:
        return [error_from_item(status) for status in self._future.result().statuses]

    def cancel(self) -> bool:
        return self._future.cancel()


def _submit_results(
    stub: foreman_pb2_grpc.ForemanStub, requests: list[foreman_pb2.SubmitResultRequest]
) -> _Submitted:
    """One SubmitResults call: its deadline the sum of the single calls'."""
    return _Submitted(
        stub.SubmitResults.future(
            foreman_pb2.SubmitResultsRequest(results=requests),
            timeout=sum(_attempt_seconds(r.ciphertext) for r in requests),
        )
    )


def _described(error: Exception) -> tuple[str, str]:
    """(code name, details) of a failed call or item, for the log."""
    if isinstance(error, grpc.RpcError):
        return error.code().name, error.details() or ""
    if isinstance(error, ItemFailed):
        return error.code.name, error.message
    return type(error).__name__, str(error)
