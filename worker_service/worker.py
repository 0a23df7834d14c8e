"""The worker's logic, without gRPC: take a task into a slot once the
discovery service confirms it, and in the background run it in the
sandbox, encrypt, and submit.

Nothing is cached, reserved for long or computed for a task the discovery
service has not confirmed as this worker's (FetchKey succeeds and names the
same foreman as the request), and a task id runs at most once
(docs/protocol.md section 2, Worker). Its collaborators come in through the
constructor (a key source, a sandbox runner, a submitter) so the state
machine is testable with plain objects and the servicer only translates
protos.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ec262.envelope import seal
from ec262.errors import (
    FunctionNotCached,
    NoFreeSlot,
    PermissionDenied,
    ResultNotDelivered,
    TaskConflict,
)
from worker_service.sandbox.pool import SandboxResult
from worker_service.tasks import Task

logger = logging.getLogger(__name__)

MAX_CACHED_PAYLOADS = 64
# Tasks a worker takes beyond its running slots, queued: the discovery
# service frees a slot when a task settles, which can be before this
# worker's own late copy of it ends, and a task offered in that moment
# should wait a little here rather than be refused.
QUEUED_PER_SLOT = 1
MAX_CACHED_PAYLOAD_BYTES = 256 * 1024 * 1024
# Task ids remembered so that none runs twice (a repeat of an evicted id
# could run only while the discovery service still confirms the task).
MAX_REMEMBERED_TASKS = 65_536


class KeySource(Protocol):
    def __call__(self, task_id: str) -> tuple[bytes, str]:
        """(the task's key, the foreman that owns it); UnknownTask if the
        discovery service does not assign it to this worker."""
        ...


class SandboxRunner(Protocol):
    def run(self, digest: str, payload: bytes | None, phase: int, rows: bytes) -> SandboxResult: ...


class Submitter(Protocol):
    def __call__(self, task: Task, worker_id: str, ciphertext: str) -> None: ...


def _fingerprint(task: Task) -> tuple:
    """What makes two AssignTasks for one id the same request (a CRC of the
    rows: a collision can only make a different request look like a repeat,
    which is then not run either)."""
    return (
        task.foreman_id,
        task.submit_token,
        task.function_sha256,
        task.phase,
        task.result_address,
        len(task.rows),
        zlib.crc32(task.rows),
    )


@dataclass
class WorkerCounters:
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_dropped: int = 0
    submitted: int = 0


@dataclass(frozen=True)
class WorkerSnapshot:
    client_id: str
    slots: int
    busy_slots: int
    tasks_done: int
    tasks_failed: int
    cached_functions: list[str] = field(default_factory=list)


class Worker:
    """Slots, the payload cache, and the background life of each task."""

    def __init__(
        self,
        *,
        slots: int,
        sandbox: SandboxRunner,
        fetch_key: KeySource,
        submit: Submitter,
        client_id: Callable[[], str],
    ) -> None:
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        self.slots = slots
        self._sandbox = sandbox
        self._fetch_key = fetch_key
        self._submit = submit
        self._client_id = client_id
        self._lock = threading.Lock()
        self._running: set[str] = set()  # confirmed, or being confirmed
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._payload_bytes = 0
        self._taken: OrderedDict[str, tuple] = OrderedDict()  # task id -> fingerprint
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task")
        self.counters = WorkerCounters()
        self._idle = threading.Condition(self._lock)

    # -- taking a task (called by the servicer; returns once confirmed) ---------

    def assign(self, task: Task) -> None:
        """Take `task`, or raise: FunctionNotCached (send the payload),
        NoFreeSlot, UnknownTask (the discovery service does not confirm it),
        PermissionDenied (it belongs to another foreman), TaskConflict (this
        id already ran here with other contents). A repeat of a task already
        taken, with the same contents, is accepted and not run again (the
        foreman may resend when a reply was lost)."""
        fingerprint = _fingerprint(task)
        with self._lock:
            taken = self._taken.get(task.task_id)
            if taken is not None:
                if taken == fingerprint:
                    logger.info("task %s assigned again; it runs once", task.task_id)
                    return
                raise TaskConflict(
                    f"task {task.task_id} was already taken by this worker with other"
                    " contents; a task id runs at most once"
                )
            if task.task_id in self._running:
                raise TaskConflict(f"task {task.task_id} is being taken by another call")
            if task.function is None and task.function_sha256 not in self._payloads:
                raise FunctionNotCached(
                    f"this worker does not hold function {task.function_sha256}; send the payload"
                )
            if len(self._running) >= self.slots * (1 + QUEUED_PER_SLOT):
                raise NoFreeSlot(
                    f"all {self.slots} slot(s) of this worker are busy and its queue is full"
                )
            self._running.add(task.task_id)  # the slot is held while we ask
        try:
            key, owner = self._fetch_key(task.task_id)
            if owner != task.foreman_id:
                logger.warning(
                    "refused task %s: the request names foreman %s, the discovery service"
                    " says it belongs to %s",
                    task.task_id,
                    task.foreman_id,
                    owner,
                )
                raise PermissionDenied(
                    f"task {task.task_id} does not belong to foreman {task.foreman_id}"
                )
        except BaseException:
            with self._lock:
                self._running.discard(task.task_id)
                self._idle.notify_all()
            raise
        with self._lock:
            self._remember(task.task_id, fingerprint)
            payload = self._cache(task)
        logger.debug("task %s (%s) accepted", task.task_id, "map" if task.phase == 1 else "reduce")
        self._executor.submit(self._work, task, payload, key)

    def _remember(self, task_id: str, fingerprint: tuple) -> None:
        self._taken[task_id] = fingerprint
        while len(self._taken) > MAX_REMEMBERED_TASKS:
            self._taken.popitem(last=False)

    def _cache(self, task: Task) -> bytes:
        """The task's payload, kept for later tasks of the same function
        (least recently used out first, bounded in count and bytes)."""
        digest = task.function_sha256
        if task.function is not None and digest not in self._payloads:
            self._payloads[digest] = task.function
            self._payload_bytes += len(task.function)
        payload = self._payloads.get(digest)
        if payload is None:  # evicted while the key was fetched
            if task.function is None:
                raise FunctionNotCached(f"function {digest} left the cache; send the payload")
            payload = task.function
        self._payloads.move_to_end(digest)
        while len(self._payloads) > 1 and (
            len(self._payloads) > MAX_CACHED_PAYLOADS
            or self._payload_bytes > MAX_CACHED_PAYLOAD_BYTES
        ):
            _, evicted = self._payloads.popitem(last=False)
            self._payload_bytes -= len(evicted)
        return payload

    # -- the background life of a task ---------------------------------------

    def _work(self, task: Task, payload: bytes, key: bytes) -> None:
        started = time.monotonic()
        try:
            # A sandbox is reused only for the same function *and* the same
            # foreman: whatever a task leaves in its process (module state)
            # must not reach another foreman's tasks, even with the same code.
            sandbox_key = f"{task.foreman_id}/{task.function_sha256}"
            result = self._sandbox.run(sandbox_key, payload, task.phase, task.rows)
            ciphertext = seal(result.plaintext, key)
            self._submit(task, self._client_id(), ciphertext)
            self._count(done=int(result.ok), failed=int(not result.ok), submitted=1)
            logger.info(
                "task %s %s in %.1f ms",
                task.task_id,
                "done" if result.ok else "failed (error result sent)",
                (time.monotonic() - started) * 1000,
            )
        except ResultNotDelivered:  # the submitter has said why
            logger.info("task %s abandoned", task.task_id)
            self._count(dropped=1)
        except Exception:
            logger.exception("task %s abandoned", task.task_id)
            self._count(dropped=1)
        finally:
            with self._lock:
                self._running.discard(task.task_id)
                self._idle.notify_all()

    def _count(
        self, *, done: int = 0, failed: int = 0, dropped: int = 0, submitted: int = 0
    ) -> None:
        with self._lock:
            self.counters.tasks_done += done
            self.counters.tasks_failed += failed
            self.counters.tasks_dropped += dropped
            self.counters.submitted += submitted

    # -- introspection and shutdown --------------------------------------------

    def snapshot(self) -> WorkerSnapshot:
        with self._lock:
            return WorkerSnapshot(
                client_id=self._client_id(),
                slots=self.slots,
                busy_slots=len(self._running),
                tasks_done=self.counters.tasks_done,
                tasks_failed=self.counters.tasks_failed + self.counters.tasks_dropped,
                cached_functions=sorted(self._payloads),
            )

    def wait_idle(self, timeout: float) -> bool:
        """True once no task is running (for orderly shutdown and tests)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
