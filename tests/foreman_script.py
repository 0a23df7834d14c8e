"""A foreman in a process of its own, for the tests that kill one mid-job:
`python -m tests.foreman_script DISCOVERY IDENTITY SECONDS_PER_RECORD RECORDS`."""

from __future__ import annotations

import sys

import ec262


def slow_words(key, line):
    import time

    time.sleep(float(line.split()[0]))
    yield key, 1


def total(key, values):
    return sum(values)


if __name__ == "__main__":
    discovery, identity, seconds, records = sys.argv[1:5]
    data = {f"r{i}": f"{seconds} words" for i in range(int(records))}
    print("starting", flush=True)
    job = ec262.Job(discovery=discovery, identity=identity, progress=False, chunk_bytes=16,
                    mapper=slow_words, reducer=total)  # fmt: skip
    print(job.run(data), flush=True)
