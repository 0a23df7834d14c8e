"""What the sandbox allows: limits and the import allow-list (PROTOCOL.md
section 5). Plain data, shared by the worker (parent) and the sandbox."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass, field

from ec262.defaults import MAX_RESULT_BYTES

DEFAULT_ALLOWED_MODULES = frozenset({
    "math", "cmath", "re", "string", "collections", "itertools", "functools",
    "operator", "json", "time", "datetime", "random", "statistics", "heapq",
    "bisect", "decimal", "fractions", "unicodedata", "hashlib", "textwrap",
    "typing", "dataclasses", "enum", "copy",
})  # fmt: skip

# Modules no --allow-module can open: they are the escape hatches themselves.
NEVER_ALLOWED = frozenset({
    "os", "posix", "sys", "subprocess", "_posixsubprocess", "socket", "_socket", "ctypes",
    "_ctypes", "cffi", "multiprocessing", "_multiprocessing", "importlib", "builtins", "io",
    "_io", "pathlib", "shutil", "signal", "gc", "inspect", "pty", "fcntl", "mmap", "resource",
    "threading", "_thread", "marshal", "pickle", "_pickle", "dill", "code", "codeop", "pdb",
    "sqlite3", "ssl", "select", "selectors", "asyncio", "urllib", "http", "ftplib", "smtplib",
})  # fmt: skip


def library_dirs() -> tuple[str, ...]:
    """The interpreter's own library directories (of the base installation,
    not a virtualenv's site-packages), the only places a sandbox may read
    files from, to import allowed modules."""
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    dirs = {os.path.realpath(paths[name]) for name in ("stdlib", "platstdlib") if name in paths}
    return tuple(sorted(dirs))


def module_dirs(names: frozenset[str]) -> tuple[str, ...]:
    """Directories holding extra allowed modules (e.g. numpy under
    site-packages), so importing them can read their files."""
    dirs = set()
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            dirs.update(os.path.realpath(p) for p in spec.submodule_search_locations)
        elif spec.origin and os.path.isabs(spec.origin):
            dirs.add(os.path.realpath(spec.origin))
    return tuple(sorted(dirs))


# The layers a test may switch off one by one (`SandboxLimits.layers_off`).
LAYERS = (
    "uid", "namespaces", "filesystem", "cgroup", "capabilities",
    "landlock", "seccomp", "audit_hook",
)  # fmt: skip


@dataclass(frozen=True)
class SandboxLimits:
    """The limits of one sandbox process; `ec262 worker` flags fill it."""

    task_timeout: float = 60.0
    memory_limit_mb: int = 1024
    output_limit_bytes: int = MAX_RESULT_BYTES
    open_files: int = 64
    allowed_modules: frozenset[str] = DEFAULT_ALLOWED_MODULES
    read_dirs: tuple[str, ...] = field(default_factory=library_dirs)
    # Layers switched off, for the tests that show what each layer alone
    # stops (and for diagnosing a kernel); no command-line flag sets it.
    layers_off: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.layers_off) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown sandbox layers: {', '.join(sorted(unknown))}")
        if self.task_timeout <= 0:
            raise ValueError("task timeout must be positive")
        if self.memory_limit_mb < 64:
            raise ValueError("memory limit must be at least 64 MB")
        forbidden = {m.partition(".")[0] for m in self.allowed_modules} & NEVER_ALLOWED
        if forbidden:
            raise ValueError(
                f"these modules can never be allowed in the sandbox: {', '.join(sorted(forbidden))}"
            )

    @classmethod
    def with_extra_modules(cls, extra: list[str] | tuple[str, ...], **kwargs) -> SandboxLimits:
        """Default allow-list plus `--allow-module` names, whose files the
        sandbox may then read."""
        modules = DEFAULT_ALLOWED_MODULES | frozenset(extra)
        extra_dirs = module_dirs(frozenset(extra) - DEFAULT_ALLOWED_MODULES)
        return cls(allowed_modules=modules, read_dirs=library_dirs() + extra_dirs, **kwargs)
