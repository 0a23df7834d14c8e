"""A small single-threaded process that forks sandboxes on request.

The worker runs gRPC threads and holds its identity; forking it directly
would copy both into the sandbox (and fork with threads is unsafe). Instead
the worker starts this zygote once, with only the sandbox code and the
allow-listed modules imported, and asks it for each new sandbox: the worker
sends one end of a fresh socketpair (SCM_RIGHTS), the zygote forks, and the
child locks itself down around that end. Sandboxes die with the zygote
(PR_SET_PDEATHSIG), and the zygote dies with the worker (EOF on its socket).

Run as `python -m worker_service.sandbox.zygote FD LIMITS_JSON`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from worker_service.sandbox.policy import SandboxLimits

_PID = struct.Struct("!q")


def sandbox_environment() -> dict[str, str]:
    """The zygote's (and so every sandbox's) whole environment: nothing of
    the worker's (no tokens, no paths to its identity), and a fixed hash
    seed so that every replica iterates a set of strings in the same order
    and computes the same bytes."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "PATH": "/usr/bin:/bin",
    }


def _limits_to_json(limits: SandboxLimits) -> str:
    data = dataclasses.asdict(limits)
    data["allowed_modules"] = sorted(limits.allowed_modules)
    return json.dumps(data)


def _limits_from_json(text: str) -> SandboxLimits:
    data = json.loads(text)
    data["allowed_modules"] = frozenset(data["allowed_modules"])
    data["read_dirs"] = tuple(data["read_dirs"])
    return SandboxLimits(**data)


class Zygote:
    """The worker's handle on its zygote process."""

    def __init__(self, limits: SandboxLimits) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket = ours
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker_service.sandbox.zygote",
                str(theirs.fileno()),
                _limits_to_json(limits),
            ],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            env=sandbox_environment(),
            cwd="/",
        )
        theirs.close()

    def fork(self) -> tuple[int, Connection]:
        """A new sandbox process: its pid and the worker's end of its pipe."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                socket.send_fds(self._socket, [b"F"], [theirs.fileno()])
                reply = self._recv_exactly(_PID.size)
        finally:
            theirs.close()
        (pid,) = _PID.unpack(reply)
        if pid <= 0:
            ours.close()
            raise OSError("the zygote could not fork a sandbox")
        return pid, Connection(ours.detach())

    def _recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._socket.recv(size - len(data))
            if not chunk:
                raise OSError("the sandbox zygote has died")
            data += chunk
        return data

    def close(self) -> None:
        self._socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def _serve(control: socket.socket, limits: SandboxLimits) -> None:
    from worker_service.sandbox import child as sandbox_child

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished sandboxes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop
    while True:
        try:
            _message, fds, _flags, _addr = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:
            return  # EOF: the worker is gone
        (fd,) = fds
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sandbox_child.main(Connection(fd), limits)
            finally:
                os._exit(0)
        os.close(fd)
        control.sendall(_PID.pack(pid))


def main() -> None:
    fd, limits_json = int(sys.argv[1]), sys.argv[2]
    limits = _limits_from_json(limits_json)
    # Import what every sandbox needs once, here, so forks start warm.
    for name in sorted(limits.allowed_modules):
        with contextlib.suppress(ImportError):
            __import__(name)
    with contextlib.suppress(ImportError, OSError):
        import pyseccomp  # noqa: F401
    from worker_service.sandbox import child  # noqa: F401  (and the encoders it imports)

    # What is loaded now lives as long as every sandbox: out of the
    # collector's sight, and never copied by a collection touching it.
    gc.freeze()
    _serve(socket.socket(fileno=fd), limits)


if __name__ == "__main__":
    main()
