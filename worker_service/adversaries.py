"""Workers that misbehave on purpose, for the adversary lab
(`ec262 cluster --adversaries colluding:3,wrong:1,silent:1,slow:1`, and
`ec262 worker --adversary MODE`): a user watches the defences of
docs/protocol.md sections 9 and 10 work against them, and the tests use
the same code.

Each mode wraps one of the worker's two seams: the sandbox runner (what a
task computes) or the result submitter (what it sends). The worker is
otherwise the honest one: it registers, fetches keys, seals with the real
key, so its lies are well-formed and only the vote can catch them.
  colluding  every colluder returns the same wrong result (each integer + 1):
             together they can outvote honest workers where they meet;
  wrong      a wrong result of its own (each integer + a random shift):
             disagrees with everyone;
  malformed  what is no map output (a value that is not a list), the same
             for every such worker: colluders probing the foreman's checks;
  silent     takes tasks, computes them, never sends a result;
  slow       honest, but sends each result SLOW_SECONDS late.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from ec262.encoding import decode_pairs, encode_pairs
from worker_service.mapreduce import MAP
from worker_service.sandbox.pool import SandboxResult

MODES = ("colluding", "wrong", "malformed", "silent", "slow")
SLOW_SECONDS = 0.3
MALFORMED_OUTPUT = b'[["pwned",999]]'


def _shifted(value, by: int):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value + by
    if isinstance(value, list):
        return [_shifted(v, by) for v in value]
    return value


@dataclass
class Tampering:
    """The real sandbox runner, its results falsified."""

    inner: object
    mode: str
    shift: int

    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        honest = self.inner.run(digest, payload, phase, rows, cancel=cancel)
        if self.mode == "malformed":
            return SandboxResult(True, MALFORMED_OUTPUT) if phase == MAP else honest
        pairs = [(k, _shifted(v, self.shift)) for k, v in decode_pairs(honest.plaintext)]
        return SandboxResult(honest.ok, encode_pairs(pairs))

    def __getattr__(self, name: str):  # probe, close, ...: the real runner's
        return getattr(self.inner, name)


def check_mode(mode: str) -> str:
    if mode and mode not in MODES:
        raise ValueError(f"adversary mode {mode!r} is none of {', '.join(MODES)}")
    return mode


def sandbox_for(mode: str, pool):
    """The sandbox runner a worker of `mode` uses."""
    if mode in ("colluding", "malformed"):
        return Tampering(pool, mode, 1)
    if mode == "wrong":
        return Tampering(pool, mode, random.randrange(2, 2**40))
    return pool


def submit_for(mode: str, submit: Callable) -> Callable:
    """The result submitter a worker of `mode` uses."""
    if mode == "silent":
        return lambda task, worker_id, ciphertext, cancel=None: None
    if mode == "slow":

        def late(task, worker_id, ciphertext, cancel=None):
            time.sleep(SLOW_SECONDS)  # the misbehaviour itself
            return submit(task, worker_id, ciphertext, cancel=cancel)

        return late
    return submit


def parse_lab(text: str) -> list[str]:
    """`colluding:3,wrong:1` → one mode per adversary worker to start."""
    modes: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        mode, _, count = part.partition(":")
        check_mode(mode)
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"--adversaries {part!r}: the count after ':' is a positive number")
        modes += [mode] * (int(count) if count else 1)
    return modes
