"""Trust among strangers (docs/protocol.md section 10), the parts built so
far: new identities limited per source network."""

from __future__ import annotations

import grpc
import pytest

from discovery_service.ledger import NEW_CLIENT_WINDOW, Ledger, LedgerConfig
from discovery_service.sqlite_store import SqliteStore
from ec262.addresses import network_of
from ec262.errors import TooManyNewClients
from ec262.v1 import discovery_pb2 as pb
from tests.discovery_harness import ManualClock


def test_networks_are_slash_24_and_slash_48():
    assert network_of("198.51.100.77") == "198.51.100.0/24"
    assert network_of("2001:db8:1234:5678::1") == "2001:db8:1234::/48"
    assert network_of("::ffff:198.51.100.9") == "198.51.100.0/24"
    assert network_of("[::1]") == "::/48"
    assert network_of("worker.example.org") is None


def test_new_identities_are_limited_per_network_and_hour(discovery_factory):
    """Over gRPC, so the caller's real peer address (127.0.0.1) counts; both
    stores. The flood gets RESOURCE_EXHAUSTED with nothing made, and the
    window slides."""
    discovery = discovery_factory(LedgerConfig(max_new_clients=5))
    made = [discovery.client() for _ in range(5)]
    before = discovery.server.ledger.store.totals()
    with pytest.raises(grpc.RpcError) as refused:
        discovery.stub.CreateClient(pb.CreateClientRequest())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "127.0.0.0/24" in refused.value.details()
    assert "try again in" in refused.value.details()
    assert discovery.server.ledger.store.totals() == before  # nothing made, no credit issued
    # Those made still work; an hour later the network may make more.
    info = discovery.stub.GetClient(pb.GetClientRequest(), metadata=made[0].metadata)
    assert info.client_id == made[0].client_id
    discovery.clock.advance(NEW_CLIENT_WINDOW + 1)
    assert discovery.client().client_id


def test_the_limit_counts_each_network_apart(tmp_path):
    clock = ManualClock()
    ledger = Ledger(
        SqliteStore(tmp_path / "l.sqlite3"), LedgerConfig(max_new_clients=2), clock=clock
    )
    for host in ("198.51.100.1", "198.51.100.200"):
        ledger.create_client(host)
    with pytest.raises(TooManyNewClients, match=r"198\.51\.100\.0/24"):
        ledger.create_client("198.51.100.3")
    ledger.create_client("198.51.101.3")  # the next /24
    ledger.create_client("2001:db8:1::1")
    ledger.create_client("2001:db8:1::2")
    with pytest.raises(TooManyNewClients, match="2001:db8:1::/48"):
        ledger.create_client("2001:db8:1:ffff::9")
    clock.advance(NEW_CLIENT_WINDOW / 2)
    with pytest.raises(TooManyNewClients):
        ledger.create_client("198.51.100.4")
    clock.advance(NEW_CLIENT_WINDOW / 2 + 1)  # the first two slid out
    ledger.create_client("198.51.100.4")
    ledger.create_client(None)  # no peer address (a test, a unix socket): no limit
    unlimited = Ledger(SqliteStore(tmp_path / "u.sqlite3"), LedgerConfig(), clock=clock)
    for _ in range(30):
        unlimited.create_client("198.51.100.1")
    ledger.store.close()
    unlimited.store.close()


def test_the_limit_is_on_by_default_off_loopback():
    from ec262.cli import max_new_clients

    assert max_new_clients("0.0.0.0", None) == 20 == max_new_clients("198.51.100.1", None)
    assert max_new_clients("127.0.0.1", None) == 0 == max_new_clients("0.0.0.0", 0)
    assert max_new_clients("127.0.0.1", 3) == 3
