"""The worker's logic, without gRPC: take a task into a slot once the
discovery service confirms it, and in the background run it in the
sandbox, encrypt, and submit.

Nothing is cached, reserved for long or computed for a task the discovery
service has not confirmed as this worker's (FetchKey succeeds and names the
same foreman as the request), and a task id runs at most once
(docs/protocol.md section 2, Worker). The foreman may cancel a task it no
longer needs (section 9): its slot is free when the cancel returns, and no
attempt to send its result starts after it. Its collaborators come in
through the constructor (a key source, a sandbox runner, a submitter) so
the state machine is testable with plain objects and the servicer only
translates protos.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ec262.envelope import seal
from ec262.errors import (
    FunctionNotCached,
    LateTask,
    NoFreeSlot,
    PermissionDenied,
    ResultNotDelivered,
    TaskConflict,
    UnknownTask,
)
from worker_service.sandbox.pool import Cancellation, Cancelled, SandboxResult
from worker_service.tasks import Task

logger = logging.getLogger(__name__)

MAX_CACHED_PAYLOADS = 64
# Tasks a worker holds queued beyond its running slots. On a network a
# task spends round trips between being granted and starting (AssignTask,
# its key) and after it ends (the commitment, the result, the settle); a
# worker with tasks queued runs the next one meanwhile. The worker
# registers running and queued together as its slots (what it takes at
# once, docs/protocol.md section 2), so the discovery service grants them.
QUEUED_PER_SLOT = 32
# Rows held by queued tasks, at most: a queue must not let a foreman fill a
# volunteer's memory (a task runs whatever its size once a slot is free).
MAX_QUEUED_ROWS_BYTES = 64 * 1024 * 1024
MAX_CACHED_PAYLOAD_BYTES = 256 * 1024 * 1024
# Task ids remembered so that none runs twice (a repeat of an evicted id
# could run only while the discovery service still confirms the task).
MAX_REMEMBERED_TASKS = 65_536


def capacity_for(slots: int) -> int:
    """The tasks a worker with `slots` running slots takes at once (its
    RegisterWorker slots): those it runs and those queued behind them."""
    return slots * (1 + QUEUED_PER_SLOT)


# The stages of a task taken; a cancel stops it in any of the first three.
QUEUED, RUNNING, SUBMITTING = "queued", "running", "submitting"
FINISHED, CANCELLED = "finished", "cancelled"
_STOPPABLE = (QUEUED, RUNNING, SUBMITTING)


class KeySource(Protocol):
    def __call__(self, task_ids: Sequence[str]) -> list[tuple[bytes, str] | Exception]:
        """Per task, in order: (its key, the foreman that owns it), or the
        exception saying why not (UnknownTask when the discovery service
        does not assign it to this worker)."""
        ...


def one_by_one(fetch_key: Callable[[str], tuple[bytes, str]]) -> KeySource:
    """A KeySource from a function that confirms one task at a time."""

    def fetch_keys(task_ids: Sequence[str]) -> list[tuple[bytes, str] | Exception]:
        answers: list[tuple[bytes, str] | Exception] = []
        for task_id in task_ids:
            try:
                answers.append(fetch_key(task_id))
            except Exception as error:
                answers.append(error)
        return answers

    return fetch_keys


class SandboxRunner(Protocol):
    def run(
        self,
        digest: str,
        payload: bytes | None,
        phase: int,
        rows: bytes,
        cancel: Cancellation | None = None,
    ) -> SandboxResult:
        """The task's result; Cancelled once `cancel` is flipped (the task
        then never starts, or its sandbox is killed)."""
        ...


class Submitter(Protocol):
    def __call__(
        self, task: Task, worker_id: str, ciphertext: str, cancel: Cancellation | None = None
    ) -> None:
        """Send the result; Cancelled once `cancel` is flipped (no attempt
        starts after it, the one in flight is cancelled)."""
        ...


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


@dataclass(eq=False, slots=True)
class _Taken:
    """What the worker keeps of a task id it took (never its rows): enough
    to tell a repeat from a conflict, check a cancel's token, and stop it."""

    task_id: str
    fingerprint: tuple
    submit_token: str
    foreman_id: str
    stage: str = QUEUED
    cancel: Cancellation = field(default_factory=Cancellation)


@dataclass
class WorkerCounters:
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_dropped: int = 0
    tasks_cancelled: int = 0  # neither failed nor dropped
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
        fetch_keys: KeySource,
        submit: Submitter,
        client_id: Callable[[], str],
    ) -> None:
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        self.slots = slots
        # What the worker registers: running and queued. It takes as many
        # again as it runs beyond that: the discovery service frees a slot
        # when a task settles, which can be before this worker's own late
        # copy of it ends, and a task offered then waits here, not refused.
        self.capacity = capacity_for(slots)
        self._sandbox = sandbox
        self._fetch_keys = fetch_keys
        self._submit = submit
        self._client_id = client_id
        self._lock = threading.Lock()
        # Being confirmed, or taken and not ended -> the bytes of its rows.
        self._running: dict[str, int] = {}
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._payload_bytes = 0
        self._taken: OrderedDict[str, _Taken] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="task")
        # Results being committed and sent: as many as the tasks it holds.
        self._delivery = ThreadPoolExecutor(
            max_workers=self.capacity + slots, thread_name_prefix="deliver"
        )
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
        error = self.assign_many([task])[0]
        if error is not None:
            raise error

    def assign_many(self, tasks: Sequence[Task]) -> list[Exception | None]:
        """`assign` for each task, in order, with one confirmation from the
        discovery service for all of them (AssignTasks): None for a task
        taken, else the exception `assign` would have raised."""
        outcomes: list[Exception | None] = [None] * len(tasks)
        asking: list[tuple[int, Task, tuple]] = []
        # A batch sends a function's payload once, with its first task.
        carried = {t.function_sha256: t.function for t in tasks if t.function is not None}
        with self._lock:
            for index, task in enumerate(tasks):
                try:
                    fingerprint = self._reserve(task, carried)
                except Exception as error:
                    outcomes[index] = error
                    continue
                if fingerprint is not None:
                    asking.append((index, task, fingerprint))
        if not asking:
            return outcomes
        try:
            keys = self._fetch_keys([task.task_id for _, task, _ in asking])
        except BaseException:
            self._release(task for _, task, _ in asking)
            raise
        for (index, task, fingerprint), answer in zip(asking, keys, strict=True):
            outcomes[index] = self._take(task, fingerprint, answer, carried)
        return outcomes

    def _reserve(self, task: Task, carried: dict[str, bytes]) -> tuple | None:
        """Hold a slot for `task` while the discovery service is asked (under
        the lock): its fingerprint, None for a repeat already taken, or
        raise why it cannot be taken."""
        fingerprint = _fingerprint(task)
        taken = self._taken.get(task.task_id)
        if taken is not None:
            if taken.fingerprint == fingerprint:
                logger.info("task %s assigned again; it runs once", task.task_id)
                return None
            raise TaskConflict(
                f"task {task.task_id} was already taken by this worker with other"
                " contents; a task id runs at most once"
            )
        if task.task_id in self._running:
            raise TaskConflict(f"task {task.task_id} is being taken by another call")
        digest = task.function_sha256
        if task.function is None and digest not in self._payloads and digest not in carried:
            raise FunctionNotCached(
                f"this worker does not hold function {task.function_sha256}; send the payload"
            )
        if len(self._running) >= self.capacity + self.slots or (
            len(self._running) >= self.slots
            and sum(self._running.values()) + len(task.rows) > MAX_QUEUED_ROWS_BYTES
        ):
            raise NoFreeSlot(
                f"all {self.slots} slot(s) of this worker are busy and its queue is full"
            )
        self._running[task.task_id] = len(task.rows)  # the slot is held while we ask
        return fingerprint

    def _release(self, tasks: Iterable[Task]) -> None:
        with self._lock:
            for task in tasks:
                self._running.pop(task.task_id, None)
            self._idle.notify_all()

    def _take(
        self, task: Task, fingerprint: tuple, answer, carried: dict[str, bytes]
    ) -> Exception | None:
        """Start a reserved task once the discovery service's `answer` (key
        and owner, or an exception) confirms it; else free its slot."""
        if not isinstance(answer, Exception):
            key, owner = answer
            if owner == task.foreman_id:
                with self._lock:
                    try:
                        payload = self._cache(task, carried)
                    except FunctionNotCached as error:  # not remembered: may come again
                        self._running.pop(task.task_id, None)
                        self._idle.notify_all()
                        return error
                    taken = self._remember(task, fingerprint)
                logger.debug(
                    "task %s (%s) accepted", task.task_id, "map" if task.phase == 1 else "reduce"
                )
                self._executor.submit(self._work, task, payload, key, taken)
                return None
            logger.warning(
                "refused task %s: the request names foreman %s, the discovery service"
                " says it belongs to %s",
                task.task_id,
                task.foreman_id,
                owner,
            )
            answer = PermissionDenied(
                f"task {task.task_id} does not belong to foreman {task.foreman_id}"
            )
        self._release([task])
        return answer

    def _remember(self, task: Task, fingerprint: tuple) -> _Taken:
        taken = _Taken(task.task_id, fingerprint, task.submit_token, task.foreman_id)
        self._taken[task.task_id] = taken
        while len(self._taken) > MAX_REMEMBERED_TASKS:
            self._taken.popitem(last=False)
        return taken

    def _cache(self, task: Task, carried: dict[str, bytes]) -> bytes:
        """The task's payload, kept for later tasks of the same function
        (least recently used out first, bounded in count and bytes).
        `carried`: the payloads other tasks of its AssignTasks brought."""
        digest = task.function_sha256
        function = task.function or carried.get(digest)
        if function is not None and digest not in self._payloads:
            self._payloads[digest] = function
            self._payload_bytes += len(function)
        payload = self._payloads.get(digest)
        if payload is None:  # evicted while the key was fetched
            raise FunctionNotCached(f"function {digest} left the cache; send the payload")
        self._payloads.move_to_end(digest)
        while len(self._payloads) > 1 and (
            len(self._payloads) > MAX_CACHED_PAYLOADS
            or self._payload_bytes > MAX_CACHED_PAYLOAD_BYTES
        ):
            _, evicted = self._payloads.popitem(last=False)
            self._payload_bytes -= len(evicted)
        return payload

    # -- cancelling a task (called by the servicer) ------------------------------

    def cancel(self, task_id: str, submit_token: str, *, only_queued: bool = False) -> bool:
        """Stop a task this worker took with `submit_token`: True when it was
        queued, running or sending its result (it never will now, and its
        slot is free on return), or was cancelled already; False when it
        had finished, or, with `only_queued`, had started (it goes on).
        UnknownTask for an id not taken here or another token, alike, so a
        stranger learns nothing of the task."""
        with self._lock:
            taken = self._taken.get(task_id)
            if taken is None or not secrets.compare_digest(
                taken.submit_token.encode(), submit_token.encode()
            ):
                raise UnknownTask(f"task {task_id} was not taken here with that submit token")
            stage = taken.stage
            if only_queued and stage not in (QUEUED, CANCELLED):
                logger.info("task %s: withdrawal asked, the task is %s already", task_id, stage)
                return False
            if stage in _STOPPABLE:
                taken.stage = CANCELLED
                self.counters.tasks_cancelled += 1
                self._running.pop(task_id, None)  # the slot: free before the reply
                self._idle.notify_all()
                taken.cancel.cancel()  # kills its sandbox, stops its retries
        if stage in _STOPPABLE:
            logger.info("task %s cancelled while %s", task_id, stage)
        else:
            logger.info("task %s: cancel asked, the task is %s already", task_id, stage)
        return stage != FINISHED

    # -- the background life of a task ---------------------------------------

    def _work(self, task: Task, payload: bytes, key: bytes, taken: _Taken) -> None:
        """Run and seal one task on a running slot, then hand its result to
        a delivery thread: the slot runs the next queued task while the
        commitment and the result make their round trips. A cancel may end
        it anywhere; then nothing is sent, nothing counted but the cancel,
        and the slot (which the cancel freed) is left alone."""
        started = time.monotonic()
        try:
            if not self._advance(taken, RUNNING):
                return
            # A sandbox is reused only for the same function *and* the same
            # foreman: whatever a task leaves in its process (module state)
            # must not reach another foreman's tasks, even with the same code.
            sandbox_key = f"{task.foreman_id}/{task.function_sha256}"
            result = self._sandbox.run(
                sandbox_key, payload, task.phase, task.rows, cancel=taken.cancel
            )
            ciphertext = seal(result.plaintext, key)
            if not self._advance(taken, SUBMITTING):
                return
            self._delivery.submit(self._deliver, task, taken, result.ok, ciphertext, started)
        except Cancelled:  # the cancel has said so
            self._finish(taken)
        except Exception:
            if self._finish(taken, dropped=1):
                logger.exception("task %s abandoned", task.task_id)

    def _deliver(
        self, task: Task, taken: _Taken, ok: bool, ciphertext: str, started: float
    ) -> None:
        """Commit and send one result (the submitter retries), then free its place."""
        try:
            self._submit(task, self._client_id(), ciphertext, cancel=taken.cancel)
            if self._finish(taken, done=int(ok), failed=int(not ok), submitted=1):
                logger.info(
                    "task %s %s in %.1f ms",
                    task.task_id,
                    "done" if ok else "failed (error result sent)",
                    (time.monotonic() - started) * 1000,
                )
        except Cancelled:  # the cancel has said so
            pass
        except ResultNotDelivered:  # the submitter has said why
            if self._finish(taken, dropped=1):
                logger.info("task %s abandoned", task.task_id)
            self._drop_closed_queue(task.foreman_id)
        except Exception:
            if self._finish(taken, dropped=1):
                logger.exception("task %s abandoned", task.task_id)
        finally:
            self._finish(taken)

    def _drop_closed_queue(self, foreman_id: str) -> None:
        """A result of this foreman's could not be delivered (its task
        closed, or the foreman gone): its tasks still queued here are
        confirmed in one FetchKeys, and those the discovery service no
        longer has are dropped before they run for nothing (a foreman
        killed with tasks queued here). A task settled while this worker
        was late is kept: dropped, its slot would stay held at the
        discovery service until the late window ends, and it be counted
        failed."""
        with self._lock:
            queued = [
                t for t in self._taken.values() if t.stage == QUEUED and t.foreman_id == foreman_id
            ]
        if not queued:
            return
        answers = self._fetch_keys([t.task_id for t in queued])
        dropped = 0
        for taken, answer in zip(queued, answers, strict=True):
            if not isinstance(answer, UnknownTask) or isinstance(answer, LateTask):
                continue  # open, or late and still paid for a result in time
            with self._lock:
                if taken.stage != QUEUED:
                    continue
                taken.stage = CANCELLED
                self.counters.tasks_dropped += 1
                self._running.pop(taken.task_id, None)
                self._idle.notify_all()
                taken.cancel.cancel()
                dropped += 1
        if dropped:
            logger.info("dropped %d queued task(s) of foreman %s: closed", dropped, foreman_id)

    def _advance(self, taken: _Taken, stage: str) -> bool:
        """Move a task on to `stage`; False if it was cancelled meanwhile."""
        with self._lock:
            if taken.stage == CANCELLED:
                return False
            taken.stage = stage
            return True

    def _finish(
        self, taken: _Taken, *, done: int = 0, failed: int = 0, dropped: int = 0, submitted: int = 0
    ) -> bool:
        """Count a task's end and free its slot, once: False if it ended
        already, or was cancelled (the cancel counted it and freed the
        slot, which may hold another task by now)."""
        with self._lock:
            if taken.stage in (FINISHED, CANCELLED):
                return False
            taken.stage = FINISHED
            self.counters.tasks_done += done
            self.counters.tasks_failed += failed
            self.counters.tasks_dropped += dropped
            self.counters.submitted += submitted
            self._running.pop(taken.task_id, None)
            self._idle.notify_all()
            return True

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
        self._delivery.shutdown(wait=False, cancel_futures=True)
