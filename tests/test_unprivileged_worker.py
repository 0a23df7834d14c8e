"""A real `ec262 worker` process running as an unprivileged user (a test
run as root starts it under uid nobody), in a job beside root workers: an
operating-system attack that on the old main reniced every process of the
worker's uid fails, changes nothing, and the worker then computes another
foreman's word count (docs/protocol.md section 5)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import ec262
from ec262.local_cluster import LocalCluster
from tests.job_harness import sequential, stdlib_text, sum_reducer, word_mapper
from tests.processes import start_server
from tests.sandbox_harness import UNPRIVILEGED_UID, as_other_user

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="starting a worker as another user needs root"),
]


def renice_every_process_of_my_uid(key, line):
    import random

    os = random._os
    os.setpriority(os.PRIO_USER, 0, 19)  # 0: the caller's own uid
    yield key, 1


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Uid:"))
    return int(line.split()[1])


def test_an_unprivileged_worker_refuses_the_attack_and_serves_the_next_foreman(tmp_path):
    home = tempfile.mkdtemp(prefix="ec262-nobody-")
    os.chown(home, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    try:
        with LocalCluster(workers=2, directory=str(tmp_path / "cluster")) as cluster:
            args = ["worker", "-P", "0", "--discovery", cluster.address, "-v",
                    "--identity", str(Path(home) / "identity.json")]  # fmt: skip
            launcher = as_other_user([], UNPRIVILEGED_UID)
            with start_server(args, launcher=launcher, env={"HOME": home}) as worker:
                worker.wait_for("registered with discovery")
                layers = worker.wait_for("sandbox layers:")
                assert "(the worker's, in a user namespace)" in layers, layers
                pid = worker.process.pid
                assert _uid_of(pid) == UNPRIVILEGED_UID
                nice_before = os.getpriority(os.PRIO_PROCESS, pid)

                job = ec262.Job(
                    discovery=cluster.address,
                    identity=tmp_path / "attacker.json",
                    progress=False,
                    mapper=renice_every_process_of_my_uid,
                    reducer=sum_reducer,
                )
                with pytest.raises(ec262.RemoteError) as caught:
                    job.run({"a": "one line", "b": "another"})
                assert caught.value.type_name == "PermissionError", caught.value
                assert os.getpriority(os.PRIO_PROCESS, pid) == nice_before
                assert os.getpriority(os.PRIO_USER, UNPRIVILEGED_UID) == nice_before

                data = stdlib_text(0.2)
                honest = ec262.Job(
                    discovery=cluster.address,
                    identity=tmp_path / "another-foreman.json",
                    progress=False,
                    mapper=word_mapper,
                    reducer=sum_reducer,
                )
                assert honest.run(data) == sequential(data, word_mapper, sum_reducer)
                worker.wait_for("done in")  # the unprivileged worker took part
    finally:
        shutil.rmtree(home, ignore_errors=True)
