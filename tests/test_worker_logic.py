"""The worker's task logic with real sandboxes but no gRPC: the key source
and the submitter are plain functions."""

from __future__ import annotations

import threading

import pytest

from ec262.encoding import encode_pairs
from ec262.envelope import decrypt_data
from ec262.payload import digest, pack_functions
from worker_service.sandbox.policy import SandboxLimits
from worker_service.sandbox.pool import SandboxPool
from worker_service.tasks import checked_task
from worker_service.worker import Worker

KEY = bytes(range(16))
FOREMAN_A = "00000000-0000-4000-8000-00000000000a"
FOREMAN_B = "00000000-0000-4000-8000-00000000000b"


def counting(key, value):
    """Counts the tasks its sandbox has run, in a function attribute."""
    counting.runs = getattr(counting, "runs", 0) + 1
    yield "runs", counting.runs


@pytest.fixture
def worker():
    pool = SandboxPool(SandboxLimits(task_timeout=10), size=4)
    done = threading.Semaphore(0)
    results: dict[str, dict] = {}

    def submit(task, worker_id, ciphertext):
        results[task.task_id] = decrypt_data(ciphertext, KEY)
        done.release()

    running = Worker(
        slots=1,
        sandbox=pool,
        fetch_key=lambda task_id: KEY,
        submit=submit,
        client_id=lambda: "worker",
    )
    yield running, results, done
    running.close()
    pool.close()


def _task(number: int, foreman: str, payload: bytes):
    return checked_task(
        task_id=f"{number:032x}",
        job_id="j",
        phase=1,
        function=payload,
        function_sha256=digest(payload),
        rows=encode_pairs([("k", "v")]),
        result_address="127.0.0.1:1",
        foreman_id=foreman,
        submit_token="t",
    )


def test_a_sandbox_is_reused_for_one_foreman_but_never_shared_with_another(worker):
    running, results, done = worker
    payload = pack_functions(counting)
    for number, foreman in enumerate([FOREMAN_A, FOREMAN_A, FOREMAN_B, FOREMAN_A]):
        running.assign(_task(number, foreman, payload))
        assert done.acquire(timeout=30)
        assert running.wait_idle(30)  # the slot frees just after the submit
    runs = [results[f"{n:032x}"]["runs"] for n in range(4)]
    assert runs == [[1], [2], [1], [3]]
