"""Plain-Python pieces of the discovery logic, without sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery_service.ledger import choose_workers
from discovery_service.store import Candidate
from ec262.addresses import join_address, split_address
from ec262.auth import parse_bearer
from ec262.errors import AuthenticationError, InvalidRequest


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:11235", ("127.0.0.1", 11235)),
        ("[::1]:1", ("::1", 1)),
        ("host.example:65535", ("host.example", 65535)),
    ],
)
def test_split_address_accepts_host_port(address, expected):
    assert split_address(address) == expected
    assert join_address(*expected) == address


@given(st.text(max_size=40))
def test_split_address_raises_only_invalid_request(text):
    try:
        host, port = split_address(text)
    except InvalidRequest as error:
        assert str(error)
    else:
        assert 1 <= port <= 65535 and host


def test_parse_bearer_needs_a_canonical_uuid():
    with pytest.raises(AuthenticationError, match="UUID"):
        parse_bearer("Bearer 123:secret")
    assert parse_bearer("Bearer 6fd6260a-ef78-4724-b31e-45c52cf77dfd:s") == (
        "6fd6260a-ef78-4724-b31e-45c52cf77dfd",
        "s",
    )


def _candidates(slots: list[int]) -> list[Candidate]:
    return [Candidate(f"w{i}", f"h:{i + 1}", free) for i, free in enumerate(slots)]


@given(st.lists(st.integers(1, 4), max_size=8), st.integers(1, 10), st.integers(1, 4))
def test_choose_workers_respects_slots_and_distinctness(slots, n, replication):
    groups = choose_workers(_candidates(slots), n, replication, random.Random(0))
    used = Counter(c.client_id for group in groups for c in group)
    assert len(groups) <= n
    assert all(len(group) == replication for group in groups)
    assert all(len({c.client_id for c in group}) == replication for group in groups)
    assert all(used[f"w{i}"] <= free for i, free in enumerate(slots))
    # Stops only when it had to: n reached or too few workers with a free slot.
    remaining = sum(1 for i, free in enumerate(slots) if free - used[f"w{i}"] > 0)
    assert len(groups) == n or remaining < replication
