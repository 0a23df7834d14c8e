"""Starting ec262 servers as child processes and waiting on what they
report (the `listening on HOST:PORT` line, log lines), never on a sleep.
Used by the embedded local cluster and by the tests."""

from __future__ import annotations

import contextlib
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


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, text: str, timeout: float = START_TIMEOUT, *, count: int = 1) -> str:
        """Block until `text` has appeared in `count` lines of the server's
        stderr; AssertionError (with the output) on timeout or exit."""
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


def spawn_server(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = START_TIMEOUT,
    module: str = "ec262",
) -> ServerProcess:
    """Run `python -m MODULE ARGS`; return once it prints its listening line."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    changed = threading.Condition()
    announced: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stderr:
            with changed:
                lines.append(line)
                changed.notify_all()
            if line.startswith("listening on "):
                announced.put(line.split()[-1])
        with changed:
            changed.notify_all()
        announced.put(None)

    threading.Thread(target=pump, name="server-output", daemon=True).start()
    try:
        address = announced.get(timeout=timeout)
    except queue.Empty:
        address = None
    if address is None:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        raise RuntimeError(f"`ec262 {' '.join(args)}` did not start:\n{''.join(lines)}")
    return ServerProcess(process, address, lines, changed)


@contextlib.contextmanager
def running_server(args: Sequence[str], **kwargs) -> Iterator[ServerProcess]:
    server = spawn_server(args, **kwargs)
    try:
        yield server
    finally:
        server.kill()
