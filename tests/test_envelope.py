"""Canonical encoding and the encryption envelope (docs/protocol.md sections 3-4)."""

from __future__ import annotations

import base64
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ec262
from ec262.encoding import decode_result, encode_result
from ec262.envelope import open_sealed, seal

KEY = bytes(range(16))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hashable_keys = st.recursive(
    st.one_of(st.integers(-1000, 1000), st.text(max_size=10), st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)
results = st.dictionaries(hashable_keys, json_values, max_size=12)


def shuffled(data: dict, seed: int) -> dict:
    items = list(data.items())
    random.Random(seed).shuffle(items)
    return dict(items)


def test_insertion_order_does_not_change_the_bytes():
    data = {"b": 2, "a": 1, "c": [3, {"y": 1, "x": 2}]}
    assert encode_result(data) == encode_result(shuffled(data, 1))
    assert encode_result(data) == b'[["a",1],["b",2],["c",[3,{"x":2,"y":1}]]]'
    assert ec262.encrypt_data(data, KEY) == ec262.encrypt_data(shuffled(data, 2), KEY)


def test_numeric_keys_sort_as_numbers_and_mixed_keys_by_json_text():
    assert encode_result({10: "a", 9: "b", 1.5: "c"}) == b'[[1.5,"c"],[9,"b"],[10,"a"]]'
    mixed = {"b": 1, 2: 2, (1, "x"): 3, None: 4}
    # By canonical JSON text: '"b"' < '2' < '[1,"x"]' < 'null'.
    assert encode_result(mixed) == b'[["b",1],[2,2],[[1,"x"],3],[null,4]]'
    assert encode_result(mixed) == encode_result(shuffled(mixed, 3))


def test_round_trips_of_nested_unicode_mixed_and_tuple_keys():
    data = {
        "naïve ☃": {"deep": [1, 2.5, None, True, {"k": "ü"}]},
        ("tuple", 1, ("nested", 2)): [["a", 1]],
        42: -7,
        3.25: "float key",
        "": "",
    }
    text = ec262.encrypt_data(data, KEY)
    assert ec262.decrypt_data(text, KEY) == data
    assert isinstance(
        next(k for k in ec262.decrypt_data(text, KEY) if isinstance(k, tuple))[2], tuple
    )


def test_tuple_values_become_lists():
    assert ec262.decrypt_data(ec262.encrypt_data({"a": (1, (2, 3))}, KEY), KEY) == {
        "a": [1, [2, 3]]
    }


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"ok": 1, "bad": {1, 2}}, "'bad'"),
        ({"x": object()}, "'x'"),
        ({("t", 1): float("nan")}, "('t', 1)"),
        ({"m": {1: "a", "b": 2}}, "'m'"),
        ({frozenset([1]): 1}, "frozenset"),
    ],
)
def test_a_value_json_cannot_carry_is_an_error_naming_the_key(data, named):
    with pytest.raises(ec262.EncodingError) as caught:
        encode_result(data)
    assert named in str(caught.value)


def test_a_result_must_be_a_dict():
    with pytest.raises(ec262.EncodingError, match="must be a dict"):
        encode_result([("a", 1)])


def test_a_wrong_key_raises_decryption_error():
    text = ec262.encrypt_data({"a": 1}, KEY)
    for bogus in (bytes(16), os.urandom(16), b"short", b"", KEY + b"x"):
        with pytest.raises(ec262.DecryptionError):
            ec262.decrypt_data(text, bogus)


def test_every_flipped_byte_raises_decryption_error():
    raw = base64.b64decode(ec262.encrypt_data({"word": 3, "other": [1, 2]}, KEY))
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            tampered = bytearray(raw)
            tampered[index] ^= bit
            with pytest.raises(ec262.DecryptionError):
                ec262.decrypt_data(base64.b64encode(bytes(tampered)).decode(), KEY)


@pytest.mark.parametrize(
    "text",
    ["", "not base64!", "AAAA", "A" * 99, "=" * 8, base64.b64encode(b"\x02" + bytes(64)).decode()],
)
def test_malformed_envelopes_raise_decryption_error(text):
    with pytest.raises(ec262.DecryptionError):
        ec262.decrypt_data(text, KEY)


def test_truncated_or_extended_envelopes_raise_decryption_error():
    raw = base64.b64decode(ec262.encrypt_data({"a": "b" * 100}, KEY))
    for tampered in (raw[:-1], raw[:-16], raw[16:], raw + b"\x00", raw + bytes(16)):
        with pytest.raises(ec262.DecryptionError):
            open_sealed(base64.b64encode(tampered), KEY)


def test_encrypting_with_a_malformed_key_is_a_value_error():
    with pytest.raises(ValueError, match="16 bytes"):
        seal(b"x", b"short")


@settings(max_examples=200, deadline=None)
@given(results, st.integers(0, 2**32))
def test_property_round_trip_and_order_independence(data, seed):
    key = random.Random(seed).randbytes(16)
    text = ec262.encrypt_data(data, key)
    assert ec262.encrypt_data(shuffled(data, seed), key) == text
    assert ec262.decrypt_data(text, key) == decode_result(encode_result(data))


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
)
def test_property_seal_is_deterministic_and_keys_do_not_cross(plaintext, key, other):
    text = seal(plaintext, key)
    assert seal(plaintext, key) == text
    assert open_sealed(text, key) == plaintext
    if other != key:
        with pytest.raises(ec262.DecryptionError):
            open_sealed(text, other)
