"""One identity per ledger in an identity file (docs/protocol.md sections 9
and 11): pointing a client at another cluster adds an identity and never
breaks the one it has for the first; another front-end of the same ledger
uses the same identity; a stored secret goes only to addresses it was used
at; the single form of earlier versions is still read."""

from __future__ import annotations

import json
import stat
import uuid

import pytest

from ec262.discovery_client import DiscoveryClient
from ec262.identity import load_identities, load_identity, save_identity
from tests.discovery_harness import DiscoveryHarness


@pytest.fixture
def two_ledgers(tmp_path):
    started = [DiscoveryHarness.start(str(tmp_path / f"{name}.sqlite3")) for name in "ab"]
    yield started
    for harness in started:
        harness.stop()


def _use(address: str, path) -> tuple[str, int]:
    with DiscoveryClient(address) as client:
        identity = client.load_or_create_identity(path)
        return identity.client_id, client.get_client().credits


def test_another_cluster_adds_an_identity_and_the_first_keeps_working(two_ledgers, tmp_path):
    """The README's own sequence: one cluster, then another, then the first."""
    a, b = two_ledgers
    path = tmp_path / "identity.json"
    first, _ = _use(a.address, path)
    second, _ = _use(b.address, path)
    assert second != first
    again, credits = _use(a.address, path)
    assert again == first and credits == a.config.starting_credits
    assert _use(b.address, path)[0] == second
    stored = load_identities(path)
    assert [i.client_id for i in stored] == [first, second]
    assert all(i.ledger_id for i in stored)
    assert stored[0].ledger_id != stored[1].ledger_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path, b.address).client_id == second


def test_the_single_form_of_earlier_versions_is_read_and_kept(two_ledgers, tmp_path):
    a, b = two_ledgers
    path = tmp_path / "identity.json"
    with DiscoveryClient(a.address) as client:
        made = client.create_client()
    path.write_text(
        json.dumps({"client_id": made.client_id, "secret": made.secret, "discovery": a.address})
    )
    assert _use(a.address, path)[0] == made.client_id  # read, and upgraded to the new form
    assert _use(b.address, path)[0] != made.client_id
    assert _use(a.address, path)[0] == made.client_id
    assert "identities" in json.loads(path.read_text())


def test_a_stored_secret_is_sent_only_where_it_was_used(two_ledgers, tmp_path):
    """At an address new to the file nothing stored is presented: a new
    identity is made there (an unknown address might be anyone's)."""
    a, b = two_ledgers
    path = tmp_path / "identity.json"
    mine, _ = _use(a.address, path)
    presented: list[str] = []
    ledger = b.server.ledger
    real = ledger.authenticate

    def recording(authorization):
        presented.append(authorization or "")
        return real(authorization)

    ledger.authenticate = recording  # what b's servicer is shown
    theirs, _ = _use(b.address, path)
    assert presented, "the recorder saw no call"
    assert not [p for p in presented if mine in p], "a's identity was presented to b"
    assert theirs != mine


def test_another_front_end_of_the_same_ledger_uses_the_same_identity(redis_server, tmp_path):
    url = redis_server.url(f"t{uuid.uuid4().hex[:12]}:")
    front_ends = [DiscoveryHarness.start(url) for _ in range(2)]
    try:
        path = tmp_path / "identity.json"
        first, _ = _use(front_ends[0].address, path)
        assert _use(front_ends[1].address, path)[0] == first
        (stored,) = load_identities(path)
        assert stored.addresses() == [front_ends[0].address, front_ends[1].address]
        assert _use(front_ends[1].address, path)[0] == first  # now without a detour
    finally:
        for harness in front_ends:
            harness.stop()


def test_saving_one_ledger_never_drops_another(tmp_path):
    from ec262.identity import Identity

    path = tmp_path / "identity.json"
    save_identity(path, Identity("c1", "s1", "127.0.0.1:1", "ledger-1"))
    save_identity(path, Identity("c2", "s2", "127.0.0.1:2", "ledger-2"))
    save_identity(path, Identity("c1", "s1", "127.0.0.1:1,127.0.0.1:3", "ledger-1"))
    assert [(i.client_id, i.ledger_id, i.discovery) for i in load_identities(path)] == [
        ("c2", "ledger-2", "127.0.0.1:2"),
        ("c1", "ledger-1", "127.0.0.1:1,127.0.0.1:3"),
    ]
