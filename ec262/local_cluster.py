"""A discovery service and a few workers on this machine, as child
processes: what `run_job` starts when no discovery service is configured,
and what `ec262 cluster` keeps running for repeated jobs."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ec262.discovery_trust import ENV_DISCOVERY_CERT
from ec262.processes import PendingServer, ServerProcess, spawn_server
from ec262.tls import CERT_FILE

logger = logging.getLogger(__name__)

LOCAL_STARTING_CREDITS = 1_000_000  # your own machine: credits are only bookkeeping
LAB_ADVERSARY_NETWORK = "127.0.66"  # the adversary lab's misbehaving workers: 127.0.66.0/24
# The cluster's servers trust each other by its own flags, never by a
# certificate the user's environment names for some other discovery service.
OWN_TRUST = {ENV_DISCOVERY_CERT: None}


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
        discovery_args: tuple[str, ...] = (),
        tls: bool = False,
        host: str = "127.0.0.1",
        adversaries: Sequence[str] = (),
    ) -> None:
        """`tls=True` serves TLS on loopback too (`--tls` everywhere); a
        job then needs `discovery_cert=cluster.discovery_cert`. `host` is
        where every server of the cluster listens.

        `adversaries` (modes of worker_service/adversaries.py, one per
        worker) makes the adversary lab: those workers all listen on one
        /24 (LAB_ADVERSARY_NETWORK, as one operator's machines would),
        each honest worker on a /24 of its own (127.1.N.1: all of
        127.0.0.0/8 is loopback), and the discovery service keeps the
        replicas of a task on distinct networks."""
        if workers < 1:
            raise ValueError("a local cluster needs at least one worker")
        self.workers_wanted = workers
        self.slots = slots
        self.starting_credits = starting_credits
        self.replication = replication
        self.worker_args = worker_args
        self.discovery_args = discovery_args
        self.tls = tls
        self.host = host
        self.adversaries = list(adversaries)
        self.adversary_workers: list[ServerProcess] = []
        self._owned_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ec262-cluster-"))
        self.discovery: ServerProcess | None = None
        self.workers: list[ServerProcess] = []
        self._launched = 0

    @property
    def address(self) -> str:
        assert self.discovery is not None, "the cluster is not running"
        return self.discovery.address

    @property
    def foreman_identity(self) -> Path:
        return self.directory / "foreman.json"

    @property
    def discovery_cert(self) -> Path | None:
        """The discovery service's certificate when the cluster serves TLS."""
        return self.directory / CERT_FILE if self.tls else None

    def start(self) -> LocalCluster:
        try:
            self.discovery = spawn_server(
                [
                    "discovery",
                    "--host",
                    self.host,
                    "--port",
                    "0",
                    "--store",
                    f"sqlite:///{self.directory / 'ledger.sqlite3'}",
                    "--starting-credits",
                    str(self.starting_credits),
                    "--replication",
                    str(self.replication),
                    *(["--tls"] if self.tls else []),
                    *(["--diversity", "network"] if self.adversaries else []),
                    *self.discovery_args,
                ],
                env=OWN_TRUST,
            )
            self._start_workers(self.workers_wanted)
            if self.adversaries:
                self.adversary_workers = self._start_workers(
                    len(self.adversaries), adversaries=self.adversaries
                )
        except BaseException:
            self.close()
            raise
        logger.info("local cluster: discovery %s, %d worker(s)", self.address, len(self.workers))
        return self

    def add_workers(self, count: int = 1) -> list[ServerProcess]:
        """`count` more workers (started together), registered when this returns."""
        return self._start_workers(count)

    def _start_workers(self, count: int, *, adversaries: Sequence[str] = ()) -> list[ServerProcess]:
        # Numbered by launches, not by workers running: a worker started
        # after one died must not take a live worker's identity file.
        first, self._launched = self._launched, self._launched + count
        modes = list(adversaries) or [""] * count
        pending = [
            self._launch_worker(n, mode)
            for n, mode in zip(range(first, first + count), modes, strict=True)
        ]
        added = []
        try:
            for launched in pending:
                added.append(launched.listening())
        finally:
            self.workers.extend(added)
            for launched in pending[len(added) :]:
                launched.process.kill()
        for worker in added:
            worker.wait_for("registered with discovery")
        return added

    def _worker_host(self, number: int, adversary: str) -> str:
        if not self.adversaries:
            return self.host
        if adversary:
            return f"{LAB_ADVERSARY_NETWORK}.{number % 250 + 1}"
        return f"127.{number // 250 + 1}.{number % 250 + 1}.1"

    def _launch_worker(self, number: int, adversary: str = "") -> PendingServer:
        identity = str(self.directory / f"worker{number}.json")
        tls = (
            [
                "--tls",
                "--tls-cert",
                str(self.directory / f"worker{number}-cert.pem"),
                "--tls-key",
                str(self.directory / f"worker{number}-key.pem"),
                "--discovery-cert",
                str(self.discovery_cert),
            ]
            if self.tls
            else []
        )
        return PendingServer(
            [
                "worker",
                "--host",
                self._worker_host(number, adversary),
                *(["--adversary", adversary] if adversary else []),
                "-P",
                "0",
                "--discovery",
                self.address,
                "--slots",
                str(self.slots),
                "--identity",
                identity,
                "-v",
                *tls,
                *self.worker_args,
            ],
            env=OWN_TRUST,
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
