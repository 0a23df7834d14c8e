"""The worker's side of the sandbox: a small pool of locked-down processes,
each bound to one function digest and reused for that function's tasks.

Processes come from a zygote (`zygote.py`), so they are forked from a
clean, single-threaded process (never from the worker with its gRPC
threads and identity), and start in a few milliseconds with the sandbox
code and the allow-listed modules already imported. Whatever user code does
(raise, loop, exhaust memory, crash, flood), `run` returns a result or an
error document; a sandbox that misbehaved is killed, never reused. A
task's `Cancellation` kills the sandbox running it at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ec262.encoding import encode_result
from ec262.remote_errors import error_document
from worker_service.sandbox import child as sandbox_child
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.watchdog import Watchdog
from worker_service.sandbox.zygote import Zygote, ZygoteGone

logger = logging.getLogger(__name__)

START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class SandboxResult:
    ok: bool
    plaintext: bytes  # canonical result, or a canonical error document


class Cancelled(Exception):
    """The task was cancelled: it has no result, and nothing is sent for it."""


class Cancellation:
    """One task's cancel switch, shared by the worker (which flips it), the
    pool (which kills the sandbox running the task) and the submitter
    (which stops its retries).

    Actions run under the switch's lock, and a block leaves `on_cancel`
    under it too, so an action never runs once its block has left: a pool
    that finds the task not cancelled on leaving knows its sandbox was not
    killed.
    """

    __slots__ = ("_actions", "_cancelled", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._actions: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """Flip the switch and run the actions of the blocks inside
        `on_cancel` now; True the first time, False on a repeat."""
        with self._lock:
            if self._cancelled:
                return False
            self._cancelled = True
            for action in self._actions:
                action()
            return True

    @contextlib.contextmanager
    def on_cancel(self, action: Callable[[], None]) -> Iterator[None]:
        """Within the block, a cancel runs `action` (it must be quick: a
        signal, an event); Cancelled at once if the task was cancelled
        already."""
        with self._lock:
            if self._cancelled:
                raise Cancelled("the task was cancelled")
            self._actions.append(action)
        try:
            yield
        finally:
            with self._lock:
                self._actions.remove(action)


class _Sandbox:
    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid = pid
        self.conn = conn
        self.digest: str | None = None
        self.layers: dict = {}
        self.failure: SandboxResult | None = None
        self.timed_out = False

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, number)

    def expire(self) -> None:
        """The watchdog's action: the task ran out of time."""
        self.timed_out = True
        self._signal(signal.SIGKILL)

    def abort(self) -> None:
        """A cancel's action: killed now, from another thread. The conn is
        left to the thread running the task (it reads EOF and discards the
        sandbox), so no file descriptor closes under its read."""
        self._signal(signal.SIGKILL)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self.conn.close()

    def pause(self) -> None:
        """An idle sandbox does not run: whatever user code left behind
        (a loop after a forged reply) stops until the next task."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)


def _failure(type_name: str, message: str) -> SandboxResult:
    return SandboxResult(False, encode_result(error_document(type_name, message)))


_CRASHED = _failure(
    "SandboxCrashed",
    "the sandbox process died while running the task (it may have hit the memory limit)",
)


def log_layers(layers: dict) -> None:
    """One line per layer: on, or off and why (the worker logs it at start)."""
    namespaces = layers.get("namespaces", [])
    missing = [n for n in ("user", "pid", "ipc", "mount", "network") if n not in namespaces]
    owner = "dedicated" if layers.get("dedicated_uid") else "the worker's, in a user namespace"
    off = f" (OFF: {', '.join(missing)})" if missing else ""
    landlock = f"ABI {layers['landlock']}" if layers.get("landlock") else "OFF (unavailable)"
    lines = [
        f"uid {layers.get('uid')} ({owner})",
        "namespaces " + (", ".join(namespaces) or "none") + off,
        f"file system view {layers.get('filesystem')}",
        "capabilities " + ("none" if layers.get("capabilities_dropped") else "NOT dropped"),
        f"cgroup {layers.get('cgroup')}",
        f"Landlock {landlock}",
        "seccomp " + ("allow-list" if layers.get("seccomp") else "OFF (unavailable)"),
    ]  # fmt: skip
    logger.info("sandbox layers: %s", "; ".join(lines))
    for problem in layers.get("problems", []):
        logger.warning("sandbox layer unavailable: %s", problem)


class ReportsLayers:
    """What a pool's first sandbox said of its layers, read two common ways."""

    layers: dict | None

    @property
    def seccomp_active(self) -> bool | None:
        return None if self.layers is None else bool(self.layers.get("seccomp"))

    @property
    def landlock_abi(self) -> int:
        return 0 if self.layers is None else int(self.layers.get("landlock", 0))


class SandboxPool(ReportsLayers):
    """At most `size` sandbox processes; idle ones kept per digest."""

    def __init__(self, limits: SandboxLimits, *, size: int = 2) -> None:
        self.limits = limits
        self.size = max(1, size)
        self._zygote: Zygote | None = None
        self._watchdog = Watchdog("sandbox-watchdog")
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, _Sandbox] = OrderedDict()  # LRU, oldest first
        self._live = 0
        self._capacity = threading.Semaphore(self.size)
        self.layers: dict | None = None  # what the first sandbox reported
        self._closed = False

    # -- lifecycle ------------------------------------------------------------

    def _fork(self) -> tuple[int, Connection]:
        """A sandbox from the zygote; a zygote that died (killed, OOM, a bug)
        is replaced once, so no event inside one leaves the worker unable
        to run tasks."""
        for attempt in (1, 2):
            with self._lock:
                if self._zygote is not None and not self._zygote.alive:
                    logger.warning(
                        "the sandbox zygote exited (%s); starting a new one",
                        self._zygote.process.returncode,
                    )
                    self._zygote.kill()
                    self._zygote = None
                    self._forget_idle()  # they died with it
                if self._zygote is None:
                    self._zygote = Zygote(self.limits)
                zygote = self._zygote
            try:
                return zygote.fork()
            except ZygoteGone as error:
                with self._lock:
                    self._forget_idle()
                if attempt == 2:
                    raise RuntimeError(str(error)) from None
                logger.warning("%s; starting a new one", error)
            except OSError as error:
                raise RuntimeError(str(error)) from None
        raise AssertionError("unreachable")

    def _forget_idle(self) -> None:
        """Drop the idle sandboxes (called with the lock held)."""
        for sandbox in self._idle.values():
            sandbox.kill()
        self._live -= len(self._idle)
        self._idle.clear()

    def _start(self) -> _Sandbox:
        pid, parent_end = self._fork()
        sandbox = _Sandbox(pid, parent_end)
        try:
            if not parent_end.poll(START_TIMEOUT):
                raise RuntimeError("sandbox did not start in time")
            hello = parent_end.recv_bytes(1 << 16)
        except (EOFError, OSError, RuntimeError) as error:
            sandbox.kill()
            raise RuntimeError(f"sandbox failed to start: {error}") from None
        if hello[:1] != sandbox_child.READY:
            sandbox.kill()
            raise RuntimeError("sandbox sent a malformed greeting")
        sandbox.layers = json.loads(hello[1:])
        if self.layers is None:
            self.layers = sandbox.layers
            log_layers(sandbox.layers)
        return sandbox

    @property
    def zygote_pid(self) -> int | None:
        return None if self._zygote is None else self._zygote.process.pid

    def probe(self) -> dict:
        """Start one sandbox (kept idle for the first task) so the layers in
        force are known and logged before any task arrives."""
        if self.layers is not None:
            return self.layers
        with self._capacity:
            with self._lock:
                self._live += 1
            try:
                sandbox = self._start()
            except RuntimeError:
                self._discard(None)
                raise
            sandbox.pause()
            self._give_back(sandbox)
        return self.layers or {}

    def _take(self, digest: str) -> _Sandbox | None:
        """An idle sandbox already holding `digest`, evicting the least
        recently used other idle sandbox if the pool is full."""
        with self._lock:
            for key, sandbox in self._idle.items():
                if sandbox.digest == digest:
                    del self._idle[key]
                    return sandbox
            if self._live >= self.size and self._idle:
                _, victim = self._idle.popitem(last=False)
                self._live -= 1
                victim.kill()
            self._live += 1
            return None

    def _take_blank(self) -> _Sandbox | None:
        """An idle sandbox that has no function yet (the probe's)."""
        with self._lock:
            for key, sandbox in self._idle.items():
                if sandbox.digest is None:
                    del self._idle[key]
                    self._live -= 1
                    return sandbox
        return None

    def _give_back(self, sandbox: _Sandbox) -> None:
        with self._lock:
            if self._closed:
                self._live -= 1
                sandbox.kill()
            else:
                self._idle[id(sandbox)] = sandbox

    def _discard(self, sandbox: _Sandbox | None) -> None:
        with self._lock:
            self._live -= 1
        if sandbox is not None:
            sandbox.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), OrderedDict()
            self._live -= len(idle)
        for sandbox in idle:
            sandbox.kill()
        if self._zygote is not None:
            self._zygote.close()

    # -- running ----------------------------------------------------------------

    def _exchange(self, sandbox: _Sandbox, message: bytes, timeout: float) -> SandboxResult | None:
        """Send one message and read one reply; None means the sandbox
        misbehaved and the failure result is in `sandbox.failure`.

        A watchdog kills the process at the deadline, whatever it is doing
        (looping, or writing half a reply and stalling), so the read below
        always ends: with the reply, or with EOF once the process is dead.
        """
        alarm = self._watchdog.arm(timeout, sandbox.expire)
        try:
            sandbox.conn.send_bytes(message)
            reply = sandbox.conn.recv_bytes(self.limits.output_limit_bytes + 1024)
        except (EOFError, OSError) as error:
            if sandbox.timed_out:
                sandbox.failure = _failure(
                    "TimeoutError",
                    f"the task ran longer than the worker's limit of {timeout:g} s",
                )
            elif isinstance(error, OSError) and "bad message length" in str(error):
                sandbox.failure = _failure(
                    "ResultTooLarge",
                    "the task's result is over the limit of "
                    f"{self.limits.output_limit_bytes} bytes a result may have",
                )
            else:
                sandbox.failure = _CRASHED
            return None
        finally:
            self._watchdog.cancel(alarm)
        status, body = reply[:1], reply[1:]
        if status == sandbox_child.OK:
            return SandboxResult(True, body)
        if status == sandbox_child.FAILED:
            return SandboxResult(False, body)
        sandbox.failure = _failure("SandboxError", "the sandbox sent a malformed reply")
        return None

    def _ready(self, digest: str, payload: bytes | None) -> _Sandbox | SandboxResult:
        """A running sandbox for `digest`: an idle one holding it, else a
        blank or new one for `payload` (loaded by `_load_and_run`); a failure
        result when none starts."""
        sandbox = self._take(digest)
        if sandbox is not None:
            sandbox.resume()
            return sandbox
        if payload is None:
            self._discard(None)
            raise LookupError(f"no sandbox holds function {digest}")
        try:
            sandbox = self._take_blank()
            if sandbox is None:
                return self._start()
            sandbox.resume()
            return sandbox
        except RuntimeError as error:
            self._discard(None)
            logger.error("%s", error)
            return _failure("SandboxError", "the worker could not start a sandbox")

    def _load_and_run(
        self, sandbox: _Sandbox, digest: str, payload: bytes | None, phase: int, rows: bytes
    ) -> SandboxResult | None:
        """Load `payload` unless the sandbox holds `digest` already, then
        run the task; None as `_exchange` means it."""
        timeout = self.limits.task_timeout
        if sandbox.digest != digest:
            loaded = self._exchange(sandbox, sandbox_child.LOAD + (payload or b""), timeout)
            if loaded is None or not loaded.ok:
                return loaded
            sandbox.digest = digest
        return self._exchange(sandbox, sandbox_child.RUN + bytes((phase,)) + rows, timeout)

    def run(
        self,
        digest: str,
        payload: bytes | None,
        phase: int,
        rows: bytes,
        cancel: Cancellation | None = None,
    ) -> SandboxResult:
        """Run one task in a sandbox holding `digest` (loading `payload`
        into a fresh one when none is idle).

        Cancelled when `cancel` is flipped: before the task starts (it never
        does), or while it runs (its sandbox is killed at once and discarded,
        and the pool starts another when one is next needed)."""
        cancel = cancel if cancel is not None else Cancellation()
        if cancel.cancelled:
            raise Cancelled("the task was cancelled before it started")
        with self._capacity:
            sandbox = self._ready(digest, payload)
            if isinstance(sandbox, SandboxResult):
                return sandbox
            try:
                with cancel.on_cancel(sandbox.abort):
                    result = self._load_and_run(sandbox, digest, payload, phase, rows)
            except Cancelled:  # before the block: the sandbox is untouched
                sandbox.pause()
                self._give_back(sandbox)
                raise
            if cancel.cancelled:  # in the block (killed) or just after: not reused
                self._discard(sandbox)
                raise Cancelled("the task was cancelled while it ran")
            if result is None or not result.ok:
                # A sandbox that failed may hold anything (a half-done escape,
                # a broken interpreter): it is not reused.
                self._discard(sandbox)
                return result if result is not None else sandbox.failure
            sandbox.pause()
            self._give_back(sandbox)
            return result
