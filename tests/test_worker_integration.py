"""Workers as real processes with a real discovery service on loopback and a
recording foreman: the task cycle of docs/protocol.md sections 2-4 end to end."""

from __future__ import annotations

import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from discovery_service.ledger import Ledger
from discovery_service.server import build_server
from discovery_service.sqlite_store import SqliteStore
from ec262.encoding import encode_pairs
from ec262.envelope import decrypt_data
from ec262.grpc_errors import item_code
from ec262.identity import load_identity
from ec262.payload import digest, pack_functions
from ec262.remote_errors import is_error_document
from ec262.v1 import discovery_pb2, discovery_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import rpc_error
from tests.discovery_harness import DiscoveryHarness, Identity
from tests.processes import ROOT, start_server
from tests.worker_cluster import running_cluster, worker_process

pytestmark = pytest.mark.slow

TEXT = [("doc1", "the cat sat on the mat"), ("doc2", "The cat ate")]


def word_count_mapper(key, text):
    for word in text.split():
        yield word.lower(), 1


def failing_mapper(key, text):
    if "cat" in text:
        raise ValueError(f"no cats allowed in {key}")
    yield key, 1


def slow_mapper(key, seconds):
    import time

    time.sleep(seconds)
    yield key, seconds


def sequential_map(mapper, rows) -> dict:
    out: dict = {}
    for key, value in rows:
        for k2, v2 in mapper(key, value):
            out.setdefault(k2, []).append(v2)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("cluster"), 3) as running:
        yield running


def new_task(cluster):
    """A real task from discovery, assigned to all three workers."""
    response = cluster.discovery.request(cluster.foreman, n=1)
    (task,) = response.tasks
    return task, [cluster.by_id(w.client_id) for w in task.workers]


def test_a_worker_logs_its_sandbox_layers_at_start(cluster):
    """Which layers are on, and why any is off, before the first task."""
    for worker in cluster.workers:
        line = worker.server.wait_for("sandbox layers:")
        for layer in ("uid", "namespaces", "file system view", "capabilities", "cgroup",
                      "Landlock", "seccomp"):  # fmt: skip
            assert layer in line, line


def test_three_workers_give_byte_identical_ciphertexts_that_decrypt_with_the_key(cluster):
    task, workers = new_task(cluster)
    for worker in workers:
        assert cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT).accepted
    results = cluster.recorder.wait_for(task.task_id, 3)
    assert set(results) == {w.client_id for w in workers}
    assert len(set(results.values())) == 1
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    decrypted = decrypt_data(next(iter(results.values())), key)
    assert decrypted == sequential_map(word_count_mapper, TEXT)
    assert decrypted["the"] == [1, 1, 1]


def test_reduce_tasks_set_one_value_per_key(cluster):
    task, workers = new_task(cluster)

    def total(key, values):
        return sum(values)

    rows = [("cat", [1, 1]), ("mat", [1])]
    for worker in workers:
        cluster.assign(worker, task.task_id, total, rows=rows, phase=worker_pb2.REDUCE)
    results = cluster.recorder.wait_for(task.task_id, 3)
    assert len(set(results.values())) == 1
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    assert decrypt_data(next(iter(results.values())), key) == {"cat": 2, "mat": 1}


def test_a_combiner_in_the_payload_runs_after_map(cluster):
    task, workers = new_task(cluster)

    def add_up(word, counts):
        yield word, sum(counts)

    for worker in workers:
        cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, combiner=add_up)
    results = cluster.recorder.wait_for(task.task_id, 3)
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    assert decrypt_data(next(iter(results.values())), key)["the"] == [3]


def test_a_raising_function_gives_identical_error_envelopes(cluster):
    task, workers = new_task(cluster)
    for worker in workers:
        cluster.assign(worker, task.task_id, failing_mapper, rows=TEXT)
    results = cluster.recorder.wait_for(task.task_id, 3)
    assert len(set(results.values())) == 1
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    document = decrypt_data(next(iter(results.values())), key)
    assert is_error_document(document)
    error = document["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "no cats allowed in doc1"
    assert len(error["traceback"]) == 1
    assert re.fullmatch(
        r'File ".*test_worker_integration.py", line \d+, in failing_mapper', error["traceback"][0]
    )


MAIN_SCRIPT = textwrap.dedent("""
    import sys
    from collections import Counter
    from ec262.payload import pack_functions

    STOP = {"the", "a"}

    def normalise(word):
        return word.strip(".,").lower()

    def make_mapper(weight):
        seen = Counter()
        def mapper(key, text):
            for word in map(normalise, text.split()):
                if word not in STOP:
                    seen[word] += 1
                    yield word, weight * seen[word]
        return mapper

    sys.stdout.buffer.write(pack_functions(make_mapper(10)))
""")


def test_a_main_function_with_closures_and_helpers_travels_through_dill(cluster, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(MAIN_SCRIPT)
    payload = subprocess.run(
        [sys.executable, str(script)], capture_output=True, check=True, timeout=60
    ).stdout
    assert b"make_mapper" in payload
    task, workers = new_task(cluster)
    for worker in workers:
        cluster.assign(worker, task.task_id, None, payload=payload, rows=TEXT)
    results = cluster.recorder.wait_for(task.task_id, 3)
    assert len(set(results.values())) == 1
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    assert decrypt_data(next(iter(results.values())), key) == {
        "cat": [10, 20],
        "sat": [10],
        "on": [10],
        "mat": [10],
        "ate": [10],
    }


def _status(worker) -> worker_pb2.WorkerStatus:
    return worker.stub().GetStatus(worker_pb2.GetStatusRequest(), timeout=10)


def big_payload_mapper(key, text):
    ballast = "x" * 4_000_000  # noqa: F841  (makes the payload 4 MB)
    yield key, 1


def test_a_task_the_discovery_service_does_not_confirm_is_refused_and_cached_nowhere(cluster):
    task, workers = new_task(cluster)
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)  # no longer anyone's
    worker = workers[0]
    payload = pack_functions(big_payload_mapper)
    for task_id in (task.task_id, "ab" * 16):  # settled, and never made
        error = rpc_error(
            cluster.assign, worker, task_id, big_payload_mapper, rows=TEXT, payload=payload
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    status = _status(worker)
    assert digest(payload) not in status.cached_functions
    assert status.busy_slots == 0
    assert not [k for k in cluster.recorder.results if k[0] in (task.task_id, "ab" * 16)]


def test_a_request_naming_another_foreman_is_permission_denied(cluster):
    task, workers = new_task(cluster)
    worker = workers[0]
    impostor = "00000000-0000-4000-8000-0000000000ff"
    with pytest.raises(grpc.RpcError) as caught:
        cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, foreman_id=impostor)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert impostor in caught.value.details()
    worker.server.wait_for(f"refused task {task.task_id}")
    assert _status(worker).busy_slots == 0
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


def test_a_worker_stops_retrying_a_dead_foreman_once_the_task_is_closed(cluster):
    """The worker retries SubmitResult while its foreman is unreachable, but
    only while the discovery service still has the task open: settled (or
    expired, or its foreman's lease gone), the slot is free within 5 s."""
    task, workers = new_task(cluster)
    worker = workers[0]
    # nobody listens at 127.0.0.1:1
    cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, result_address="127.0.0.1:1")
    worker.server.wait_for(f"SubmitResult({task.task_id}) to 127.0.0.1:1 failed")
    assert _status(worker).busy_slots == 1  # still retrying: the task is open
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)
    closed = time.monotonic()
    while _status(worker).busy_slots and time.monotonic() < closed + 5:
        time.sleep(0.05)  # watching the slot, not waiting for it
    assert _status(worker).busy_slots == 0, "the slot stayed busy after the task closed"
    worker.server.wait_for(f"task {task.task_id} abandoned")


def test_a_task_id_is_computed_once_whatever_the_rows(cluster):
    task, workers = new_task(cluster)
    worker = workers[0]
    done_before = _status(worker).tasks_done
    token = "same-token"
    assert cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, token=token).accepted
    results = cluster.recorder.wait_for(task.task_id, 1)
    # the same request again (a reply lost on the way): accepted, not run again
    assert cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, token=token).accepted
    error = rpc_error(
        cluster.assign, worker, task.task_id, word_count_mapper, rows=[("x", "new rows")]
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
    key = cluster.discovery.settle(cluster.foreman, task.task_id, valid=True).key
    assert decrypt_data(next(iter(results.values())), key) == sequential_map(
        word_count_mapper, TEXT
    )
    assert _status(worker).tasks_done == done_before + 1


def test_a_second_assign_works_from_the_digest_cache(cluster):
    first, workers = new_task(cluster)
    for worker in workers:
        cluster.assign(worker, first.task_id, word_count_mapper, rows=TEXT)
    cluster.recorder.wait_for(first.task_id, 3)
    cluster.discovery.settle(cluster.foreman, first.task_id, valid=True)
    second, workers = new_task(cluster)
    for worker in workers:
        response = cluster.assign(
            worker, second.task_id, word_count_mapper, rows=[("x", "dog dog")], send_payload=False
        )
        assert response.accepted
    results = cluster.recorder.wait_for(second.task_id, 3)
    key = cluster.discovery.settle(cluster.foreman, second.task_id, valid=True).key
    assert decrypt_data(next(iter(results.values())), key) == {"dog": [1, 1]}


def test_without_the_payload_an_unknown_digest_is_failed_precondition(cluster):
    task, workers = new_task(cluster)

    def never_sent(key, value):
        yield "never", "sent"

    error = rpc_error(
        cluster.assign, workers[0], task.task_id, never_sent, rows=TEXT, send_payload=False
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "send the payload" in error.details()
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


def test_a_busy_worker_still_judges_the_next_offer_on_its_merits(cluster):
    """A worker whose slot is busy keeps room to queue one task (the
    discovery service may free its slot before its own late copy ends), so
    an offer is not refused for being momentarily full: here it is judged,
    and refused as unknown. (The limit itself: tests/test_worker_logic.py.)"""
    task, workers = new_task(cluster)
    worker = workers[0]
    cluster.assign(worker, task.task_id, slow_mapper, rows=[("nap", 1.5)])
    other = "cd" * 16
    error = rpc_error(cluster.assign, worker, other, word_count_mapper, rows=TEXT)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert cluster.recorder.wait_for(task.task_id, 1)
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


def spinning_mapper(key, seconds):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    yield key, seconds


def _cancel(worker, task_id: str, token: str) -> worker_pb2.CancelTaskResponse:
    request = worker_pb2.CancelTaskRequest(task_id=task_id, submit_token=token)
    return worker.stub().CancelTask(request, timeout=10)


def test_a_cancelled_task_stops_at_once_sends_nothing_and_frees_its_slot(cluster):
    """A task spinning for 30 s is cancelled: the slot is free on the reply,
    no result ever reaches the foreman, and the worker's one slot runs the
    next task at once (its sandbox was killed, not left to spin)."""
    task, workers = new_task(cluster)
    worker = workers[0]
    cluster.assign(worker, task.task_id, spinning_mapper, rows=[("spin", 30)], token="first")
    assert _cancel(worker, task.task_id, "first").cancelled
    assert _status(worker).busy_slots == 0
    worker.server.wait_for(f"task {task.task_id} cancelled while")
    assert _cancel(worker, task.task_id, "first").cancelled  # harmless to repeat
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)
    following, _ = new_task(cluster)
    cluster.assign(worker, following.task_id, word_count_mapper, rows=TEXT, token="second")
    cluster.recorder.wait_for(following.task_id, 1, timeout=20)  # before the spin could end
    # one slot, so the cancelled task's thread ended before the next one ran
    assert not [k for k in cluster.recorder.results if k[0] == task.task_id]
    assert not [r for r in cluster.recorder.rejected if r[0] == task.task_id]
    worker.server.wait_for(f"task {following.task_id} done")
    assert not _cancel(worker, following.task_id, "second").cancelled  # it had finished
    assert _status(worker).busy_slots == 0
    cluster.discovery.settle(cluster.foreman, following.task_id, valid=False)


def _withdraw(worker, task_id: str, token: str) -> bool:
    request = worker_pb2.CancelTaskRequest(task_id=task_id, submit_token=token, only_queued=True)
    return worker.stub().CancelTask(request, timeout=10).cancelled


def _spinning_and_queued(cluster):
    """A worker's two slots held: one task spinning for 30 s (token "run"),
    one queued behind it (token "wait")."""
    spinning, workers = new_task(cluster)
    worker = workers[0]
    cluster.assign(worker, spinning.task_id, spinning_mapper, rows=[("spin", 30)], token="run")
    queued, _ = new_task(cluster)
    cluster.assign(worker, queued.task_id, word_count_mapper, rows=TEXT, token="wait")
    assert _status(worker).busy_slots == 2
    return worker, spinning, queued


def test_a_withdrawal_drops_a_task_not_yet_started_and_no_other(cluster):
    """CancelTask with only_queued over the wire: a task queued behind a
    spinning one is dropped (true) and never sends; a finished one is not
    (false). A running one goes on: tests/test_worker_logic.py."""
    worker, spinning, queued = _spinning_and_queued(cluster)
    assert _withdraw(worker, queued.task_id, "wait")
    assert _status(worker).busy_slots == 1
    assert _cancel(worker, spinning.task_id, "run").cancelled
    finished, _ = new_task(cluster)
    cluster.assign(worker, finished.task_id, word_count_mapper, rows=TEXT, token="done")
    worker.server.wait_for(f"task {finished.task_id} done")
    assert not _withdraw(worker, finished.task_id, "done")
    assert not [k for k in cluster.recorder.results if k[0] == queued.task_id]
    assert _status(worker).busy_slots == 0
    for task in (spinning, queued, finished):
        cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


def test_cancel_task_needs_the_assignments_token_and_a_well_formed_id(cluster):
    task, workers = new_task(cluster)
    worker = workers[0]
    cluster.assign(worker, task.task_id, word_count_mapper, rows=TEXT, token="right")
    for task_id, token in [(task.task_id, "wrong"), (task.task_id, ""), ("cd" * 16, "right")]:
        error = rpc_error(_cancel, worker, task_id, token)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    for task_id in ("nope", "AB" * 16, ""):
        error = rpc_error(_cancel, worker, task_id, "right")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "task_id" in error.details()
    assert cluster.recorder.wait_for(task.task_id, 1)  # none of those stopped it
    cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


def test_cancel_tasks_answers_each_item_as_its_single_call_would(cluster):
    """The batch form over the wire: a withdrawal of a queued task, a
    cancel of a spinning one, a wrong token and a malformed id, in one
    CancelTasks; each item is answered as CancelTask would have answered
    it, in order, and the bad ones change nothing. A call of no items is
    refused whole."""
    worker, spinning, queued = _spinning_and_queued(cluster)
    items = [
        worker_pb2.CancelTaskRequest(task_id=queued.task_id, submit_token="wrong"),
        worker_pb2.CancelTaskRequest(task_id="nope", submit_token="wait"),
        worker_pb2.CancelTaskRequest(
            task_id=spinning.task_id, submit_token="run", only_queued=True
        ),
        worker_pb2.CancelTaskRequest(task_id=queued.task_id, submit_token="wait", only_queued=True),
    ]
    answers = worker.stub().CancelTasks(worker_pb2.CancelTasksRequest(tasks=items), timeout=10)
    codes = [item_code(answer.status) for answer in answers.answers]
    assert codes == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
        grpc.StatusCode.OK,
    ], answers
    assert "task_id" in answers.answers[1].status.message
    assert not answers.answers[2].response.cancelled  # running: a withdrawal leaves it
    assert answers.answers[3].response.cancelled  # queued: dropped
    assert _status(worker).busy_slots == 1
    again = worker.stub().CancelTasks(
        worker_pb2.CancelTasksRequest(
            tasks=[worker_pb2.CancelTaskRequest(task_id=spinning.task_id, submit_token="run")]
        ),
        timeout=10,
    )
    assert again.answers[0].response.cancelled
    assert _status(worker).busy_slots == 0
    error = rpc_error(worker.stub().CancelTasks, worker_pb2.CancelTasksRequest(), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert not [k for k in cluster.recorder.results if k[0] == queued.task_id]
    for task in (spinning, queued):
        cluster.discovery.settle(cluster.foreman, task.task_id, valid=False)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("task_id", "nope", "task_id"),
        ("phase", 0, "phase"),
        ("phase", 7, "phase"),
        ("function_sha256", "xyz", "function_sha256"),
        ("function_sha256", "0" * 64, "does not match"),
        ("rows", b"", "rows"),
        ("result_address", "nowhere", "address"),
        ("result_address", "h:99999", "port"),
        ("foreman_id", "bob", "foreman_id"),
        ("submit_token", "", "submit_token"),
    ],
)
def test_malformed_assignments_are_invalid_argument(cluster, field, value, fragment):
    payload = pack_functions(word_count_mapper)
    request = worker_pb2.AssignTaskRequest(
        task_id="ef" * 16,
        job_id="j",
        phase=1,
        function=payload,
        function_sha256=digest(payload),
        rows=encode_pairs(TEXT),
        result_address=cluster.foreman_address,
        foreman_id=cluster.foreman.client_id,
        submit_token="t",
    )
    setattr(request, field, value)
    with grpc.insecure_channel(cluster.workers[0].address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        error = rpc_error(stub.AssignTask, request, timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in error.details()
        status = stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
        assert status.busy_slots == 0


def test_get_status_reports_the_worker(cluster):
    worker = cluster.workers[0]
    with grpc.insecure_channel(worker.address) as channel:
        status = worker_pb2_grpc.WorkerStub(channel).GetStatus(worker_pb2.GetStatusRequest())
    assert status.client_id == worker.client_id
    assert status.slots == 1
    assert status.address == worker.address
    assert status.runtime == f"cpython-{sys.version_info.major}.{sys.version_info.minor}"


# -- the worker process: registration, identity, signals -------------------


def test_identity_file_is_private_and_reused(tmp_path):
    discovery = DiscoveryHarness.start(str(tmp_path / "ledger.sqlite3"))
    try:
        path = tmp_path / "id" / "worker.json"
        with worker_process(discovery.address, path) as worker:
            first = worker.client_id
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with worker_process(discovery.address, path) as worker:
            assert worker.client_id == first
    finally:
        discovery.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_deregisters_and_exits_cleanly_on_a_signal(tmp_path, sig):
    from ec262.identity import load_identity

    discovery = DiscoveryHarness.start(str(tmp_path / "ledger.sqlite3"))
    try:
        path = tmp_path / "worker.json"
        with worker_process(discovery.address, path) as worker:
            with grpc.insecure_channel(worker.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(service="ec262.v1.Worker"))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            identity = load_identity(path)
            me = Identity(identity.client_id, identity.secret)
            assert discovery.info(me).expiry_unix > 0
            started = time.monotonic()
            assert worker.server.stop(sig) == 0
            assert time.monotonic() - started < 5
            assert discovery.info(me).expiry_unix == 0
            assert "left the pool" in worker.server.output
    finally:
        discovery.stop()


def _port_outside_the_ephemeral_range() -> int:
    """A port for a discovery service that will be down for a while.

    Below the kernel's ephemeral range (32768-60999 by default), so no
    outgoing connection can be given it meanwhile: a client retrying an
    ephemeral port with nothing behind it can even connect to itself and
    hold the port. Found by binding a real server to it (no probe socket).
    """
    for _ in range(50):
        port = random.randint(20000, 32000)
        try:
            server = build_server(Ledger(SqliteStore(":memory:")), port=port)
        except OSError:
            continue
        server.stop(0)
        return port
    raise AssertionError("no free port between 20000 and 32000")


def test_worker_keeps_serving_while_discovery_is_down_and_registers_later(tmp_path):
    port = _port_outside_the_ephemeral_range()
    address = f"127.0.0.1:{port}"  # nothing listens here until the test says so
    path = tmp_path / "worker.json"
    args = ["worker", "-P", "0", "--discovery", address, "--identity", str(path), "-v"]
    with start_server(args) as worker:
        worker.wait_for("unreachable; retrying")
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            assert stub.GetStatus(worker_pb2.GetStatusRequest()).slots == 1
        ledger = Ledger(SqliteStore(str(tmp_path / "ledger.sqlite3")))
        second = build_server(ledger, port=port)
        try:
            worker.wait_for("registered with discovery")
            identity = load_identity(path)
            with grpc.insecure_channel(address) as channel:
                info = discovery_pb2_grpc.DiscoveryStub(channel).GetClient(
                    discovery_pb2.GetClientRequest(),
                    metadata=Identity(identity.client_id, identity.secret).metadata,
                )
                assert info.address == worker.address
                assert info.expiry_unix > time.time()
            assert worker.stop() == 0
        finally:
            second.stop(0)


def test_run_worker_and_worker_py_start_a_worker(tmp_path):
    discovery = DiscoveryHarness.start(str(tmp_path / "ledger.sqlite3"))
    try:
        for command in (
            [
                sys.executable,
                str(ROOT / "worker.py"),
                "-v",
                "-P",
                "0",
                "--discovery",
                discovery.address,
                "--identity",
                str(tmp_path / "a.json"),
            ],
            [
                sys.executable,
                "-c",
                "import ec262; ec262.run_worker(port=0, discovery="
                f"{discovery.address!r}, identity={str(tmp_path / 'b.json')!r})",
            ],
        ):
            process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            try:
                lines = []
                for line in process.stderr:
                    lines.append(line)
                    if "registered with discovery" in line:
                        break
                assert any(line.startswith("listening on 127.0.0.1:") for line in lines), lines
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=10) == 0
            finally:
                if process.poll() is None:
                    process.kill()
    finally:
        discovery.stop()
