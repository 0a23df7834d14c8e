"""Locking a sandbox process down before it unpickles anything untrusted.

Layers, outermost first (PROTOCOL.md section 5):
1. resource limits: address space, file size 0, few open files, no core;
2. Landlock where the kernel offers it (`landlock.py`): files readable only
   under the interpreter's library, nothing writable, no TCP, no signals
   or abstract sockets outside the sandbox;
3. a seccomp filter (pyseccomp over libseccomp) where the kernel offers one:
   no socket, connect, execve, fork, writes except to the result pipe,
   no opening files for writing, no unlink/rename/chmod...; the kernel keeps
   these even if everything above it is subverted;
4. a PEP 578 audit hook that denies file writes, reads outside the
   interpreter's library, sockets, subprocesses, os.system/exec*, ctypes
   and other escape hatches, with clear messages;
5. restricted builtins (no open, eval, exec, compile, input, breakpoint) and
   an `__import__` that admits only the allow-list, given to every function
   the payload defines.
Layers 4-5 live in the sandbox's own address space, so code that reaches
frames or closures can tamper with them; the kernel layers (1-3) are the
boundary, and `integrity_problems` notices tampering after each task so the
task is reported as a violation and the process discarded. Everything here
runs in the sandbox process only.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable

from worker_service.sandbox.policy import SandboxLimits

logger = logging.getLogger(__name__)


class SandboxViolation(PermissionError):
    """User code tried something the sandbox forbids."""


# -- 1. resource limits ----------------------------------------------------


def apply_rlimits(limits: SandboxLimits) -> None:
    memory = limits.memory_limit_mb * 1024 * 1024
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past FSIZE fails, not kills
    for which, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, limits.open_files),
    ):
        resource.setrlimit(which, (value, value))


# -- 2. seccomp ------------------------------------------------------------

_DENIED_SYSCALLS = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "sendto", "sendmsg", "sendmmsg",
    # new programs, processes and threads
    "execve", "execveat", "fork", "vfork",
    # changing the file system
    "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
    "rmdir", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmod", "fchmodat",
    "chown", "fchown", "lchown", "fchownat", "truncate", "ftruncate", "mknod", "mknodat",
    "utime", "utimes", "utimensat", "futimesat", "setxattr", "lsetxattr", "fsetxattr",
    "removexattr", "lremovexattr", "fremovexattr", "copy_file_range", "sendfile", "splice",
    "tee", "open_by_handle_at", "name_to_handle_at",
    # other processes and the kernel
    "kill", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "kcmp", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "fsopen", "fsmount", "move_mount", "open_tree",
    "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "personality", "setuid", "setgid", "setreuid", "setregid",
    "setresuid", "setresgid", "setgroups",
)  # fmt: skip
_WRITE_SYSCALLS = ("write", "writev", "pwrite64", "pwritev", "pwritev2")


def apply_seccomp(result_fd: int) -> bool:
    """Load the filter; False (with a warning) where seccomp is unavailable."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as error:
        logger.warning("seccomp unavailable (%s); sandbox runs without it", error)
        return False
    eperm = sc.ERRNO(errno.EPERM)
    try:
        rules = sc.SyscallFilter(defaction=sc.ALLOW)
        for name in _DENIED_SYSCALLS:
            _try_rule(rules, eperm, name)
        # clone3 cannot be inspected; ENOSYS makes libc fall back to clone.
        _try_rule(rules, sc.ERRNO(errno.ENOSYS), "clone3")
        _try_rule(rules, sc.ERRNO(errno.ENOSYS), "openat2")
        # No processes and no threads either: a thread could outlive its
        # task and run on in an idle sandbox.
        _try_rule(rules, eperm, "clone")
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        for flag in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND):
            assert flag & write_flags
            _try_rule(rules, eperm, "open", sc.Arg(1, sc.MASKED_EQ, flag, flag))
            _try_rule(rules, eperm, "openat", sc.Arg(2, sc.MASKED_EQ, flag, flag))
        for name in _WRITE_SYSCALLS:
            _try_rule(rules, eperm, name, sc.Arg(0, sc.NE, result_fd))
        tiocsti = 0x5412  # pushing keystrokes into a terminal
        _try_rule(rules, eperm, "ioctl", sc.Arg(1, sc.EQ, tiocsti))
        # Signals only to itself (abort() uses tgkill on its own pid).
        _try_rule(rules, eperm, "tgkill", sc.Arg(0, sc.NE, os.getpid()))
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


# -- 3. the audit hook -----------------------------------------------------

CANARY_EVENT = "ec262.sandbox.canary"
_CANARY_PATH = "/ec262-sandbox-canary"
_DENIED_EVENT_PREFIXES = (
    "os.", "subprocess.", "socket.", "ctypes.", "shutil.", "pty.", "fcntl.", "mmap.",
    "sqlite3.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.",
    "telnetlib.", "webbrowser.", "resource.", "signal.", "msvcrt.", "winreg.", "_winapi.",
    "gc.", "_thread.", "sys.settrace", "sys.setprofile", "sys._current_frames", "builtins.input",
    "builtins.breakpoint", "cpython.run_", "cpython.remove_audit_hook", "syslog.",
    CANARY_EVENT,
)  # fmt: skip
_DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "cffi", "_posixsubprocess", "_socket", "mmap"})
_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_audit_hook(read_dirs: tuple[str, ...]) -> Callable[[str, tuple], None]:
    """An audit hook enforcing the policy. Its state is immutable tuples in
    a closure, so user code that finds the hook still cannot widen it."""
    roots = tuple(d.rstrip("/") + "/" for d in read_dirs)
    realpath = os.path.realpath
    fspath = os.fsdecode
    # Locals, not module globals: rebinding the module's names later
    # (setattr on this module) must not change the policy.
    denied_prefixes = _DENIED_EVENT_PREFIXES
    denied_imports = _DENIED_IMPORTS
    write_flags = _WRITE_OPEN_FLAGS
    violation = SandboxViolation

    def readable(path: object) -> bool:
        if not isinstance(path, str | bytes):
            return False
        resolved = realpath(fspath(path))
        return resolved.startswith(roots) or resolved + "/" in roots

    def deny(message: str) -> None:
        raise violation(f"sandbox: {message} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                deny(f"opening file descriptor {path}")
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing:
                deny(f"writing {fspath(path)}")
            if not readable(path):
                deny(f"reading {fspath(path)}")
        elif event in ("os.listdir", "os.scandir"):
            if not readable(args[0] if args and args[0] is not None else "."):
                deny(f"listing {args[0]!r}")
        elif event == "import":
            if args[0].partition(".")[0] in denied_imports:
                deny(f"importing {args[0]}")
        elif event.startswith(denied_prefixes):
            deny(event)

    return hook


def integrity_problems() -> list[str]:
    """What user code broke in the Python-level layers, checked after each
    task: the hook must still deny a canary event and a read outside the
    library, and no thread may outlive the task."""
    import _thread

    problems = []
    for event, args in ((CANARY_EVENT, ()), ("open", (_CANARY_PATH, "r", os.O_RDONLY))):
        try:
            sys.audit(event, *args)
        except SandboxViolation:
            continue
        except BaseException:
            pass
        problems.append(f"the audit hook no longer denies {event}")
    if _thread._count():
        problems.append("a thread outlived the task")
    return problems


# -- 4. restricted builtins and imports -------------------------------------

_REMOVED_BUILTINS = frozenset({
    "open", "eval", "exec", "compile", "input", "breakpoint", "help", "exit", "quit",
    "copyright", "credits", "license", "__loader__", "__spec__", "__build_class__",
})  # fmt: skip


def make_guarded_import(allowed: frozenset[str]) -> Callable:
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ImportError("relative imports are not available in the sandbox")
        top = name.partition(".")[0]
        if top not in allowed:
            raise SandboxViolation(
                f"sandbox: importing {name} is not allowed (allowed: {', '.join(sorted(allowed))};"
                " the worker operator can add modules with --allow-module)"
            )
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import


def restricted_builtins(allowed: frozenset[str]) -> dict:
    """The builtins every user function sees."""
    safe = {k: v for k, v in vars(builtins).items() if k not in _REMOVED_BUILTINS}
    safe["__import__"] = make_guarded_import(allowed)
    safe["__build_class__"] = builtins.__build_class__  # `class` statements need it
    return safe


def close_other_fds(keep: int) -> None:
    """Nothing of the worker's may stay open in the sandbox; stdio becomes
    /dev/null (so user code cannot write to the worker's terminal)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != keep:
            os.dup2(null, fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)  # also closes `null`, now duplicated onto stdio
