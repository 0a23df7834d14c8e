"""Between map and reduce: map outputs merged by key in chunk order (so each
key's values come in the order a sequential run produces them), then cut
into reduce chunks. Merging happens as map results arrive, overlapping the
map phase, in chunk order."""

from __future__ import annotations

import math
from typing import Any

from ec262.encoding import canonical_json
from foreman_service.planning import split_evenly

MIN_REDUCE_CHUNKS = 4


class Shuffle:
    def __init__(self, chunks: int) -> None:
        self._pending: dict[int, dict[Any, list]] = {}
        self._next = 0
        self._chunks = chunks
        self.grouped: dict[Any, list] = {}

    def add(self, index: int, output: dict[Any, list]) -> None:
        """The map output of chunk `index`; merged once all before it are.
        Its lists are adopted, not copied (they were just decoded)."""
        self._pending[index] = output
        grouped = self.grouped
        while self._next in self._pending:
            for key, values in self._pending.pop(self._next).items():
                bucket = grouped.setdefault(key, values)
                if bucket is not values:
                    bucket.extend(values)
            self._next += 1

    def reduce_chunks(self, count: int, chunk_bytes: int = 1 << 20) -> list[bytes]:
        """At most `count` reduce chunks of similar size, keys in the order
        they first appeared (deterministic: input order; every replica of a
        task gets the same bytes anyway); each chunk encoded in one call (a
        call per key costs more than the encoding itself)."""
        rows = [[key, values] for key, values in self.grouped.items()]
        if not rows:
            return []
        weights = [len(values) + 1 for values in self.grouped.values()]
        # No more chunks than the data fills (a task costs RPCs and credits),
        # but a few at least, so that workers reduce in parallel.
        count = min(count, max(MIN_REDUCE_CHUNKS, math.ceil(sum(weights) / chunk_bytes)))
        return [canonical_json(group).encode() for group in split_evenly(rows, weights, count)]
