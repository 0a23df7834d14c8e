"""The discovery service's batch calls (FetchKeys, CommitResults,
SettleTasks; docs/protocol.md section 2, batch calls) against a real server
on each store: every item answered as its single call would be, in order,
one item's failure never another's, and a malformed batch refused whole
with nothing changed."""

from __future__ import annotations

import uuid

import grpc
import pytest

from ec262.defaults import MAX_BATCH_ITEMS
from ec262.grpc_errors import error_from_item, error_from_rpc
from ec262.v1 import discovery_pb2 as pb
from tests.conftest import rpc_error
from tests.discovery_harness import AGREED_SHA256, OTHER_SHA256
from tests.test_discovery_bad_input import snapshot

OK, NOT_FOUND = grpc.StatusCode.OK.value[0], grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
def scene(discovery):
    foreman = discovery.client()
    workers = [discovery.worker(slots=4) for _ in range(3)]
    tasks = discovery.request(foreman, n=3).tasks
    assert len(tasks) == 3
    return discovery, foreman, workers, tasks


def _unknown_task() -> str:
    return uuid.uuid4().hex


def test_fetch_keys_answers_each_task_as_fetch_key_does(scene):
    discovery, _foreman, _workers, tasks = scene
    worker = discovery.identity(tasks[0].workers[0].client_id)
    mine = [t.task_id for t in tasks if worker.client_id in {w.client_id for w in t.workers}]
    asked = [mine[0], _unknown_task(), *mine[1:], mine[0]]
    response = discovery.stub.FetchKeys(
        pb.FetchKeysRequest(tasks=[pb.FetchKeyRequest(task_id=t) for t in asked]),
        metadata=worker.metadata,
    )
    assert len(response.answers) == len(asked)
    for task_id, answer in zip(asked, response.answers, strict=True):
        try:
            single = discovery.fetch_key(worker, task_id)
        except grpc.RpcError as error:
            assert answer.status.code == error.code().value[0]
            assert answer.status.message == error.details()
            assert isinstance(error_from_item(answer.status), type(error_from_rpc(error)))
        else:
            assert answer.status.code == OK
            assert (answer.response.key, answer.response.foreman_id) == (
                single.key,
                single.foreman_id,
            )
    assert response.answers[1].status.code == NOT_FOUND
    assert response.answers[1].status.reason == "UNKNOWN_TASK"


def test_commit_results_and_settle_tasks_answer_each_item_alone(scene):
    discovery, foreman, _workers, tasks = scene
    before = discovery.total_credits()
    valid, refunded, unknown = tasks[0], tasks[1], _unknown_task()
    # Each worker of the valid task commits in one CommitResults, with one
    # commitment for a task it does not hold between them.
    for ref in valid.workers:
        worker = discovery.identity(ref.client_id)
        statuses = discovery.stub.CommitResults(
            pb.CommitResultsRequest(
                commitments=[
                    pb.CommitResultRequest(task_id=unknown, ciphertext_sha256=AGREED_SHA256),
                    pb.CommitResultRequest(task_id=valid.task_id, ciphertext_sha256=AGREED_SHA256),
                    pb.CommitResultRequest(task_id=valid.task_id, ciphertext_sha256=OTHER_SHA256),
                ]
            ),
            metadata=worker.metadata,
        ).statuses
        codes = [s.code for s in statuses]
        assert codes[0] == NOT_FOUND and codes[1] == OK
        # A second, different commitment is refused as the single call refuses it.
        assert statuses[2].reason == "COMMIT_CONFLICT"
    answers = discovery.stub.SettleTasks(
        pb.SettleTasksRequest(
            tasks=[
                pb.SettleTaskRequest(task_id=valid.task_id, valid=True),
                pb.SettleTaskRequest(task_id=unknown, valid=True),
                pb.SettleTaskRequest(task_id=refunded.task_id, valid=False),
                pb.SettleTaskRequest(task_id=valid.task_id, valid=True),  # a repeat
            ]
        ),
        metadata=foreman.metadata,
    ).answers
    assert [a.status.code for a in answers] == [OK, NOT_FOUND, OK, OK]
    paid = answers[0].response
    assert len(paid.key) == 16 and paid.quorum_sha256 == AGREED_SHA256
    assert sorted(paid.paid_workers) == sorted(w.client_id for w in valid.workers)
    assert answers[2].response.key == b""
    assert answers[3].response.key == paid.key  # the same answer, paid once
    assert answers[3].response.paid_workers == paid.paid_workers
    # The single call agrees, and the books balance: paid once, refunded once.
    single = discovery.settle(foreman, valid.task_id, valid=True, commit=False)
    assert single.key == paid.key
    assert discovery.total_credits() == before
    for ref in valid.workers:
        assert discovery.info(discovery.identity(ref.client_id)).tasks_completed == 1


@pytest.mark.parametrize("method", ["FetchKeys", "CommitResults", "SettleTasks"])
@pytest.mark.parametrize("count", [0, MAX_BATCH_ITEMS + 1])
def test_a_batch_with_no_items_or_too_many_is_refused_whole(scene, method, count):
    discovery, foreman, _workers, tasks = scene
    task_id = tasks[0].task_id
    request = {
        "FetchKeys": lambda: pb.FetchKeysRequest(
            tasks=[pb.FetchKeyRequest(task_id=task_id)] * count
        ),
        "CommitResults": lambda: pb.CommitResultsRequest(
            commitments=[pb.CommitResultRequest(task_id=task_id, ciphertext_sha256=AGREED_SHA256)]
            * count
        ),
        "SettleTasks": lambda: pb.SettleTasksRequest(
            tasks=[pb.SettleTaskRequest(task_id=task_id, valid=False)] * count
        ),
    }[method]()
    caller = (
        foreman if method == "SettleTasks" else discovery.identity(tasks[0].workers[0].client_id)
    )
    before = snapshot(discovery)
    error = rpc_error(lambda: getattr(discovery.stub, method)(request, metadata=caller.metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("no items" if count == 0 else f"at most {MAX_BATCH_ITEMS}") in error.details()
    assert snapshot(discovery) == before


@pytest.mark.parametrize("method", ["FetchKeys", "CommitResults", "SettleTasks"])
def test_a_batch_without_credentials_is_unauthenticated(scene, method):
    discovery, _foreman, _workers, tasks = scene
    request = {
        "FetchKeys": pb.FetchKeysRequest(tasks=[pb.FetchKeyRequest(task_id=tasks[0].task_id)]),
        "CommitResults": pb.CommitResultsRequest(),
        "SettleTasks": pb.SettleTasksRequest(),
    }[method]
    before = snapshot(discovery)
    error = rpc_error(lambda: getattr(discovery.stub, method)(request))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert snapshot(discovery) == before
