"""Checking that a worker's address answers before it joins the pool
(docs/protocol.md section 8): a health check over the channel a foreman
would open, its registered certificate included. Without it, an address a
worker cannot be reached at (a wrong `--advertise`, a firewall, someone
else's address) would be handed to foremen and fail their tasks as
"no quorum possible"."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ec262.errors import AddressRefused
from ec262.tls import peer_credentials
from ec262.v1 import worker_pb2

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
PROBE_TIMEOUT = 3.0  # seconds; the worker's RegisterWorker waits 10


async def probe_worker(address: str, certificate_pem: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Return when `address` serves the Worker service with this
    certificate; else AddressRefused saying what was wrong."""
    credentials, options = peer_credentials(certificate_pem)
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise AddressRefused(_why(address, error)) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise AddressRefused(f"worker address {address} answers but does not serve tasks")


def _why(address: str, error: grpc.aio.AioRpcError) -> str:
    details = error.details() or ""
    if "handshake" in details.lower() or "ssl" in details.lower() or "verif" in details.lower():
        return (
            f"worker address {address} does not present the certificate this registration"
            " sent (another server answers there, or it serves plaintext)"
        )
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return f"worker address {address} answers but is not an ec262 worker"
    return (
        f"worker address {address} is unreachable from the discovery service"
        f" ({error.code().name}): foremen could not reach it either; check --advertise"
        " and the firewall"
    )
