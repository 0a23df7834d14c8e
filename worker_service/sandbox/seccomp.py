"""The sandbox's seccomp filter: an allow-list of the system calls CPython
needs to compute in memory and answer on its pipe; every other call fails
with EPERM.

The list was taken from strace of sandboxes running the allowed modules
(tests/test_sandbox_escapes.py runs them), then cut to what pure
computation needs. What it leaves out is the point: no processes, threads,
signals to others, timers, signal handlers, sockets, IPC, mounts,
namespaces, priorities, affinity, limits of other processes, clocks, keys,
BPF, perf, io_uring, ptrace, reboot, syslog, fanotify, ... A call added to
CPython's needs later shows up as an EPERM in a test, not as a hole.
pyseccomp (libseccomp) compiles it to BPF for the running architecture.
"""

from __future__ import annotations

import errno
import logging
import os

logger = logging.getLogger(__name__)

ALLOWED = (
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    # reading the library (Landlock and the file system view decide what)
    "read", "pread64", "readv", "lseek", "close", "fstat", "newfstatat", "stat", "lstat",
    "statx", "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2",
    "getcwd",
    # time, randomness, waiting on itself
    "clock_gettime", "clock_getres", "gettimeofday", "time", "clock_nanosleep", "nanosleep",
    "getrandom", "futex", "sched_yield", "restart_syscall", "rt_sigreturn", "rt_sigprocmask",
    "getitimer",
    # harmless questions about itself
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "getpriority", "getrlimit",
    "getrusage", "times", "sysinfo", "uname", "getcpu", "sched_getaffinity",
    # leaving
    "exit", "exit_group",
)  # fmt: skip

# Calls whose callers in libc fall back to an older call on ENOSYS (which
# the filter then judges); EPERM would be taken as final.
_ENOSYS = ("clone3", "openat2")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_TCGETS = 0x5401  # isatty()
_FCNTL_QUERIES = (1, 2, 3)  # F_GETFD, F_SETFD, F_GETFL


def apply_seccomp(result_fd: int) -> bool:
    """Load the filter; False (with a warning) where seccomp is unavailable.
    Writes go to the result pipe and to stdout/stderr (/dev/null) only; opens
    are read-only; signals only to itself (abort() raises SIGABRT)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as error:
        logger.warning("seccomp unavailable (%s); sandbox runs without it", error)
        return False
    try:
        rules = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
        for name in ALLOWED:
            _try_rule(rules, sc.ALLOW, name)
        for name in _ENOSYS:
            _try_rule(rules, sc.ERRNO(errno.ENOSYS), name)
        for fd in (result_fd, 1, 2):
            for name in ("write", "writev"):
                _try_rule(rules, sc.ALLOW, name, sc.Arg(0, sc.EQ, fd))
        _try_rule(rules, sc.ALLOW, "openat", sc.Arg(2, sc.MASKED_EQ, _WRITE_FLAGS, 0))
        _try_rule(rules, sc.ALLOW, "open", sc.Arg(1, sc.MASKED_EQ, _WRITE_FLAGS, 0))
        _try_rule(rules, sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, _TCGETS))
        for command in _FCNTL_QUERIES:
            _try_rule(rules, sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, command))
        # Reading its own limits (resource.getrlimit), never setting any.
        _try_rule(rules, sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
        _try_rule(rules, sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, os.getpid()))
        # Asking what a signal's handler is, never setting one.
        _try_rule(rules, sc.ALLOW, "rt_sigaction", sc.Arg(1, sc.EQ, 0))
        rules.load()
    except OSError as error:
        logger.warning("seccomp filter could not be loaded (%s); going on without it", error)
        return False
    return True


def _try_rule(rules, action: int, name: str, *args) -> None:
    try:
        rules.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):
        # A syscall this architecture does not have (e.g. `open` on arm64).
        logger.debug("seccomp: no syscall %s here", name)
