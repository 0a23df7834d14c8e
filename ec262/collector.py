"""The garbage collector's pace while bulk data is built and kept.

A task, or a job at the foreman, allocates millions of objects that live
until it ends (a map output's lists, a reduce input's rows, the caller's
input records, the shuffle's per-key lists): with CPython's default gen-0
threshold of 700 the collector re-walks them over and over (a third of the
time of decoding a reduce chunk; half the foreman's shuffle). Garbage
cycles still go, a little later.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

BULK_GC_THRESHOLDS = (50_000, 20, 100)


@contextmanager
def bulk_allocation() -> Iterator[None]:
    """BULK_GC_THRESHOLDS inside, the caller's thresholds restored after
    (they are process-wide: a foreman in someone's program must not keep
    ours)."""
    before = gc.get_threshold()
    gc.set_threshold(*BULK_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
