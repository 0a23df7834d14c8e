"""The worker's SubmitResult retries (worker_service/outbound.py) against an
address nobody listens at, or an in-process foreman that never answers: a
task's cancel ends them at once, the worker's stop still does, and an
attempt in flight is cancelled on the wire."""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading

import grpc
import pytest

from ec262 import retry, serving
from ec262.encoding import encode_pairs
from ec262.errors import ResultNotDelivered
from ec262.v1 import foreman_pb2_grpc
from worker_service import outbound
from worker_service.outbound import ResultSubmitter
from worker_service.sandbox.pool import Cancellation, Cancelled, SandboxResult
from worker_service.tasks import checked_task
from worker_service.worker import Worker, WorkerCounters, one_by_one

KEY = bytes(range(16))
FOREMAN = "00000000-0000-4000-8000-00000000000a"
NOBODY = "127.0.0.1:1"  # connection refused: UNAVAILABLE at once, retried


@pytest.fixture(autouse=True)
def minute_between_attempts(monkeypatch):
    """Every retry loop below waits a minute between attempts (and an attempt
    may take a minute), so one that a cancel or a stop did not interrupt
    outlasts every wait of these tests."""
    monkeypatch.setattr(retry, "backoff_delays", lambda initial, maximum: itertools.repeat(60.0))
    monkeypatch.setattr(outbound, "_attempt_seconds", lambda ciphertext: 60.0)


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


class StillOpen:
    """The submitter's `still_assigned`: the task stays open; says when the
    first retry is decided (the first attempt has failed)."""

    def __init__(self) -> None:
        self.asked = threading.Event()

    def __call__(self, task_id: str) -> bool:
        self.asked.set()
        return True


def _task(result_address: str):
    return checked_task(
        task_id="ab" * 16,
        job_id="j",
        phase=1,
        function=b"payload",
        function_sha256=hashlib.sha256(b"payload").hexdigest(),
        rows=encode_pairs([("k", "v")]),
        result_address=result_address,
        foreman_id=FOREMAN,
        submit_token="t",
    )


def _send_in_background(submitter, task, cancel) -> queue.Queue:
    """Where the send's end arrives: None, or what it raised."""
    outcome: queue.Queue = queue.Queue()

    def send() -> None:
        try:
            submitter(task, "w", "ciphertext", cancel=cancel)
        except Exception as error:
            outcome.put(error)
        else:
            outcome.put(None)

    threading.Thread(target=send, daemon=True).start()
    return outcome


def test_a_cancel_ends_the_retries_at_once(stop):
    still_open, cancel = StillOpen(), Cancellation()
    submitter = ResultSubmitter(stop, still_open)
    try:
        outcome = _send_in_background(submitter, _task(NOBODY), cancel)
        assert still_open.asked.wait(10)  # now waiting a minute for the next attempt
        cancel.cancel()
        assert isinstance(outcome.get(timeout=10), Cancelled)
    finally:
        submitter.close()


def test_the_workers_stop_still_ends_the_retries_at_once(stop):
    still_open = StillOpen()
    submitter = ResultSubmitter(stop, still_open)
    try:
        outcome = _send_in_background(submitter, _task(NOBODY), Cancellation())
        assert still_open.asked.wait(10)
        stop.set()
        assert isinstance(outcome.get(timeout=10), ResultNotDelivered)
    finally:
        submitter.close()


class SilentForeman(foreman_pb2_grpc.ForemanServicer):
    """Takes SubmitResults (a batch of one here) and never answers, noting
    when the caller hangs up."""

    def __init__(self) -> None:
        self.calls = 0
        self.received = threading.Event()
        self.hung_up = threading.Event()
        self.release = threading.Event()

    def SubmitResults(self, request, context):
        self.calls += 1
        context.add_callback(self.hung_up.set)
        self.received.set()
        self.release.wait(30)
        context.abort(grpc.StatusCode.UNAVAILABLE, "never answers")


def test_a_cancel_cancels_the_attempt_in_flight_and_starts_no_other(stop):
    foreman = SilentForeman()
    server = serving.new_server(max_workers=4)
    foreman_pb2_grpc.add_ForemanServicer_to_server(foreman, server)
    port = serving.bind(server, "127.0.0.1", 0)
    server.start()
    submitter, cancel = ResultSubmitter(stop), Cancellation()
    try:
        outcome = _send_in_background(submitter, _task(f"127.0.0.1:{port}"), cancel)
        assert foreman.received.wait(10)
        cancel.cancel()
        assert isinstance(outcome.get(timeout=10), Cancelled)
        assert foreman.hung_up.wait(10)  # the foreman saw the call cancelled
        assert foreman.calls == 1
    finally:
        foreman.release.set()
        submitter.close()
        server.stop(0)


class Instant:
    def run(self, digest, payload, phase, rows, cancel=None) -> SandboxResult:
        return SandboxResult(True, b"[]")


def test_a_task_cancelled_in_its_submit_retries_frees_its_slot_and_is_not_dropped(stop):
    still_open, ended = StillOpen(), queue.Queue()
    submitter = ResultSubmitter(stop, still_open)

    def watched(task, worker_id, ciphertext, cancel=None):
        try:
            submitter(task, worker_id, ciphertext, cancel=cancel)
        except Exception as error:
            ended.put(error)
            raise

    worker = Worker(
        slots=1,
        sandbox=Instant(),
        fetch_keys=one_by_one(lambda task_id: (KEY, FOREMAN)),
        submit=watched,
        client_id=lambda: "w",
    )
    try:
        task = _task(NOBODY)
        worker.assign(task)
        assert still_open.asked.wait(10)
        assert worker.snapshot().busy_slots == 1
        assert worker.cancel(task.task_id, "t") is True
        assert worker.snapshot().busy_slots == 0
        assert isinstance(ended.get(timeout=10), Cancelled)
        worker._executor.shutdown(wait=True)  # the task's thread has ended
        assert worker.counters == WorkerCounters(tasks_cancelled=1)
        assert worker.cancel(task.task_id, "t") is True
    finally:
        worker.close()
        submitter.close()
