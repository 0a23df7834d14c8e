"""Canonical encoding of results (PROTOCOL.md section 3).

Replicas compare results while they are still encrypted, so two workers
that compute the same dictionary must produce the same bytes, whatever the
insertion order: a JSON list of `[key, value]` pairs sorted by key, with no
insignificant whitespace. String keys sort as strings and numeric keys as
numbers; any other mix sorts by the keys' canonical JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import Any

from ec262.errors import EncodingError

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted object keys, no spaces, no NaN."""
    return _encoder.encode(value)


def sorted_items(data: Mapping) -> list[tuple[Any, Any]]:
    """Items in canonical key order (see the module docstring)."""
    key_types = set(map(type, data))
    if key_types <= {str} or (key_types <= {int, float} and all(k == k for k in data)):
        # Sorting on the key alone lets CPython compare same-typed keys
        # directly (twice as fast as comparing the pairs). (NaN != NaN.)
        return sorted(data.items(), key=itemgetter(0))
    return sorted(data.items(), key=lambda item: _key_text(item[0]))


def _key_text(key: object) -> str:
    try:
        return canonical_json(key)
    except (TypeError, ValueError) as error:
        raise EncodingError(f"key {key!r} cannot be carried as JSON: {error}") from None


def encode_pairs(pairs: Iterable[tuple[Any, Any]]) -> bytes:
    """Canonical bytes of a list of pairs, in the order given (used for a
    chunk's rows, whose order the foreman has already fixed). JSON writes
    tuples as lists, so pairs go to the encoder as they are."""
    rows = pairs if isinstance(pairs, list) else list(pairs)
    try:
        return canonical_json(rows).encode()
    except (TypeError, ValueError):
        for key, value in rows:
            _key_text(key)
            _check_value(key, value)
        raise


def encode_result(data: Mapping) -> bytes:
    """The canonical bytes of a result dictionary.

    Raises EncodingError naming the first key whose key or value JSON
    cannot carry (a set, an object, NaN, a dict with mixed key types, ...).
    """
    if not isinstance(data, Mapping):
        raise EncodingError(f"a result must be a dict, not {type(data).__name__}")
    return encode_pairs(sorted_items(data))


def _check_value(key: object, value: object) -> None:
    try:
        canonical_json(value)
    except (TypeError, ValueError) as error:
        raise EncodingError(f"value for key {key!r} cannot be carried as JSON: {error}") from None


def _tupled(key: Any) -> Any:
    """A list key becomes a tuple again, recursively, so it is hashable."""
    if isinstance(key, list):
        return tuple(_tupled(part) for part in key)
    return key


def _loads_rows(text: bytes | str) -> list:
    try:
        rows = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise EncodingError(f"not canonical JSON: {error}") from None
    if not isinstance(rows, list):
        raise EncodingError("canonical JSON must be a list of [key, value] pairs")
    return rows


def _checked_pairs(rows: list) -> list[tuple[Any, Any]]:
    pairs = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 2:
            raise EncodingError(f"expected a [key, value] pair, got {str(row)[:80]}")
        pairs.append((_tupled(row[0]), row[1]))
    return pairs


def decode_pairs(text: bytes | str) -> list:
    """The `[key, value]` pairs of canonical JSON, list keys made tuples.

    Rows come back as 2-item lists (they unpack like tuples) unless a key
    needs converting: decoding is on the hot path of every task.
    """
    rows = _loads_rows(text)
    if all(type(row) is list and len(row) == 2 and type(row[0]) is not list for row in rows):
        return rows
    return _checked_pairs(rows)


def decode_result(text: bytes | str) -> dict:
    """The dictionary that `encode_result` encoded."""
    rows = _loads_rows(text)
    try:
        return dict(rows)  # fast: fails on a list key or a row that is not a pair
    except (TypeError, ValueError):
        return dict(_checked_pairs(rows))
