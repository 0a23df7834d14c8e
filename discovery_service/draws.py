"""Drawing a request's workers from an index of the free pool, by rejection.

Why: RequestTasks and AddReplica must cost O(replication x n), not
O(pool) (issue 16, item 5). A store keeps an index of its workers with a
free slot that it can read at a random position in O(log n) (SQLite: a
dense position column; Redis: a sorted set read by rank). Each pick draws a
random position and keeps the worker there only when it is eligible for
this pick: a candidate of the request at all (live, of its runtime, not the
foreman, not excluded), with a slot this request has not taken yet, no
spread key (address or network) shared with the group's other workers, and
of the class the trust rule asks for. Conditioned on being kept, a draw is
uniform over the eligible workers, so every pick has the distribution of
the exact draw over the whole list (docs/protocol.md section 10); how a
pick was found never depends on which worker it found.

When rejections pile up (the eligible set is a small fraction of the index:
the pool is mostly one network, or runs another runtime, or the trust rule
wants trusted workers and few are), the draw falls back to the exact scan
the stores did before: it lists every candidate once and draws the rest of
the request from that list, so behaviour is never wrong, only slower in
those cases. A pick restricted to one trust class first asks the index for
that class's members when there are at most FEW_OF_A_CLASS of them (an
index range on trust), so a pool with a handful of trusted workers costs a
short list, not a scan.

`ledger.choose_workers` runs this over a plain list of candidates; the
SQLite store over its `free_pool` table; the Redis store's assignment
scripts (`redis_store._DRAW`) do the same steps in Lua.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from discovery_service.store import MAX_SLOTS_PER_REQUEST, Candidate, GroupRule

# Random positions tried for one pick before the exact scan. Past this many
# the eligible workers are under a few percent of the index (0.95^64 < 4 %).
DRAW_ATTEMPTS = 64
# A trust class with at most this many members is listed, not sampled.
FEW_OF_A_CLASS = 64


class FreePool(Protocol):
    """An index of a request's possible workers (docs: module)."""

    def size(self) -> int:
        """The index's positions are 0 .. size() - 1 (fixed for a draw)."""

    def at(self, position: int) -> Candidate | None:
        """The worker at `position` when it is a candidate for this request
        (live, of its runtime, neither the foreman nor excluded), else None."""

    def members(self, trusted: bool | None, limit: int | None = None) -> list[Candidate] | None:
        """Every candidate with a free slot (`trusted` None), or those of one
        trust class; None when that class has more than `limit` workers."""


class CandidateList:
    """A FreePool over a list already read (the candidates themselves)."""

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        self._candidates = candidates

    def size(self) -> int:
        return len(self._candidates)

    def at(self, position: int) -> Candidate | None:
        return self._candidates[position]

    def members(self, trusted: bool | None, limit: int | None = None) -> list[Candidate] | None:
        found = [c for c in self._candidates if trusted is None or c.trusted == trusted]
        return None if limit is not None and len(found) > limit else found


def _uniform(choices: Sequence[Candidate], rng: random.Random) -> Candidate | None:
    return choices[int(rng.random() * len(choices))] if choices else None


class _Draw:
    """One request's picks: what it has taken so far, and (after a pick ran
    out of attempts) every candidate, listed once."""

    def __init__(self, pool: FreePool, rng: random.Random, attempts: int) -> None:
        self.pool = pool
        self.rng = rng
        self.attempts = attempts
        self.size = pool.size()
        self.everyone: list[Candidate] | None = None
        self.classes: dict[bool, list[Candidate] | None] = {}

    def one(self, ok: Callable[[Candidate], bool], trusted: bool | None) -> Candidate | None:
        """A uniform pick among the candidates `ok` accepts (of class
        `trusted` unless None); None when there is none."""

        def fits(candidate: Candidate | None) -> bool:
            return (
                candidate is not None
                and (trusted is None or candidate.trusted == trusted)
                and ok(candidate)
            )

        if self.everyone is None and trusted is not None:
            if trusted not in self.classes:
                self.classes[trusted] = self.pool.members(trusted, FEW_OF_A_CLASS)
            few = self.classes[trusted]
            if few is not None:
                return _uniform([c for c in few if fits(c)], self.rng)
        if self.everyone is None:
            for _ in range(self.attempts if self.size else 0):
                candidate = self.pool.at(int(self.rng.random() * self.size))
                if fits(candidate):
                    return candidate
            self.everyone = self.pool.members(None) or []
        return _uniform([c for c in self.everyone if fits(c)], self.rng)


def draw_groups(
    pool: FreePool,
    rules: Sequence[GroupRule],
    rng: random.Random,
    *,
    spread: str,
    taken: frozenset[str] = frozenset(),
    untrusted_taken: int = 0,
    attempts: int = DRAW_ATTEMPTS,
) -> list[list[Candidate]]:
    """A group of workers per rule, in order, stopping at the first group
    that cannot be filled: the rules of `ledger.choose_workers`, each pick
    uniform over the workers eligible for it (docs: module)."""
    draw = _Draw(pool, rng, attempts)
    used: Counter[str] = Counter()  # slots of each worker this request took
    groups: list[list[Candidate]] = []
    for rule in rules:
        chosen: list[Candidate] = []
        keys = set(taken)
        untrusted = untrusted_taken

        def ok(candidate: Candidate, keys: set[str] = keys) -> bool:
            room = min(candidate.free_slots, MAX_SLOTS_PER_REQUEST)
            return used[candidate.client_id] < room and candidate.spread_key(spread) not in keys

        while len(chosen) < rule.size:
            only_trusted = rule.cap is not None and untrusted >= rule.cap
            pick = None
            if rule.untrusted_first and not chosen and not only_trusted:
                pick = draw.one(ok, trusted=False)
            if pick is None:
                pick = draw.one(ok, trusted=True if only_trusted else None)
            if pick is None:
                break
            chosen.append(pick)
            untrusted += not pick.trusted
            keys.add(pick.spread_key(spread))
        if len(chosen) < rule.size:
            break
        used.update(worker.client_id for worker in chosen)
        groups.append(chosen)
    return groups
