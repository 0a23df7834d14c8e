"""Word count over Python's own standard library, on ec262, checked against
a sequential run: `python examples/stdlib_wordcount.py [--megabytes 5]`.

With no discovery service configured it starts a local cluster (a discovery
service and 3 worker processes) for the job, like example.py.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import ec262

WORD = re.compile(r"[A-Za-z_]+")


def stdlib_text(megabytes: float) -> dict[str, str]:
    """Source files of the standard library, in a fixed order, up to a size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, str] = {}
    size = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts[str(path.relative_to(root))] = text
        size += len(text)
        if size >= megabytes * 1e6:
            break
    return texts


@ec262.mapper
def words(path, text):
    for word in WORD.findall(text):
        yield word.lower(), 1


@ec262.reducer
def total(word, counts):
    return sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=5.0)
    args = parser.parse_args()
    data = stdlib_text(args.megabytes)
    size = sum(map(len, data.values())) / 1e6
    print(f"word count over {len(data)} standard-library files ({size:.1f} MB)")
    started = time.perf_counter()
    expected = Counter(w.lower() for text in data.values() for w in WORD.findall(text))
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    result = ec262.run_job(data)
    distributed = time.perf_counter() - started
    print(f"most common: {', '.join(f'{w} {n}' for w, n in Counter(result).most_common(8))}")
    print(
        f"ec262: {distributed:.2f} s (local cluster start included); one process without"
        f" replication or sandboxes: {sequential:.2f} s"
    )
    if not sys.stderr.isatty():  # on a terminal the progress display printed it already
        print(result.stats.summary())
    if dict(expected) != dict(result):
        print("MISMATCH with the sequential count", file=sys.stderr)
        return 1
    print(f"same {len(result)} counts as the sequential run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
