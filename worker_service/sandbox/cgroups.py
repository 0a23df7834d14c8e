"""A control group per sandbox, where the worker may make one: the kernel's
own bound on its memory and process count and a CPU weight below the
worker's, which no code inside can lift (rlimits are the fallback).

cgroup v2 (memory.max, pids.max, cpu.weight) where the worker's own group
delegates those controllers to groups below it; else cgroup v1 (the
memory, pids and cpu hierarchies, where mounted and writable: a worker
running as root). The zygote creates the group before it forks the
sandbox's keeper, the keeper joins it (so the sandbox is born inside), and
the zygote removes it once the keeper is reaped. Plain file writes; no
library covers both versions, and the writes are a dozen lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The sandbox and its keeper; a third would be a fork, which seccomp
# refuses anyway.
SANDBOX_PIDS = 2
# Relative to a plain process's 1024 (v1) or 100 (v2): sandboxes yield the
# CPU to the worker's own threads.
V1_CPU_SHARES = 256
V2_CPU_WEIGHT = 25
_V1_CONTROLLERS = ("memory", "pids", "cpu")


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    paths = {}
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _mounts() -> dict[str, str]:
    """controller (or "" for v2) -> mount point."""
    found = {}
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            left, _, right = line.partition(" - ")
            fstype, _source, options = right.split()[:3]
            mount_point = left.split()[4]
            if fstype == "cgroup2":
                found.setdefault("", mount_point)
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in _V1_CONTROLLERS:
                        found.setdefault(option, mount_point)
    return found


def _write(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


@dataclass
class CgroupManager:
    """Groups for one zygote's sandboxes under `parents` (one per hierarchy)."""

    version: int
    parents: dict[str, str]  # hierarchy -> this zygote's directory
    memory_bytes: int

    @classmethod
    def create(cls, memory_bytes: int) -> tuple[CgroupManager | None, str]:
        """A manager, or None and why there is none."""
        try:
            own, mounts = _own_paths(), _mounts()
        except OSError as error:
            return None, f"cannot read /proc ({error})"
        name = f"ec262-sandboxes-{os.getpid()}"
        reasons = []
        if "" in mounts and "" in own:
            base = mounts[""] + own[""].rstrip("/")
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as control:
                    enabled = control.read().split()
                if {"memory", "pids"} <= set(enabled):
                    parent = os.path.join(base, name)
                    os.mkdir(parent)
                    wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in enabled)
                    _write(os.path.join(parent, "cgroup.subtree_control"), wanted)
                    return cls(2, {"": parent}, memory_bytes), "v2"
                reasons.append(f"v2 group {base} does not delegate memory and pids")
            except OSError as error:
                reasons.append(f"v2: {error.strerror} ({base})")
        parents = {}
        for controller in _V1_CONTROLLERS:
            if controller not in mounts or controller not in own:
                continue
            base = mounts[controller] + own[controller].rstrip("/")
            try:
                _sweep_stale(base)
                parent = os.path.join(base, name)
                os.mkdir(parent)
                parents[controller] = parent
            except OSError as error:
                reasons.append(f"v1 {controller}: {error.strerror} ({base})")
        if "memory" in parents and "pids" in parents:
            return cls(1, parents, memory_bytes), "v1 " + "+".join(parents)
        for parent in parents.values():
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        return None, "; ".join(reasons) or "no cgroup hierarchy mounted"

    def make(self, sandbox: str) -> list[str]:
        """The group directories (one per hierarchy) of a new sandbox, its
        limits written; the keeper joins each by writing its pid."""
        made = []
        try:
            for controller, parent in self.parents.items():
                path = os.path.join(parent, sandbox)
                os.mkdir(path)
                made.append(path)
                if self.version == 2:
                    _write(os.path.join(path, "memory.max"), str(self.memory_bytes))
                    _write(os.path.join(path, "pids.max"), str(SANDBOX_PIDS))
                    with contextlib.suppress(OSError):
                        _write(os.path.join(path, "memory.swap.max"), "0")
                    with contextlib.suppress(OSError):
                        _write(os.path.join(path, "cpu.weight"), str(V2_CPU_WEIGHT))
                elif controller == "memory":
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(self.memory_bytes))
                elif controller == "pids":
                    _write(os.path.join(path, "pids.max"), str(SANDBOX_PIDS))
                elif controller == "cpu":
                    _write(os.path.join(path, "cpu.shares"), str(V1_CPU_SHARES))
        except OSError:
            self.remove(made)
            raise
        return made

    @staticmethod
    def join(groups: list[str]) -> None:
        """Called by the keeper: move itself (and so its children) in."""
        for path in groups:
            _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))

    @staticmethod
    def remove(groups: list[str]) -> None:
        for path in groups:
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def close(self) -> None:
        self.remove(list(self.parents.values()))


def _sweep_stale(base: str) -> None:
    """Empty groups left by a zygote that was killed (its pid is gone)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            if not entry.startswith("ec262-sandboxes-"):
                continue
            pid = entry.rpartition("-")[2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                parent = os.path.join(base, entry)
                with contextlib.suppress(OSError):
                    for child in os.listdir(parent):
                        with contextlib.suppress(OSError):
                            os.rmdir(os.path.join(parent, child))
                    os.rmdir(parent)
