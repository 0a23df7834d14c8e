"""What users import: `@mapper`, `@reducer`, `@combiner`, `run_job`, `Job`.

The decorators only mark a function (an attribute on it); `run_job` finds the
marked functions among its caller's globals, so the five-line mincemeat
style works without ec262 keeping any global state, and `Job` runs several
jobs in one program explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ec262 import replication as replicas
from ec262.addresses import routable_host
from ec262.defaults import ENV_ADVERTISE, ENV_DISCOVERY, ENV_HOST
from ec262.discovery_client import DiscoveryClient
from ec262.identity import identity_path

logger = logging.getLogger(__name__)

ROLE = "__ec262_role__"


def _host_toward(discovery: str) -> str:
    """The local address that routes to the discovery service: where
    workers (which reach that service) can most likely reach us too."""
    try:
        return routable_host(discovery)
    except (OSError, ValueError):
        return "127.0.0.1"


def _mark(role: str) -> Callable[[Callable], Callable]:
    def decorate(function: Callable) -> Callable:
        if not callable(function):
            raise TypeError(f"@ec262.{role} decorates a function, not {function!r}")
        setattr(function, ROLE, role)
        return function

    decorate.__name__ = role
    decorate.__doc__ = f"Mark a function as the job's {role} (found by `ec262.run_job`)."
    return decorate


mapper = _mark("mapper")
reducer = _mark("reducer")
combiner = _mark("combiner")


class JobResult(dict):
    """The result dictionary, with the job's statistics as `.stats`."""

    stats: Any = None


@dataclass
class Job:
    """A MapReduce job: `Job(mapper=f, reducer=g).run(data)`.

    Options: `discovery` ("HOST:PORT"; else $EC262_DISCOVERY; else a local
    cluster of `local_workers` processes is started for the job),
    `discovery_cert` (its certificate or a CA, else $EC262_DISCOVERY_CERT,
    else pinned in the identity file on first use), `identity`
    (path of the foreman's identity file), `chunk_bytes` (input per map task),
    `task_timeout` (seconds before a task without quorum is retried),
    `max_attempts` (per chunk), `progress` (None = a bar when stderr is a
    terminal; or an object with `phase`, `advance`, `close` methods that get
    the live statistics), `host`/`advertise` (where this foreman's result
    server listens and the address workers dial; else $EC262_HOST and
    $EC262_ADVERTISE, else the local address that routes to the discovery
    service), `replication` (workers per task, 1-99, or "adaptive": 2
    trusted workers and a third only on disagreement or lateness, with 10 %
    spot checks at 3; None = the discovery service's default).
    """

    mapper: Callable | None = None
    reducer: Callable | None = None
    combiner: Callable | None = None
    discovery: str | None = None
    discovery_cert: str | os.PathLike | None = None
    identity: str | os.PathLike | None = None
    chunk_bytes: int | None = None
    task_timeout: float | None = None
    max_attempts: int | None = None
    progress: Any = None  # None/True/False, or an object with phase/advance/close
    local_workers: int = 3
    host: str | None = None
    advertise: str | None = None
    replication: int | str | None = None
    stats: Any = field(default=None, init=False, repr=False)

    def run(self, data: Any, **overrides: Any) -> JobResult:
        job = replace(self, **overrides) if overrides else self
        if job.mapper is None or job.reducer is None:
            raise TypeError("a job needs a mapper and a reducer")
        replicas.parse(job.replication)  # ValueError before anything starts
        result = _run(job, data)
        self.stats = result.stats
        return result


def _engine_config(job: Job):
    from foreman_service.engine import EngineConfig

    changes = {
        name: value
        for name, value in (
            ("chunk_bytes", job.chunk_bytes),
            ("task_timeout", job.task_timeout),
            ("max_attempts", job.max_attempts),
            ("replication", replicas.parse(job.replication)),
        )
        if value is not None
    }
    return replace(EngineConfig(), **changes)


def _run(job: Job, data: Any) -> JobResult:
    from ec262.local_cluster import LocalCluster
    from ec262.progress import TerminalProgress
    from foreman_service.engine import JobEngine
    from foreman_service.inbox import ResultInbox
    from foreman_service.server import start_foreman_server

    with ExitStack() as stack:
        stack.enter_context(_sigterm_stops_the_job())
        address = job.discovery or os.environ.get(ENV_DISCOVERY)
        identity = Path(job.identity) if job.identity else None
        cluster = None
        if not address:
            logger.info("no discovery service configured: starting a local cluster")
            cluster = stack.enter_context(LocalCluster(workers=job.local_workers))
            address = cluster.address
            identity = identity or cluster.foreman_identity
        path = identity_path(identity)
        discovery = stack.enter_context(
            DiscoveryClient(
                address,
                certificate=job.discovery_cert,
                pins=path,
                trust_environment=cluster is None,
            )
        )
        discovery.load_or_create_identity(path)
        inbox = ResultInbox()
        progress = (
            job.progress
            if hasattr(job.progress, "advance")
            else TerminalProgress(enabled=job.progress)
        )
        engine = JobEngine(
            discovery, inbox, result_address="", config=_engine_config(job), progress=progress
        )
        if cluster is not None:  # this machine's own: the environment is for others
            host, advertise = job.host or "127.0.0.1", job.advertise
        else:
            host = job.host or os.environ.get(ENV_HOST) or _host_toward(address)
            advertise = job.advertise or os.environ.get(ENV_ADVERTISE) or None
        server = start_foreman_server(
            inbox,
            engine.stats,
            host=host,
            advertise=advertise,
            tls=discovery.uses_tls,
        )
        stack.callback(server.stop)
        engine.result_address = engine.stats.foreman_address = server.address
        engine.result_certificate = server.certificate_pem
        logger.info("foreman service for this job on %s (GetJob shows progress)", server.address)
        result = JobResult(engine.run(data, job.mapper, job.reducer, job.combiner))
        result.stats = engine.stats
        return result


@contextlib.contextmanager
def _sigterm_stops_the_job():
    """SIGTERM (docker stop, timeout, a service manager) unwinds the job as
    Ctrl-C does, so its open tasks are settled and refunded on the way out
    (docs/protocol.md section 9): it raises SystemExit(143) in the main
    thread. A handler the program set itself is left alone."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _find_marked(namespace: dict, role: str) -> Callable | None:
    found = [
        value
        for value in namespace.values()
        if callable(value) and getattr(value, ROLE, None) == role
    ]
    if len(found) > 1:
        names = ", ".join(sorted(getattr(f, "__name__", "?") for f in found))
        raise TypeError(
            f"several @ec262.{role} functions here ({names}): pass {role}=... to run_job,"
            " or use ec262.Job"
        )
    return found[0] if found else None


def run_job(
    data: Any,
    *,
    mapper: Callable | None = None,
    reducer: Callable | None = None,
    combiner: Callable | None = None,
    **options: Any,
) -> JobResult:
    """Run a MapReduce job and return its result dictionary.

    `data` is a dict of records (or a list, keyed by position). The mapper,
    reducer and optional combiner are the functions marked with
    `@ec262.mapper`, `@ec262.reducer` and `@ec262.combiner` in the calling
    module, unless given here. Other options are those of `ec262.Job`.
    """
    caller = sys._getframe(1).f_globals
    mapper = mapper or _find_marked(caller, "mapper")
    reducer = reducer or _find_marked(caller, "reducer")
    combiner = combiner or _find_marked(caller, "combiner")
    if mapper is None or reducer is None:
        missing = " and ".join(
            r for r, f in (("@ec262.mapper", mapper), ("@ec262.reducer", reducer)) if f is None
        )
        raise TypeError(f"run_job found no {missing} function: decorate one, or pass it")
    return Job(mapper=mapper, reducer=reducer, combiner=combiner, **options).run(data)
