"""A real worker process that cheats, for the foreman's end-to-end tests.

`python -m tests.cheating_worker MODE --discovery HOST:PORT --identity PATH`
runs the ordinary worker but, per MODE:
  wrong   sends a well-formed envelope of a wrong result, with the real key
          (every integer in the result plus 1);
  wrong2  the same with plus 2 (so two cheaters disagree with each other);
  silent  accepts tasks, computes them, and never answers;
  malformed  sends, sealed with the real key, what is no map output: a
          `["pwned", 999]` row whose value is not a list (two of them
          agree with each other: the colluders of docs/protocol.md
          section 10).
It prints `listening on HOST:PORT` and logs like a worker.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from ec262 import serving
from ec262.encoding import decode_pairs, encode_pairs
from ec262.processes import die_with_parent_if_asked
from worker_service.sandbox.pool import SandboxResult
from worker_service.server import WorkerConfig, start_worker


def _shift(value, by: int):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value + by
    if isinstance(value, list):
        return [_shift(v, by) for v in value]
    return value


@dataclass
class Tampering:
    """Wraps the real sandbox runner and falsifies what it computes."""

    inner: object
    shift: int

    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        honest = self.inner.run(digest, payload, phase, rows, cancel=cancel)
        pairs = [(k, _shift(v, self.shift)) for k, v in decode_pairs(honest.plaintext)]
        return SandboxResult(honest.ok, encode_pairs(pairs))


@dataclass
class Malformed:
    """Map outputs of the wrong shape; reduce outputs left honest."""

    inner: object

    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        honest = self.inner.run(digest, payload, phase, rows, cancel=cancel)
        if phase != 1:  # MAP
            return honest
        return SandboxResult(True, b'[["pwned",999]]')


def main() -> int:
    die_with_parent_if_asked()
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["wrong", "wrong2", "silent", "malformed"])
    parser.add_argument("--discovery", required=True)
    parser.add_argument("--identity", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    running = start_worker(
        WorkerConfig(port=0, discovery=args.discovery, identity=args.identity, slots=2)
    )
    if args.mode == "silent":
        running.worker._submit = lambda task, worker_id, ciphertext, cancel=None: None
    elif args.mode == "malformed":
        running.worker._sandbox = Malformed(running.pool)
    else:
        running.worker._sandbox = Tampering(running.pool, 1 if args.mode == "wrong" else 2)
    serving.announce("127.0.0.1", running.port)
    serving.wait_for_signal(lambda: running.stop(grace=1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
