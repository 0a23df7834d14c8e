"""The layers a sandbox applies to itself, in its own process: resource
limits, the PEP 578 audit hook, restricted builtins and imports, bounded
stdout/stderr, and the integrity check after each task. The order they go
on, with the kernel's layers around them, is in `__init__.py`.

The hook and the builtins live in the sandbox's own address space, so code
that reaches frames or closures can tamper with them; the kernel layers are
the boundary, and `integrity_problems` notices tampering after each task so
the task is reported as a violation and the process discarded.
"""

from __future__ import annotations

import builtins
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


def integrity_problems(*, hook: bool = True) -> list[str]:
    """What user code broke or left behind, checked after each task: the
    hook (when on) must still deny a canary event and a read outside the
    library; no thread, interval timer or signal handler may outlive the
    task (the kernel refuses all three; this notices if one got through)."""
    import _thread

    problems = []
    probes = ((CANARY_EVENT, ()), ("open", (_CANARY_PATH, "r", os.O_RDONLY))) if hook else ()
    for event, args in probes:
        try:
            sys.audit(event, *args)
        except SandboxViolation:
            continue
        except BaseException:
            pass
        problems.append(f"the audit hook no longer denies {event}")
    if _thread._count():
        problems.append("a thread outlived the task")
    if any(signal.getitimer(timer) != (0.0, 0.0) for timer in _TIMERS):
        problems.append("an interval timer outlived the task")
    if {sig: signal.getsignal(sig) for sig in _WATCHED_SIGNALS} != _DEFAULT_HANDLERS:
        problems.append("a signal handler outlived the task")
    return problems


def _watched():
    timers = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
    watched = (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGUSR1, signal.SIGUSR2,
               signal.SIGTERM, signal.SIGCHLD, signal.SIGIO)  # fmt: skip
    return timers, watched, {sig: signal.getsignal(sig) for sig in watched}


_TIMERS, _WATCHED_SIGNALS, _DEFAULT_HANDLERS = _watched()


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


def close_other_fds(keep: tuple[int, ...]) -> None:
    """Nothing of the worker's may stay open in the sandbox; stdio becomes
    /dev/null (so user code cannot write to the worker's terminal)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(null, fd)
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)  # also closes `null`, now duplicated onto stdio


class BoundedOutput:
    """sys.stdout and sys.stderr of a sandbox: print() works and costs no
    more than `limit` characters of memory; the tail is kept for the error
    report of a task that fails."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.text = ""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.text = (self.text + text)[-self.limit :]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def take(self) -> str:
        text, self.text = self.text, ""
        return text
