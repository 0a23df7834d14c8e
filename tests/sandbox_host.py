"""A sandbox pool in a process of its own, driven over a pipe: how the
escape tests run the corpus against a worker of another uid (an
unprivileged user, while the tests run as root).

Run as `python -m tests.sandbox_host FD LIMITS_JSON`; messages are pickled
tuples (both ends are the test's own code): ("run", key, payload, phase,
rows) -> (ok, plaintext); ("info",) -> dict; ("close",) -> "closed".
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

from worker_service.sandbox.pool import SandboxPool
from worker_service.sandbox.zygote import _limits_from_json


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    pool = SandboxPool(_limits_from_json(sys.argv[2]), size=2)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message[0] == "run":
            result = pool.run(*message[1:])
            conn.send((result.ok, result.plaintext))
        elif message[0] == "info":
            conn.send({"pid": os.getpid(), "uid": os.geteuid(), "zygote_pid": pool.zygote_pid,
                       "layers": pool.layers})  # fmt: skip
        elif message[0] == "close":
            break
    pool.close()
    conn.send("closed")


if __name__ == "__main__":
    main()
