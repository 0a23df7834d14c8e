"""Job planning and the shuffle, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ec262.encoding import decode_pairs
from ec262.errors import EncodingError, InsufficientCredits
from foreman_service.planning import input_rows, plan_job, split_evenly
from foreman_service.shuffle import Shuffle


@given(st.lists(st.integers(0, 50), max_size=60), st.integers(1, 12))
def test_split_evenly_keeps_order_and_never_exceeds_the_count(weights, count):
    items = list(range(len(weights)))
    groups = split_evenly(items, weights, count) if items else []
    assert [i for group in groups for i in group] == items
    assert len(groups) <= count
    assert all(groups)


@given(
    st.dictionaries(st.text(max_size=5), st.text(max_size=300), min_size=1, max_size=40),
    st.integers(0, 200),
    st.integers(1, 5),
    st.integers(16, 2000),
)
def test_a_plan_is_affordable_and_keeps_every_row_in_order(data, balance, replication, chunk):
    rows = input_rows(data)
    try:
        plan = plan_job(rows, balance=balance, replication=replication, chunk_bytes=chunk)
    except InsufficientCredits as error:
        assert error.available == balance and error.needed > balance
        assert balance < 2 * replication
        return
    assert plan.credits_needed <= balance
    decoded = [tuple(pair) for chunk_rows in plan.map_chunks for pair in decode_pairs(chunk_rows)]
    assert decoded == rows


def test_input_that_json_cannot_carry_names_the_record():
    with pytest.raises(EncodingError, match="'bad'"):
        plan_job([("ok", "x"), ("bad", {1, 2})], balance=100, replication=3)


def test_the_shuffle_merges_in_chunk_order_whatever_order_results_arrive():
    shuffle = Shuffle(3)
    shuffle.add(2, {"a": [5], "c": [6]})
    shuffle.add(0, {"a": [1, 2], "b": [3]})
    assert shuffle.grouped == {"a": [1, 2], "b": [3]}
    shuffle.add(1, {"a": [4]})
    assert shuffle.grouped == {"a": [1, 2, 4, 5], "b": [3], "c": [6]}
    chunks = shuffle.reduce_chunks(2, chunk_bytes=1)
    assert 1 <= len(chunks) <= 2
    rows = [tuple(pair) for chunk in chunks for pair in decode_pairs(chunk)]
    assert rows == [("a", [1, 2, 4, 5]), ("b", [3]), ("c", [6])]
