"""A discovery service and a few workers on this machine, as child
processes: what `run_job` starts when no discovery service is configured,
and what `ec262 cluster` keeps running for repeated jobs."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ec262.processes import ServerProcess, spawn_server

logger = logging.getLogger(__name__)

LOCAL_STARTING_CREDITS = 1_000_000  # your own machine: credits are only bookkeeping


class LocalCluster:
    """`with LocalCluster(workers=3) as cluster: cluster.address`."""

    def __init__(
        self,
        workers: int = 3,
        *,
        slots: int = 2,
        directory: str | None = None,
        starting_credits: int = LOCAL_STARTING_CREDITS,
        replication: int = 3,
        worker_args: tuple[str, ...] = (),
    ) -> None:
        if workers < 1:
            raise ValueError("a local cluster needs at least one worker")
        self.workers_wanted = workers
        self.slots = slots
        self.starting_credits = starting_credits
        self.replication = replication
        self.worker_args = worker_args
        self._owned_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ec262-cluster-"))
        self.discovery: ServerProcess | None = None
        self.workers: list[ServerProcess] = []

    @property
    def address(self) -> str:
        assert self.discovery is not None, "the cluster is not running"
        return self.discovery.address

    @property
    def foreman_identity(self) -> Path:
        return self.directory / "foreman.json"

    def start(self) -> LocalCluster:
        try:
            self.discovery = spawn_server(
                [
                    "discovery",
                    "--port",
                    "0",
                    "--store",
                    f"sqlite:///{self.directory / 'ledger.sqlite3'}",
                    "--starting-credits",
                    str(self.starting_credits),
                    "--replication",
                    str(self.replication),
                ]
            )
            with ThreadPoolExecutor(max_workers=self.workers_wanted) as pool:
                started = list(pool.map(self._spawn_worker, range(self.workers_wanted)))
            self.workers.extend(started)
            for worker in self.workers:
                worker.wait_for("registered with discovery")
        except BaseException:
            self.close()
            raise
        logger.info("local cluster: discovery %s, %d worker(s)", self.address, len(self.workers))
        return self

    def add_workers(self, count: int = 1) -> list[ServerProcess]:
        """`count` more workers (started together), registered when this returns."""
        first = len(self.workers)
        with ThreadPoolExecutor(max_workers=count) as pool:
            added = list(pool.map(self._spawn_worker, range(first, first + count)))
        self.workers.extend(added)
        for worker in added:
            worker.wait_for("registered with discovery")
        return added

    def _spawn_worker(self, number: int) -> ServerProcess:
        identity = str(self.directory / f"worker{number}.json")
        return spawn_server(
            [
                "worker",
                "-P",
                "0",
                "--discovery",
                self.address,
                "--slots",
                str(self.slots),
                "--identity",
                identity,
                "-v",
                *self.worker_args,
            ]
        )

    def close(self) -> None:
        for server in [*self.workers, *([self.discovery] if self.discovery else [])]:
            with contextlib.suppress(Exception):
                if server.stop() != 0:
                    logger.debug("server exited with %s", server.process.returncode)
            with contextlib.suppress(Exception):
                server.kill()
        self.workers.clear()
        self.discovery = None
        if self._owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
