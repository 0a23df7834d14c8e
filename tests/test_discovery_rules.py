"""The rules of docs/protocol.md section 2 for Discovery, checked against a real
server on loopback through the generated stubs."""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections import Counter

import grpc
import pytest

from discovery_service.ledger import LedgerConfig
from ec262.errors import InsufficientCredits, UnknownTask
from ec262.grpc_errors import error_from_rpc
from ec262.v1 import discovery_pb2 as pb
from tests.conftest import rpc_error
from tests.discovery_harness import RUNTIME

NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def assigned(response: pb.RequestTasksResponse) -> list[str]:
    return [w.client_id for task in response.tasks for w in task.workers]


# -- identities and credits ------------------------------------------------


def test_a_new_client_starts_with_the_starting_credits(discovery):
    response = discovery.stub.CreateClient(pb.CreateClientRequest())
    assert str(uuid.UUID(response.client_id)) == response.client_id
    assert len(response.secret) >= 32
    assert response.info.client_id == response.client_id
    assert response.info.credits == 12
    me = discovery.client()
    assert discovery.info(me).credits == 12
    assert discovery.info(me).client_id == me.client_id


def test_starting_credits_follow_the_config(discovery_factory):
    harness = discovery_factory(LedgerConfig(starting_credits=5))
    assert harness.credits(harness.client()) == 5


def test_the_ledger_keeps_only_a_hash_of_the_secret(discovery):
    me = discovery.client()
    raw = discovery.raw_ledger()
    assert me.client_id.encode() in raw
    assert me.secret.encode() not in raw


def test_each_task_costs_replication_credits(discovery_factory):
    for replication in (1, 2, 3):
        harness = discovery_factory(LedgerConfig(replication=replication), name=f"r{replication}")
        foreman = harness.client()
        for _ in range(3):
            harness.worker(slots=2)
        response = harness.request(foreman, n=2)
        assert len(response.tasks) == 2
        assert all(len(task.workers) == replication for task in response.tasks)
        assert response.replication == replication
        assert response.credits == 12 - 2 * replication
        assert harness.credits(foreman) == 12 - 2 * replication


def test_a_request_beyond_the_balance_fails_whole_and_charges_nothing(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=5) for _ in range(3)]
    error = rpc_error(discovery.request, foreman, 5)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "15" in error.details() and "12" in error.details()
    translated = error_from_rpc(error)
    assert isinstance(translated, InsufficientCredits)
    assert (translated.needed, translated.available) == (15, 12)
    assert discovery.credits(foreman) == 12
    assert all(discovery.info(w).busy_slots == 0 for w in workers)
    assert discovery.server.ledger.store.totals().open_tasks == 0


def test_partial_fill_charges_only_for_the_tasks_made(discovery):
    foreman = discovery.client()
    for _ in range(4):
        discovery.worker(slots=1)
    response = discovery.request(foreman, n=3)
    assert len(response.tasks) == 1
    assert response.credits == 9
    assert discovery.credits(foreman) == 9
    empty = discovery.request(foreman, n=2)
    assert len(empty.tasks) == 0
    assert empty.credits == 9


def test_n_zero_means_one(discovery):
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(slots=3)
    assert len(discovery.request(foreman, n=0).tasks) == 1


# -- the worker pool -------------------------------------------------------


def test_expired_workers_are_never_assigned(discovery):
    foreman = discovery.client()
    short = [discovery.worker(ttl=10) for _ in range(2)]
    long = [discovery.worker(ttl=100) for _ in range(2)]
    discovery.clock.advance(11)
    response = discovery.request(foreman, n=1)
    assert response.tasks == []
    assert discovery.credits(foreman) == 12
    discovery.worker(ttl=100)
    response = discovery.request(foreman, n=1)
    assert len(response.tasks) == 1
    chosen = set(assigned(response))
    assert not chosen & {w.client_id for w in short}
    assert {w.client_id for w in long} <= chosen


def test_a_heartbeat_extends_the_lease(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(ttl=10) for _ in range(3)]
    discovery.clock.advance(8)
    for number, worker in enumerate(workers):
        discovery.stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                address=f"127.0.0.1:{9990 + number}", ttl_seconds=10, runtime="cpython-3.11"
            ),
            metadata=worker.metadata,
        )
    discovery.clock.advance(8)
    assert len(discovery.request(foreman).tasks) == 1


def test_ttl_zero_means_the_default_lease(discovery):
    worker = discovery.worker(ttl=0)
    info = discovery.info(worker)
    assert info.expiry_unix == int(discovery.clock() + discovery.config.worker_ttl)


def test_deregistered_workers_are_never_assigned(discovery):
    foreman = discovery.client()
    workers = [discovery.worker() for _ in range(4)]
    leaving = workers[0]
    info = discovery.stub.RegisterWorker(
        pb.RegisterWorkerRequest(ttl_seconds=-1), metadata=leaving.metadata
    )
    assert info.expiry_unix == 0
    response = discovery.request(foreman, n=1)
    assert len(response.tasks) == 1
    assert leaving.client_id not in assigned(response)
    assert len(discovery.request(foreman, n=1).tasks) == 0


def test_the_foreman_is_never_its_own_worker(discovery):
    foreman = discovery.worker(slots=10)
    for _ in range(2):
        discovery.worker(slots=10)
    assert discovery.request(foreman, n=4).tasks == []
    discovery.worker(slots=10)
    response = discovery.request(foreman, n=4)
    assert len(response.tasks) == 4
    assert foreman.client_id not in assigned(response)


def test_workers_in_a_task_are_distinct_even_with_many_slots(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=5) for _ in range(3)]
    response = discovery.request(foreman, n=4)
    assert len(response.tasks) == 4
    for task in response.tasks:
        ids = [w.client_id for w in task.workers]
        assert len(set(ids)) == 3
    assert Counter(assigned(response)) == {w.client_id: 4 for w in workers}
    assert all(discovery.info(w).busy_slots == 4 for w in workers)


def test_excluded_workers_are_skipped(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=4) for _ in range(4)]
    excluded = workers[1].client_id
    response = discovery.request(foreman, n=4, exclude_workers=[excluded])
    assert len(response.tasks) == 4
    assert excluded not in assigned(response)
    foreman2 = discovery.client()
    response = discovery.request(
        foreman2, n=1, exclude_workers=[workers[0].client_id, workers[2].client_id]
    )
    assert response.tasks == []


def test_only_workers_of_the_requested_runtime_are_assigned(discovery):
    foreman = discovery.client()
    old = [discovery.worker(slots=3, runtime="cpython-3.10") for _ in range(3)]
    new = [discovery.worker(slots=3, runtime="cpython-3.11") for _ in range(2)]
    assert discovery.request(foreman, runtime="cpython-3.11").tasks == []
    third = discovery.worker(slots=3, runtime="cpython-3.11")
    response = discovery.request(foreman, runtime="cpython-3.11")
    assert set(assigned(response)) == {w.client_id for w in [*new, third]}
    response = discovery.request(foreman, runtime="cpython-3.10")
    assert set(assigned(response)) == {w.client_id for w in old}


def test_workers_are_chosen_at_random_not_by_lease(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=1, ttl=10 + i) for i in range(6)]
    seen: Counter[str] = Counter()
    for _ in range(40):  # P(some worker never chosen) < 6 * 0.5**40
        task = discovery.request(foreman, n=1).tasks[0]
        seen.update(w.client_id for w in task.workers)
        discovery.settle(foreman, task.task_id, valid=False)
    assert set(seen) == {w.client_id for w in workers}


def test_a_busy_slot_frees_on_settle(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=1) for _ in range(3)]
    first = discovery.request(foreman).tasks[0]
    assert all(discovery.info(w).busy_slots == 1 for w in workers)
    assert discovery.request(foreman).tasks == []
    discovery.settle(foreman, first.task_id, valid=True)
    assert all(discovery.info(w).busy_slots == 0 for w in workers)
    second = discovery.request(foreman).tasks[0]
    discovery.settle(foreman, second.task_id, valid=False)
    assert len(discovery.request(foreman).tasks) == 1


def test_re_registering_keeps_credits_and_busy_slots(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=2) for _ in range(3)]
    task = discovery.request(foreman, n=2).tasks[0]
    discovery.settle(foreman, task.task_id, valid=True)
    before = discovery.info(workers[0])
    assert before.credits == 13
    assert before.busy_slots == 1
    after = discovery.stub.RegisterWorker(
        pb.RegisterWorkerRequest(
            address="127.0.0.1:30000", ttl_seconds=30, slots=3, runtime="cpython-3.11"
        ),
        metadata=workers[0].metadata,
    )
    assert after.credits == 13
    assert after.busy_slots == 1
    assert after.slots == 3
    assert after.address == "127.0.0.1:30000"
    assert after.tasks_completed == 1


# -- keys and settlement ---------------------------------------------------


def test_a_valid_settle_returns_the_workers_key_and_pays_them(discovery):
    foreman = discovery.client()
    workers = {w.client_id: w for w in (discovery.worker() for _ in range(3))}
    task = discovery.request(foreman).tasks[0]
    keys = set()
    for ref in task.workers:
        fetched = discovery.fetch_key(workers[ref.client_id], task.task_id)
        assert fetched.foreman_id == foreman.client_id
        keys.add(fetched.key)
    assert len(keys) == 1
    (key,) = keys
    assert len(key) == 16
    settled = discovery.settle(foreman, task.task_id, valid=True)
    assert settled.key == key
    assert settled.credits == 9
    for worker in workers.values():
        info = discovery.info(worker)
        assert (info.credits, info.tasks_completed, info.tasks_failed) == (13, 1, 0)
    assert discovery.total_credits() == discovery.issued_credits()


def test_missing_workers_are_not_paid_and_their_credit_returns(discovery):
    foreman = discovery.client()
    workers = {w.client_id: w for w in (discovery.worker() for _ in range(3))}
    task = discovery.request(foreman).tasks[0]
    cheater = task.workers[2].client_id
    settled = discovery.settle(foreman, task.task_id, valid=True, missing=[cheater, cheater])
    assert len(settled.key) == 16
    assert settled.credits == 10
    for client_id, worker in workers.items():
        info = discovery.info(worker)
        if client_id == cheater:
            assert (info.credits, info.tasks_completed, info.tasks_failed) == (12, 0, 1)
        else:
            assert (info.credits, info.tasks_completed, info.tasks_failed) == (13, 1, 0)
        assert info.busy_slots == 0
    assert discovery.total_credits() == discovery.issued_credits()


def test_an_invalid_settle_refunds_everything_and_returns_no_key(discovery):
    foreman = discovery.client()
    workers = [discovery.worker() for _ in range(3)]
    task = discovery.request(foreman).tasks[0]
    settled = discovery.settle(foreman, task.task_id, valid=False)
    assert settled.key == b""
    assert settled.credits == 12
    for worker in workers:
        info = discovery.info(worker)
        assert (info.credits, info.tasks_completed, info.tasks_failed, info.busy_slots) == (
            12,
            0,
            0,
            0,
        )


def test_settle_happens_once_by_the_owner_only(discovery):
    foreman = discovery.client()
    stranger = discovery.client()
    workers = {w.client_id: w for w in (discovery.worker() for _ in range(3))}
    task = discovery.request(foreman).tasks[0]
    for intruder in (stranger, workers[task.workers[0].client_id]):
        error = rpc_error(discovery.settle, intruder, task.task_id, valid=True)
        assert error.code() == NOT_FOUND
        assert isinstance(error_from_rpc(error), UnknownTask)
    discovery.settle(foreman, task.task_id, valid=True)
    for intruder in (stranger, workers[task.workers[0].client_id]):  # settled: still not theirs
        assert rpc_error(discovery.settle, intruder, task.task_id, valid=True).code() == NOT_FOUND
    unknown = "0" * 32
    assert rpc_error(discovery.settle, foreman, unknown, valid=True).code() == NOT_FOUND
    assert discovery.credits(foreman) == 9
    assert discovery.credits(stranger) == 12
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_repeated_settle_gets_the_same_answer_and_moves_nothing(discovery):
    """A foreman whose settle reply was lost can retry it (docs/protocol.md
    section 9): the same settle answers the same key and moves no credit; a
    contradicting one is FAILED_PRECONDITION and moves none either."""
    foreman = discovery.client()
    workers = [discovery.worker() for _ in range(3)]
    task = discovery.request(foreman).tasks[0]
    cheater = task.workers[2].client_id
    first = discovery.settle(foreman, task.task_id, valid=True, missing=[cheater])
    books = (discovery.total_credits(), [discovery.info(w) for w in workers])
    again = discovery.settle(foreman, task.task_id, valid=True, missing=[cheater])
    assert (again.key, again.credits) == (first.key, first.credits)
    for valid, missing in ((False, []), (True, []), (True, [task.workers[0].client_id])):
        error = rpc_error(discovery.settle, foreman, task.task_id, valid=valid, missing=missing)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (valid, missing)
        assert "already settled valid" in error.details()
    assert (discovery.total_credits(), [discovery.info(w) for w in workers]) == books
    assert discovery.credits(foreman) == first.credits == 10
    invalid = discovery.request(foreman).tasks[0]
    refunded = discovery.settle(foreman, invalid.task_id, valid=False)
    assert discovery.settle(foreman, invalid.task_id, valid=False).credits == refunded.credits
    error = rpc_error(discovery.settle, foreman, invalid.task_id, valid=True)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already settled invalid" in error.details()
    assert discovery.total_credits() == discovery.issued_credits()


# -- releasing and adding replicas (docs/protocol.md section 9) ---------------


def _workers_by_id(discovery, count: int, **fields) -> dict:
    return {w.client_id: w for w in (discovery.worker(**fields) for _ in range(count))}


def test_add_replica_releases_a_worker_and_adds_another_for_one_credit(discovery):
    foreman = discovery.client()
    workers = _workers_by_id(discovery, 4)
    task = discovery.request(foreman).tasks[0]
    members = [w.client_id for w in task.workers]
    (outside,) = set(workers) - set(members)
    refused = members[0]  # say its AssignTask was refused: it never started
    added = discovery.add_replica(foreman, task.task_id, release_workers=[refused])
    assert added.client_id == outside
    assert added.address.startswith("127.0.0.1:")
    assert discovery.credits(foreman) == 9  # 3 escrowed, 1 back, 1 more in
    assert discovery.info(workers[refused]).busy_slots == 0
    assert discovery.info(workers[outside]).busy_slots == 1
    assert rpc_error(discovery.fetch_key, workers[refused], task.task_id).code() == NOT_FOUND
    assert discovery.fetch_key(workers[outside], task.task_id).foreman_id == foreman.client_id
    settled = discovery.settle(foreman, task.task_id, valid=True)
    assert settled.credits == 9
    released = discovery.info(workers[refused])
    assert (released.credits, released.tasks_completed, released.tasks_failed) == (12, 0, 0)
    for client_id in set(members[1:]) | {outside}:
        info = discovery.info(workers[client_id])
        assert (info.credits, info.tasks_completed, info.busy_slots) == (13, 1, 0)
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_replica_never_repeats_a_member_an_excluded_or_a_released_worker(discovery):
    foreman = discovery.client()
    workers = _workers_by_id(discovery, 5, slots=4)
    task = discovery.request(foreman).tasks[0]
    members = {w.client_id for w in task.workers}
    excluded = sorted(set(workers) - members)[0]
    first = discovery.add_replica(
        foreman, task.task_id, exclude_workers=[excluded], count_live=True
    )
    assert first.client_id not in members | {excluded}
    second = discovery.add_replica(
        foreman,
        task.task_id,
        exclude_workers=[excluded],
        release_workers=[first.client_id],
        count_live=True,
    )
    assert second.client_id == ""  # every other worker is a member, excluded or released
    again = discovery.add_replica(
        foreman, task.task_id, exclude_workers=[excluded, first.client_id]
    )
    assert again.client_id == ""
    # Counted when asked and nobody was found: all five are live, busy or
    # not (the foreman learns its exclusions leave the task nobody).
    assert [w.live_workers for w in (first, second, again)] == [0, 5, 0]
    assert discovery.info(workers[first.client_id]).busy_slots == 0
    assert discovery.credits(foreman) == 9
    discovery.settle(foreman, task.task_id, valid=False)
    assert discovery.credits(foreman) == 12
    assert all(discovery.info(w).busy_slots == 0 for w in workers.values())
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_task_holds_at_most_twice_the_replication_in_workers(discovery):
    foreman = discovery.client()
    _workers_by_id(discovery, 9)
    task = discovery.request(foreman).tasks[0]
    replication = discovery.config.replication
    added = [discovery.add_replica(foreman, task.task_id).client_id for _ in range(5)]
    assert all(added[:replication]) and added[replication:] == ["", ""]
    assert discovery.credits(foreman) == 12 - 2 * replication
    discovery.settle(foreman, task.task_id, valid=True)
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_repeated_add_replica_returns_the_same_worker_and_charges_once(discovery):
    foreman = discovery.client()
    _workers_by_id(discovery, 6)
    task = discovery.request(foreman).tasks[0]
    first = discovery.add_replica(foreman, task.task_id, request_id="r-1")
    again = discovery.add_replica(foreman, task.task_id, request_id="r-1")
    assert (again.client_id, again.address) == (first.client_id, first.address) != ("", "")
    assert discovery.credits(foreman) == 8
    error = rpc_error(
        discovery.add_replica,
        foreman,
        task.task_id,
        request_id="r-1",
        exclude_workers=[first.client_id],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert discovery.credits(foreman) == 8


def test_add_replica_is_for_the_owner_of_an_open_task_only(discovery):
    foreman = discovery.client()
    stranger = discovery.client()
    workers = _workers_by_id(discovery, 4)
    task = discovery.request(foreman).tasks[0]
    assert rpc_error(discovery.add_replica, stranger, task.task_id).code() == NOT_FOUND
    outsider = sorted(set(workers) - {w.client_id for w in task.workers})[0]
    error = rpc_error(discovery.add_replica, foreman, task.task_id, release_workers=[outsider])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not assigned" in error.details()
    discovery.settle(foreman, task.task_id, valid=True)
    assert rpc_error(discovery.add_replica, foreman, task.task_id).code() == NOT_FOUND
    assert discovery.credits(foreman) == 9 and discovery.credits(stranger) == 12
    assert discovery.total_credits() == discovery.issued_credits()


def test_add_replica_needs_a_credit(discovery_factory):
    discovery = discovery_factory(LedgerConfig(starting_credits=3))
    foreman = discovery.client()
    _workers_by_id(discovery, 4)
    task = discovery.request(foreman).tasks[0]
    error = rpc_error(discovery.add_replica, foreman, task.task_id)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert discovery.credits(foreman) == 0
    swapped = discovery.add_replica(
        foreman, task.task_id, release_workers=[task.workers[0].client_id]
    )
    assert swapped.client_id  # the released worker's credit pays for its replacement
    assert discovery.credits(foreman) == 0
    assert discovery.total_credits() == discovery.issued_credits()


def test_released_workers_at_settle_are_neither_paid_nor_failed(discovery):
    foreman = discovery.client()
    workers = _workers_by_id(discovery, 4)
    task = discovery.request(foreman).tasks[0]
    extra = discovery.add_replica(foreman, task.task_id).client_id
    late = task.workers[0].client_id  # cancelled after the quorum
    wrong = task.workers[1].client_id
    settled = discovery.settle(foreman, task.task_id, valid=True, missing=[wrong], released=[late])
    assert settled.credits == 12 - 4 + 2
    expected = {late: (12, 0, 0), wrong: (12, 0, 1)}
    for client_id, worker in workers.items():
        info = discovery.info(worker)
        got = (info.credits, info.tasks_completed, info.tasks_failed)
        assert got == expected.get(client_id, (13, 1, 0)), client_id
        assert info.busy_slots == 0
    again = discovery.settle(foreman, task.task_id, valid=True, missing=[wrong], released=[late])
    assert again.credits == settled.credits
    error = rpc_error(discovery.settle, foreman, task.task_id, valid=True, missing=[wrong])
    assert error.code() == FAILED_PRECONDITION
    assert extra in workers
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_worker_cannot_be_both_missing_and_released(discovery):
    foreman = discovery.client()
    _workers_by_id(discovery, 3)
    task = discovery.request(foreman).tasks[0]
    both = task.workers[0].client_id
    error = rpc_error(
        discovery.settle, foreman, task.task_id, valid=True, missing=[both], released=[both]
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert discovery.credits(foreman) == 9


def test_a_settle_is_remembered_until_the_task_would_have_expired(discovery_factory):
    discovery = discovery_factory(LedgerConfig(task_ttl=600))
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(ttl=3600)
    task = discovery.request(foreman).tasks[0]
    discovery.settle(foreman, task.task_id, valid=True)
    discovery.clock.advance(599)
    assert len(discovery.settle(foreman, task.task_id, valid=True).key) == 16
    discovery.clock.advance(1)
    assert rpc_error(discovery.settle, foreman, task.task_id, valid=True).code() == NOT_FOUND


def _assigned(response) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(t.task_id, [(w.client_id, w.address) for w in t.workers]) for t in response.tasks]


def test_a_repeated_request_id_returns_the_same_tasks_and_charges_once(discovery):
    """A RequestTasks whose reply was lost can be retried (docs/protocol.md
    section 9): the same request_id returns the same tasks, charges nothing
    more and takes no more slots."""
    foreman, other = discovery.client(), discovery.client()
    workers = [discovery.worker(slots=4) for _ in range(3)]
    first = discovery.request(foreman, n=2, request_id="job-1/request-1")
    assert len(first.tasks) == 2 and first.credits == 6
    again = discovery.request(foreman, n=2, request_id="job-1/request-1")
    assert _assigned(again) == _assigned(first)
    assert again.credits == 6
    assert [discovery.info(w).busy_slots for w in workers] == [2, 2, 2]
    # scoped to the foreman: another one's same id is a request of its own
    assert discovery.request(other, n=1, request_id="job-1/request-1").credits == 9
    # and still answered the same after the tasks are settled
    for task in first.tasks:
        discovery.settle(foreman, task.task_id, valid=False)
    assert _assigned(discovery.request(foreman, n=2, request_id="job-1/request-1")) == (
        _assigned(first)
    )
    assert discovery.credits(foreman) == 12
    assert discovery.total_credits() == discovery.issued_credits()


@pytest.mark.parametrize(
    "change",
    [{"n": 1}, {"exclude_workers": ["00000000-0000-4000-8000-000000000001"]}],
    ids=["other-n", "other-exclusions"],
)
def test_a_request_id_reused_for_another_request_is_invalid_and_charges_nothing(discovery, change):
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(slots=4)
    discovery.request(foreman, n=2, request_id="r1")
    fields = {"n": 2, "request_id": "r1", **change}
    error = rpc_error(discovery.request, foreman, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "r1" in error.details()
    assert discovery.credits(foreman) == 6


def test_a_request_id_is_at_most_64_printable_characters(discovery):
    foreman = discovery.client()
    for bad in ("x" * 65, "tab\there"):
        error = rpc_error(discovery.request, foreman, n=1, request_id=bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert discovery.credits(foreman) == 12


def test_a_request_id_is_remembered_for_the_task_ttl(discovery_factory):
    discovery = discovery_factory(LedgerConfig(task_ttl=600))
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(ttl=3600, slots=4)
    first = discovery.request(foreman, n=1, request_id="r")
    discovery.clock.advance(599)
    assert _assigned(discovery.request(foreman, n=1, request_id="r")) == _assigned(first)
    discovery.clock.advance(1)  # the task expired (refunded); the id is forgotten
    later = discovery.request(foreman, n=1, request_id="r")
    assert _assigned(later) != _assigned(first)
    assert later.credits == 9


def test_fetch_key_is_for_assigned_workers_only(discovery):
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker()
    bystander = discovery.worker()
    discovery.stub.RegisterWorker(
        pb.RegisterWorkerRequest(ttl_seconds=-1), metadata=bystander.metadata
    )
    task = discovery.request(foreman).tasks[0]
    for caller in (bystander, foreman, discovery.client()):
        error = rpc_error(discovery.fetch_key, caller, task.task_id)
        assert error.code() == NOT_FOUND
    assert rpc_error(discovery.fetch_key, foreman, "f" * 32).code() == NOT_FOUND


def test_fetch_key_after_settle_is_not_found(discovery):
    foreman = discovery.client()
    workers = {w.client_id: w for w in (discovery.worker() for _ in range(3))}
    task = discovery.request(foreman).tasks[0]
    worker = workers[task.workers[0].client_id]
    discovery.fetch_key(worker, task.task_id)
    discovery.settle(foreman, task.task_id, valid=True)
    assert rpc_error(discovery.fetch_key, worker, task.task_id).code() == NOT_FOUND


def test_an_expired_task_refunds_frees_slots_and_is_gone(discovery_factory):
    discovery = discovery_factory(LedgerConfig(task_ttl=600))
    foreman = discovery.client()
    workers = {w.client_id: w for w in (discovery.worker(ttl=3600) for _ in range(3))}
    task = discovery.request(foreman).tasks[0]
    assert task.expiry_unix == int(discovery.clock() + discovery.config.task_ttl)
    discovery.clock.advance(discovery.config.task_ttl - 1)
    worker = workers[task.workers[0].client_id]
    assert len(discovery.fetch_key(worker, task.task_id).key) == 16
    discovery.clock.advance(1)
    assert rpc_error(discovery.fetch_key, worker, task.task_id).code() == NOT_FOUND
    assert rpc_error(discovery.settle, foreman, task.task_id, valid=True).code() == NOT_FOUND
    assert discovery.credits(foreman) == 12
    assert all(discovery.info(w).busy_slots == 0 for w in workers.values())
    assert all(discovery.info(w).credits == 12 for w in workers.values())
    assert len(discovery.request(foreman).tasks) == 1


def test_task_ids_are_opaque_and_random(discovery):
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(slots=4)
    ids = [t.task_id for t in discovery.request(foreman, n=4).tasks]
    assert len(set(ids)) == 4
    assert all(re.fullmatch(r"[0-9a-f]{32}", task_id) for task_id in ids)
    as_numbers = sorted(int(task_id, 16) for task_id in ids)
    assert all(b - a > 1000 for a, b in itertools.pairwise(as_numbers))


# -- authentication --------------------------------------------------------


def _every_authenticated_call(discovery, task_id: str):
    stub = discovery.stub
    return {
        "RegisterWorker": lambda md: stub.RegisterWorker(
            pb.RegisterWorkerRequest(address="127.0.0.1:1234"), metadata=md
        ),
        "GetClient": lambda md: stub.GetClient(pb.GetClientRequest(), metadata=md),
        "RequestTasks": lambda md: stub.RequestTasks(pb.RequestTasksRequest(n=1), metadata=md),
        "FetchKey": lambda md: stub.FetchKey(pb.FetchKeyRequest(task_id=task_id), metadata=md),
        "SettleTask": lambda md: stub.SettleTask(
            pb.SettleTaskRequest(task_id=task_id, valid=True), metadata=md
        ),
        "AddReplica": lambda md: stub.AddReplica(
            pb.AddReplicaRequest(task_id=task_id), metadata=md
        ),
    }


def test_missing_forged_or_borrowed_secrets_are_unauthenticated(discovery):
    foreman = discovery.client()
    other = discovery.client()
    workers = [discovery.worker() for _ in range(3)]
    task = discovery.request(foreman).tasks[0]
    bad_credentials = {
        "missing": (),
        "forged secret": (("authorization", f"Bearer {foreman.client_id}:not-the-secret"),),
        "someone else's secret": (("authorization", f"Bearer {foreman.client_id}:{other.secret}"),),
        "unknown client": (("authorization", f"Bearer {uuid.uuid4()}:{foreman.secret}"),),
        "garbage": (("authorization", "Bearer !!!"),),
        "wrong scheme": (("authorization", f"Basic {foreman.client_id}:{foreman.secret}"),),
    }
    for call_name, call in _every_authenticated_call(discovery, task.task_id).items():
        for label, metadata in bad_credentials.items():
            error = rpc_error(call, metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (call_name, label)
            assert foreman.secret not in error.details()
    assert discovery.credits(foreman) == 9
    # The task is still open and settles normally with the right secret.
    worker_ids = {w.client_id for w in workers}
    assert {w.client_id for w in task.workers} == worker_ids
    assert len(discovery.settle(foreman, task.task_id, valid=True).key) == 16


# -- concurrency -----------------------------------------------------------


def _run_threads(count: int, target) -> list:
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = ("ok", target(index))
        except grpc.RpcError as error:
            results[index] = ("error", error.code())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_twenty_threads_settling_one_task_settle_it_once(discovery):
    foreman = discovery.client()
    workers = [discovery.worker() for _ in range(3)]
    for _round in range(3):
        task = discovery.request(foreman).tasks[0]
        results = _run_threads(
            20, lambda i, t=task: discovery.settle(foreman, t.task_id, valid=i % 2 == 0)
        )
        successes = [r for r in results if r[0] == "ok"]
        # the settle that took effect, and its repeats; the others contradict it
        assert len(successes) == 10
        assert all(r == ("error", FAILED_PRECONDITION) for r in results if r[0] == "error")
        assert discovery.total_credits() == discovery.issued_credits()
    paid = sum(discovery.credits(w) - 12 for w in workers)
    assert discovery.credits(foreman) == 12 - paid
    assert all(discovery.info(w).busy_slots == 0 for w in workers)


def test_twenty_threads_of_one_foreman_never_overdraw(discovery):
    foreman = discovery.client()
    for _ in range(10):
        discovery.worker(slots=10)
    results = _run_threads(20, lambda i: discovery.request(foreman, n=1))
    successes = [r[1] for r in results if r[0] == "ok"]
    failures = [r[1] for r in results if r[0] == "error"]
    assert len(successes) == 4
    assert failures == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 16
    assert sorted(s.credits for s in successes) == [0, 3, 6, 9]
    assert discovery.credits(foreman) == 0
    assert discovery.server.ledger.store.totals().open_tasks == 4
    assert discovery.total_credits() == discovery.issued_credits()


@pytest.mark.parametrize("n", [1, 2])
def test_many_foremen_at_once_conserve_credits(discovery, n):
    foremen = [discovery.client() for _ in range(8)]
    workers = [discovery.worker(slots=3) for _ in range(6)]

    def cycle(index: int) -> int:
        foreman = foremen[index % len(foremen)]
        response = discovery.request(foreman, n=n)
        for number, task in enumerate(response.tasks):
            missing = [task.workers[0].client_id] if number % 2 else []
            discovery.settle(foreman, task.task_id, valid=index % 3 != 0, missing=missing)
        return len(response.tasks)

    results = _run_threads(16, cycle)
    assert all(r[0] == "ok" or r[1] == grpc.StatusCode.RESOURCE_EXHAUSTED for r in results)
    assert discovery.total_credits() == discovery.issued_credits()
    assert all(discovery.info(w).busy_slots == 0 for w in workers)


# -- the foreman lease (docs/protocol.md section 9) -----------------------------


def test_a_silent_foreman_loses_its_open_tasks_within_the_lease_and_two_seconds(
    discovery_factory,
):
    discovery = discovery_factory(LedgerConfig(foreman_lease=60))
    foreman, other = discovery.client(), discovery.client()
    workers = [discovery.worker(ttl=3600, slots=2) for _ in range(3)]
    mine = discovery.request(foreman, n=1).tasks[0]  # the foreman's last call
    theirs = discovery.request(other, n=1).tasks[0]
    worker = next(w for w in workers if w.client_id == mine.workers[0].client_id)
    discovery.clock.advance(59)
    discovery.info(other)  # the other foreman keeps calling; this one is silent
    assert discovery.sweep() == 0
    assert len(discovery.fetch_key(worker, mine.task_id).key) == 16  # still open at 59 s
    discovery.clock.advance(3)  # 62 s after the foreman's last call
    discovery.info(other)
    discovery.sweep()
    assert discovery.credits(foreman) == 12  # refunded
    assert all(discovery.info(w).busy_slots == 1 for w in workers)  # only the other's task
    assert all(discovery.info(w).credits == 12 for w in workers)
    assert rpc_error(discovery.fetch_key, worker, mine.task_id).code() == NOT_FOUND
    assert len(discovery.fetch_key(worker, theirs.task_id).key) == 16
    assert rpc_error(discovery.settle, foreman, mine.task_id, valid=True).code() == NOT_FOUND
    assert discovery.total_credits() == discovery.issued_credits()


def test_a_foreman_calling_every_third_of_its_lease_keeps_its_tasks(discovery_factory):
    discovery = discovery_factory(LedgerConfig(foreman_lease=30))
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(ttl=3600)
    task = discovery.request(foreman).tasks[0]
    for _ in range(10):  # 100 s, more than three leases, with a GetClient every 10 s
        discovery.clock.advance(10)
        discovery.info(foreman)
        assert discovery.sweep() == 0
    assert len(discovery.settle(foreman, task.task_id, valid=True).key) == 16


def test_leases_start_again_when_the_discovery_service_starts(discovery_factory):
    """Nobody could call while the service was away: a restart on the same
    store gives every foreman a whole lease again."""
    discovery = discovery_factory(LedgerConfig(foreman_lease=60))
    foreman = discovery.client()
    for _ in range(3):
        discovery.worker(ttl=3600)
    task = discovery.request(foreman).tasks[0]
    discovery.clock.advance(55)
    discovery.restart()
    discovery.clock.advance(30)  # 85 s after the last call, 30 s after the restart
    discovery.sweep()
    assert len(discovery.settle(foreman, task.task_id, valid=True).key) == 16
    discovery.clock.advance(62)  # and a whole lease of silence after that settle
    discovery.sweep()
    assert discovery.credits(foreman) == 9


def test_a_short_reply_says_how_many_workers_are_live(discovery):
    """So a foreman can tell "busy, wait" from "too few, give up"
    (ec262.NotEnoughWorkers)."""
    foreman = discovery.client()
    discovery.worker(slots=1)
    discovery.worker(slots=1, runtime="cpython-3.12")
    short = discovery.request(foreman, n=1, runtime=RUNTIME)
    assert (len(short.tasks), short.live_workers) == (0, 1)  # the other runtime's not counted
    assert discovery.request(foreman, n=1, runtime="").live_workers == 2
    for _ in range(2):
        discovery.worker(slots=1)
    full = discovery.request(foreman, n=1, runtime=RUNTIME)
    assert len(full.tasks) == 1
    busy = discovery.request(foreman, n=1, runtime=RUNTIME)  # every worker of it busy now
    assert (len(busy.tasks), busy.live_workers) == (0, 3)
