"""The job engine: plan, then run each phase's chunks as replicated tasks,
validate them by quorum on the ciphertexts, settle, decrypt, retry, and
shuffle map output into reduce chunks. Plain Python; the gRPC edges
(discovery client, worker stubs, the Foreman servicer feeding the inbox)
come in through the constructor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from ec262.discovery_client import DiscoveryClient
from ec262.encoding import decode_result
from ec262.envelope import open_sealed
from ec262.errors import (
    DecryptionError,
    EncodingError,
    JobFailed,
    NotEnoughWorkers,
    RemoteError,
    UnknownTask,
)
from ec262.limits import MAX_MESSAGE_BYTES
from ec262.payload import digest, pack_functions
from ec262.remote_errors import is_error_document
from ec262.retry import call_with_retry
from ec262.v1 import worker_pb2, worker_pb2_grpc
from foreman_service.inbox import ResultInbox
from foreman_service.planning import DEFAULT_CHUNK_BYTES, input_rows, plan_job
from foreman_service.shuffle import Shuffle
from foreman_service.stats import JobStats

logger = logging.getLogger(__name__)

MAP, REDUCE = worker_pb2.MAP, worker_pb2.REDUCE
PHASE_NAMES = {MAP: "map", REDUCE: "reduce"}
# While tasks of ours run, their settles free slots and trigger the next
# request; this slower poll only catches slots freed by others and workers
# joining, without an empty RequestTasks after every assignment.
BUSY_POLL_SECONDS = 0.25
# How long fewer live workers than a task needs are borne before
# NotEnoughWorkers (a worker restarting comes back sooner).
NOT_ENOUGH_WORKERS_SECONDS = 5.0
# How long RequestTasks and SettleTask are retried while the discovery
# service is unreachable (both are safe to repeat).
SETTLE_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class EngineConfig:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    task_timeout: float = 120.0  # no quorum by then: settle invalid, retry
    max_attempts: int = 4  # per chunk, then JobFailed
    # After quorum, the remaining replicas get as long again as the quorum
    # took (honest replicas run the same code on the same rows), within
    # [grace_min, grace_max] seconds, before they are reported missing.
    grace_fraction: float = 1.0
    grace_min: float = 0.05
    grace_max: float = 3.0
    batch: int = 64  # tasks asked for in one RequestTasks
    assign_timeout: float = 10.0


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


@dataclass
class Chunk:
    phase: int
    index: int
    rows: bytes
    attempts: int = 0
    suspects: set[str] = field(default_factory=set)
    starved_since: float | None = None  # when a retry first found no workers

    @property
    def label(self) -> str:
        return f"{PHASE_NAMES[self.phase]} chunk {self.index}"


@dataclass
class Attempt:
    chunk: Chunk
    task_id: str
    workers: dict[str, str]  # worker id -> address
    tokens: dict[str, str]
    started: float
    deadline: float
    unreachable: set[str] = field(default_factory=set)
    quorum_at: float | None = None


class WorkerStubs:
    """One channel per worker address, for the length of a job."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(
                address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
            )
        return worker_pb2_grpc.WorkerStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


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
        config: EngineConfig | None = None,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.inbox = inbox
        self.result_address = result_address
        self.config = config or EngineConfig()
        self.progress = progress or _NoProgress()
        self.stats = JobStats()
        self._clock = clock
        self._stubs = WorkerStubs()
        self._holders: dict[str, set[str]] = {}  # digest -> workers holding it
        self._cheaters: set[str] = set()
        self._active: dict[str, Attempt] = {}
        self._slots_freed = False
        self._replication = 3
        # Results settled but not yet handed on: merging a map output takes
        # milliseconds, so it waits until the freed workers have new tasks.
        self._settled: list[tuple[Chunk, Any]] = []
        self._fresh_starved_since: float | None = None
        self._live_workers: int | None = None  # when the last short reply said
        # AssignTask calls run on these threads, a task's replicas in
        # parallel (grpc futures would start a thread per call).
        self._calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="assign")

    # -- the whole job ---------------------------------------------------------

    def run(
        self, data: Any, mapper: Callable, reducer: Callable, combiner: Callable | None = None
    ) -> dict:
        started = self._clock()
        stats = self.stats
        stats.job_id = uuid.uuid4().hex
        info = self.discovery.get_client()
        replication = self._replication = info.replication or 3
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
        keepalive = LeaseKeepalive(self.discovery, info.foreman_lease_seconds or 60)
        try:
            if not plan.map_chunks:
                return {}
            shuffle = Shuffle(len(plan.map_chunks))
            map_payload = pack_functions(mapper, combiner)
            self._run_phase(
                MAP,
                [Chunk(MAP, i, rows) for i, rows in enumerate(plan.map_chunks)],
                map_payload,
                lambda chunk, output: shuffle.add(chunk.index, output),
            )
            reduce_rows = shuffle.reduce_chunks(plan.reduce_chunks, self.config.chunk_bytes)
            result: dict = {}
            outputs: dict[int, dict] = {}
            self._run_phase(
                REDUCE,
                [Chunk(REDUCE, i, rows) for i, rows in enumerate(reduce_rows)],
                pack_functions(reducer),
                lambda chunk, output: outputs.__setitem__(chunk.index, output),
            )
            for index in sorted(outputs):
                result.update(outputs[index])
            stats.phase = "done"
            return result
        except BaseException:
            stats.phase = "failed"
            raise
        finally:
            keepalive.stop()
            self._abandon_all()
            # Channels first: calls still in flight (to a frozen worker, say)
            # end at once instead of at their deadline, so a stopped job
            # returns within moments.
            self._stubs.close()
            self._calls.shutdown(wait=True)
            stats.seconds = self._clock() - started
            try:
                stats.credits_spent = info.credits - self.discovery.get_client().credits
            except Exception:
                logger.debug("could not read the final balance", exc_info=True)
            self.progress.close(stats)

    # -- one phase -------------------------------------------------------------

    def _run_phase(
        self,
        phase: int,
        chunks: list[Chunk],
        payload: bytes,
        on_result: Callable[[Chunk, Any], None],
    ) -> None:
        name = PHASE_NAMES[phase]
        self.stats.phase = name
        phase_started = self._clock()
        if phase == MAP:
            self.stats.map_tasks = len(chunks)
        else:
            self.stats.reduce_tasks = len(chunks)
        self.progress.phase(name, len(chunks))
        payload_digest = digest(payload)
        pending: deque[Chunk] = deque(chunks)
        next_request = 0.0
        empty_requests = 0
        starved_since: float | None = None
        while pending or self._active:
            now = self._clock()
            if pending and (self._slots_freed or now >= next_request):
                self._slots_freed = False
                if self._launch(pending, payload, payload_digest):
                    starved_since, empty_requests = None, 0
                    # Still pending means every free slot is taken: ask
                    # again when a settle of ours frees one, or after a
                    # while for slots freed by others and workers joining.
                    next_request = now + BUSY_POLL_SECONDS if pending else 0.0
                else:
                    # Workers are busy (a settle will free them) or absent:
                    # ask again with backoff to notice workers joining.
                    empty_requests += 1
                    next_request = now + min(1.0, 0.025 * 2**empty_requests)
                    if self._active:
                        next_request = min(next_request, now + BUSY_POLL_SECONDS)
                    starved_since = starved_since or now
                    live = self._live_workers
                    if live is not None and live < self._replication:
                        if now - starved_since > NOT_ENOUGH_WORKERS_SECONDS:
                            raise NotEnoughWorkers(
                                live, self._replication, chunk=pending[0].label
                            )
                    elif not self._active and now - starved_since > self.config.task_timeout:
                        raise JobFailed(
                            f"no workers available for {pending[0].label} for"
                            f" {self.config.task_timeout:g} s (a task needs {self._replication}"
                            " distinct live workers with a free slot, other than this foreman)",
                            chunk=pending[0].label,
                        )
            self._hand_on(on_result)
            self._wait(next_request if pending else None)
            for attempt in list(self._active.values()):
                self._decide(attempt, pending)
        self._hand_on(on_result)
        self.stats.phase_seconds[name] = self._clock() - phase_started

    def _launch(self, pending: deque[Chunk], payload: bytes, payload_digest: str) -> int:
        """Ask discovery for tasks for the pending chunks and assign them.

        Known cheaters, and for a retried chunk the workers of its failed
        attempts, are excluded, as long as enough other workers exist: a
        request that such exclusions leave empty for `relax_after` seconds
        is made without them (an honest majority still outvotes a cheater).
        """
        now = self._clock()
        relax_after = min(5.0, max(1.0, 0.05 * self.config.task_timeout))
        fresh = [c for c in pending if not c.suspects][: self.config.batch]
        made = 0
        if fresh:
            got = self._request_and_assign(fresh, self._cheaters, payload, payload_digest, pending)
            if got or not self._cheaters:
                self._fresh_starved_since = None
            else:
                self._fresh_starved_since = self._fresh_starved_since or now
                if now - self._fresh_starved_since > relax_after:
                    got = self._request_and_assign(fresh, set(), payload, payload_digest, pending)
            made += got
        for chunk in [c for c in pending if c.suspects]:
            got = self._request_and_assign(
                [chunk], chunk.suspects | self._cheaters, payload, payload_digest, pending
            )
            if not got:
                chunk.starved_since = chunk.starved_since or now
                if now - chunk.starved_since > relax_after:
                    chunk.suspects.clear()
                    chunk.starved_since = None
                    got = self._request_and_assign([chunk], set(), payload, payload_digest, pending)
            made += got
        return made

    def _request_and_assign(
        self,
        chunks: list[Chunk],
        exclude: set[str],
        payload: bytes,
        payload_digest: str,
        pending: deque[Chunk],
    ) -> int:
        request_id = uuid.uuid4().hex  # makes the retries below safe (docs/protocol.md s. 9)
        response = call_with_retry(
            lambda: self.discovery.request_tasks(
                len(chunks), exclude_workers=sorted(exclude), request_id=request_id
            ),
            what="RequestTasks",
            deadline=time.monotonic() + SETTLE_RETRY_SECONDS,
        )
        if len(response.tasks) < len(chunks):  # the service says how many workers are live
            self._live_workers = response.live_workers
        elif response.tasks:
            self._live_workers = None
        now = self._clock()
        attempts = []
        for chunk, task in zip(chunks, response.tasks, strict=False):
            pending.remove(chunk)
            workers = {w.client_id: w.address for w in task.workers}
            attempt = Attempt(
                chunk=chunk,
                task_id=task.task_id,
                workers=workers,
                tokens=self.inbox.open_task(task.task_id, workers),
                started=now,
                deadline=now + self.config.task_timeout,
            )
            self._active[task.task_id] = attempt
            attempts.append(attempt)
            self.stats.states["assigned"] += 1
            self.stats.credits_spent += len(workers)  # escrowed; refunds come back below
        self._assign(attempts, payload, payload_digest)
        return len(attempts)

    def _assign(self, attempts: list[Attempt], payload: bytes, payload_digest: str) -> None:
        """AssignTask to every worker of these tasks in parallel, sending the
        payload only to workers not known to hold it."""
        holders = self._holders.setdefault(payload_digest, set())
        calls = []
        for attempt in attempts:
            for worker_id, address in attempt.workers.items():
                calls.append((attempt, worker_id, address, worker_id not in holders))
        futures = [
            self._calls.submit(self._assign_one, a, w, addr, payload, payload_digest, send)
            for a, w, addr, send in calls
        ]
        retry = []
        for (attempt, worker_id, address, sent), future in zip(calls, futures, strict=True):
            try:
                future.result()
                holders.add(worker_id)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION and not sent:
                    retry.append((attempt, worker_id, address))
                    continue
                self._unreachable(attempt, worker_id, error)
        for attempt, worker_id, address in retry:
            try:
                self._assign_one(attempt, worker_id, address, payload, payload_digest, True)
                holders.add(worker_id)
            except grpc.RpcError as error:
                self._unreachable(attempt, worker_id, error)

    def _assign_one(
        self,
        attempt: Attempt,
        worker_id: str,
        address: str,
        payload: bytes,
        payload_digest: str,
        send_payload: bool,
    ):
        request = worker_pb2.AssignTaskRequest(
            task_id=attempt.task_id,
            job_id=self.stats.job_id,
            phase=attempt.chunk.phase,
            function=payload if send_payload else b"",
            function_sha256=payload_digest,
            rows=attempt.chunk.rows,
            result_address=self.result_address,
            foreman_id=self.discovery.identity.client_id,
            submit_token=attempt.tokens[worker_id],
        )
        return self._stubs.stub(address).AssignTask(request, timeout=self.config.assign_timeout)

    def _unreachable(self, attempt: Attempt, worker_id: str, error: grpc.RpcError) -> None:
        logger.info(
            "worker %s did not take %s (%s: %s)",
            worker_id[:8],
            attempt.chunk.label,
            error.code().name,
            error.details(),
        )
        attempt.unreachable.add(worker_id)
        with self.inbox.changed:
            self.inbox.dirty.add(attempt.task_id)

    # -- waiting and deciding ----------------------------------------------------

    def _wait(self, wake_at: float | None) -> None:
        now = self._clock()
        deadlines = [a.deadline for a in self._active.values()]
        deadlines += [
            a.quorum_at + self._grace(a) for a in self._active.values() if a.quorum_at is not None
        ]
        if wake_at is not None:
            deadlines.append(wake_at)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        with self.inbox.changed:
            if not self.inbox.dirty:
                self.inbox.changed.wait(timeout)
            self.inbox.dirty.clear()

    def _grace(self, attempt: Attempt) -> float:
        took = (attempt.quorum_at or attempt.started) - attempt.started
        config = self.config
        return min(config.grace_max, max(config.grace_min, config.grace_fraction * took))

    def _decide(self, attempt: Attempt, pending: deque[Chunk]) -> None:
        now = self._clock()
        results = self.inbox.results(attempt.task_id)
        workers = set(attempt.workers)
        quorum = len(workers) // 2 + 1
        counts = Counter(results.values())
        winner, votes = counts.most_common(1)[0] if counts else (None, 0)
        still_possible = workers - attempt.unreachable - set(results)
        if votes >= quorum:
            if attempt.quorum_at is None:
                attempt.quorum_at = now
            if still_possible and now < attempt.quorum_at + self._grace(attempt):
                return
            agreeing = {w for w, c in results.items() if c == winner}
            self._settle_valid(attempt, winner, agreeing, pending)
        elif votes + len(still_possible) < quorum or now >= attempt.deadline:
            reason = "deadline passed" if now >= attempt.deadline else "no quorum possible"
            self._settle_invalid(attempt, pending, reason)

    def _finish(self, attempt: Attempt) -> None:
        self._active.pop(attempt.task_id, None)
        self.inbox.close_task(attempt.task_id)
        self._slots_freed = True  # its workers can take the next task

    def _settle_valid(
        self,
        attempt: Attempt,
        winner: str,
        agreeing: set[str],
        pending: deque[Chunk],
    ) -> None:
        missing = sorted(set(attempt.workers) - agreeing)
        results = self.inbox.results(attempt.task_id)
        disagreeing = {w for w in missing if w in results}
        self._finish(attempt)
        settlement = self._settle(attempt.task_id, valid=True, missing=missing)
        stats = self.stats
        stats.tasks_validated += 1
        stats.states["validated"] += 1
        stats.missing_reports += len(missing)
        stats.credits_spent -= len(missing)
        if disagreeing:
            stats.cheaters |= disagreeing
            self._cheaters |= disagreeing
            logger.warning(
                "%s: worker(s) %s sent a result that disagrees with the quorum;"
                " reported missing and not paid",
                attempt.chunk.label,
                ", ".join(w[:8] for w in sorted(disagreeing)),
            )
        try:
            plaintext = open_sealed(winner, settlement.key)
            # Map output goes to the shuffle as text; only an error document
            # (or a reduce output) needs decoding here.
            is_map = attempt.chunk.phase == MAP
            output = (
                plaintext
                if is_map and not plaintext.startswith(b'[["error",')
                else decode_result(plaintext)
            )
        except (DecryptionError, EncodingError):
            # The agreeing workers sent the same garbage: they were paid, but
            # their result is useless; run the chunk again without them.
            self._cheaters |= agreeing
            stats.cheaters |= agreeing
            self._retry(attempt, pending, "the agreed result does not decrypt")
            return
        if isinstance(output, dict) and is_error_document(output):
            error = output["error"]
            raise RemoteError(
                error["type"],
                error["message"],
                error["traceback"],
                chunk=attempt.chunk.label,
                output=str(error.get("output", "")),
            )
        if is_map and isinstance(output, dict):  # an ordinary result with an "error" key
            output = plaintext
        self._settled.append((attempt.chunk, output))
        self.progress.advance(stats)

    def _hand_on(self, on_result: Callable[[Chunk, Any], None]) -> None:
        settled, self._settled = self._settled, []
        for chunk, output in settled:
            on_result(chunk, output)

    def _settle(self, task_id: str, *, valid: bool, missing: list[str] | None = None):
        """SettleTask, retried while the discovery service is unreachable: a
        repeated settle gets the same answer (docs/protocol.md section 9), so
        a reply lost on the way costs nothing."""
        return call_with_retry(
            lambda: self.discovery.settle_task(task_id, valid=valid, missing=missing or []),
            what=f"SettleTask({task_id})",
            deadline=time.monotonic() + SETTLE_RETRY_SECONDS,
        )

    def _settle_invalid(self, attempt: Attempt, pending: deque[Chunk], reason: str) -> None:
        self._finish(attempt)
        with contextlib.suppress(UnknownTask):  # expired: discovery refunded it already
            self._settle(attempt.task_id, valid=False)
        self.stats.tasks_invalid += 1
        self.stats.states["invalid"] += 1
        self.stats.credits_spent -= len(attempt.workers)
        self._retry(attempt, pending, reason)

    def _retry(self, attempt: Attempt, pending: deque[Chunk], reason: str) -> None:
        chunk = attempt.chunk
        chunk.attempts += 1
        if chunk.attempts >= self.config.max_attempts:
            raise JobFailed(
                f"no quorum for {chunk.label} after {chunk.attempts} attempts (last: {reason})",
                chunk=chunk.label,
            )
        chunk.suspects |= set(attempt.workers)
        self.stats.retries += 1
        logger.info(
            "%s: %s; retrying on other workers (attempt %d)",
            chunk.label,
            reason,
            chunk.attempts + 1,
        )
        pending.append(chunk)
        self.progress.advance(self.stats)

    def _abandon_all(self) -> None:
        """Refund every task still open (the job failed or stopped)."""
        for attempt in list(self._active.values()):
            self._finish(attempt)
            try:
                self.discovery.settle_task(attempt.task_id, valid=False)
            except Exception as error:
                logger.warning("could not refund task %s: %s", attempt.task_id, error)
