"""Between map and reduce: map outputs merged by key in chunk order (so each
key's values come in the order a sequential run produces them), then cut
into reduce chunks. Merging happens as map results arrive, overlapping the
map phase, in chunk order.

Map outputs arrive as canonical JSON text (split and joined as bytes by
`ec262.encoding`, where the proofs are). When every key is a string and
every value list is flat (word counts and most jobs), they are merged as
text: each key's value-list bodies are concatenated without decoding a
single value, and the reduce rows are written by joining bytes; decoding
and re-encoding the intermediate data was most of the foreman's work. Any
other output switches the shuffle to decoded objects, with the same result.
"""

from __future__ import annotations

import math
from typing import Any

from ec262.encoding import (
    FlatRows,
    canonical_bytes,
    decode_result,
    flat_row,
    flat_rows,
    join_blocks,
)
from foreman_service.planning import split_evenly

MIN_REDUCE_CHUNKS = 4


class Shuffle:
    def __init__(self, chunks: int) -> None:
        self._pending: dict[int, bytes] = {}
        self._merged: list[bytes] = []  # in order; kept to re-merge as objects if needed
        self._next = 0
        self._chunks = chunks
        self._bodies: dict[bytes, list[bytes]] | None = {}  # text mode
        self.grouped: dict[Any, list] | None = None  # object mode

    @property
    def text_mode(self) -> bool:
        return self._bodies is not None

    def add(self, index: int, output: bytes, rows: FlatRows | None = None) -> None:
        """The canonical JSON map output of chunk `index` (and its split,
        when the foreman proved it: not split twice); merged once all
        chunks before it are."""
        self._pending[index] = (output, rows)
        while self._next in self._pending:
            text, rows = self._pending.pop(self._next)
            self._merged.append(text)
            if self._bodies is not None and not self._merge_text(text, rows):
                self._switch_to_objects()
            elif self._bodies is None:
                self._merge_objects(decode_result(text))
            self._next += 1

    def _merge_text(self, text: bytes, rows: FlatRows | None) -> bool:
        """Merge one output as text; False (changing nothing: the caller
        re-merges everything as objects) if it is not flat."""
        found = flat_rows(text) if rows is None else (rows.keys, rows.bodies)
        if found is None:
            return False
        bodies = self._bodies
        for key, body in zip(*found, strict=True):
            parts = bodies.get(key)
            if parts is None:
                bodies[key] = [body] if body else []
            elif body:
                parts.append(body)
        return True

    def _switch_to_objects(self) -> None:
        self._bodies, self.grouped = None, {}
        for text in self._merged:
            self._merge_objects(decode_result(text))

    def _merge_objects(self, output: dict[Any, list]) -> None:
        grouped = self.grouped
        for key, values in output.items():
            bucket = grouped.setdefault(key, values)
            if bucket is not values:
                bucket.extend(values)

    def reduce_chunks(self, count: int, chunk_bytes: int = 1 << 20) -> list[bytes]:
        """At most `count` reduce chunks of similar size, keys in the order
        they first appeared (deterministic: input order; every replica of a
        task gets the same bytes anyway). No more chunks than the data
        fills (a task costs RPCs and credits), but a few at least, so that
        workers reduce in parallel.

        Called once, at the end of the map phase: the merged outputs are
        released (tens of thousands of lists the foreman's collector would
        otherwise keep walking through the reduce phase)."""
        if self._bodies is not None:
            rows = [flat_row(key, parts) for key, parts in self._bodies.items()]
            weights = [len(row) + 1 for row in rows]
            encode = join_blocks
        else:
            rows = [[key, values] for key, values in self.grouped.items()]
            weights = [2 * len(values) + 8 for values in self.grouped.values()]
            encode = _encode_rows
        self._merged = []
        if self._bodies is not None:
            self._bodies = {}
        else:
            self.grouped = {}
        if not rows:
            return []
        count = min(count, max(MIN_REDUCE_CHUNKS, math.ceil(sum(weights) / chunk_bytes)))
        return [encode(group) for group in split_evenly(rows, weights, count)]


def _encode_rows(rows: list) -> bytes:
    return canonical_bytes(rows)
