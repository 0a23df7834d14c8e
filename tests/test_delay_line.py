"""The delay line the latency benches and tests stand on (issue 16, item
3): it must add its delay each way, keep every byte in order, and carry
gRPC unchanged."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.delay_line import DelayLine


@pytest.fixture
def echo_server():
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(1 << 16):
                    connection.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def _round_trip(address: str, payload: bytes) -> tuple[float, bytes]:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port))) as connection:
        started = time.monotonic()
        # A line whose target is gone may close before we finish sending
        # (ENOTCONN, EPIPE, a reset): what came back, if anything, says so.
        with contextlib.suppress(OSError):
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := connection.recv(1 << 16):
                received += data
        return time.monotonic() - started, bytes(received)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_every_byte_comes_back_in_order_a_round_trip_later(echo_server, delay):
    payload = os.urandom(3 << 20)  # many reads and writes each way
    with DelayLine(echo_server, delay) as line:
        seconds, received = _round_trip(line.address, payload)
    assert received == payload
    assert seconds >= 2 * delay
    assert line.connections == 1


def test_grpc_through_the_line_pays_the_delay_each_way():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        line = DelayLine(f"127.0.0.1:{port}", 0.05)
        with line, grpc.insecure_channel(line.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connects
            started = time.monotonic()
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            seconds = time.monotonic() - started
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert seconds >= 0.1  # one round trip: 50 ms there, 50 ms back
    finally:
        server.stop(None)


def test_a_target_that_is_gone_closes_the_connection_not_the_line():
    probe = socket.create_server(("127.0.0.1", 0))
    gone = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    with DelayLine(gone, 0.01) as line:
        _, received = _round_trip(line.address, b"hello")
        assert received == b""
        _, received = _round_trip(line.address, b"again")
        assert received == b""
        assert line.connections == 2
