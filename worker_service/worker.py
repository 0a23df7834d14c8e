"""The worker's logic, without gRPC: take a task into a slot, and in the
background fetch its key, run it in the sandbox, encrypt, and submit.

Its collaborators come in through the constructor (a key source, a
sandbox runner, a submitter) so the state machine is testable with plain
objects and the servicer only translates protos.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ec262.envelope import seal
from ec262.errors import FunctionNotCached, NoFreeSlot, UnknownTask
from worker_service.sandbox.pool import SandboxResult
from worker_service.tasks import Task

logger = logging.getLogger(__name__)

MAX_CACHED_PAYLOADS = 64


class KeySource(Protocol):
    def __call__(self, task_id: str) -> bytes: ...


class SandboxRunner(Protocol):
    def run(self, digest: str, payload: bytes | None, phase: int, rows: bytes) -> SandboxResult: ...


class Submitter(Protocol):
    def __call__(self, task: Task, worker_id: str, ciphertext: str) -> None: ...


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
        self._running: set[str] = set()
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task")
        self.counters = WorkerCounters()
        self._idle = threading.Condition(self._lock)

    # -- taking a task (called by the servicer; returns at once) -------------

    def assign(self, task: Task) -> None:
        with self._lock:
            if task.task_id in self._running:
                logger.info("task %s assigned again while running; ignoring the copy", task.task_id)
                return
            if task.function is None and task.function_sha256 not in self._payloads:
                raise FunctionNotCached(
                    f"this worker does not hold function {task.function_sha256}; send the payload"
                )
            if len(self._running) >= self.slots:
                raise NoFreeSlot(f"all {self.slots} slot(s) of this worker are busy")
            if task.function is not None:
                self._payloads[task.function_sha256] = task.function
            self._payloads.move_to_end(task.function_sha256)
            while len(self._payloads) > MAX_CACHED_PAYLOADS:
                self._payloads.popitem(last=False)
            payload = self._payloads[task.function_sha256]
            self._running.add(task.task_id)
        logger.debug("task %s (%s) accepted", task.task_id, "map" if task.phase == 1 else "reduce")
        self._executor.submit(self._work, task, payload)

    # -- the background life of a task ---------------------------------------

    def _work(self, task: Task, payload: bytes) -> None:
        started = time.monotonic()
        try:
            try:
                key = self._fetch_key(task.task_id)
            except UnknownTask:
                logger.warning(
                    "dropping task %s: the discovery service says it is not assigned to this"
                    " worker (unknown, settled or expired)",
                    task.task_id,
                )
                self._count(dropped=1)
                return
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
