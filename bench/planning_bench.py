"""Foreman memory and planning time per input record (issue 16, item 2).

    .venv/bin/python bench/planning_bench.py [--records 1000000]

Each measurement runs in a fresh process, so its peak RSS is its own. The
input is a dict of `--records` lines (the lines bench's data). Reported:
  plan          plan_job over the dict: seconds, and the peak RSS beyond
                the process with its input built, per record
  floor         one orjson.dumps of list(data.items()): the least a
                planner that encodes the input must spend, measured the
                same way in its own process
  job           (--job) a whole replication-1 run_job on a local cluster:
                the foreman's peak RSS beyond its input, per record
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(what: str, records: int) -> dict:
    """Runs in the child: build the input, then `what`; the peak beyond the
    input (ru_maxrss is a high-water mark, so the input is built first and
    its own peak noted)."""
    import gc

    from lines_bench import make_lines

    data = {f"l{n}": line for n, line in enumerate(make_lines(records))}
    gc.collect()
    base = max(_rss_bytes(), _peak_bytes())
    started = time.perf_counter()
    if what == "plan":
        from foreman_service.planning import input_rows, plan_job

        plan = plan_job(input_rows(data), balance=10**9, replication=3)
        extra = {"chunks": len(plan.map_chunks), "input_bytes": plan.input_bytes}
    elif what == "floor":
        import orjson

        extra = {"input_bytes": len(orjson.dumps(list(data.items())))}
    else:
        from lines_bench import split_line, total

        import ec262
        from ec262.local_cluster import LocalCluster

        with LocalCluster(workers=2) as cluster:
            base = max(_rss_bytes(), _peak_bytes())
            started = time.perf_counter()
            result = ec262.run_job(
                data, mapper=split_line, reducer=total, replication=1,
                discovery=cluster.address, identity=cluster.foreman_identity, progress=False,
            )  # fmt: skip
        extra = {"words": len(result)}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_beyond_input": _peak_bytes() - base, **extra}


def in_child(what: str, records: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, "--records", str(records)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--job", action="store_true", help="also a whole job's foreman peak")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.records)))
        return 0
    n = args.records
    rows = [("floor: one orjson.dumps", in_child("floor", n)), ("plan_job", in_child("plan", n))]
    if args.job:
        rows.append(("run_job, replication 1", in_child("job", n)))
    floor = rows[0][1]["seconds"]
    print(f"{n} records ({rows[0][1]['input_bytes'] / 1e6:.1f} MB of canonical JSON)")
    print(f"{'':26} {'seconds':>8} {'x floor':>8} {'peak beyond input':>18} {'per record':>11}")
    for name, got in rows:
        peak = got["peak_beyond_input"]
        print(
            f"  {name:24} {got['seconds']:>8.2f} {got['seconds'] / floor:>8.1f}"
            f" {peak / 1e6:>15.0f} MB {peak / n:>9.0f} B"
        )
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
