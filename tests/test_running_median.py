"""The foreman's running median gives what `statistics.median` gives over
the same numbers, after every one of them."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foreman_service.median import RunningMedian

seconds = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(st.lists(seconds, max_size=200))
def test_the_median_after_every_value_is_the_median_of_all_so_far(values: list[float]) -> None:
    running = RunningMedian()
    for count, value in enumerate(values, start=1):
        running.add(value)
        assert len(running) == count
        assert running.median() == statistics.median(values[:count])


@given(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=1, max_size=50))
def test_repeated_values_land_in_either_half_alike(values: list[float]) -> None:
    running = RunningMedian()
    for value in values:
        running.add(value)
    assert running.median() == statistics.median(values)


def test_an_empty_median_is_an_error_not_a_number() -> None:
    with pytest.raises(ValueError):
        RunningMedian().median()
    assert len(RunningMedian()) == 0
