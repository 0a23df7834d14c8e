"""What the escape tests share: the limits, the target an attack aims at,
the checks that it failed and changed nothing, the helpers attacks call
(pickled by value along with them, since tests/ is not installed), and the
pools they run in: one in this process, or one in a process of another uid
(`tests/sandbox_host.py`), so the corpus runs against a root worker and an
unprivileged one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from ec262.encoding import decode_result, encode_pairs
from ec262.payload import digest, pack_functions
from ec262.remote_errors import is_error_document
from tests.processes import ROOT
from worker_service.mapreduce import MAP
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.pool import ReportsLayers, SandboxPool, SandboxResult
from worker_service.sandbox.zygote import _limits_to_json

TASK_TIMEOUT = 3.0
LIMITS = SandboxLimits(task_timeout=TASK_TIMEOUT, memory_limit_mb=512, output_limit_bytes=1_000_000)
SECCOMP = "Operation not permitted"  # what the seccomp filter's EPERM says


class Target:
    """What an attack aims at, and how to tell whether it hit."""

    def __init__(self, owner: int) -> None:
        # World-writable, in a world-readable place: whatever stops an
        # attack is the sandbox, not the test's own file permissions.
        self.dir = tempfile.mkdtemp(prefix="ec262-victim-")
        os.chmod(self.dir, 0o777)
        self.marker = os.path.join(self.dir, "MARKER")
        self.secret = "ec262-identity-secret-" + secrets.token_hex(16)
        self.secret_file = os.path.join(self.dir, "identity.json")
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"client_id": "w1", "secret": self.secret}, handle)
        os.chown(self.secret_file, owner, -1)  # the worker's own identity file
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.files_before = sorted(os.listdir(self.dir))
        self.extra: dict = {}

    def rows(self) -> bytes:
        value = {
            "dir": self.dir,
            "marker": self.marker,
            "secret_file": self.secret_file,
            "port": self.port,
            **self.extra,
        }
        return encode_pairs([("target", value)])

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def nobody_connected(self) -> bool:
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return True
        connection.close()
        return False


def run_attack(pool: SandboxPool, function, target: Target, payload: bytes | None = None):
    payload = payload if payload is not None else pack_functions(function)
    return pool.run(digest(payload), payload, MAP, target.rows())


def error_of(result) -> dict:
    document = decode_result(result.plaintext)
    assert is_error_document(document), result.plaintext[:500]
    error = document["error"]
    assert isinstance(error["type"], str)
    assert error["type"]
    return error


def assert_contained(pool: SandboxPool, target: Target, result) -> dict:
    """The attack failed, visibly, and changed nothing; the pool still works."""
    assert target.secret.encode() not in result.plaintext
    assert result.ok is False, f"the attack was reported as a success: {result.plaintext[:500]!r}"
    error = error_of(result)
    assert sorted(os.listdir(target.dir)) == target.files_before
    assert not os.path.exists(target.marker)
    assert target.nobody_connected()
    assert_still_serving(pool)
    return error


def _word_count(key, value):
    for word in value.split():
        yield word.lower(), 1


def assert_still_serving(pool: SandboxPool, foreman: str = "another-foreman") -> None:
    """The pool computes a word count for another foreman (its own sandbox)."""
    payload = pack_functions(_word_count)
    rows = encode_pairs([("doc", "The cat saw the dog")])
    result = pool.run(f"{foreman}/{digest(payload)}", payload, MAP, rows)
    assert result.ok, result.plaintext
    assert decode_result(result.plaintext) == {"cat": [1], "dog": [1], "saw": [1], "the": [1, 1]}


# -- helpers the attacks call (pickled by value along with them) ---------------


def _caller_frames():
    """The frames above the attack: the sandbox's own code."""
    try:
        raise ValueError
    except ValueError as caught:
        frame = caught.__traceback__.tb_frame
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _frame_global(name):
    """`name` from the globals of the first sandbox frame that has it."""
    for frame in _caller_frames():
        if name in frame.f_globals:
            return frame.f_globals[name]
    raise LookupError(name)


def _real_builtins():
    """The interpreter's own builtins, as the sandbox's frames see them."""
    return _caller_frames()[-1].f_builtins


def _modules():
    """sys.modules, through a module global of an allowed module."""
    import collections

    return collections._sys.modules


def _no_denial_like(violation):
    """A `deny` with the same free variable as the hook's, doing nothing."""

    def deny(message):
        return violation and None

    return deny


_no_denial = _no_denial_like(None)


def _disable_audit_hook():
    """Make the audit hook allow everything: provoke a denial, find the
    hook's frame in the traceback, and give its `deny` a body that does
    nothing."""
    try:
        _real_builtins()["open"]("/nonexistent/ec262-probe")
    except PermissionError as denial:
        tb = denial.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "hook":
                tb.tb_frame.f_locals["deny"].__code__ = _no_denial.__code__
                return
            tb = tb.tb_next
    raise AssertionError("could not find the audit hook")


def unhooked_fork(key, value):
    """A fork with the audit hook out of the way: seccomp, or else the
    cgroup's process count, must refuse it."""
    _disable_audit_hook()
    os = _modules()["os"]
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    yield "forked", pid


# -- pools: this process's, or one of another uid --------------------------------

UNPRIVILEGED_UID = 65534  # nobody


class RemotePool(ReportsLayers):
    """A SandboxPool in a process of another uid, with the same methods the
    tests use."""

    def __init__(self, limits: SandboxLimits, uid: int) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "tests.sandbox_host", str(theirs.fileno())]
        command.append(_limits_to_json(limits))
        self.process = subprocess.Popen(
            as_other_user(command, uid),
            pass_fds=(theirs.fileno(),),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        self.layers: dict | None = None
        self.worker_pid = self.process.pid  # until the host says its own
        self.zygote_pid: int | None = None

    def run(self, key: str, payload: bytes | None, phase: int, rows: bytes) -> SandboxResult:
        self.conn.send(("run", key, payload, phase, rows))
        ok, plaintext = self.conn.recv()
        self._refresh()
        return SandboxResult(ok, plaintext)

    def _refresh(self) -> None:
        self.conn.send(("info",))
        info = self.conn.recv()
        assert info["uid"] != 0, "the unprivileged pool runs as root"
        self.layers, self.worker_pid, self.zygote_pid = (
            info["layers"],
            info["pid"],
            info["zygote_pid"],
        )

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(("close",))
            self.conn.recv()
        self.process.wait(timeout=30)
        self.conn.close()


def as_other_user(command: list[str], uid: int) -> list[str]:
    """`command` run as `uid` (and its own gid, no groups). Where the
    interpreter, the virtualenv or this checkout lies under a directory
    others may not enter (root's home), a mount namespace of the command's
    own lays a readable tmpfs over that directory with only those trees
    bound back in; the host sees no change."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, str(ROOT))}
    blocked: dict[str, set[str]] = {}
    for path in needed:
        outer, inner = _closed_ancestor(path)
        if outer is not None:
            blocked.setdefault(outer, set()).add(inner)
    if not blocked:
        return drop
    steps = ["set -e"]
    for number, (outer, inners) in enumerate(sorted(blocked.items())):
        inners_sorted = sorted(inners)
        for index, inner in enumerate(inners_sorted):
            steps.append(
                f'T{number}_{index}=$(mktemp -d); mount --bind "{inner}" "$T{number}_{index}"'
            )
        steps.append(f'mount -t tmpfs -o mode=0755 ec262-test "{outer}"')
        for index, inner in enumerate(inners_sorted):
            steps.append(
                f'mkdir -p "{inner}"; mount --move "$T{number}_{index}" "{inner}";'
                f' rmdir "$T{number}_{index}"'
            )
    steps.append('exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", "; ".join(steps), "sh", *drop]


def _closed_ancestor(path: str) -> tuple[str | None, str]:
    """The outermost directory above `path` that others cannot enter, and
    its child on the way to `path`."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not os.stat(directory).st_mode & 0o001:
            return directory, "/" + "/".join(parts[: depth + 1])
    return None, path


def pool_kinds() -> list[str]:
    """Root tests both a root worker and an unprivileged one (started under
    another uid); an unprivileged run tests its own kind, in process."""
    return ["root", "unprivileged"] if os.geteuid() == 0 else ["unprivileged"]


def start_pool(kind: str, limits: SandboxLimits = LIMITS):
    if kind == "unprivileged" and os.geteuid() == 0:
        return RemotePool(limits, UNPRIVILEGED_UID)
    local = SandboxPool(limits, size=2)
    local.worker_pid = os.getpid()
    return local


def pool_owner(pool) -> int:
    """The uid of the pool's worker (who owns the identity file)."""
    return UNPRIVILEGED_UID if isinstance(pool, RemotePool) else os.geteuid()


# -- what an attack must not change outside the sandbox --------------------------

_IOPRIO_GET, _IOPRIO_WHO_PROCESS = 252, 1
_libc = ctypes.CDLL(None, use_errno=True)


def _ioprio(pid: int) -> int:
    return _libc.syscall(_IOPRIO_GET, _IOPRIO_WHO_PROCESS, pid)


def _limits(pid: int) -> str:
    """Every resource limit of the process (from /proc: prlimit(2) on
    another uid's process needs CAP_SYS_RESOURCE, which root may lack)."""
    with open(f"/proc/{pid}/limits") as limits:
        return limits.read()


def _ipc_objects() -> dict[str, list[str]]:
    found = {}
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as table:
            found[kind] = [" ".join(line.split()[:2]) for line in table.readlines()[1:]]
    return found


def outside_state(pool) -> dict:
    """Priorities, affinity, scheduling, I/O priority and limits of the worker
    and the zygote; the host's System V IPC objects; the host clock."""
    state: dict = {}
    for name, pid in (("worker", pool.worker_pid), ("zygote", pool.zygote_pid)):
        assert pid, f"no {name} pid"
        state[name] = {
            "alive": os.path.exists(f"/proc/{pid}") and _not_zombie(pid),
            "nice": os.getpriority(os.PRIO_PROCESS, pid),
            "affinity": sorted(os.sched_getaffinity(pid)),
            "scheduler": os.sched_getscheduler(pid),
            "ioprio": _ioprio(pid),
            "limits": _limits(pid),
        }
    state["process_group_nice"] = os.getpriority(os.PRIO_PGRP, os.getpgid(pool.worker_pid))
    state["ipc"] = _ipc_objects()
    state["clock_offset"] = round(time.time() - time.monotonic())
    return state


def _not_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] != "Z"


def assert_nothing_outside_changed(before: dict, pool) -> None:
    after = outside_state(pool)
    offset_moved = abs(after.pop("clock_offset") - before["clock_offset"])
    assert after == {k: v for k, v in before.items() if k != "clock_offset"}
    assert offset_moved <= 1, "the host clock moved"
