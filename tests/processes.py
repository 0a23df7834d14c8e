"""Starting ec262 servers as real processes and waiting for them properly:
on the `listening on HOST:PORT` line, never on a sleep."""

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
        stderr (an event the server reports), failing the test on timeout."""
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

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` and wait for the exit code (fails the test on a hang)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=STOP_TIMEOUT)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def start_server(
    args: Sequence[str], *, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Run `python -m ec262 ARGS` and yield once it prints its listening line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ec262", *args],
        cwd=ROOT,
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

    threading.Thread(target=pump, daemon=True).start()
    try:
        try:
            address = announced.get(timeout=START_TIMEOUT)
        except queue.Empty:
            address = None
        if address is None:
            raise AssertionError(f"server did not start: {''.join(lines)}")
        yield ServerProcess(process, address, lines, changed)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
