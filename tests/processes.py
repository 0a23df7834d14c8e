"""Test-side names for ec262.processes (the library's own process helpers)."""

from __future__ import annotations

from pathlib import Path

from ec262.processes import ServerProcess, running_server

ROOT = Path(__file__).resolve().parent.parent


def start_server(args, **kwargs):
    """`python -m ec262 ARGS` from the repository root, yielded once listening."""
    return running_server(args, cwd=str(ROOT), **kwargs)


__all__ = ["ROOT", "ServerProcess", "start_server"]
