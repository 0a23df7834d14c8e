"""Planning a job before spending a credit: the input cut into map chunks by
bytes, and the number of chunks bounded by what the foreman can afford."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ec262.encoding import join_blocks, pairs_blocks
from ec262.errors import EncodingError, InsufficientCredits

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB of canonical JSON per map task
MAX_CHUNK_BYTES = 32 << 20  # under ec262.defaults.MAX_ROWS_BYTES
MAX_REDUCE_CHUNKS = 64
# Chunks are cut between blocks of encoded rows, a block about a sixteenth
# of a chunk: chunks even to a few percent, a thousand rows per encoder call.
BLOCKS_PER_CHUNK = 16
MAX_BLOCK_BYTES = 256 << 10


@dataclass(frozen=True)
class Plan:
    map_chunks: list[bytes]  # canonical JSON rows of each map task
    reduce_chunks: int
    replication: int
    input_bytes: int

    @property
    def tasks(self) -> int:
        return len(self.map_chunks) + self.reduce_chunks

    @property
    def credits_needed(self) -> int:
        return self.tasks * self.replication


def input_rows(data: Mapping | Sequence | Iterable) -> Iterable[tuple[Any, Any]]:
    """(key, value) rows of the job's input: a dict's items, or a list's
    (index, item) pairs as mincemeat did. An iterable, not a list: the
    plan encodes it a block at a time, so no row object outlives its block."""
    if isinstance(data, Mapping):
        return data.items()
    if isinstance(data, str | bytes):
        raise TypeError("run_job needs a dict (or a list) of records, not a single string")
    return enumerate(data)


def _encoded_blocks(rows: Iterable[tuple[Any, Any]], block_bytes: int) -> tuple[list[bytes], int]:
    """The rows' canonical text in blocks (see `pairs_blocks`), and how many
    rows there were."""
    blocks: list[bytes] = []
    count = 0
    try:
        for text, pairs in pairs_blocks(rows, block_bytes):
            blocks.append(text)
            count += pairs
    except EncodingError as error:
        raise EncodingError(f"an input record cannot be sent as JSON: {error}") from None
    return blocks, count


def plan_job(
    rows: Iterable[tuple[Any, Any]],
    *,
    balance: int,
    replication: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Plan:
    """The whole job's plan, or InsufficientCredits before anything is spent.

    Map chunks are about `chunk_bytes` each; when the balance cannot pay for
    that many tasks, chunks grow (fewer tasks) up to MAX_CHUNK_BYTES. Reduce
    tasks are as many as map tasks (at most MAX_REDUCE_CHUNKS) within what
    remains affordable. Retries are paid from refunds (an invalid task is
    refunded before its chunk is retried), so the plan's credits suffice.

    Rows are encoded in blocks of about a sixteenth of a chunk, and chunks
    are cut between blocks: the foreman holds the input's canonical text
    and one chunk's copy of it, and no object per row.
    """
    block_bytes = max(1, min(MAX_BLOCK_BYTES, chunk_bytes // BLOCKS_PER_CHUNK))
    blocks, count = _encoded_blocks(rows, block_bytes)
    if not count:
        return Plan(map_chunks=[], reduce_chunks=0, replication=replication, input_bytes=0)
    total = sum(map(len, blocks)) + len(blocks) + 1  # the text of one list of every row
    affordable = balance // replication
    if affordable < 2:
        raise InsufficientCredits(
            2 * replication,
            balance,
            f"not enough credits: the smallest job (1 map + 1 reduce task x {replication}"
            f" workers) needs {2 * replication}, the account has {balance}",
        )
    wanted_maps = max(1, min(count, math.ceil(total / chunk_bytes)))
    wanted_reduces = max(1, min(wanted_maps, MAX_REDUCE_CHUNKS))
    if wanted_maps + wanted_reduces > affordable:
        maps = max(1, (affordable * wanted_maps) // (wanted_maps + wanted_reduces))
        reduces = max(1, min(wanted_reduces, affordable - maps))
        maps = affordable - reduces if maps + reduces > affordable else maps
    else:
        maps, reduces = wanted_maps, wanted_reduces
    if math.ceil(total / maps) > MAX_CHUNK_BYTES:
        needed_maps = math.ceil(total / MAX_CHUNK_BYTES)
        needed = (needed_maps + 1) * replication
        raise InsufficientCredits(
            needed,
            balance,
            f"not enough credits: {total} bytes of input need at least {needed_maps} map tasks"
            f" of at most {MAX_CHUNK_BYTES} bytes, so {needed} credits; the account has {balance}",
        )
    return Plan(
        map_chunks=_chunks_of(blocks, maps),
        reduce_chunks=reduces,
        replication=replication,
        input_bytes=total,
    )


def split_evenly(items: list, weights: list[int], count: int) -> list[list]:
    """Consecutive items into at most `count` groups of similar weight, in
    order (so values reach each key in the order a sequential run sees
    them). Never more than `count`: the plan paid for that many tasks.
    Cut points come from running totals and a bisect per group, not a step
    per item: reduce input has one item per distinct key."""
    count = max(1, min(count, len(items)))
    before = list(itertools.accumulate(weights, initial=0))  # weight before each item
    share = before.pop() / count
    cuts = [bisect.bisect_left(before, share * part) for part in range(1, count)]
    bounds = [0, *cuts, len(items)]
    groups = [items[a:b] for a, b in itertools.pairwise(bounds)]
    return [group for group in groups if group]


def _chunks_of(blocks: list[bytes], count: int) -> list[bytes]:
    """Encoded blocks into at most `count` chunks of canonical JSON, each
    block let go once its chunk is joined (the peak is the input's text
    and one chunk, not two copies of the input)."""
    groups = split_evenly(blocks, [len(b) + 1 for b in blocks], count)
    blocks.clear()
    chunks = []
    for at, group in enumerate(groups):
        chunks.append(join_blocks(group))
        groups[at] = []
    return chunks
