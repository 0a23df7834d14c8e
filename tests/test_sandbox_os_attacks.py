"""Attacks of the operating-system kind (docs/protocol.md section 5): user
code that reaches the kernel directly, to change the worker, the zygote,
other sandboxes or the host. Each measured on the old main is here (renice
and pinning of the worker's process group, prlimit on the zygote, an
interval timer whose handler keeps an idle sandbox busy, SysV shared
memory outliving the sandbox, privileged calls answering as if permitted),
with the rest of the kernel's dangerous surface.

Most attacks first switch the audit hook off (as an attacker who reached a
frame can), so that the kernel layers alone stop them; the system call then
fails with EPERM, the task reports the tampering, and the test checks that
nothing outside changed (the worker's and zygote's nice value, affinity,
scheduler, I/O priority and limits; the host's System V IPC objects; the
host clock) and that the pool then computes a word count for another
foreman. Every test runs against a root worker's pool and an unprivileged
worker's (tests/sandbox_harness.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import time

import pytest

from ec262.payload import digest, pack_functions
from tests.sandbox_harness import (
    LIMITS,
    SECCOMP,
    Target,
    _caller_frames,
    _disable_audit_hook,
    _modules,
    assert_contained,
    assert_nothing_outside_changed,
    assert_still_serving,
    outside_state,
    pool_kinds,
    pool_owner,
    run_attack,
    start_pool,
    unhooked_fork,
)
from worker_service.mapreduce import MAP

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="system call numbers of x86-64"),
]


@pytest.fixture(scope="module", params=pool_kinds())
def pool(request):
    sandbox_pool = start_pool(request.param)
    yield sandbox_pool
    sandbox_pool.close()


@pytest.fixture
def target(pool):
    aim = Target(pool_owner(pool))
    yield aim
    aim.close()


@pytest.fixture
def outside(pool):
    """The state outside the sandbox, taken with a sandbox already started
    (so the zygote exists), and checked again after the test."""
    assert_still_serving(pool)
    before = outside_state(pool)
    yield before
    assert_nothing_outside_changed(before, pool)


def aim_at(target: Target, pool, **extra) -> None:
    ids = {"worker": pool.worker_pid, "zygote": pool.zygote_pid, "uid": pool_owner(pool)}
    target.extra.update(worker_pid=pool.worker_pid, zygote_pid=pool.zygote_pid, ids=ids, **extra)


# -- the attacks -----------------------------------------------------------------


def raw_syscall(key, value):
    """Any system call, through ctypes (loaded in every sandbox), with the
    audit hook out of the way. Arguments: ints, {"str": text} for a C
    string, {"buf": n} for n zero bytes, {"id": "worker"|"zygote"|"uid"}
    for the worker's or the zygote's pid or the worker's uid."""
    _disable_audit_hook()
    ctypes = _modules()["ctypes"]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    keep = []

    def argument(spec):
        if isinstance(spec, int):
            return ctypes.c_long(spec)
        if "str" in spec:
            keep.append(ctypes.create_string_buffer(spec["str"].encode()))
        elif "buf" in spec:
            keep.append(ctypes.create_string_buffer(spec["buf"]))
        else:
            return ctypes.c_long(value["ids"][spec["id"]])
        return ctypes.cast(keep[-1], ctypes.c_void_p)

    result = libc.syscall(ctypes.c_long(value["nr"]), *[argument(a) for a in value["args"]])
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{value['name']}: {_modules()['os'].strerror(number)}")
    yield value["name"], result


WORKER, ZYGOTE, UID = {"id": "worker"}, {"id": "zygote"}, {"id": "uid"}
IPC_PRIVATE, IPC_CREAT = 0, 0o1000
# (name, x86-64 number, arguments): what each would do if it got through
SYSCALLS = [
    ("reboot", 169, [0xFEE1DEAD, 0x12345678, 0, 0]),  # bad magic: EINVAL, if allowed
    ("settimeofday", 164, [0, 0]),  # a no-op that succeeds, if allowed
    ("clock_settime", 227, [0, 0]),
    ("syslog", 103, [10, 0, 0]),  # SYSLOG_ACTION_SIZE_BUFFER
    ("fanotify_init", 300, [4, 0]),  # FAN_CLASS_CONTENT: permission marks
    ("kill-zygote", 62, [ZYGOTE, signal.SIGKILL]),
    ("tgkill-worker", 234, [WORKER, WORKER, 0]),
    ("ptrace-attach-worker", 101, [16, WORKER, 0, 0]),
    ("process_vm_readv-worker", 310, [WORKER, {"buf": 16}, 1, {"buf": 16}, 1, 0]),
    ("pidfd_open-worker", 434, [WORKER, 0]),
    ("setpriority-worker", 141, [0, WORKER, 19]),  # PRIO_PROCESS
    ("setpriority-user", 141, [2, UID, 19]),  # PRIO_USER: every process of the uid
    ("sched_setaffinity-worker", 203, [WORKER, 8, {"buf": 8}]),
    ("sched_setscheduler-worker", 144, [WORKER, 5, {"buf": 8}]),  # SCHED_IDLE
    ("ioprio_set-process-group", 251, [2, 0, 3 << 13]),  # IOPRIO_WHO_PGRP, class idle
    ("prlimit64-zygote", 302, [ZYGOTE, 7, {"buf": 16}, 0]),  # RLIMIT_NOFILE (0, 0)
    ("setrlimit-own", 160, [7, {"buf": 16}]),
    ("perf_event_open", 298, [{"buf": 128}, 0, -1, -1, 0]),
    ("bpf", 321, [0, {"buf": 128}, 128]),  # BPF_MAP_CREATE
    ("keyctl", 250, [0, -3, 1]),  # KEYCTL_GET_KEYRING_ID of the session keyring
    ("add_key", 248, [{"str": "user"}, {"str": "ec262"}, {"str": "x"}, 1, -2]),
    ("userfaultfd", 323, [0]),
    ("io_uring_setup", 425, [1, {"buf": 120}]),
    ("mount", 165, [{"str": "none"}, {"str": "/"}, {"str": "tmpfs"}, 0, 0]),
    ("unshare", 272, [0x10000000]),  # CLONE_NEWUSER
    ("setns", 308, [0, 0]),
    ("chroot", 161, [{"str": "/"}]),
    ("mknod", 133, [{"str": "/ec262-fifo"}, 0o10600, 0]),
    ("mlock", 149, [0, 1 << 28]),
    ("shmget", 29, [IPC_PRIVATE, 200 << 20, IPC_CREAT | 0o600]),
    ("msgget", 68, [IPC_PRIVATE, IPC_CREAT | 0o600]),
    ("semget", 64, [IPC_PRIVATE, 1, IPC_CREAT | 0o600]),
    ("mq_open", 240, [{"str": "ec262"}, 0o102, 0o600, 0]),  # O_CREAT | O_RDWR
    ("memfd_create", 319, [{"str": "ec262"}, 0]),
    ("setitimer", 38, [0, {"buf": 32}, 0]),
    ("alarm", 37, [1]),
    ("timer_create", 222, [0, 0, {"buf": 8}]),
    ("timerfd_create", 283, [1, 0]),
    ("rt_sigaction-SIGALRM", 13, [14, {"buf": 32}, 0, 8]),
    ("sethostname", 170, [{"str": "pwned"}, 5]),
    ("init_module", 175, [0, 0, {"str": ""}]),
    ("swapon", 167, [{"str": "/ec262-swap"}, 0]),
    ("acct", 163, [{"str": "/ec262-acct"}]),
    ("personality", 135, [0x0040000]),  # ADDR_NO_RANDOMIZE
    ("socket", 41, [1, 1, 0]),  # AF_UNIX
    ("dup", 32, [0]),
]


@pytest.mark.parametrize(("name", "number", "args"), SYSCALLS, ids=[s[0] for s in SYSCALLS])
def test_system_call_is_refused_and_changes_nothing(pool, target, outside, name, number, args):
    if not pool.seccomp_active:
        pytest.skip("no seccomp on this machine")
    aim_at(target, pool, nr=number, args=args, name=name)
    error = assert_contained(pool, target, run_attack(pool, raw_syscall, target))
    assert error["type"] == "SandboxViolation", error
    assert "tampering detected" in error["message"], error
    assert f"{name}: {SECCOMP}" in error["message"], error


# -- without tampering: the attacks exactly as measured on the old main -------------


def renice_process_group(key, value):
    import random

    os = random._os
    os.setpriority(os.PRIO_PGRP, os.getpgid(0), 19)
    yield "reniced", 1


def renice_worker(key, value):
    import random

    random._os.setpriority(random._os.PRIO_PROCESS, value["worker_pid"], 19)
    yield "reniced", 1


def pin_worker(key, value):
    import random

    random._os.sched_setaffinity(value["worker_pid"], {0})
    yield "pinned", 1


def pin_itself(key, value):
    """Even its own affinity: a sandbox's scheduling is the worker's call."""
    import random

    random._os.sched_setaffinity(0, {0})
    yield "pinned", 1


def prlimit_zygote(key, value):
    _disable_audit_hook()
    resource = _modules()["resource"]
    resource.prlimit(value["zygote_pid"], resource.RLIMIT_NOFILE, (0, 0))
    yield "limited", 1


def alarm_handler_that_loops(key, value):
    """An interval timer whose SIGALRM handler spins: the sandbox would burn
    CPU after its task reported, for ever."""
    signal = _modules()["signal"]

    def spin(*_):
        while True:
            pass

    signal.signal(signal.SIGALRM, spin)
    signal.setitimer(signal.ITIMER_REAL, 0.5, 0.5)
    yield "armed", 1


def unhooked_alarm_handler(key, value):
    _disable_audit_hook()
    yield from alarm_handler_that_loops(key, value)


def sysv_shared_memory(key, value):
    """3 x 200 MB (by default) of System V shared memory, attached and
    touched: on the old main, 1.8 GB outlived three workers."""
    _disable_audit_hook()
    ctypes = _modules()["ctypes"]
    strerror = _modules()["os"].strerror
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    size = value.get("megabytes", 200) << 20
    for _ in range(3):
        segment = libc.shmget(0, ctypes.c_size_t(size), 0o1000 | 0o600)
        if segment < 0:
            raise OSError(ctypes.get_errno(), "shmget: " + strerror(ctypes.get_errno()))
        address = libc.shmat(segment, None, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "shmat: " + strerror(ctypes.get_errno()))
        ctypes.memset(address, 1, size)
    yield "segments", 3


def posix_shared_memory(key, value):
    _disable_audit_hook()
    os = _modules()["os"]
    fd = os.open("/dev/shm/ec262-" + str(os.getpid()), os.O_CREAT | os.O_RDWR, 0o600)
    yield "fd", fd


PLAIN = [
    pytest.param(renice_process_group, id="renice-process-group"),
    pytest.param(renice_worker, id="renice-worker"),
    pytest.param(pin_worker, id="pin-worker"),
    pytest.param(pin_itself, id="pin-itself"),
    pytest.param(alarm_handler_that_loops, id="alarm-handler"),
]
UNHOOKED = [
    pytest.param(prlimit_zygote, id="prlimit-zygote"),
    pytest.param(unhooked_alarm_handler, id="unhooked-alarm-handler"),
    pytest.param(sysv_shared_memory, id="sysv-shm-600MB"),
    pytest.param(posix_shared_memory, id="posix-shm"),
]


@pytest.mark.parametrize("attack", PLAIN)
def test_as_measured_without_tampering(pool, target, outside, attack):
    if not pool.seccomp_active:
        pytest.skip("no seccomp on this machine")
    aim_at(target, pool)
    error = assert_contained(pool, target, run_attack(pool, attack, target))
    assert error["type"] == "PermissionError", error
    assert SECCOMP in error["message"], error


@pytest.mark.parametrize("attack", UNHOOKED)
def test_as_measured_with_the_hook_off(pool, target, outside, attack):
    if not pool.seccomp_active:
        pytest.skip("no seccomp on this machine")
    aim_at(target, pool)
    error = assert_contained(pool, target, run_attack(pool, attack, target))
    assert error["type"] == "SandboxViolation", error
    assert "tampering detected" in error["message"], error
    assert SECCOMP in error["message"] or "No such file" in error["message"], error


# -- layers one at a time ---------------------------------------------------------------


@contextlib.contextmanager
def _without_seccomp(pool, namespace: str):
    """A pool like `pool` (root's or not) with seccomp off, started, skipping
    the test where the kernel gave no `namespace` namespace; closed after."""
    kind = "root" if pool_owner(pool) == 0 else "unprivileged"
    layer_pool = start_pool(kind, dataclasses.replace(LIMITS, layers_off=frozenset({"seccomp"})))
    try:
        assert_still_serving(layer_pool)
        if namespace not in layer_pool.layers["namespaces"]:
            pytest.skip(f"no {namespace} namespace here: {layer_pool.layers['problems']}")
        yield layer_pool
    finally:
        layer_pool.close()


def test_ipc_namespace_alone_keeps_shared_memory_off_the_host(pool, target):
    """With seccomp switched off, shmget succeeds, but in the sandbox's own
    IPC namespace: the host never sees a segment, and it dies with the
    sandbox."""
    with _without_seccomp(pool, "ipc") as layer_pool:
        before = outside_state(layer_pool)
        aim_at(target, layer_pool, megabytes=50)
        result = run_attack(layer_pool, sysv_shared_memory, target)
        error = assert_contained(layer_pool, target, result)
        assert "tampering detected" in error["message"], error
        assert_nothing_outside_changed(before, layer_pool)


def test_pid_namespace_alone_hides_the_worker(pool, target):
    """With seccomp switched off, kill(2) is allowed, but the worker and the
    zygote do not exist in the sandbox's pid namespace."""
    with _without_seccomp(pool, "pid") as layer_pool:
        before = outside_state(layer_pool)
        aim_at(target, layer_pool, nr=62, args=[ZYGOTE, signal.SIGKILL], name="kill")
        error = assert_contained(layer_pool, target, run_attack(layer_pool, raw_syscall, target))
        assert "kill: No such process" in error["message"], error
        assert_nothing_outside_changed(before, layer_pool)


@pytest.mark.parametrize("name", ["reboot", "settimeofday", "fanotify_init", "syslog"])
def test_no_capabilities_alone_refuses_privileged_calls(name):
    """A root worker's sandbox with its uid, namespaces and seccomp switched
    off is still root, but without a single capability: the kernel refuses
    what needs one. (With the capability layer off as well, this test's
    calls answer as on the old main: see the second half.)"""
    if os.geteuid() != 0:
        pytest.skip("only a root worker's sandbox could hold capabilities")
    nr, args = next((s[1], s[2]) for s in SYSCALLS if s[0] == name)
    target = Target(os.geteuid())
    weakened = {"uid", "namespaces", "seccomp", "cgroup"}
    for off, refused in ((weakened, True), (weakened | {"capabilities"}, False)):
        weak = start_pool("root", dataclasses.replace(LIMITS, layers_off=frozenset(off)))
        try:
            assert_still_serving(weak)
            aim_at(target, weak, nr=nr, args=args, name=name)
            result = run_attack(weak, raw_syscall, target)
            message = result.plaintext.decode()
            if refused:
                assert f"{name}: {SECCOMP}" in message, message
            else:
                assert f"{name}: {SECCOMP}" not in message, message
        finally:
            weak.close()
    target.close()


# -- an idle sandbox does not run --------------------------------------------------------


def forged_reply_then_spin(key, value):
    """Write a complete reply on the result pipe itself, then spin: the
    worker takes the sandbox for idle while user code still runs."""
    for frame in _caller_frames():
        conn = frame.f_locals.get("conn")
        if conn is not None and hasattr(conn, "send_bytes"):
            conn.send_bytes(b"0[]")
            break
    while True:
        pass


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def _settles_to(pid: int, state: str, timeout: float = 10.0) -> str:
    """The process's state once it is `state` (a signal takes effect when
    the process is next scheduled), or the last seen at the deadline."""
    deadline = time.monotonic() + timeout
    seen = _state(pid)
    while seen != state and time.monotonic() < deadline:
        time.sleep(0.001)
        seen = _state(pid)
    return seen


def test_an_idle_sandbox_is_stopped_even_after_a_forged_reply():
    """The pool stops every sandbox it holds idle (SIGSTOP) and wakes it
    for its next task: user code that forged its own reply and kept running
    is frozen, and then killed at the next task's deadline."""
    from worker_service.sandbox.pool import SandboxPool

    own = SandboxPool(LIMITS, size=1)
    target = Target(os.geteuid())
    try:
        payload = pack_functions(forged_reply_then_spin)
        first = own.run(digest(payload), payload, MAP, target.rows())
        assert first.ok  # the forgery was taken for the reply...
        (idle,) = own._idle.values()
        assert _settles_to(idle.pid, "T") == "T", "an idle sandbox is running"  # ...but stopped
        second = own.run(digest(payload), None, MAP, target.rows())
        assert not second.ok  # woken, it spins through the next task's deadline
        assert b"TimeoutError" in second.plaintext
    finally:
        own.close()
        target.close()


def test_no_timer_or_handler_survives_in_an_idle_sandbox(pool, target, outside):
    """The measured attack: an interval timer whose handler loops. The
    kernel refuses both; had either got through, the check after the task
    would have reported it and discarded the sandbox."""
    if not pool.seccomp_active:
        pytest.skip("no seccomp on this machine")
    payload = pack_functions(alarm_handler_that_loops)
    first = pool.run("f/" + digest(payload), payload, MAP, target.rows())
    assert not first.ok and b"PermissionError" in first.plaintext
    # a second task of the same function and foreman gets a fresh sandbox
    # (a failed one is never reused) and fails the same way
    second = pool.run("f/" + digest(payload), payload, MAP, target.rows())
    assert second.plaintext == first.plaintext


# -- the control group -------------------------------------------------------------------


def test_a_cgroup_bounds_each_sandbox_and_goes_with_it():
    """Where the worker can make control groups (root here): each sandbox is
    born in a group of its own with the memory limit and a process count of
    two (it and its keeper), so with seccomp switched off a fork still fails;
    the groups go when the pool closes."""
    from worker_service.sandbox.cgroups import SANDBOX_PIDS
    from worker_service.sandbox.pool import SandboxPool

    own = SandboxPool(dataclasses.replace(LIMITS, layers_off=frozenset({"seccomp"})), size=1)
    target = Target(os.geteuid())
    try:
        assert_still_serving(own)
        if not own.layers["cgroup"].startswith(("v1", "v2")):
            pytest.skip(f"no cgroup for sandboxes here: {own.layers['cgroup']}")
        (idle,) = own._idle.values()
        with open(f"/proc/{idle.pid}/cgroup") as lines:
            groups = [line.strip().split(":", 2) for line in lines]
        mine = {name: path for _, name, path in groups if "ec262-sandboxes-" in path}
        assert mine, groups
        limits = {}
        for names, path in mine.items():
            root = "/sys/fs/cgroup/" + ("unified" if names == "" else names.split(",")[0])
            for name in ("memory.limit_in_bytes", "memory.max", "pids.max"):
                if os.path.exists(root + path + "/" + name):
                    with open(root + path + "/" + name) as value:
                        limits[name] = int(value.read())
        assert limits.get("pids.max") == SANDBOX_PIDS, limits
        memory = limits.get("memory.limit_in_bytes", limits.get("memory.max"))
        assert memory == LIMITS.memory_limit_mb << 20, limits
        result = run_attack(own, unhooked_fork, target)
        assert not result.ok
        assert b"Resource temporarily unavailable" in result.plaintext, result.plaintext
    finally:
        own.close()
        target.close()
    for names, path in mine.items():
        root = "/sys/fs/cgroup/" + ("unified" if names == "" else names.split(",")[0])
        assert not os.path.exists(root + path), f"{root + path} outlived the pool"
