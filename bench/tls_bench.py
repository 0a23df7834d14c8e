"""What TLS costs a job (docs/protocol.md section 8), measured against the
same job in plaintext in the same run.

    .venv/bin/python bench/tls_bench.py [--rounds 5] [--megabytes 5] [--tiny 300]

Two local clusters run side by side for the whole run, the same in all but
TLS (discovery and 3 workers with 2 slots; `--tls` on every server of one,
so its foreman's result server serves TLS too). Round by round, so the
machine's drift hits both alike, each cluster runs:
  words  a word count of `--megabytes` of the standard library's source;
  tiny   `--tiny` one-record tasks (the per-task cost, where TLS's share is
         largest: every task is 5 discovery calls, 3 AssignTask and 3
         SubmitResult);
  no-op  1,000 health Checks on one channel to the cluster's discovery
         service (the floor of one RPC, plaintext or TLS).
Each job opens its channels anew (a new TLS handshake to every worker and
from every worker to the new result server), as a real foreman would.
The table gives medians and TLS / plaintext; the goal is at most 1.25.
The discovery service's own cycles/s with and without TLS are measured by
`bench/discovery_cycles.py --tls-compare`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ec262
from ec262 import tls
from ec262.local_cluster import LocalCluster
from tests.job_harness import stdlib_text, sum_reducer, word_mapper


def one(key, value):
    yield key, 1


def noop_ms(cluster: LocalCluster, calls: int = 1000) -> float:
    """Wall milliseconds per no-op RPC to the cluster's discovery service."""
    certificate = cluster.discovery_cert.read_bytes() if cluster.discovery_cert else None
    with tls.channel(cluster.address, certificate) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(50):
            stub.Check(request, timeout=10)
        started = time.perf_counter()
        for _ in range(calls):
            stub.Check(request, timeout=10)
        return (time.perf_counter() - started) / calls * 1e3


def run_job(cluster: LocalCluster, data: dict, **options) -> tuple[float, ec262.JobResult]:
    started = time.perf_counter()
    result = ec262.Job(
        discovery=cluster.address,
        discovery_cert=cluster.discovery_cert,
        identity=cluster.foreman_identity,
        progress=False,
        **options,
    ).run(data)
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=float, default=5.0)
    parser.add_argument("--tiny", type=int, default=300, help="one-record tasks in the tiny job")
    args = parser.parse_args()
    words = stdlib_text(args.megabytes)
    tiny = {f"k{i:05d}": i for i in range(args.tiny)}
    figures: dict[str, dict[str, list[float]]] = {
        kind: {"words s": [], "tiny ms/task": [], "no-op ms": []} for kind in ("plain", "tls")
    }
    with (
        tempfile.TemporaryDirectory() as plain_dir,
        tempfile.TemporaryDirectory() as tls_dir,
        LocalCluster(workers=3, slots=2, directory=plain_dir) as plain,
        LocalCluster(workers=3, slots=2, directory=tls_dir, tls=True) as secure,
    ):
        clusters = {"plain": plain, "tls": secure}
        for cluster in clusters.values():  # warm: identities, function caches
            run_job(cluster, dict(list(tiny.items())[:6]), mapper=one, reducer=sum_reducer)
        for round_number in range(args.rounds):
            order = list(clusters) if round_number % 2 == 0 else list(reversed(clusters))
            for name in order:
                cluster = clusters[name]
                seconds, _ = run_job(cluster, words, mapper=word_mapper, reducer=sum_reducer)
                figures[name]["words s"].append(seconds)
                seconds, result = run_job(
                    cluster, tiny, mapper=one, reducer=sum_reducer, chunk_bytes=1
                )
                tasks = result.stats.tasks_validated
                figures[name]["tiny ms/task"].append(seconds / tasks * 1e3)
                figures[name]["no-op ms"].append(noop_ms(cluster))
            print(
                f"round {round_number + 1}/{args.rounds}: "
                + ", ".join(
                    f"{name} words {figures[name]['words s'][-1]:.2f} s"
                    f" tiny {figures[name]['tiny ms/task'][-1]:.2f} ms/task"
                    for name in clusters
                ),
                file=sys.stderr,
                flush=True,
            )
    print(f"\n{args.megabytes:g} MB word count, {args.tiny} tiny tasks, medians of {args.rounds}")
    print(f"{'figure':14} {'plaintext':>10} {'TLS':>10} {'TLS / plain':>12}")
    for figure in ("words s", "tiny ms/task", "no-op ms"):
        plain_value = statistics.median(figures["plain"][figure])
        tls_value = statistics.median(figures["tls"][figure])
        print(f"{figure:14} {plain_value:10.3f} {tls_value:10.3f} {tls_value / plain_value:12.2f}")
    print("goal: TLS / plain <= 1.25 for jobs")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
