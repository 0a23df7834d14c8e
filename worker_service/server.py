"""Assembling and running a worker: gRPC server, sandbox pool, task logic,
registration with discovery."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ec262 import serving
from ec262.addresses import is_wildcard, join_address, routable_host
from ec262.batching import Batcher
from ec262.defaults import DEFAULT_DISCOVERY
from ec262.discovery_client import DiscoveryClient, this_runtime
from ec262.identity import identity_path
from ec262.tls import ServerCertificate, server_certificate
from ec262.v1 import worker_pb2, worker_pb2_grpc
from worker_service import adversaries
from worker_service.outbound import KeyFetcher, ResultSubmitter
from worker_service.registration import Registrar
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.pool import SandboxPool
from worker_service.servicer import WorkerServicer
from worker_service.worker import Worker, capacity_for

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `ec262 worker` takes on its command line."""

    host: str = "127.0.0.1"
    port: int = 11235
    advertise: str | None = None
    discovery: str = DEFAULT_DISCOVERY
    slots: int = 1
    identity: Path | None = None
    allow_modules: tuple[str, ...] = ()
    task_timeout: float = 60.0
    memory_limit_mb: int = 1024
    lease_seconds: int = 30
    extra_sandboxes: int = 2
    tls: bool = False  # TLS on loopback too (always off loopback)
    tls_cert: str | None = None  # default: tls-cert.pem beside the identity file
    tls_key: str | None = None
    discovery_cert: str | None = None  # else $EC262_DISCOVERY_CERT, else pinned
    adversary: str = ""  # misbehave on purpose (worker_service/adversaries.py)
    limits: SandboxLimits = field(init=False)

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("--slots must be at least 1")
        adversaries.check_mode(self.adversary)
        object.__setattr__(
            self,
            "limits",
            SandboxLimits.with_extra_modules(
                self.allow_modules,
                task_timeout=self.task_timeout,
                memory_limit_mb=self.memory_limit_mb,
            ),
        )


@dataclass
class RunningWorker:
    config: WorkerConfig
    server: object
    port: int
    address: str
    worker: Worker
    registrar: Registrar
    pool: SandboxPool
    discovery: DiscoveryClient
    submitter: ResultSubmitter
    stop_event: threading.Event
    certificate: ServerCertificate | None = None
    batchers: tuple = ()  # closed last (ec262/batching.py)

    def stop(self, grace: float = 2.0) -> None:
        """Leave the pool, stop taking calls, let running tasks finish for
        `grace` seconds, then kill the sandboxes."""
        self.registrar.leave()
        self.stop_event.set()
        self.server.stop(grace).wait()
        self.worker.wait_idle(grace)
        self.worker.close()
        self.pool.close()
        self.submitter.close()
        for batcher in self.batchers:
            batcher.close()
        self.discovery.close()


def _advertised_host(config: WorkerConfig) -> str:
    """--advertise, else --host; on a wildcard, the local address that
    routes to the discovery service (a name like `localhost` or the
    machine's would mean nothing to a foreman elsewhere)."""
    if config.advertise:
        return config.advertise
    if not is_wildcard(config.host):
        return config.host
    try:
        return routable_host(config.discovery)
    except OSError as error:
        raise OSError(
            f"--host {config.host}: no route to discovery {config.discovery} ({error}) to"
            " find the address foremen reach this worker at; pass --advertise"
        ) from None


def start_worker(config: WorkerConfig) -> RunningWorker:
    """A started worker; registration proceeds in the background."""
    stop = threading.Event()
    pool = SandboxPool(config.limits, size=config.slots + config.extra_sandboxes)
    discovery = DiscoveryClient(
        config.discovery, certificate=config.discovery_cert, pins=identity_path(config.identity)
    )
    key_fetcher = KeyFetcher(discovery, stop)
    commitments = Batcher(discovery.commit_results, name="commit")
    submitter = ResultSubmitter(
        stop, key_fetcher.still_assigned, lambda task_id, text: commitments.call((task_id, text))
    )
    advertised = _advertised_host(config)
    identity = identity_path(config.identity)
    certificate = server_certificate(
        config.host,
        forced=config.tls,
        cert_path=config.tls_cert,
        key_path=config.tls_key,
        directory=identity.parent,
        advertise=advertised,
    )
    server = serving.new_server(max_workers=max(4, config.slots + 2))
    port = serving.bind(server, config.host, config.port, certificate)
    address = join_address(advertised, port)
    registrar = Registrar(
        discovery,
        identity,
        advertise=address,
        slots=capacity_for(config.slots),
        lease_seconds=config.lease_seconds,
        stop=stop,
        tls_certificate=certificate.certificate_pem.decode() if certificate else "",
    )
    worker = Worker(
        slots=config.slots,
        sandbox=adversaries.sandbox_for(config.adversary, pool),
        fetch_keys=key_fetcher,
        submit=adversaries.submit_for(config.adversary, submitter),
        client_id=registrar.client_id,
    )
    if config.adversary:
        logger.warning("this worker misbehaves on purpose: adversary %r", config.adversary)
    worker_pb2_grpc.add_WorkerServicer_to_server(
        WorkerServicer(worker, address=address, runtime=this_runtime()), server
    )
    serving.add_standard_services(server, [SERVICE_NAME])
    try:  # the layers in force, logged before any task arrives
        pool.probe()
    except RuntimeError as error:
        logger.error("the sandbox does not start: %s", error)
    server.start()
    registrar.start()
    logger.info(
        "worker on %s:%d (advertised %s), %d slot(s), discovery %s",
        config.host,
        port,
        address,
        config.slots,
        config.discovery,
    )
    return RunningWorker(
        config,
        server,
        port,
        address,
        worker,
        registrar,
        pool,
        discovery,
        submitter,
        stop,
        certificate,
        (key_fetcher, commitments),
    )


def run(config: WorkerConfig) -> None:
    """`ec262 worker`: serve until SIGINT/SIGTERM."""
    running = start_worker(config)
    serving.announce(config.host, running.port, running.certificate)
    serving.wait_for_signal(lambda: running.stop(grace=2.0))
    logger.info("worker stopped")
