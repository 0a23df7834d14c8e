"""The function payload a foreman sends and a worker's sandbox loads.

A dill pickle of `{"function": f, "combiner": c or None}`. The worker can
import only its allow-list, not the user's own modules, so the user's code
must travel by value: functions and classes from `__main__` always do, and
`pack_functions` makes those of any other user module (one that is not part
of the Python installation, e.g. a test module or the user's package) do the
same, together with the helpers, globals and closures they use.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator

import dill

_LIBRARY_PREFIXES = tuple(
    {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
)

_OUR_PACKAGES = frozenset(
    {"ec262", "worker_service", "foreman_service", "discovery_service", "dill"}
)


def _is_user_module(name: str | None) -> bool:
    if not name or name == "__main__":
        return False  # __main__ already travels by value
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path is None:
        return False  # builtin or namespace: importable on the worker as it is
    if name.partition(".")[0] in _OUR_PACKAGES:
        return False
    return not path.startswith(_LIBRARY_PREFIXES)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _user_objects(root: Callable) -> list[object]:
    """Functions and classes of user modules reachable from `root` through
    globals, closures, defaults and class dictionaries."""
    found: dict[int, object] = {}
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in found:
            continue
        if isinstance(obj, types.FunctionType):
            if not _is_user_module(obj.__module__) and obj is not root:
                continue
            found[id(obj)] = obj
            globals_ = obj.__globals__
            stack.extend(globals_[n] for n in _code_names(obj.__code__) if n in globals_)
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _has_contents(c))
            stack.extend(obj.__defaults__ or ())
        elif isinstance(obj, type) and _is_user_module(obj.__module__):
            found[id(obj)] = obj
            stack.extend(v for v in vars(obj).values() if isinstance(v, types.FunctionType | type))
    return list(found.values())


def _has_contents(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _travel_by_value(objects: list[object]) -> Iterator[None]:
    """Make dill treat these as defined in `__main__` while pickling."""
    saved = [(obj, obj.__module__) for obj in objects if _is_user_module(obj.__module__)]
    try:
        for obj, _ in saved:
            obj.__module__ = "__main__"
        yield
    finally:
        for obj, module in saved:
            obj.__module__ = module


def pack_functions(function: Callable, combiner: Callable | None = None) -> bytes:
    """The payload for a task's function (and optional combiner)."""
    objects = _user_objects(function) + (_user_objects(combiner) if combiner else [])
    with _travel_by_value(objects):
        return dill.dumps({"function": function, "combiner": combiner}, recurse=True)


def digest(payload: bytes) -> str:
    """`function_sha256`: how workers cache payloads."""
    return hashlib.sha256(payload).hexdigest()
