from __future__ import annotations

import grpc
import pytest

from discovery_service.ledger import LedgerConfig
from tests.discovery_harness import DiscoveryHarness


@pytest.fixture
def discovery(tmp_path):
    """A real discovery server on 127.0.0.1:<ephemeral> over a SQLite file."""
    harness = DiscoveryHarness.start(str(tmp_path / "ledger.sqlite3"))
    yield harness
    harness.stop()


@pytest.fixture
def discovery_factory(tmp_path):
    """Start discovery servers with a chosen config; all stopped after."""
    started: list[DiscoveryHarness] = []

    def start(config: LedgerConfig | None = None, name: str = "ledger") -> DiscoveryHarness:
        harness = DiscoveryHarness.start(str(tmp_path / f"{name}.sqlite3"), config)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value
