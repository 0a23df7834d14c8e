"""What a task computes, given the user's functions and the chunk's rows.

MAP: every `(k2, v2)` the mapper yields is appended to `out[k2]`; an
optional combiner then runs on each `(k2, values)`: the pairs it yields are
appended to a fresh output, or the value it returns becomes `[value]`. REDUCE: every `(k2, v2)` the
reducer yields sets `out[k2]`; a reducer that returns a value instead of
yielding sets `out[key]` (the mincemeat style the seed used).
Plain functions, run inside the sandbox.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from types import GeneratorType
from typing import Any

from ec262.encoding import hashable_key
from ec262.errors import Ec262Error

MAP = 1
REDUCE = 2


class BadUserOutput(Ec262Error, TypeError):
    """A user function produced something that is not (key, value) pairs."""


def _checked_pair(item: Any, what: str) -> tuple[Any, Any]:
    """The (key, value) of an item a combiner or reducer yielded that is not
    a plain 2-tuple: a 2-list will do; a list key becomes a tuple (as a
    list key decoded from JSON does)."""
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise BadUserOutput(f"{what} yielded {str(item)[:60]!r}, not a (key, value) pair")
    return hashable_key(item[0]), item[1]


def run_map(mapper: Callable, rows: Iterable[tuple[Any, Any]]) -> dict[Any, list]:
    """The hot loop of every map task: no per-pair checks beyond what
    unpacking and hashing do anyway (a non-pair or an unhashable key raises
    there, with Python's own message)."""
    out: defaultdict[Any, list] = defaultdict(list)
    for key, value in rows:
        produced = mapper(key, value)
        if produced is None:
            continue
        for item in produced:  # the user's errors propagate from here as they are
            try:
                k2, v2 = item
                out[k2].append(v2)
            except (TypeError, ValueError) as error:
                raise BadUserOutput(
                    f"the mapper must yield (key, value) pairs with hashable keys, not"
                    f" {str(item)[:60]} ({error})"
                ) from None
    return dict(out)


def run_combiner(combiner: Callable, grouped: dict[Any, list]) -> dict[Any, list]:
    """Like run_map, a hot loop (one call per key of every map output): a
    check only for what is not a plain (key, value) tuple."""
    out: defaultdict[Any, list] = defaultdict(list)
    for key, values in grouped.items():
        produced = combiner(key, values)
        if type(produced) is not GeneratorType:
            out[key].append(produced)
            continue
        for item in produced:
            if type(item) is not tuple or len(item) != 2:
                item = _checked_pair(item, "the combiner")
            try:
                out[item[0]].append(item[1])
            except TypeError:  # unhashable: a list key becomes a tuple, or a clear error
                out[hashable_key(item[0])].append(item[1])
    return dict(out)


def run_reduce(reducer: Callable, rows: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, values in rows:
        produced = reducer(key, values)
        if type(produced) is not GeneratorType:
            out[key] = produced
            continue
        for item in produced:
            if type(item) is not tuple or len(item) != 2:
                item = _checked_pair(item, "the reducer")
            try:
                out[item[0]] = item[1]
            except TypeError:
                out[hashable_key(item[0])] = item[1]
    return out


def run_task(phase: int, functions: dict, rows: Iterable[tuple[Any, Any]]) -> dict:
    """The result dictionary of one task."""
    if phase == MAP:
        out = run_map(functions["function"], rows)
        combiner = functions.get("combiner")
        return run_combiner(combiner, out) if combiner is not None else out
    if phase == REDUCE:
        return run_reduce(functions["function"], rows)
    raise ValueError(f"unknown phase {phase}")
