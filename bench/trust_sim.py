"""How often colluders win a task's vote, with the real assignment policy
(`discovery_service.ledger.choose_workers`) and no processes
(docs/protocol.md section 10).

    .venv/bin/python bench/trust_sim.py [--tasks 10000] [--pool 100] [--seed 1]

A pool of `--pool` live workers, a fraction f of them colluding (they
return the same wrong result); each task draws 3 workers and is won by the
colluders when they hold 2 of them. Per f = 0.1, 0.2, 0.35, 0.5 and two
placements of the colluders' identities:
  one /24     Sybil identities on one operator's network (distinct hosts);
  spread      each colluding identity on a /24 of its own;
honest workers each on a /24 of their own. Columns: wrong results accepted
per 10,000 tasks with random choice (`--diversity identity`: distinct
identities and addresses only), with ec262's `--diversity network`, with
network diversity and the trust rule when the honest workers have earned
trust and the colluders are new (at most one untrusted worker per task
while a quorum of trusted ones is live), and the formula 3f^2 - 2f^3 for
random choice from an infinite pool.

What this shows and what it does not: network diversity defeats Sybils on
one network outright (at most one replica per /24), but colluders spread
over many networks are as strong as under random choice; against new
identities, wherever they are, the trust rule leaves them no quorum. It
does not cover turncoats that earned trust first (they are as strong as
under random choice until their first disagreeing commitment resets
them).

The second table is adaptive replication (`store.adaptive_rules`, the same
draws): a trusted pool of `--pool` workers, a fraction f of them turncoats
that collude, beside `--pool` / 3 new identities that all collude (a
Sybil flood, the worst case for the spot checks' untrusted worker). A task
of 2 whose workers disagree gets a third, drawn as AddReplica draws it
(a trusted one, store.replica_cap), which decides. Columns: wrong results
accepted per 10,000 tasks, the bound the job summary states
(ec262/replication.py `wrong_task_bound`), and credits per validated task
(2 per task of two, 3 per spot check or task that got a third). Trust is
static here: in the service a turncoat caught disagreeing loses its trust,
so the bound is the worst case.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery_service.ledger import choose_workers
from discovery_service.store import (
    IDENTITY,
    NETWORK,
    Candidate,
    GroupRule,
    adaptive_rules,
    replica_cap,
    untrusted_cap,
)
from ec262 import replication as replicas

FRACTIONS = (0.1, 0.2, 0.35, 0.5)
REPLICATION, QUORUM = 3, 2


def pool(
    size: int, fraction: float, placement: str, honest_trusted: bool = False
) -> tuple[list[Candidate], set[str]]:
    colluders = round(size * fraction)
    workers, bad = [], set()
    for number in range(size):
        client_id = f"w{number}"
        if number < colluders:
            bad.add(client_id)
            network = "10.66.6.0/24" if placement == "one /24" else f"10.1.{number}.0/24"
            host = f"10.66.6.{number + 1}" if placement == "one /24" else f"10.1.{number}.1"
        else:
            network, host = f"10.2.{number}.0/24", f"10.2.{number}.1"
        trusted = honest_trusted and client_id not in bad
        workers.append(Candidate(client_id, f"{host}:7000", 1, network, trusted))
    return workers, bad


def wrong_per_10k(
    workers: list[Candidate],
    bad: set[str],
    spread: str,
    tasks: int,
    rng: random.Random,
    untrusted_cap: int | None = None,
) -> float:
    wrong = 0
    for _ in range(tasks):
        [group] = choose_workers(
            workers,
            1,
            REPLICATION,
            rng,
            spread=spread,
            rules=[GroupRule(REPLICATION, untrusted_cap)],
        )
        if sum(w.client_id in bad for w in group) >= QUORUM:
            wrong += 1
    return wrong * 10_000 / tasks


def adaptive_pool(size: int, fraction: float) -> tuple[list[Candidate], set[str]]:
    """`size` trusted workers (a fraction of them colluding turncoats) and
    size / 3 new colluding identities, each on a /24 of its own."""
    workers, bad = [], set()
    for number in range(size + size // 3):
        trusted = number < size
        client_id = f"w{number}"
        if number < round(size * fraction) or not trusted:
            bad.add(client_id)
        network = f"10.{3 + number // 250}.{number % 250}"
        workers.append(Candidate(client_id, f"{network}.1:7000", 1, f"{network}.0/24", trusted))
    return workers, bad


def adaptive_run(
    workers: list[Candidate], bad: set[str], tasks: int, rng: random.Random
) -> tuple[float, float]:
    """(wrong per 10,000 tasks, credits per validated task)."""
    trusted_live = sum(w.trusted for w in workers)
    full = replicas.ADAPTIVE_FULL
    wrong = credits = 0
    for _ in range(tasks):
        rules = adaptive_rules([rng.random() < replicas.SPOT_CHECK_RATE], trusted_live)
        [group] = choose_workers(workers, 1, full, rng, spread=NETWORK, rules=rules)
        votes = [w.client_id in bad for w in group]
        if len(group) == 2 and votes[0] != votes[1]:  # they disagree: a third decides
            untrusted = sum(not w.trusted for w in group)
            [[third]] = choose_workers(
                [w for w in workers if w not in group],
                1,
                1,
                rng,
                spread=NETWORK,
                taken=frozenset(w.spread_key(NETWORK) for w in group),
                rules=[GroupRule(1, replica_cap(full, True, trusted_live, untrusted))],
                untrusted_taken=untrusted,
            )
            votes.append(third.client_id in bad)
        credits += len(votes)
        wrong += sum(votes) >= replicas.quorum(full)
    return wrong * 10_000 / tasks, credits / tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"{args.pool} live workers, {args.tasks} tasks each, 2 of 3 wins; wrong per 10,000 tasks")
    print(f"{'f':>5} {'placement':>9} {'random':>8} {'network':>8} {'+trust':>8} {'3f2-2f3':>8}")
    for fraction in FRACTIONS:
        for placement in ("one /24", "spread"):
            workers, bad = pool(args.pool, fraction, placement)
            plain = wrong_per_10k(workers, bad, IDENTITY, args.tasks, rng)
            diverse = wrong_per_10k(workers, bad, NETWORK, args.tasks, rng)
            trusted_pool, _ = pool(args.pool, fraction, placement, honest_trusted=True)
            cap = untrusted_cap(REPLICATION, len(trusted_pool) - len(bad))
            with_trust = wrong_per_10k(trusted_pool, bad, NETWORK, args.tasks, rng, cap)
            formula = (3 * fraction**2 - 2 * fraction**3) * 10_000
            print(
                f"{fraction:>5} {placement:>9} {plain:>8.0f} {diverse:>8.0f}"
                f" {with_trust:>8.0f} {formula:>8.0f}"
            )
    print("credits per validated task: 3")
    print(
        f"\nadaptive replication: {args.pool} trusted workers (a fraction f colluding),"
        f" {args.pool // 3} new colluding identities; wrong per 10,000 tasks"
    )
    print(f"{'f':>5} {'wrong':>8} {'bound':>8} {'credits/task':>13}")
    for fraction in (0.0, *FRACTIONS[:2]):
        workers, bad = adaptive_pool(args.pool, fraction)
        wrong, credits = adaptive_run(workers, bad, args.tasks, rng)
        bound = replicas.wrong_task_bound(fraction) * 10_000
        print(f"{fraction:>5} {wrong:>8.0f} {bound:>8.0f} {credits:>13.2f}")
    print(f"\ncommand: {' '.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
