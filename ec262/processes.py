"""Starting ec262 servers as child processes and waiting on what they
report (the `listening on HOST:PORT` line, log lines), never on a sleep.
Used by the embedded local cluster and by the tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
# A server's stderr kept in memory: its first lines (how it started) and
# its last ones. A worker of the embedded cluster logs a line per task, so
# a long local job would otherwise keep them all in the foreman's memory.
KEPT_HEAD_LINES = 200
KEPT_TAIL_LINES = 5_000


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT, *, count: int = 1) -> str:
        """Block until `text` has appeared in `count` lines of the server's
        stderr (of those kept: see KEPT_TAIL_LINES); AssertionError (with
        the output) on timeout or exit."""
        with self.changed:
            found = self.changed.wait_for(
                lambda: (
                    sum(text in line for line in self.lines) >= count
                    or self.process.poll() is not None
                ),
                timeout,
            )
            matches = [line for line in self.lines if text in line]
        if not found or len(matches) < count:
            raise AssertionError(f"server never logged {text!r}:\n{self.output}")
        return matches[count - 1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)

    @property
    def output(self) -> str:
        with self.changed:
            return "".join(self.lines)


ENV_PARENT = "EC262_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent_if_asked() -> None:
    """In a server started by `PendingServer`: receive SIGTERM when the
    starter goes (even by SIGKILL), so no server is orphaned.

    The child sets this itself, after exec: a `preexec_fn` would run Python
    between fork and exec in a parent full of gRPC threads, which gRPC's
    fork handlers do not survive.
    """
    expected = os.environ.pop(ENV_PARENT, None)
    if not expected:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(expected):  # the starter died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class PendingServer:
    """A server process started but not yet known to be listening."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str | None] | None = None,
        cwd: str | None = None,
        module: str = "ec262",
        launcher: Sequence[str] = (),
    ) -> None:
        """`launcher` goes before the interpreter (e.g. a command that runs
        the server as another user); `env` adds to this process's
        environment, a None value removing that variable."""
        self.args = list(args)
        # Linux ties PDEATHSIG to the thread that forks: start servers from
        # a thread that lives as long as they should (not a pool thread).
        self.process = subprocess.Popen(
            [*launcher, sys.executable, "-m", module, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                name: value
                for name, value in {**os.environ, **(env or {})}.items()
                if value is not None
            }
            | {ENV_PARENT: str(os.getpid())},
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self._announced: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name="server-output", daemon=True).start()

    def _pump(self) -> None:
        dropped = 0
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                if len(self.lines) > KEPT_HEAD_LINES + 1 + 2 * KEPT_TAIL_LINES:
                    dropped = self._drop_middle(dropped)
                self.changed.notify_all()
            if line.startswith("listening on "):
                self._announced.put(line.split()[2])  # `listening on ADDR [(tls sha256:FP)]`
        with self.changed:
            self.changed.notify_all()
        self._announced.put(None)

    def _drop_middle(self, dropped: int) -> int:
        """Forget the oldest lines after the head, leaving the last
        KEPT_TAIL_LINES and one line saying how many went (done in blocks,
        so each line costs O(1) on average); the new count dropped."""
        start = KEPT_HEAD_LINES + (1 if dropped else 0)
        end = len(self.lines) - KEPT_TAIL_LINES
        dropped += end - start
        self.lines[KEPT_HEAD_LINES:end] = [f"[... {dropped} lines of output not kept ...]\n"]
        return dropped

    def listening(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """The running server once it prints its listening line."""
        try:
            address = self._announced.get(timeout=timeout)
        except queue.Empty:
            address = None
        if address is None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
            raise RuntimeError(
                f"`ec262 {' '.join(self.args)}` did not start:\n{''.join(self.lines)}"
            )
        return ServerProcess(self.process, address, self.lines, self.changed)


def announced_fingerprint(server: ServerProcess) -> str | None:
    """The `sha256:` fingerprint a TLS server printed on its listening line."""
    for line in server.lines:
        if line.startswith("listening on ") and "(tls sha256:" in line:
            return line.split("(tls sha256:")[1].rstrip(")\n ")
    return None


def spawn_server(args: Sequence[str], *, timeout: float = START_TIMEOUT, **kwargs) -> ServerProcess:
    """Run `python -m MODULE ARGS`; return once it prints its listening line."""
    return PendingServer(args, **kwargs).listening(timeout)


@contextlib.contextmanager
def running_server(args: Sequence[str], **kwargs) -> Iterator[ServerProcess]:
    server = spawn_server(args, **kwargs)
    try:
        yield server
    finally:
        server.kill()
