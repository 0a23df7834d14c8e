"""Job planning and the shuffle, without sockets."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ec262.encoding import decode_pairs, decode_result, encode_result
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
    rows = list(input_rows(data))
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


def _merged(outputs: list[tuple[int, dict]], chunks: int, count: int = 2) -> tuple[list, bool]:
    shuffle = Shuffle(chunks)
    for index, output in outputs:
        shuffle.add(index, encode_result(output))
    reduce_chunks = shuffle.reduce_chunks(count, chunk_bytes=1)
    assert len(reduce_chunks) <= count
    rows = [tuple(pair) for chunk in reduce_chunks for pair in decode_pairs(chunk)]
    return rows, shuffle.text_mode


def test_the_shuffle_merges_in_chunk_order_whatever_order_results_arrive():
    outputs = [(2, {"a": [5], "c": [6]}), (0, {"a": [1, 2], "b": ["x,y"]}), (1, {"a": [4]})]
    rows, text_mode = _merged(outputs, 3)
    assert text_mode
    assert rows == [("a", [1, 2, 4, 5]), ("b", ["x,y"]), ("c", [6])]


@pytest.mark.parametrize(
    ("awkward", "stays_text"),
    [
        ({7: [1]}, False),
        ({"a": [[1, 2]]}, False),
        ({"a": ["has ] bracket"]}, False),
        ({("t", 1): [1]}, False),
        ({"a": [{"k": 1}]}, True),
        ({"": [1], "x,y": ["a,b", None]}, True),
        ({"a]],[": [1]}, False),
        ({'a"b\\': [1]}, True),  # escapes stay text
        ({"a": ['",[', 2]}, False),
        ({"a": ['x",y']}, True),
        ({"a": [[]]}, False),
    ],
)
def test_outputs_that_are_not_flat_text_merge_as_objects_with_the_same_result(awkward, stays_text):
    outputs = [(0, {"a": [1], "b": [2]}), (1, awkward), (2, {"a": [3]})]
    rows, text_mode = _merged(outputs, 3)
    assert text_mode == stays_text
    expected: dict = {}
    for _, output in outputs:
        for key, values in output.items():
            expected.setdefault(key, []).extend(values)
    assert dict(rows) == expected
    assert [key for key, _ in rows] == list(expected)


@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=6),
            st.lists(
                st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none()), max_size=4
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_property_text_and_object_merging_agree(outputs):
    indexed = list(enumerate(outputs))
    rows, _ = _merged(indexed, len(outputs), count=3)
    expected: dict = {}
    for output in outputs:  # as the workers send them: keys in canonical order
        for key, values in decode_result(encode_result(output)).items():
            expected.setdefault(key, []).extend(values)
    assert rows == list(expected.items())


def test_planning_holds_the_input_text_once_and_no_object_per_row():
    """Issue 16: a row at a time cost about 4 KB of foreman memory per record.
    Now the blocks of text are the peak, with one chunk's copy beside them."""
    data = {f"line{n}": f"w{n % 977} w{n % 13} the quick brown fox {n}" for n in range(200_000)}
    tracemalloc.start()
    try:
        plan = plan_job(input_rows(data), balance=10**6, replication=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan.map_chunks) > 8
    assert peak < 1.3 * plan.input_bytes + (2 << 20), (peak, plan.input_bytes)
    sizes = [len(chunk) for chunk in plan.map_chunks]
    assert max(sizes) < 1.2 * min(sizes)  # cut between blocks, still even
    decoded = [tuple(pair) for chunk in plan.map_chunks for pair in decode_pairs(chunk)]
    assert decoded == list(data.items())


def test_a_job_paces_the_collector_for_bulk_data_and_gives_the_callers_pace_back():
    import gc

    from ec262.collector import BULK_GC_THRESHOLDS, bulk_allocation

    before = gc.get_threshold()
    gc.set_threshold(123, 4, 5)
    try:
        with pytest.raises(RuntimeError), bulk_allocation():
            assert gc.get_threshold() == BULK_GC_THRESHOLDS
            raise RuntimeError("a job that fails")
        assert gc.get_threshold() == (123, 4, 5)
    finally:
        gc.set_threshold(*before)
