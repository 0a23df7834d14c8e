"""Canonical encoding of results (docs/protocol.md section 3).

Replicas compare results while they are still encrypted, so two workers
that compute the same dictionary must produce the same bytes, whatever the
insertion order: a JSON list of `[key, value]` pairs sorted by key, with no
insignificant whitespace. String keys sort as strings and numeric keys as
numbers; any other mix sorts by the keys' canonical JSON text.

The bytes are those of the standard library's `json` (sorted object keys,
compact separators, no ASCII escaping, no NaN), plus two conveniences: an
Enum member is written as its value and a UUID as its string. orjson writes
and reads the same text several times faster, which matters because every
replica encodes every result and decodes every chunk; it is used wherever
its output is provably the same (see `canonical_bytes`) and `json` does the
rest.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from ec262.errors import EncodingError


def _by_value(value: object) -> object:
    """What orjson writes natively for these, the standard encoder writes too."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    default=_by_value,
)

# Subclasses, dataclasses and datetimes go to `_refuse` and so to `json`,
# which writes subclasses its own way and refuses the others.
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)
# Where orjson's text may differ from json's: floats (orjson writes 1e-7
# and 0.000015 where json writes 1e-07 and 1.5e-05; every float orjson
# writes has a point or a signed exponent) and NaN/Infinity (orjson writes
# null, json refuses). Without those substrings the text is json's; with
# them (a dotted word in a string will do), a walk over the value decides.
# A null token follows "[", "," or ":" unless it is the whole text.
_FLOAT_OR_NULL_HINTS = (b".", b"e+", b"e-", b"[null", b",null", b":null")
_SAME_TEXT_SCALARS = frozenset({str, int, bool})  # ints over 64 bits made orjson refuse
_CONTAINERS = frozenset({list, tuple, dict})
_SAME_TEXT_TYPES = _SAME_TEXT_SCALARS | _CONTAINERS
_DECODED_WITHOUT_FLOAT = frozenset({str, int, bool, type(None), list, dict})
_CONTAINER_COST = 32
# An integer of 19 digits or more may be outside 64 bits, where orjson reads
# a float: such text is read by json. Found by mapping every digit to "0".
_DIGITS_ONLY = bytes(48 if 48 <= i <= 57 else 46 for i in range(256))  # "0" or "."
_LONG_NUMBER = b"0" * 19


def _same_text(value: Any, text: bytes) -> bool:
    """True if orjson's `text` for `value` is what json writes."""
    return not _may_differ(text) or _holds_only_same_text_types(value)


def _may_differ(text: bytes) -> bool:
    """False if orjson's `text` is json's whatever it encoded: no float
    and no null in it (see _FLOAT_OR_NULL_HINTS)."""
    return text == b"null" or any(hint in text for hint in _FLOAT_OR_NULL_HINTS)


def _holds_only_same_text_types(value: Any) -> bool:
    """No float, None, Enum or UUID anywhere in `value`."""
    return _holds_only(value, _SAME_TEXT_TYPES) is True


def _holds_only(value: Any, allowed: frozenset[type], budget: float = math.inf) -> bool | None:
    """True if every object in `value` is of an `allowed` type, False if
    not, None if that would cost more than `budget` (in objects scanned; a
    container counts as its members plus `_CONTAINER_COST`). One C-speed
    type scan per container, not a Python step per item.

    A container's `_CONTAINER_COST` is charged when it is found, so a value
    of many small containers (a chunk's rows) is given up before its walk,
    not after a budget's worth of steps."""
    stack = [value]
    budget -= _CONTAINER_COST  # a Python step costs ~30 member scans
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            members = item.values()
        elif kind is list or kind is tuple:
            members = item
        else:
            if kind not in allowed:
                return False
            continue
        budget -= len(members)
        if budget < 0:
            return None
        kinds = set(map(type, members))
        if not kinds <= allowed:
            return False
        if not kinds.isdisjoint(_CONTAINERS):
            if kinds <= _CONTAINERS:  # rows: all of them, no step to find them
                inner = members
            else:
                inner = [member for member in members if type(member) in _CONTAINERS]
            budget -= len(inner) * _CONTAINER_COST
            if budget < 0:
                return None
            stack.extend(inner)
    return True


def _refuse(value: object) -> object:
    raise TypeError("left to json")


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted object keys, no spaces, no NaN."""
    return _encoder.encode(value)


def canonical_bytes(value: Any) -> bytes:
    """`canonical_json(value)` as UTF-8, by orjson when the text is sure to
    be the same (no float, no null, nothing but JSON's own types and 64-bit
    integers), else by json."""
    return _canonical(value, _holds_only_same_text_types)


def _canonical(value: Any, holds_only_same_text_types: Callable[[Any], bool]) -> bytes:
    """canonical_bytes, with the proof that `value` holds nothing orjson
    writes otherwise given (a quicker one where the shape is known)."""
    try:
        text = orjson.dumps(value, default=_refuse, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a type, a key or an integer orjson leaves to json
        return _encoder.encode(value).encode()
    if not _may_differ(text) or holds_only_same_text_types(value):
        return text
    return _encoder.encode(value).encode()


def loads(text: bytes | str) -> Any:
    """json.loads, by orjson unless the text may hold an integer beyond 64
    bits (which orjson reads as a float) or something only json accepts
    (NaN, a lone surrogate escape).

    Whether orjson made a float of an integer is settled the cheaper way:
    a type walk finding no float at all where the value has few objects
    for its size (a chunk of long texts), else a scan of the text for a run
    of 19 digits (about a nanosecond a byte)."""
    if not isinstance(text, bytes):
        return json.loads(text)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    if _holds_only(value, _DECODED_WITHOUT_FLOAT, budget=len(text) / 32) is True:
        return value
    if _LONG_NUMBER not in text.translate(_DIGITS_ONLY):
        return value
    return json.loads(text)


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
    tuples as lists, so pairs go to the encoder as they are.

    Pairs of plain scalars (a dict of lines, say) are proved same-text by
    two type scans over the columns rather than a walk over every pair,
    even when a dotted word sends the text to the check."""
    rows = pairs if isinstance(pairs, list) else list(pairs)
    try:
        return _canonical(rows, _pairs_hold_only_same_text_types)
    except (TypeError, ValueError):
        for key, value in rows:
            _key_text(key)
            _check_value(key, value)
        raise


def _pairs_hold_only_same_text_types(rows: list) -> bool:
    """`_holds_only_same_text_types(rows)`, settled by a few C-speed
    column scans when `rows` are 2-tuples of str, int or bool (no Python
    step per row), else by the walk."""
    if set(map(type, rows)) == {tuple} and set(map(len, rows)) == {2}:
        keys, values = set(map(type, map(_first, rows))), set(map(type, map(_second, rows)))
        if keys <= _SAME_TEXT_SCALARS and values <= _SAME_TEXT_SCALARS:
            return True
    return _holds_only_same_text_types(rows)


_first, _second = itemgetter(0), itemgetter(1)


def pairs_blocks(pairs: Iterable[tuple[Any, Any]], block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """The canonical text of consecutive runs of `pairs`, each about
    `block_bytes`, without the brackets of its list, with its pair count:
    a chunk of rows is `join_blocks` of consecutive blocks.

    One encoder call per block, not per pair (per-pair calls cost a
    Python step and a bytes object each: 4 KB of memory a record on a
    million records). A block's pair count follows the bytes per pair seen
    so far; a block over twice its size is halved and encoded again, so
    one long record never makes a fat block of its neighbours."""
    iterator = iter(pairs)
    count, seen_pairs, seen_bytes = 16, 0, 0
    while block := list(itertools.islice(iterator, count)):
        pending = [block]
        while pending:
            rows = pending.pop()
            text = encode_pairs(rows)
            if len(text) > 2 * block_bytes and len(rows) > 1:
                half = len(rows) // 2
                pending += [rows[half:], rows[:half]]
                continue
            yield text[1:-1], len(rows)
            seen_pairs, seen_bytes = seen_pairs + len(rows), seen_bytes + len(text)
        count = max(1, min(_MAX_BLOCK_PAIRS, block_bytes * seen_pairs // max(1, seen_bytes)))


_MAX_BLOCK_PAIRS = 1 << 16


def join_blocks(blocks: Iterable[bytes]) -> bytes:
    """One canonical list from the bracketless texts of its runs of items
    (`pairs_blocks`) or of its items: `[a,b]` from `a` and `b`."""
    return b"[" + b",".join(blocks) + b"]"


def encode_result(data: Mapping) -> bytes:
    """The canonical bytes of a result dictionary.

    Raises EncodingError naming the first key whose key or value JSON
    cannot carry (a set, an object, NaN, a dict with mixed key types, ...).
    """
    if not isinstance(data, Mapping):
        raise EncodingError(f"a result must be a dict, not {type(data).__name__}")
    if type(data) is dict and data and set(map(type, data.values())) == {list}:
        text = _list_valued_dict_text(data)  # every map output has this shape
        if text is not None:
            return text
    return encode_pairs(sorted_items(data))


def _list_valued_dict_text(data: dict) -> bytes | None:
    """The canonical bytes of a dict of string keys and flat lists, made
    from orjson's sorted JSON object by two replacements (sorting and
    writing in Rust is several times faster than sorting the items in
    Python and writing pairs); None when that is not provably exact.

    Proof: with exactly one `[` and one `]` per value, every bracket opens
    or closes a value list (none is inside a key or a list). So each `":[`
    is a key's closing quote and its list's start, and each `],"` a list's
    end and the next key's opening quote:
    `{"k":[1],"l":[2]}` -> `[["k",[1]],["l",[2]]]`.
    orjson sorts keys as Python sorts strings (code points); its scalars
    are json's wherever `_same_text` says so.
    """
    try:
        text = orjson.dumps(data, default=_refuse, option=_ORJSON_OPTIONS)
    except TypeError:
        return None
    count = len(data)
    if text.count(b"[") != count or text.count(b"]") != count:
        return None
    if not _same_text(data, text):
        return None
    rows = text[2:-2].replace(b'":[', b'",[').replace(b'],"', b']],["')
    return b'[["' + rows + b"]]]"


def _check_value(key: object, value: object) -> None:
    try:
        canonical_json(value)
    except (TypeError, ValueError) as error:
        raise EncodingError(f"value for key {key!r} cannot be carried as JSON: {error}") from None


def hashable_key(key: Any) -> Any:
    """A list key (as JSON carries a tuple) becomes a tuple again,
    recursively, so it is hashable; any other key is returned as it is."""
    if isinstance(key, list):
        return tuple(hashable_key(part) for part in key)
    return key


def _loads_rows(text: bytes | str) -> list:
    try:
        rows = loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise EncodingError(f"not canonical JSON: {error}") from None
    if not isinstance(rows, list):
        raise EncodingError("canonical JSON must be a list of [key, value] pairs")
    return rows


def _checked_pairs(rows: list) -> list[tuple[Any, Any]]:
    pairs = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 2:
            raise EncodingError(f"expected a [key, value] pair, got {str(row)[:80]}")
        pairs.append((hashable_key(row[0]), row[1]))
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


# Map outputs, split as bytes (docs/protocol.md section 3). The foreman's
# shuffle merges `["key",[values]]` rows without decoding a value; these are
# the splits, their proofs, and the check that an agreed text is JSON at all.

_ROW_SEPARATOR = b']],["'  # between `["k1",[...]]` and `["k2",[...]]`
_KEY_END = b'",['


def flat_rows(text: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """The key texts and value-list texts of the `["key",[values]]` rows of
    a canonical output, found by splitting bytes (at memory speed) rather
    than parsing; None unless that split is provably the JSON structure.
    It does not say the pieces are JSON: `valid_flat_rows` does.

    Proof: with no bracket but the rows' own (two per row and the outer
    pair), no key or value list holds one. So every `]],["` separates two
    rows, the first `[` after a row's key opens its (flat) value list, and
    the `",[` before it ends the key, escaped quotes and all. Replacing the
    separators by `",[` then leaves exactly one `",[` after each key and
    after each row's values.
    """
    if text == b"[]":
        return [], []
    if not (text.startswith(b'[["') and text.endswith(b"]]]")):
        return None
    inner = text[3:-3]
    rows = inner.count(_ROW_SEPARATOR) + 1
    structural = 2 * rows + 1
    if text.count(b"[") != structural or text.count(b"]") != structural:
        return None
    parts = inner.replace(_ROW_SEPARATOR, _KEY_END).split(_KEY_END)
    if len(parts) != 2 * rows:
        return None
    return parts[0::2], parts[1::2]


# Each byte of a value list as its class: 0, another digit, a comma, a
# minus, or "x" for anything else.
_NUMBER_CLASSES = bytes(
    48 if i == 48 else 49 if 49 <= i <= 57 else i if i in b",-" else 120 for i in range(256)
)
_NOT_INTEGER_LISTS = (b"x", b",,", b"--", b"-,", b"0-", b"1-", b",00", b",01", b"-00", b"-01")
_KEY_ESCAPE_OR_CONTROL = re.compile(rb'[\x00-\x1f"\\]')


class FlatRows(NamedTuple):
    """A map output's canonical text, proved JSON, and its split."""

    text: bytes
    keys: list[bytes]
    bodies: list[bytes]


def valid_flat_rows(text: bytes) -> FlatRows | None:
    """`flat_rows(text)` when it is also provably valid JSON of that shape
    with integer values (a word count's, a histogram's): at memory speed,
    where decoding a map output to check it costs about 30 ms a megabyte.
    None means "not proved": decode it to know.

    Proof: given the split, the text is JSON iff each key is a JSON string's
    body and each value list a JSON list's. A key with no quote, backslash
    or control character, in valid UTF-8, is one. The non-empty value lists
    joined by commas hold only digits, commas and minus signs, no empty
    item (no leading, trailing or doubled comma), every minus at an item's
    start and before a digit, no 0 before a digit at an item's start: so
    each item is `-?(0|[1-9][0-9]*)`, a JSON integer.
    """
    found = flat_rows(text)
    if found is None:
        return None
    keys, bodies = found
    joined_keys = b"".join(keys)
    if _KEY_ESCAPE_OR_CONTROL.search(joined_keys):
        return None
    try:
        joined_keys.decode()
    except UnicodeDecodeError:
        return None
    values = b",".join([body for body in bodies if body]).translate(_NUMBER_CLASSES)
    if values.startswith((b",", b"00", b"01")) or values.endswith((b",", b"-")):
        return None
    if any(pattern in values for pattern in _NOT_INTEGER_LISTS):
        return None
    return FlatRows(text, keys, bodies)


def flat_row(key: bytes, bodies: list[bytes]) -> bytes:
    """One `["key",[values]]` row from a key's text and its value lists'
    bodies (from `flat_rows`): the reduce input, written without decoding."""
    return b'["%b",[%b]]' % (key, b",".join(bodies))
