"""Building and running the discovery server (grpc.aio, see ec262/aio_serving.py)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from discovery_service.ledger import SWEEP_INTERVAL, Ledger, LedgerConfig
from discovery_service.servicer import DiscoveryServicer
from discovery_service.stores import open_store, store_directory
from ec262 import serving
from ec262.aio_serving import BackgroundAioServer
from ec262.tls import ServerCertificate, server_certificate
from ec262.v1 import discovery_pb2, discovery_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name


# A gap this long between two sweeps means the process did not run.
FROZEN_GAP_SECONDS = 5.0


class Sweeper:
    """A thread that runs `ledger.sweep()` every SWEEP_INTERVAL, so expired
    tasks and those of silent foremen are closed even when nobody calls."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.time()
        while not self._stop.wait(SWEEP_INTERVAL):
            now = time.time()
            if now - last > FROZEN_GAP_SECONDS:
                # This process was stopped (SIGSTOP, a frozen VM): nobody
                # could call it meanwhile, so no lease may end for that.
                logger.warning("the service was frozen for %.0f s", now - last)
                self._ledger.resume()
            last = now
            try:
                self._ledger.sweep()
            except Exception:
                logger.exception("sweeping expired tasks failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class DiscoveryServer:
    server: BackgroundAioServer
    port: int
    ledger: Ledger
    sweeper: Sweeper | None

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)
        if self.sweeper is not None:
            self.sweeper.stop()
        self.ledger.store.close()


def build_server(
    ledger: Ledger,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    sweep: bool = True,
    certificate: ServerCertificate | None = None,
) -> DiscoveryServer:
    """A started discovery server on host:port (0 = ephemeral), with
    reflection and health, TLS with `certificate` when given; `.port` is
    the port actually bound. `sweep=False` leaves the sweeps to the caller
    (a test on a manual clock)."""
    servicer = DiscoveryServicer(ledger)
    server = BackgroundAioServer(
        lambda aio_server: discovery_pb2_grpc.add_DiscoveryServicer_to_server(servicer, aio_server),
        [SERVICE_NAME],
        host=host,
        port=port,
        certificate=certificate,
    )
    port = server.start()
    sweeper = Sweeper(ledger) if sweep else None
    return DiscoveryServer(server=server, port=port, ledger=ledger, sweeper=sweeper)


def run(
    *,
    host: str,
    port: int,
    store_url: str,
    config: LedgerConfig,
    tls: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    """`ec262 discovery`: serve until SIGINT/SIGTERM; TLS off loopback or
    with `tls` (docs/protocol.md section 8)."""
    certificate = server_certificate(
        host,
        forced=tls,
        cert_path=tls_cert,
        key_path=tls_key,
        directory=store_directory(store_url),
    )
    ledger = Ledger(open_store(store_url), config)
    try:
        running = build_server(ledger, host=host, port=port, certificate=certificate)
    except BaseException:
        ledger.store.close()
        raise
    logger.info(
        "discovery on %s:%d, store %s, %d starting credits, replication %d",
        host,
        running.port,
        store_url,
        config.starting_credits,
        config.replication,
    )
    serving.announce(host, running.port, certificate)
    serving.wait_for_signal(lambda: running.stop(grace=2.0))
    logger.info("discovery stopped")
