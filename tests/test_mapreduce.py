"""What a task computes from the user's functions (worker_service.mapreduce,
plain Python, as the sandbox runs it): the shapes of output a user may
produce, and a clear error for the ones they may not."""

from __future__ import annotations

import pytest

from worker_service.mapreduce import (
    MAP,
    REDUCE,
    BadUserOutput,
    run_combiner,
    run_map,
    run_reduce,
    run_task,
)


def words(_key, text):
    for word in text.split():
        yield word, 1


def test_map_groups_values_by_key_in_the_order_they_were_yielded():
    out = run_map(words, [("a", "x y x"), ("b", "y x")])
    assert out == {"x": [1, 1, 1], "y": [1, 1]}
    assert list(out) == ["x", "y"]


def test_a_mapper_returning_none_or_a_list_of_pairs_is_fine():
    assert run_map(lambda k, v: None, [("a", 1)]) == {}
    assert run_map(lambda k, v: [(v, k), [v, k]], [("a", 1)]) == {1: ["a", "a"]}


@pytest.mark.parametrize("bad", [7, ("only one",), ({"un": "hashable"}, 1)])
def test_a_mapper_yielding_something_else_is_a_clear_error(bad):
    with pytest.raises(BadUserOutput, match="the mapper must yield"):
        run_map(lambda k, v: iter([bad]), [("a", 1)])


def add_up(word, counts):
    yield word, sum(counts)


def test_a_combiner_may_yield_pairs_or_return_a_value():
    grouped = {"x": [1, 1, 1], "y": [1]}
    assert run_combiner(add_up, grouped) == {"x": [3], "y": [1]}
    assert run_combiner(lambda k, vs: max(vs), grouped) == {"x": [1], "y": [1]}

    def count_all(key, values):
        yield "all", len(values)

    assert run_combiner(count_all, grouped) == {"all": [3, 1]}  # merged, in order
    # Only a generator yields pairs: anything else returned is the value.
    returned = iter([("not", "pairs")])
    assert run_combiner(lambda k, vs: returned, {"x": [1]}) == {"x": [returned]}


def test_reducers_yield_pairs_or_return_a_value_mincemeat_style():
    rows = [("x", [1, 2]), ("y", [3])]
    assert run_reduce(lambda k, vs: sum(vs), rows) == {"x": 3, "y": 3}
    assert run_reduce(add_up, rows) == {"x": 3, "y": 3}

    def doubled(key, values):
        yield key * 2, values

    assert run_reduce(doubled, rows) == {"xx": [1, 2], "yy": [3]}


@pytest.mark.parametrize("phase_runner", ["combiner", "reducer"])
def test_list_keys_become_tuples_and_2_lists_count_as_pairs(phase_runner):
    def keyed(key, values):
        yield ["t", [key, 1]], len(values)
        yield [("u",), 2]

    if phase_runner == "combiner":
        out = run_combiner(keyed, {"x": [1, 1]})
        assert out == {("t", ("x", 1)): [2], ("u",): [2]}
    else:
        out = run_reduce(keyed, [("x", [1, 1])])
        assert out == {("t", ("x", 1)): 2, ("u",): 2}


@pytest.mark.parametrize(
    ("runner", "what"),
    [
        (lambda f: run_combiner(f, {"x": [1]}), "the combiner"),
        (lambda f: run_reduce(f, [("x", [1])]), "the reducer"),
    ],
)
@pytest.mark.parametrize("bad", [7, ("a", 1, 2), "ab", None])
def test_combiners_and_reducers_yielding_non_pairs_are_clear_errors(runner, what, bad):
    def yields_bad(key, values):
        yield bad

    with pytest.raises(BadUserOutput, match=f"{what} yielded .*not a \\(key, value\\) pair"):
        runner(yields_bad)


def test_an_unhashable_key_from_a_reducer_is_the_users_type_error():
    def dict_key(key, values):
        yield {"k": key}, 1

    with pytest.raises(TypeError, match="unhashable"):
        run_reduce(dict_key, [("x", [1])])


def test_run_task_runs_map_then_the_payloads_combiner_or_reduce():
    functions = {"function": words, "combiner": add_up}
    assert run_task(MAP, functions, [("a", "x x y")]) == {"x": [2], "y": [1]}
    assert run_task(MAP, {"function": words}, [("a", "x x")]) == {"x": [1, 1]}
    assert run_task(REDUCE, {"function": add_up}, [("x", [2, 3])]) == {"x": 5}
    with pytest.raises(ValueError, match="unknown phase"):
        run_task(9, functions, [])
