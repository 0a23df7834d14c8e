"""The fast canonical encoder (orjson where its text is provably json's)
must write exactly the bytes the standard library's json writes, and the
fast reader must read exactly what json reads."""

from __future__ import annotations

import enum
import json
import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ec262
from ec262 import encoding
from ec262.encoding import (
    canonical_bytes,
    canonical_json,
    decode_result,
    encode_pairs,
    encode_result,
    flat_rows,
    join_blocks,
    loads,
    pairs_blocks,
    valid_flat_rows,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too, where orjson stops
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e-3, max_value=1e-3),  # where the two write floats differently
    st.sampled_from([1e16, 1e15, 1e-5, 1e-7, 5e-324, 1.7976931348623157e308, -0.0]),
    st.text(),
    st.sampled_from(["null", "1.5", "e+", "[null", ",null", "x\x00\x1f\x7f\u2028\U0001f600"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=16,
)


def standard(value) -> bytes:
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
    ).encode()


@settings(max_examples=600, deadline=None)
@given(values)
def test_property_the_fast_encoder_writes_what_json_writes(value):
    assert canonical_bytes(value) == standard(value)
    assert canonical_bytes(value) == canonical_json(value).encode()


@settings(max_examples=600, deadline=None)
@given(values)
def test_property_the_fast_reader_reads_what_json_reads(value):
    text = standard(value)
    decoded = loads(text)
    assert decoded == json.loads(text)
    assert repr(decoded) == repr(json.loads(text))  # 1 vs 1.0, -0.0, big integers exact


@pytest.mark.parametrize(
    "value",
    [
        [1e-7, 1.5e-5, 1e16, 1e15, 0.1],
        [2**64, -(2**63) - 1, 2**200],
        {"null": None, "b": [None, 1]},
        None,
        ["a", [None]],
    ],
)
def test_values_where_orjson_and_json_differ_are_written_as_json_writes_them(value):
    assert canonical_bytes(value) == standard(value)
    assert loads(canonical_bytes(value)) == json.loads(standard(value))


@pytest.mark.parametrize(
    "text",
    [
        b"[123456789012345678901234567890]",
        b"[18446744073709551616,-9223372036854775809]",
        b"[NaN,Infinity,-Infinity]",
        b'["\\ud800"]',
        b"[1.0e400]",
        b' [ 1 , "a" ] ',
        # Few objects for the size: decided by a type walk, not a digit scan.
        b'[["k","' + b"x" * 5000 + b'",123456789012345678901234567890]]',
        b'[["k","' + b"x" * 5000 + b'",1.5,-0.0,1e-7]]',
        "[1,2]",
    ],
)
def test_texts_only_json_reads_exactly_are_read_by_json(text):
    assert repr(loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {"k": [1, float("-inf")]}])
def test_nan_and_infinity_are_refused_whichever_encoder_runs(value):
    with pytest.raises(ValueError):
        canonical_bytes(value)


@pytest.mark.parametrize(
    "text", [b"[[1,2]", b"[" * 100_000 + b"]" * 100_000, b'[["a",1]] trailing', b"\xff"]
)
def test_not_canonical_json_is_an_encoding_error(text):
    """Even nesting too deep for either parser: an agreed result that does
    not decode is the cheaters' problem, not a crash of the foreman."""
    with pytest.raises(ec262.EncodingError, match="not canonical JSON"):
        decode_result(text)


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_enum_members_and_uuids_are_written_by_value_on_both_paths():
    ident = uuid.UUID(int=5)
    fast = canonical_bytes([Colour.RED, Level.HIGH, ident])
    # A float sends the same values through json instead of orjson.
    slow = canonical_bytes([Colour.RED, Level.HIGH, ident, 1e-7])
    assert fast == b'["red",3,"00000000-0000-0000-0000-000000000005"]'
    assert slow == fast[:-1] + b",1e-07]"
    assert decode_result(encode_result({"c": Colour.RED})) == {"c": "red"}


def test_subclasses_and_other_types_are_left_to_json():
    class Text(str):
        pass

    assert canonical_bytes([Text("x"), {"k": Text("y")}]) == b'["x",{"k":"y"}]'
    with pytest.raises(TypeError):
        canonical_bytes([{1, 2}])
    with pytest.raises(ec262.EncodingError, match="'when'"):
        encode_result({"when": __import__("datetime").date(2026, 1, 1)})
    assert math.isnan(loads(b"[NaN]")[0])  # only json reads it: the fallback does


def test_words_that_look_like_floats_or_null_in_strings_need_no_walk(monkeypatch):
    """The fast path's substring test must not send ordinary word counts
    (the word "null", hyphen-free words) to the slower type walk."""
    from ec262 import encoding

    def walked(value):
        raise AssertionError("walked")

    monkeypatch.setattr(encoding, "_holds_only_same_text_types", walked)
    assert (
        canonical_bytes([["null", [1, 1]], ["nullable", [1]]])
        == b'[["null",[1,1]],["nullable",[1]]]'
    )
    with pytest.raises(AssertionError, match="walked"):
        canonical_bytes([["a", [None]]])


def test_a_walk_of_many_small_containers_is_given_up_before_it_starts():
    """A chunk's rows cost a Python step each: when their count alone is
    over the budget, the walk answers None at once (the text scan decides),
    here without reaching the last row, whose float would answer False."""
    rows = [["k", "v"]] * 1000 + [[1.5]]
    allowed = encoding._DECODED_WITHOUT_FLOAT
    assert encoding._holds_only(rows, allowed, budget=2000) is None
    assert encoding._holds_only(rows, allowed) is False
    assert encoding._holds_only(rows[:-1], allowed) is True
    assert encoding._holds_only([["k", "v"]] * 10, allowed, budget=2000) is True


structural_text = st.text(alphabet='[]",:\\{} a1é\U0001f600', max_size=6)


@settings(max_examples=600, deadline=None)
@given(
    st.dictionaries(
        st.one_of(
            structural_text, st.text(max_size=4), st.sampled_from(['":[', '],"', 'a":[1],"b'])
        ),
        st.lists(
            st.one_of(
                st.integers(), structural_text, st.none(), st.floats(), st.sampled_from(['],"'])
            ),
            max_size=3,
        ),
        max_size=6,
    )
)
def test_property_map_outputs_encode_as_sorted_pairs_whichever_path(output):
    """A dict of lists (every map output) may be written from orjson's
    sorted object; the bytes must be those of the sorted pairs."""
    from ec262.encoding import encode_pairs, sorted_items

    try:
        expected = encode_pairs(sorted_items(output))
    except (ValueError, ec262.EncodingError):  # NaN: both ways refuse
        with pytest.raises((ValueError, ec262.EncodingError)):
            encode_result(output)
        return
    assert encode_result(output) == expected


def test_a_word_count_map_output_takes_the_fast_path():
    from ec262.encoding import _list_valued_dict_text

    output = {"the": [1, 1], "null": [1], "Zebra": [1], "é": [2]}
    assert (
        _list_valued_dict_text(output)
        == b'[["Zebra",[1]],["null",[1]],["the",[1,1]],["\xc3\xa9",[2]]]'
    )
    assert _list_valued_dict_text({"a]": [1]}) is None
    assert _list_valued_dict_text({'q"\\': [1]}) == b'[["q\\"\\\\",[1]]]'  # escapes are fine


pair_rows = st.lists(st.tuples(st.one_of(st.text(max_size=6), st.integers()), values), max_size=40)


@settings(max_examples=300, deadline=None)
@given(pair_rows, st.integers(1, 200))
def test_property_blocks_join_to_the_canonical_text_of_all_the_pairs(rows, block_bytes):
    blocks = list(pairs_blocks(rows, block_bytes))
    assert join_blocks(text for text, _ in blocks) == standard([list(row) for row in rows])
    assert sum(count for _, count in blocks) == len(rows)
    for text, count in blocks:
        assert count >= 1
        assert len(text) + 2 <= 2 * block_bytes or count == 1  # a fat block is halved


def test_pairs_of_plain_scalars_are_proved_by_their_columns_not_a_walk(monkeypatch):
    """Dotted words send the text to the check; str and int columns settle
    it without walking the pairs one by one."""
    rows = [(f"k{n}", f"a line. with {n} dots.") for n in range(1000)]
    walked = []
    real = encoding._holds_only
    monkeypatch.setattr(encoding, "_holds_only", lambda *a, **k: walked.append(1) or real(*a, **k))
    assert encode_pairs(rows) == standard([list(row) for row in rows])
    assert walked == []
    assert encode_pairs([("k", 1.5)]) == b'[["k",1.5]]'
    assert walked  # a float column does need the walk


structural_text = st.text(alphabet='[]",\\{}: a1', max_size=6)


@settings(max_examples=500)
@given(
    st.dictionaries(
        structural_text,
        st.lists(st.one_of(st.integers(-3, 3), structural_text, st.none()), max_size=3),
        max_size=5,
    )
)
def test_property_flat_rows_is_the_json_structure_or_nothing(output):
    """Keys and values made of JSON's structural characters: whenever the
    byte split answers, it is what parsing the JSON gives."""
    text = encode_result(output)
    found = flat_rows(text)
    if found is not None:
        keys, bodies = found
        parsed = [
            (json.loads(b'"' + k + b'"'), json.loads(b"[" + b + b"]"))
            for k, b in zip(keys, bodies, strict=True)
        ]
        assert parsed == [tuple(row) for row in json.loads(text)]
    if all(isinstance(v, int) for vs in output.values() for v in vs) and not any(
        c in key for key in output for c in '[]"\\'
    ):
        assert found is not None  # the common case must take the fast path


def _parsed_flat(text: bytes):
    rows = json.loads(text)
    assert isinstance(rows, list)
    for row in rows:
        assert isinstance(row, list) and len(row) == 2
        assert isinstance(row[0], str) and isinstance(row[1], list)
    return rows


@settings(max_examples=1500)
@given(
    st.lists(
        st.tuples(
            st.text(alphabet='ab"\\\x01é', max_size=3),
            st.one_of(
                st.text(alphabet="0123456789,-x. ", max_size=8),
                st.lists(st.sampled_from(["0", "7", "10", "01", "-", "-0", "-01", "", "1.5"])).map(
                    ",".join
                ),
            ),
        ),
        max_size=4,
    )
)
def test_property_a_proved_flat_output_is_json_integers_and_every_json_one_is_proved(rows):
    """Near-misses of `[["k",[1,2]]]` built as bytes, not by an encoder:
    whatever `valid_flat_rows` proves, json reads as string keys and
    integer lists; whatever json reads so, canonical and with plain keys,
    it proves."""
    text = b"[" + b",".join(b'["%b",[%b]]' % (k.encode(), v.encode()) for k, v in rows) + b"]"
    try:
        parsed = _parsed_flat(text)
        exact = all(type(v) is int for _, values in parsed for v in values)
    except (ValueError, AssertionError):
        parsed, exact = None, False
    proved = valid_flat_rows(text)
    if proved is not None:
        assert parsed is not None and exact, text
        assert [json.loads(b'"' + key + b'"') for key in proved.keys] == [k for k, _ in parsed]
    elif exact and standard(parsed) == text and not any(c in k for k, _ in rows for c in '"\\\x01'):
        pytest.fail(f"JSON integer lists with plain keys not proved: {text!r}")


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=6), st.lists(st.integers(), max_size=5), max_size=8))
def test_property_encoded_integer_outputs_are_proved_unless_a_key_needs_an_escape(output):
    text = encode_result(output)
    plain = not any(c in key for key in output for c in '[]"\\') and all(
        ord(c) >= 0x20 for key in output for c in key
    )
    assert (valid_flat_rows(text) is not None) == plain


def test_a_word_count_output_is_proved_by_bytes_and_garbage_is_not():
    assert valid_flat_rows(encode_result({"the": [1, 1], "é": [-3, 0, 10]})) is not None
    for garbage in [
        b'[["k",[garbage]]]',
        b'[["k",[01]]]',
        b'[["k",[1,]]]',
        b'[["k",[1-2]]]',
        b'[["k",[-]]]',
        b'[["k",[1,01]]]',
        b'[["k",[-01]]]',
        b'[["k",[1]],["j",[2,-00]]]',
        b'[["k\\",[1]]]',
        b'[["\xff",[1]]]',
        b'[["k",[1.5]]]',
    ]:
        assert valid_flat_rows(garbage) is None, garbage
