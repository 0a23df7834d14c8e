"""Building and running the discovery server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from discovery_service.ledger import Ledger, LedgerConfig
from discovery_service.servicer import DiscoveryServicer
from discovery_service.stores import open_store
from ec262 import serving
from ec262.v1 import discovery_pb2, discovery_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name


@dataclass(frozen=True)
class DiscoveryServer:
    server: grpc.Server
    port: int
    ledger: Ledger

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()
        self.ledger.store.close()


def build_server(
    ledger: Ledger, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8
) -> DiscoveryServer:
    """A started discovery server on host:port (0 = ephemeral), with
    reflection and health; `.port` is the port actually bound."""
    server = serving.new_server(max_workers=max_workers)
    discovery_pb2_grpc.add_DiscoveryServicer_to_server(DiscoveryServicer(ledger), server)
    serving.add_standard_services(server, [SERVICE_NAME])
    bound = serving.bind(server, host, port)
    server.start()
    return DiscoveryServer(server=server, port=bound, ledger=ledger)


def run(*, host: str, port: int, store_url: str, config: LedgerConfig) -> None:
    """`ec262 discovery`: serve until SIGINT/SIGTERM."""
    ledger = Ledger(open_store(store_url), config)
    running = build_server(ledger, host=host, port=port)
    logger.info(
        "discovery on %s:%d, store %s, %d starting credits, replication %d",
        host,
        running.port,
        store_url,
        config.starting_credits,
        config.replication,
    )
    serving.announce(host, running.port)
    serving.wait_for_signal(lambda: running.stop(grace=2.0))
    logger.info("discovery stopped")
