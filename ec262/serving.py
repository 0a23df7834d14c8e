"""What every ec262 server does the same way: reflection and health, the
`listening on HOST:PORT` line, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ec262.addresses import join_address
from ec262.defaults import MAX_MESSAGE_BYTES
from ec262.tls import ServerCertificate

logger = logging.getLogger(__name__)


def new_server(*, max_workers: int = 8, options: Iterable[tuple[str, int]] = ()) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *options,
        ],
    )


def add_standard_services(
    server: grpc.Server, service_names: Iterable[str]
) -> health.HealthServicer:
    """Turn on reflection (so `grpcurl list/describe` work without protos)
    and the health service, reporting SERVING for each named service."""
    names = list(service_names)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return health_servicer


def bind(
    server: grpc.Server | grpc.aio.Server,
    host: str,
    port: int,
    certificate: ServerCertificate | None = None,
) -> int:
    """Bind a port, TLS with `certificate` or else plaintext, and return the
    port actually bound (port 0 asks the kernel for an ephemeral one)."""
    address = join_address(host, port)
    if certificate is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, certificate.server_credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {address}: address in use or not available")
    return bound


def announce(host: str, port: int, certificate: ServerCertificate | None = None) -> None:
    """The one line scripts and tests wait for (docs/protocol.md section 8:
    with the fingerprint a client can check when TLS is on)."""
    tls = f" (tls sha256:{certificate.fingerprint})" if certificate else ""
    # One write, its newline in it: print() writes the line and then "\n",
    # and a log record another thread wrote between the two (a worker's
    # registration logs as it starts) was read as the end of the address.
    sys.stderr.write(f"listening on {join_address(host, port)}{tls}\n")
    sys.stderr.flush()


def wait_for_signal(shutdown: Callable[[], None]) -> None:
    """Block until SIGINT or SIGTERM, then call `shutdown` (which stops the
    server and whatever else the program runs)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        shutdown()
