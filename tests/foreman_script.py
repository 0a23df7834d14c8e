"""A foreman in a process of its own, for the tests that kill one mid-job:
`python -m tests.foreman_script DISCOVERY IDENTITY SECONDS_PER_RECORD RECORDS`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import ec262


def interruptible_as_in_a_terminal(identity: str) -> None:
    """Ctrl-C as a user at a terminal sends it: SIGINT handled by Python,
    not blocked. A test process can pass this script an ignored or blocked
    SIGINT (both survive fork and exec; a shell without job control starts
    its background jobs with SIGINT ignored, as POSIX says, so `make test &`
    in a script does), and the test would then measure that instead of the
    foreman; what was inherited is noted beside the identity file."""
    inherited = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if inherited is not signal.default_int_handler or blocked:
        Path(identity).with_suffix(".signals").write_text(
            f"SIGINT inherited as {inherited!r}, blocked: {blocked}\n"
        )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])


def slow_words(key, line):
    import time

    time.sleep(float(line.split()[0]))
    yield key, 1


def total(key, values):
    return sum(values)


if __name__ == "__main__":
    discovery, identity, seconds, records = sys.argv[1:5]
    interruptible_as_in_a_terminal(identity)
    data = {f"r{i}": f"{seconds} words" for i in range(int(records))}
    print("starting", flush=True)
    job = ec262.Job(discovery=discovery, identity=identity, progress=False, chunk_bytes=16,
                    mapper=slow_words, reducer=total)  # fmt: skip
    print(job.run(data), flush=True)
