"""A small single-threaded process that forks sandboxes on request.

The worker runs gRPC threads and holds its identity; forking it directly
would copy both into the sandbox (and fork with threads is unsafe). Instead
the worker starts this zygote once, with only the sandbox code and the
allow-listed modules imported, and asks it for each new sandbox: the worker
sends one end of a fresh socketpair (SCM_RIGHTS); the zygote makes the
sandbox's control group and forks a keeper, which joins the group, enters
new namespaces, takes the sandbox's uid and forks the sandbox (pid 1 of its
own pid namespace) around that end, reports its pid and waits for it. The
zygote reaps keepers and removes their groups. Sandboxes die with their
keeper, keepers with the zygote (PR_SET_PDEATHSIG), and the zygote with the
worker (EOF on its socket, when it kills what is left and removes the
groups).

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

from worker_service.sandbox import isolation as isolation_layer
from worker_service.sandbox import lockdown
from worker_service.sandbox.cgroups import CgroupManager
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
        "TZ": "UTC",  # the same local time on every replica
    }


def _limits_to_json(limits: SandboxLimits) -> str:
    data = dataclasses.asdict(limits)
    data["allowed_modules"] = sorted(limits.allowed_modules)
    data["layers_off"] = sorted(limits.layers_off)
    return json.dumps(data)


def _limits_from_json(text: str) -> SandboxLimits:
    data = json.loads(text)
    data["allowed_modules"] = frozenset(data["allowed_modules"])
    data["read_dirs"] = tuple(data["read_dirs"])
    data["layers_off"] = frozenset(data["layers_off"])
    return SandboxLimits(**data)


class ZygoteGone(OSError):
    """The zygote died or stopped answering; the pool starts another."""


# How long the zygote may take to fork a keeper and hear back from it.
FORK_TIMEOUT = 30.0


class Zygote:
    """The worker's handle on its zygote process."""

    def __init__(self, limits: SandboxLimits) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(FORK_TIMEOUT)  # a frozen zygote must not hang the pool
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
        """A new sandbox process: its pid and the worker's end of its pipe.
        ZygoteGone if the zygote is dead or does not answer (it is killed)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                socket.send_fds(self._socket, [b"F"], [theirs.fileno()])
                reply = self._recv_exactly(_PID.size)
        except OSError as error:
            ours.close()
            self.kill()
            raise ZygoteGone(f"the sandbox zygote is gone ({error})") from None
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

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """Its sandboxes die with it (PR_SET_PDEATHSIG down the line)."""
        self._socket.close()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def close(self) -> None:
        self._socket.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


class _Zygote:
    """The zygote's side: fork a keeper per request, report the sandbox's
    pid, reap keepers and remove their control groups."""

    def __init__(self, control: socket.socket, limits: SandboxLimits) -> None:
        self.control = control
        self.limits = limits
        self.cgroups, self.cgroup_state = (
            CgroupManager.create(limits.memory_limit_mb << 20)
            if "cgroup" not in limits.layers_off
            else (None, "switched off")
        )
        self.keepers: dict[int, tuple[int, list[str]]] = {}  # keeper -> (sandbox, groups)
        self.exited: set[int] = set()
        self.forked = 0

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, self._reap)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop
        while True:
            try:
                _message, fds, _flags, _addr = socket.recv_fds(self.control, 1, 1)
            except OSError:
                break
            if not fds:
                break  # EOF: the worker is gone
            (fd,) = fds
            self.control.sendall(_PID.pack(self._fork(fd)))
        self._stop()

    def _fork(self, fd: int) -> int:
        """A keeper and its sandbox; the sandbox's pid (or -1)."""
        self.forked += 1
        groups: list[str] = []
        cgroup = "off: " + self.cgroup_state
        if self.cgroups is not None:
            try:
                groups = self.cgroups.make(f"sandbox-{self.forked}")
                cgroup = self.cgroup_state
            except OSError as error:
                cgroup = f"off: {error}"
        report_r, report_w = os.pipe()
        keeper = os.fork()
        if keeper == 0:
            try:
                self.control.close()
                os.close(report_r)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _keeper(fd, report_w, self.limits, groups, cgroup)
            finally:
                os._exit(0)
        os.close(fd)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as report:
            reply = report.read(_PID.size)
        sandbox = _PID.unpack(reply)[0] if len(reply) == _PID.size else -1
        self.keepers[keeper] = (sandbox, groups)
        self._cleanup()
        return sandbox

    def _reap(self, *_signal) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.exited.add(pid)
        self._cleanup()

    def _cleanup(self) -> None:
        for keeper in list(self.exited):
            entry = self.keepers.pop(keeper, None)
            if entry is not None:
                self.exited.discard(keeper)
                CgroupManager.remove(entry[1])

    def _stop(self) -> None:
        """Sandboxes end with the zygote, and so do their groups."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sandbox, _groups in list(self.keepers.values()):
            if sandbox > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sandbox, signal.SIGKILL)
        for keeper, (_sandbox, groups) in list(self.keepers.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(keeper, 0)
            CgroupManager.remove(groups)
        if self.cgroups is not None:
            self.cgroups.close()


def _keeper(fd: int, report: int, limits: SandboxLimits, groups: list[str], cgroup: str) -> None:
    """The sandbox's parent: join its control group, enter its namespaces and
    take its uid, fork the sandbox (pid 1 of a new pid namespace), report its
    pid, and wait for it to end (so the zygote can then remove the group)."""
    from worker_service.sandbox import child

    isolation = isolation_layer.Isolation()
    lockdown.close_other_fds(keep=(fd, report))
    try:
        CgroupManager.join(groups)
    except OSError as error:
        cgroup = f"off: {error}"
    isolation_layer.isolate_keeper(limits.read_dirs, isolation, off=limits.layers_off)
    isolation_layer.die_with_parent()  # after the change of uid, which clears it
    try:
        sandbox = os.fork()
    except OSError:
        os.write(report, _PID.pack(-1))
        return
    if sandbox == 0:
        os.close(report)
        child.main(Connection(fd), limits, isolation, cgroup)
        os._exit(0)
    os.write(report, _PID.pack(sandbox))
    os.close(report)
    os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(sandbox, 0)


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
    _Zygote(socket.socket(fileno=fd), limits).serve()


if __name__ == "__main__":
    main()
