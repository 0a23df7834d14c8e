"""The function payload a foreman sends and a worker's sandbox loads.

A dill pickle of `{"function": f, "combiner": c or None}`, made with
`recurse=True` so a function from `__main__` travels with the globals,
helpers and closures it uses and nothing else of the foreman's program.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import dill


def pack_functions(function: Callable, combiner: Callable | None = None) -> bytes:
    return dill.dumps({"function": function, "combiner": combiner}, recurse=True)


def digest(payload: bytes) -> str:
    """`function_sha256`: how workers cache payloads."""
    return hashlib.sha256(payload).hexdigest()
