"""ec262.run_job end to end: real discovery and worker processes on
loopback, honest and cheating, crashing and silent (issue 8)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import grpc
import pytest

import ec262
from ec262.defaults import MAX_RESULT_BYTES
from ec262.identity import load_identity
from ec262.local_cluster import LocalCluster
from ec262.v1 import foreman_pb2, foreman_pb2_grpc
from tests.job_harness import (
    books,
    client_id,
    cluster_with,
    identity_files,
    sequential,
    settled_books,
    stdlib_text,
    sum_reducer,
    word_mapper,
)
from tests.processes import ROOT, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HUMPTY = [
    "Humpty Dumpty sat on a wall",
    "Humpty Dumpty had a great fall",
    "All the King's horses and all the King's men",
    "Couldn't put Humpty together again",
]
SMALL = {f"line{i}": line for i, line in enumerate(HUMPTY * 3)}


def split_words(key, line):
    for word in line.split():
        yield word, 1


def run(cluster: LocalCluster, tmp_path, data, **options):
    options.setdefault("identity", tmp_path / "foreman.json")
    options.setdefault("progress", False)
    return ec262.Job(discovery=cluster.address, **options).run(data)


def in_background(function, *args, **kwargs) -> Future:
    """Run a job on its own thread; `.result()` returns it or re-raises its error."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=target, daemon=True).start()
    return future


def assert_books_balance(cluster, before, tmp_path):
    """Whatever the foreman spent, workers earned or it got back (once the
    replicas left at work after the settles have committed)."""
    paths = [*identity_files(cluster), tmp_path / "foreman.json"]
    after = settled_books(cluster.address, paths)
    starting = cluster.starting_credits
    for client in after:
        before.setdefault(client, (starting, 0, 0))
    assert sum(c for c, _, _ in after.values()) == sum(before[c][0] for c in after)
    return after


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(workers=3, directory=str(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


def test_humpty_dumpty_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("EC262_DISCOVERY", "EC262_IDENTITY")}
    env["HOME"] = str(tmp_path)  # nothing of the user's is read or written
    result = subprocess.run(
        [sys.executable, str(ROOT / "example.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    expected: dict[str, int] = {}
    for line in HUMPTY:
        for word in line.split():
            expected[word] = expected.get(word, 0) + 1
    assert printed == expected
    assert not (tmp_path / ".config").exists()


def test_a_word_count_of_a_few_megabytes_equals_a_sequential_run(cluster, tmp_path):
    data = stdlib_text(3)
    before = books(cluster.address, identity_files(cluster))
    result = run(
        cluster, tmp_path, data, mapper=word_mapper, reducer=sum_reducer, chunk_bytes=256 * 1024
    )
    assert result == sequential(data, word_mapper, sum_reducer)
    stats = result.stats
    assert stats.map_tasks >= 10 and stats.reduce_tasks >= 1
    assert stats.tasks_validated == stats.map_tasks + stats.reduce_tasks
    assert stats.retries == 0 and stats.cheaters_seen == 0
    # Every task paid its 3 workers, less a credit back for each replica
    # reported missing or released (an honest one too slow for the grace,
    # or one still queued at the quorum, withdrawn).
    tasks = stats.map_tasks + stats.reduce_tasks
    let_go = stats.missing_reports + stats.replicas_cancelled + stats.replicas_withdrawn
    assert stats.credits_spent == 3 * tasks - let_go
    assert_books_balance(cluster, before, tmp_path)


def test_a_combiner_gives_the_same_result(cluster, tmp_path):
    data = stdlib_text(0.5)

    def add_up(word, counts):
        yield word, sum(counts)

    result = run(
        cluster,
        tmp_path,
        data,
        mapper=word_mapper,
        reducer=sum_reducer,
        combiner=add_up,
        chunk_bytes=64 * 1024,
    )
    assert result == sequential(data, word_mapper, sum_reducer)


def test_run_job_finds_the_decorated_functions(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("EC262_DISCOVERY", cluster.address)
    namespace = {"ec262": ec262, "data": SMALL, "identity": str(tmp_path / "foreman.json")}
    exec(  # a user's module, as the seed README writes it
        "@ec262.mapper\n"
        "def mapfn(k, v):\n"
        "    for w in v.split():\n"
        "        yield w, 1\n"
        "@ec262.reducer\n"
        "def reducefn(k, vs):\n"
        "    return sum(vs)\n"
        "result = ec262.run_job(data, identity=identity, progress=False)\n",
        namespace,
    )
    assert namespace["result"] == sequential(SMALL, split_words, sum_reducer)


def test_run_job_without_a_mapper_says_so():
    with pytest.raises(TypeError, match=r"no @ec262\.mapper"):
        ec262.run_job(SMALL)


def test_a_user_error_is_a_remote_error_with_the_users_message(cluster, tmp_path):
    def fussy(key, line):
        if "wall" in line:
            raise ValueError(f"walls are not allowed: {key}")
        yield key, 1

    before = books(cluster.address, identity_files(cluster))
    started = time.monotonic()
    with pytest.raises(ec262.RemoteError) as caught:
        run(cluster, tmp_path, SMALL, mapper=fussy, reducer=sum_reducer, chunk_bytes=64)
    assert caught.value.type_name == "ValueError"
    # Each line with a wall (line0, line4, ...) is a chunk of its own that
    # fails; whichever validates first ends the job, with its own message.
    walls = {f"walls are not allowed: {key}" for key, line in SMALL.items() if "wall" in line}
    assert len(walls) > 1
    assert caught.value.remote_message in walls
    assert any("in fussy" in frame for frame in caught.value.remote_traceback)
    assert "walls are not allowed" in str(caught.value)
    assert time.monotonic() - started < 30
    assert_books_balance(cluster, before, tmp_path)


def test_print_in_user_code_works_and_a_failure_shows_what_it_printed(cluster, tmp_path):
    """print() never fails a task (the old main refused the write once the
    buffer flushed); what a failing task printed comes back, bounded."""

    def chatty(key, line):
        for number in range(2000):  # far more than any stdout buffer holds
            print(f"{key}: looking at word {number} of a line " * 4)
        yield from split_words(key, line)

    def chatty_then_fails(key, line):
        print("about to fail on", key)
        raise RuntimeError("failed after printing")

    result = run(cluster, tmp_path, SMALL, mapper=chatty, reducer=sum_reducer, chunk_bytes=256)
    assert result == run(cluster, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer)
    with pytest.raises(ec262.RemoteError) as caught:
        run(cluster, tmp_path, SMALL, mapper=chatty_then_fails, reducer=sum_reducer)
    assert "about to fail on line0" in caught.value.remote_output
    assert "about to fail on line0" in str(caught.value)


def big_value(key, size):
    yield "big", "x" * size


def first_value(key, values):
    return values[0]


def test_a_result_just_under_the_cap_arrives_and_one_over_it_is_a_remote_error(cluster, tmp_path):
    """The gRPC message limit is derived from the result cap (ec262/defaults.py):
    a result a little under the cap reaches the foreman and decrypts; one
    over it is a ResultTooLarge naming both sizes, at once, not a message
    gRPC drops while the job waits for its deadline."""
    under = MAX_RESULT_BYTES - 1024
    result = run(cluster, tmp_path, {"k": under}, mapper=big_value, reducer=first_value)
    assert result == {"big": "x" * under}
    started = time.monotonic()
    with pytest.raises(ec262.RemoteError) as caught:
        run(cluster, tmp_path, {"k": MAX_RESULT_BYTES}, mapper=big_value, reducer=first_value)
    assert caught.value.type_name == "ResultTooLarge"
    assert f"limit of {MAX_RESULT_BYTES} bytes" in caught.value.remote_message
    assert str(MAX_RESULT_BYTES + len('[["big",[""]]]')) in caught.value.remote_message
    assert time.monotonic() - started < 30


def test_too_few_credits_fail_before_any_spending(tmp_path):
    with LocalCluster(workers=3, directory=str(tmp_path / "poor"), starting_credits=5) as poor:
        foreman = tmp_path / "foreman.json"
        with pytest.raises(ec262.InsufficientCredits) as caught:
            run(poor, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer, identity=foreman)
        assert (caught.value.needed, caught.value.available) == (6, 5)
        assert books(poor.address, [foreman])[client_id(foreman)] == (5, 0, 0)


def test_two_foremen_at_once_on_one_cluster(cluster, tmp_path):
    data = stdlib_text(1)
    results: dict[str, object] = {}
    foremen = {name: tmp_path / f"{name}.json" for name in ("alice", "bob")}
    workers = identity_files(cluster)
    before = books(cluster.address, workers)

    def job(name: str) -> None:
        try:
            results[name] = run(
                cluster,
                tmp_path,
                data,
                mapper=word_mapper,
                reducer=sum_reducer,
                chunk_bytes=128 * 1024,
                identity=foremen[name],
            )
        except Exception as error:  # reported below
            results[name] = error

    threads = [threading.Thread(target=job, args=(name,)) for name in foremen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    expected = sequential(data, word_mapper, sum_reducer)
    assert results["alice"] == expected, results["alice"]
    assert results["bob"] == expected, results["bob"]
    after = books(cluster.address, [*workers, *foremen.values()])
    spent = sum(cluster.starting_credits - after[client_id(p)][0] for p in foremen.values())
    earned = sum(after[c][0] - before[c][0] for c in before)
    assert spent == earned == sum(r.stats.credits_spent for r in results.values())


# -- strangers misbehaving ------------------------------------------------------


def test_a_cheating_worker_is_outvoted_reported_missing_and_unpaid(tmp_path):
    with cluster_with(tmp_path / "c", honest=2, cheaters=("colluding",)) as (cluster, _):
        cheater = client_id(cluster.directory / "cheater0.json")
        before = books(cluster.address, identity_files(cluster))
        result = run(cluster, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer)
        assert result == sequential(SMALL, split_words, sum_reducer)
        assert result.stats.cheaters == {cheater}
        verdicts = result.stats.verdicts.values()
        assert any(cheater in v["disagreed"] for v in verdicts)
        assert not any(cheater in v["agreed"] for v in verdicts)
        assert len(result.stats.verdicts) == result.stats.tasks_validated
        after = assert_books_balance(cluster, before, tmp_path)
        credits, completed, failed = after[cheater]
        assert credits == before[cheater][0] and completed == 0 and failed >= 1
        honest = [c for c in after if c not in (cheater, client_id(tmp_path / "foreman.json"))]
        assert all(after[c][0] > before[c][0] for c in honest)


class _WatchInvalid:
    """A progress object that signals the first task settled invalid."""

    def __init__(self) -> None:
        self.invalid = threading.Event()

    def phase(self, name, total):
        pass

    def advance(self, stats):
        if stats.tasks_invalid:
            self.invalid.set()

    def close(self, stats):
        pass


def test_two_workers_disagreeing_with_everyone_make_a_task_invalid_and_it_moves(tmp_path):
    with cluster_with(tmp_path / "c", honest=1, cheaters=("colluding", "wrong")) as (cluster, _):
        before = books(cluster.address, identity_files(cluster))
        watch = _WatchInvalid()
        job = in_background(
            run,
            cluster,
            tmp_path,
            SMALL,
            mapper=split_words,
            reducer=sum_reducer,
            progress=watch,
            task_timeout=60,
            max_attempts=10,  # retries before the new workers register must not end it
        )
        assert watch.invalid.wait(60), "the three-way disagreement was never settled invalid"
        cluster.add_workers(3)  # honest workers for the retry to move to
        result = job.result(timeout=150)
        assert result == sequential(SMALL, split_words, sum_reducer)
        assert result.stats.tasks_invalid >= 1 and result.stats.retries >= 1
        assert_books_balance(cluster, before, tmp_path)


MALFORMED = "the agreed result does not decrypt, decode or have an output's shape"


class _WatchMalformed(_WatchInvalid):
    def advance(self, stats):
        if stats.retry_reasons.get(MALFORMED):
            self.invalid.set()


def test_colluders_agreeing_on_a_malformed_output_are_retried_around(tmp_path):
    """Two colluding workers, in every task (one honest worker beside
    them), agree on a map output that is not one (a value that is not a
    list): run_job neither raises nor returns it, but runs the chunk again
    without them (docs/protocol.md section 10)."""
    cheaters = ("malformed", "malformed")
    with cluster_with(tmp_path / "c", honest=1, cheaters=cheaters) as (cluster, _):
        colluders = {client_id(cluster.directory / f"cheater{n}.json") for n in range(2)}
        before = books(cluster.address, identity_files(cluster))
        watch = _WatchMalformed()
        job = in_background(
            run, cluster, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer,
            progress=watch, max_attempts=10,
        )  # fmt: skip
        assert watch.invalid.wait(60), "the colluders' quorum was never noticed"
        cluster.add_workers(3)  # honest workers for the retry to move to
        result = job.result(timeout=150)
        assert result == sequential(SMALL, split_words, sum_reducer)
        assert result.stats.cheaters == colluders
        assert result.stats.retry_reasons[MALFORMED] >= 1
        assert_books_balance(cluster, before, tmp_path)


def test_a_worker_that_accepts_and_never_answers(tmp_path):
    """Its replicas are left at work after the quorum (late), unpaid; when
    the late window ends (2 s here) each is counted failed and its credit
    goes back to the foreman (docs/protocol.md section 10)."""
    window = ("--late-window", "2")
    with cluster_with(tmp_path / "c", 2, ("silent",), discovery_args=window) as (cluster, _):
        silent = client_id(cluster.directory / "cheater0.json")
        before = books(cluster.address, identity_files(cluster))
        result = run(cluster, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer)
        assert result == sequential(SMALL, split_words, sum_reducer)
        late = sum(1 for v in result.stats.verdicts.values() if silent in v["late"])
        assert late >= 1 and result.stats.cheaters_seen == 0
        after = assert_books_balance(cluster, before, tmp_path)
        assert after[silent][0] == before[silent][0]
        assert after[silent][2] - before[silent][2] == late


def slow_words(key, line):
    import time

    time.sleep(0.2)
    for word in line.split():
        yield word, 1


def test_a_worker_killed_mid_job_does_not_stop_it(tmp_path):
    with LocalCluster(workers=4, directory=str(tmp_path / "c"), slots=1) as cluster:
        before = books(cluster.address, identity_files(cluster))
        job = in_background(
            run, cluster, tmp_path, SMALL, mapper=slow_words, reducer=sum_reducer, chunk_bytes=64
        )
        victim = cluster.workers[0]
        victim.wait_for(" done in ", timeout=60)  # it is in the middle of the job
        victim.process.send_signal(signal.SIGKILL)
        result = job.result(timeout=150)
        assert result == sequential(SMALL, split_words, sum_reducer)
        assert_books_balance(cluster, before, tmp_path)


def test_every_worker_gone_fails_the_job_in_time_and_refunds(tmp_path):
    with LocalCluster(workers=3, directory=str(tmp_path / "c")) as cluster:
        for worker in cluster.workers:
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait(timeout=10)
        foreman = tmp_path / "foreman.json"
        started = time.monotonic()
        with pytest.raises(ec262.JobFailed) as caught:
            run(
                cluster,
                tmp_path,
                SMALL,
                mapper=split_words,
                reducer=sum_reducer,
                task_timeout=3,
                max_attempts=3,
            )
        assert time.monotonic() - started < 45
        assert "map chunk" in str(caught.value)
        assert books(cluster.address, [foreman])[client_id(foreman)][0] == cluster.starting_credits
        assert load_identity(foreman) is not None


def test_too_few_live_workers_is_not_enough_workers_within_seconds(tmp_path):
    """2 workers at replication 3: no task can ever be made. The old main
    waited the whole task timeout (120 s) in silence, then said JobFailed."""
    with LocalCluster(workers=2, directory=str(tmp_path / "c")) as cluster:
        foreman = tmp_path / "foreman.json"
        started = time.monotonic()
        with pytest.raises(ec262.NotEnoughWorkers) as caught:
            run(cluster, tmp_path, SMALL, mapper=split_words, reducer=sum_reducer)
        assert time.monotonic() - started < 15
        assert (caught.value.live, caught.value.needed) == (2, 3)
        assert "2 live worker(s)" in str(caught.value) and "needs 3" in str(caught.value)
        assert isinstance(caught.value, ec262.JobFailed)  # what callers already catch
        assert books(cluster.address, [foreman])[client_id(foreman)][0] == cluster.starting_credits


class _AskGetJob:
    """A progress object that calls the foreman's GetJob while the job runs."""

    def __init__(self) -> None:
        self.seen = []

    def phase(self, name, total):
        pass

    def advance(self, stats):
        if not self.seen:
            with grpc.insecure_channel(stats.foreman_address) as channel:
                self.seen.append(
                    foreman_pb2_grpc.ForemanStub(channel).GetJob(
                        foreman_pb2.GetJobRequest(), timeout=10
                    )
                )

    def close(self, stats):
        pass


def test_get_job_reports_progress_while_the_job_runs(cluster, tmp_path):
    watcher = _AskGetJob()
    result = run(
        cluster,
        tmp_path,
        SMALL,
        mapper=split_words,
        reducer=sum_reducer,
        progress=watcher,
        chunk_bytes=64,
    )
    (status,) = watcher.seen
    assert status.job_id == result.stats.job_id
    assert status.phase == "map"
    # The first advance: one SettleTasks may have validated several at once.
    assert 1 <= status.tasks_by_state["validated"] < result.stats.tasks_validated
    assert status.tasks_by_state["assigned"] >= 1
    # The verdicts of the tasks settled so far (at least the validated one),
    # as GetJob gives them (docs/protocol.md section 10).
    assert status.verdicts
    for verdict in status.verdicts:
        assert len(verdict.agreed) >= 2 and not verdict.disagreed
        assert sorted(verdict.agreed) == sorted(result.stats.verdicts[verdict.task_id]["agreed"])


def test_the_cluster_and_status_commands(tmp_path):
    with start_server(["cluster", "--workers", "3", "--dir", str(tmp_path / "c")]) as cluster:
        identity = tmp_path / "me.json"
        result = ec262.Job(
            mapper=split_words,
            reducer=sum_reducer,
            discovery=cluster.address,
            identity=identity,
            progress=False,
        ).run(SMALL)
        assert result == sequential(SMALL, split_words, sum_reducer)
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "ec262",
                "status",
                "--discovery",
                cluster.address,
                "--identity",
                str(identity),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        spent = result.stats.credits_spent
        assert f"{1_000_000 - spent} credits" in status.stdout
        assert cluster.stop() == 0
