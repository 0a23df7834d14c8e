"""A discovery service and workers, each behind its own delay line
(tests/delay_line.py), as the latency bench and the latency tests run
them: the workers advertise their line's address, so every call a foreman
or a worker makes to another party pays the delay each way."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ec262.local_cluster import LOCAL_STARTING_CREDITS, OWN_TRUST
from ec262.processes import PendingServer, spawn_server
from tests.delay_line import DelayLine


@dataclass(frozen=True)
class DelayedCluster:
    discovery: str  # the discovery service's line: what a foreman is given
    ledger: str  # the store's URL, to audit once the servers are down
    worker_lines: tuple[DelayLine, ...]  # each worker's, in front of it


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@contextlib.contextmanager
def delayed_cluster(
    delay: float, workers: int, directory: Path, name: str = "job", slots: int = 2
) -> Iterator[DelayedCluster]:
    """`workers` registered workers and their discovery service, `delay`
    seconds added each way in front of every one; all stopped on exit."""
    ledger = f"sqlite:///{directory / f'ledger-{name}-{delay}.sqlite3'}"
    with contextlib.ExitStack() as stack:
        discovery = spawn_server(
            ["discovery", "--host", "127.0.0.1", "--port", "0", "--store", ledger,
             "--starting-credits", str(LOCAL_STARTING_CREDITS)],
            env=OWN_TRUST,
        )  # fmt: skip
        stack.callback(discovery.kill)
        discovery_line = stack.enter_context(DelayLine(discovery.address, delay, "127.0.8.1"))
        pending, lines = [], []
        for n in range(workers):
            port = _free_port()
            line = stack.enter_context(
                DelayLine(f"127.0.0.1:{port}", delay, f"127.0.9.{n + 1}", port)
            )
            lines.append(line)
            command = [
                "worker", "--host", "127.0.0.1", "-P", str(port), "--advertise", line.host,
                "--discovery", discovery_line.address, "--slots", str(slots),
                "--identity", str(directory / f"w{name}-{delay}-{n}.json"), "-v",
            ]  # fmt: skip
            pending.append(PendingServer(command, env=OWN_TRUST))
        for launched in pending:
            worker = launched.listening()
            stack.callback(worker.kill)
            worker.wait_for("registered with discovery")
        yield DelayedCluster(discovery_line.address, ledger, tuple(lines))
