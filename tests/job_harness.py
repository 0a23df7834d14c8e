"""Helpers for end-to-end job tests: clusters with honest and cheating
workers as real processes, and the books of every identity involved."""

from __future__ import annotations

import contextlib
import re
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from ec262.discovery_client import DiscoveryClient
from ec262.identity import load_identity
from ec262.local_cluster import LocalCluster
from ec262.processes import ServerProcess, spawn_server
from tests.processes import ROOT
from worker_service.mapreduce import run_map, run_reduce

WORD = re.compile(r"[A-Za-z_]+")


def word_mapper(path, text):
    for word in WORD.findall(text):
        yield word.lower(), 1


def sum_reducer(word, counts):
    return sum(counts)


def sequential(data: dict, mapper, reducer) -> dict:
    """The same functions run in one process, in input order."""
    return run_reduce(reducer, run_map(mapper, data.items()).items())


def stdlib_text(megabytes: float) -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = {}, 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts[path.name] = text
        size += len(text)
        if size >= megabytes * 1e6:
            break
    return texts


def spawn_cheater(cluster: LocalCluster, mode: str, name: str) -> ServerProcess:
    """A worker that misbehaves (worker_service/adversaries.py `mode`)."""
    worker = spawn_server(
        ["worker", "-P", "0", "--slots", "2", "--adversary", mode, "-v",
         "--discovery", cluster.address, "--identity", str(cluster.directory / name)],
        cwd=str(ROOT),
    )  # fmt: skip
    worker.wait_for("registered with discovery")
    return worker


@contextlib.contextmanager
def cluster_with(
    directory: Path,
    honest: int,
    cheaters: tuple[str, ...] = (),
    discovery_args: tuple[str, ...] = (),
) -> Iterator[tuple[LocalCluster, list[ServerProcess]]]:
    with LocalCluster(
        workers=honest, directory=str(directory), discovery_args=discovery_args
    ) as cluster:
        started = []
        try:
            for number, mode in enumerate(cheaters):
                started.append(spawn_cheater(cluster, mode, f"cheater{number}.json"))
            yield cluster, started
        finally:
            for worker in started:
                worker.kill()


def client_id(path: Path) -> str:
    identity = load_identity(path)
    assert identity is not None, path
    return identity.client_id


def books(address: str, paths: list[Path]) -> dict[str, tuple[int, int, int]]:
    """client id -> (credits, tasks completed, tasks failed) for each identity."""
    out = {}
    for path in paths:
        with DiscoveryClient(address, load_identity(path)) as client:
            info = client.get_client()
        out[info.client_id] = (info.credits, info.tasks_completed, info.tasks_failed)
    return out


def settled_books(
    address: str, paths: list[Path], *, seconds: float = 60.0
) -> dict[str, tuple[int, int, int]]:
    """`books` once no identity holds a busy slot: the replicas a job left
    at work after its settles have committed, or their late window ended
    (docs/protocol.md section 10). Polls that condition, never a fixed
    sleep."""
    deadline = time.monotonic() + seconds
    while True:
        busy = 0
        for path in paths:
            with DiscoveryClient(address, load_identity(path)) as client:
                busy += client.get_client().busy_slots
        if not busy:
            return books(address, paths)
        assert time.monotonic() < deadline, f"{busy} slot(s) still busy after {seconds} s"
        time.sleep(0.05)


def identity_files(cluster: LocalCluster) -> list[Path]:
    return sorted(cluster.directory.glob("*.json"))
