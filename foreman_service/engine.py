"""The job engine's I/O loop: plan, then run each phase through the pure
core (`foreman_service/core.py`), carrying its commands out with
`foreman_service/outbound.py` and feeding it the answers, results and
clock ticks; shuffle map output into reduce chunks between the phases.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from ec262.collector import bulk_allocation
from ec262.discovery_client import DiscoveryClient
from ec262.payload import digest, pack_functions
from foreman_service.core import (
    MAP,
    PHASE_NAMES,
    REDUCE,
    Chunk,
    Deliver,
    EngineConfig,
    Fail,
    JobCore,
)
from foreman_service.inbox import ResultInbox
from foreman_service.outbound import EventQueue, ForemanOutbound
from foreman_service.planning import input_rows, plan_job
from foreman_service.shuffle import Shuffle
from foreman_service.stats import JobStats

__all__ = ["EngineConfig", "JobEngine"]

logger = logging.getLogger(__name__)

# The most a job that stops (Ctrl-C, SIGTERM, a failure) spends settling
# and cancelling its open tasks (docs/protocol.md section 9: within 2 s).
STOP_SECONDS = 1.5
# After a job returns, how long its last cancels and settles may take.
DRAIN_SECONDS = 2.0
# The longest the loop sleeps without looking at the clock.
MAX_WAIT_SECONDS = 1.0


class Progress(Protocol):
    def phase(self, name: str, total: int) -> None: ...
    def advance(self, stats: JobStats) -> None: ...
    def close(self, stats: JobStats) -> None: ...


class _NoProgress:
    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, stats: JobStats) -> None:
        pass

    def close(self, stats: JobStats) -> None:
        pass


class LeaseKeepalive:
    """Calls GetClient every third of the discovery service's foreman lease
    while a job runs, so a job that waits long on its workers keeps its
    tasks (docs/protocol.md section 9); a foreman that dies stops calling,
    and its tasks go back within the lease."""

    def __init__(self, discovery: DiscoveryClient, lease_seconds: int) -> None:
        self._discovery = discovery
        self._interval = max(0.5, lease_seconds / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._discovery.get_client()
            except Exception as error:  # the next call, or the job's own, will tell
                logger.debug("lease keepalive failed: %s", error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class JobEngine:
    """Runs one job at a time for one foreman identity."""

    def __init__(
        self,
        discovery: DiscoveryClient,
        inbox: ResultInbox,
        *,
        result_address: str,
        result_certificate: str = "",
        config: EngineConfig | None = None,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.inbox = inbox
        self.result_address = result_address
        self.result_certificate = result_certificate  # PEM; "" = plaintext (loopback)
        self.config = config or EngineConfig()
        self.progress = progress or _NoProgress()
        self.stats = JobStats()
        self._clock = clock
        self._progress_seen = (0, 0, 0)  # validated, retried, invalid at the last advance

    def run(
        self, data: Any, mapper: Callable, reducer: Callable, combiner: Callable | None = None
    ) -> dict:
        with bulk_allocation():  # the input, its chunks, the shuffle: all kept to the end
            return self._run(data, mapper, reducer, combiner)

    def _run(
        self, data: Any, mapper: Callable, reducer: Callable, combiner: Callable | None
    ) -> dict:
        started = self._clock()
        stats = self.stats
        stats.job_id = uuid.uuid4().hex
        info = self.discovery.fresh_client_info()
        replication, adaptive = self.config.replication_with(
            info.replication, info.adaptive_replication
        )
        plan = plan_job(
            input_rows(data),
            balance=info.credits,
            replication=replication,
            chunk_bytes=self.config.chunk_bytes,
        )
        stats.input_bytes = plan.input_bytes
        logger.info(
            "job %s: %d map and up to %d reduce tasks x %d workers (%d credits planned of %d)",
            stats.job_id[:8],
            len(plan.map_chunks),
            plan.reduce_chunks,
            replication,
            plan.credits_needed,
            info.credits,
        )
        core = JobCore(self.config, replication=replication, adaptive=adaptive, stats=stats)
        events = EventQueue()
        outbound = ForemanOutbound(
            self.discovery, self.inbox, events, assign_timeout=self.config.assign_timeout
        )
        outbound.job_id, outbound.result_address = stats.job_id, self.result_address
        outbound.replication = self.config.replication
        outbound.result_certificate = self.result_certificate
        keepalive = LeaseKeepalive(self.discovery, info.foreman_lease_seconds or 60)
        finished = False
        try:
            if not plan.map_chunks:
                finished = True
                return {}
            shuffle = Shuffle(len(plan.map_chunks))
            self._run_phase(
                core,
                outbound,
                events,
                [Chunk(MAP, i, rows) for i, rows in enumerate(plan.map_chunks)],
                pack_functions(mapper, combiner),
                lambda done: shuffle.add(done.chunk.index, done.output, done.rows),
            )
            reduce_rows = shuffle.reduce_chunks(plan.reduce_chunks, self.config.chunk_bytes)
            outputs: dict[int, dict] = {}
            self._run_phase(
                core,
                outbound,
                events,
                [Chunk(REDUCE, i, rows) for i, rows in enumerate(reduce_rows)],
                pack_functions(reducer),
                lambda done: outputs.__setitem__(done.chunk.index, done.output),
            )
            result: dict = {}
            for index in sorted(outputs):
                result.update(outputs[index])
            stats.phase = "done"
            finished = True
            return result
        except BaseException:
            stats.phase = "failed"
            raise
        finally:
            keepalive.stop()
            if finished:
                outbound.drain(DRAIN_SECONDS)  # the last cancels of late replicas
            else:
                outbound.finish(core.stop(), within=STOP_SECONDS)
            outbound.close()
            stats.seconds = self._clock() - started
            # A finished job's credits_spent is the core's count from the
            # discovery service's answers (charges, refunds, who a settle paid
            # or left late), the balance's change without a GetClient round
            # trip before the job returns (tests/test_jobs.py checks they
            # agree); a job stopped or failed reads the balance.
            if not finished:
                try:
                    stats.credits_spent = info.credits - self.discovery.get_client().credits
                except Exception:
                    logger.debug("could not read the final balance", exc_info=True)
            self.progress.close(stats)

    def _run_phase(
        self,
        core: JobCore,
        outbound: ForemanOutbound,
        events: EventQueue,
        chunks: list[Chunk],
        payload: bytes,
        on_result: Callable[[Deliver], None],
    ) -> None:
        phase = chunks[0].phase if chunks else MAP
        name = PHASE_NAMES[phase]
        phase_started = self._clock()
        self.progress.phase(name, len(chunks))
        payload_digest = digest(payload)
        outbound.begin_phase(payload, payload_digest)
        commands = core.start_phase(phase, chunks, payload_digest, self._clock())
        while True:
            self._carry_out(commands, outbound, on_result)
            if core.phase_done:
                break
            timeout = min(MAX_WAIT_SECONDS, max(0.0, core.wake_at() - self._clock()))
            commands = core.handle_all(events.take(timeout), self._clock())
        self.stats.phase_seconds[name] = self._clock() - phase_started

    def _carry_out(
        self,
        commands: list,
        outbound: ForemanOutbound,
        on_result: Callable[[Deliver], None],
    ) -> None:
        """Calls first, so freed workers get their next task before a map
        output is merged (milliseconds each); a failure raises at once."""
        delivered, calls = [], []
        for command in commands:
            if isinstance(command, Fail):
                outbound.execute_all(calls)
                raise command.error
            (delivered if isinstance(command, Deliver) else calls).append(command)
        outbound.execute_all(calls)
        for command in delivered:
            on_result(command)
        seen = (self.stats.tasks_validated, self.stats.retries, self.stats.tasks_invalid)
        if seen != self._progress_seen:
            self._progress_seen = seen
            self.progress.advance(self.stats)
