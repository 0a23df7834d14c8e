"""A foreman run on a host of a test network (tests/netns.py):
`python -m tests.netns_foreman job|credits --discovery HOST:PORT --identity PATH`.

`job` runs a word count of generated text with every default (no host, no
certificate: the result server's address and the discovery certificate
are found as a user on that machine would get them) and prints one JSON
line: the result, the sequential result, the foreman's address and its
credits before and after. `credits` prints the identity's balance. An
ec262 error is printed as `{"error": TYPE, "message": ...}`.
"""

from __future__ import annotations

import argparse
import json
import sys

import ec262
from ec262.discovery_client import DiscoveryClient
from tests.job_harness import sequential, sum_reducer, word_mapper

INPUT_MARKER = "quixoticnetnsmarker"
DATA = {f"doc{n}": f"alpha beta {INPUT_MARKER}{n % 7} gamma alpha" * 20 for n in range(60)}


def _credits(address: str, identity: str) -> int:
    from pathlib import Path

    with DiscoveryClient(address) as client:
        client.load_or_create_identity(Path(identity))
        return int(client.get_client().credits)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["job", "credits"])
    parser.add_argument("--discovery", required=True)
    parser.add_argument("--identity", required=True)
    args = parser.parse_args()
    try:
        if args.mode == "credits":
            print(json.dumps({"credits": _credits(args.discovery, args.identity)}))
            return 0
        before = _credits(args.discovery, args.identity)
        result = ec262.run_job(
            DATA,
            mapper=word_mapper,
            reducer=sum_reducer,
            discovery=args.discovery,
            identity=args.identity,
            progress=False,
            chunk_bytes=8192,
        )
        print(
            json.dumps(
                {
                    "right": result == sequential(DATA, word_mapper, sum_reducer),
                    "foreman_address": result.stats.foreman_address,
                    "before": before,
                    "after": _credits(args.discovery, args.identity),
                    "validated": result.stats.tasks_validated,
                }
            )
        )
    except ec262.Ec262Error as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error)}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
