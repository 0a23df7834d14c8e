"""The foreman's calls out, for the job core (`foreman_service/core.py`):
each command becomes a call that does not block the engine, and each
answer comes back as an event on the engine's queue. The counterpart of
`worker_service/outbound.py`.

Worker calls are gRPC futures: one channel per worker address, so a frozen
worker delays nobody else (docs/protocol.md section 9, liveness).
Discovery calls run on a few threads and are retried with backoff while
the service is unreachable, which is safe because every one of them is
idempotent (request ids; a repeated settle gets the same answer).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from sys import intern
from typing import Any

import grpc

from ec262 import tls
from ec262.addresses import address_is_loopback
from ec262.batching import Batcher, Pending
from ec262.defaults import BATCH_BYTES, MAX_BATCH_ITEMS, MAX_MESSAGE_BYTES
from ec262.discovery_client import DiscoveryClient
from ec262.grpc_errors import item_code
from ec262.retry import call_with_retry
from ec262.v1 import discovery_pb2, worker_pb2, worker_pb2_grpc
from foreman_service.core import (
    AddReplica,
    Assign,
    AssignAnswered,
    Cancel,
    Granted,
    ReplicaAdded,
    ReplicaFailed,
    RequestFailed,
    RequestTasks,
    ResultArrived,
    Settle,
    Settled,
    SettleFailed,
    Withdraw,
    Withdrawn,
    WorkerLost,
)
from foreman_service.inbox import ResultInbox

logger = logging.getLogger(__name__)

# How long a discovery call is retried while the service is unreachable
# (docs/protocol.md section 9: a job survives a 60 s outage).
DISCOVERY_RETRY_SECONDS = 65.0
CANCEL_DEADLINE = 2.0
# A round of RequestTasks (core.PARALLEL_REQUESTS) and AddReplicas beside it.
DISCOVERY_THREADS = 8
STOP_THREADS = 16  # settles in parallel as a job stops
SETTLE_THREADS = 64
STOP_SECONDS_FOR_LATE_GRANTS = 5.0


class EventQueue:
    """Answers and results, from any thread, for the engine's loop."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, event: Any) -> None:
        self._queue.put(event)

    def take(self, timeout: float | None) -> list:
        """Every event there is, waiting up to `timeout` for the first."""
        try:
            events = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events


class UntrustedWorker(Exception):
    """A worker off loopback that the discovery service gave no certificate for."""


class WorkerChannels:
    """One channel per worker, for the length of a job: TLS to exactly the
    certificate the discovery service handed out for it, plaintext only to a
    loopback worker that registered none (docs/protocol.md section 8)."""

    def __init__(self, on_lost: Callable[[str], None] = lambda worker_id: None) -> None:
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        # Made once per channel (a stub builds a callable per RPC: as costly
        # as a small call's own work when made per call).
        self._stubs: dict[tuple[str, str], worker_pb2_grpc.WorkerStub] = {}
        self._certificates: dict[str, str] = {}  # worker id -> PEM
        self._on_lost = on_lost
        self._watchers: list[tuple[grpc.Channel, Callable]] = []

    def learn(self, worker_id: str, certificate: str) -> None:
        self._certificates[worker_id] = certificate

    def stub(self, worker_id: str, address: str) -> worker_pb2_grpc.WorkerStub:
        certificate = self._certificates.get(worker_id, "")
        if not certificate and not address_is_loopback(address):
            raise UntrustedWorker(
                f"worker {address} is not loopback and has no registered certificate"
            )
        key = (address, certificate)
        stub = self._stubs.get(key)
        if stub is None:
            channel = self._channels[key] = tls.channel(
                address,
                certificate,
                options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
            )
            watcher = self._watcher(worker_id, channel)
            channel.subscribe(watcher)
            self._watchers.append((channel, watcher))
            stub = self._stubs[key] = worker_pb2_grpc.WorkerStub(channel)
        return stub

    def _watcher(self, worker_id: str, channel: grpc.Channel) -> Callable:
        """Tells `on_lost` when a worker is found gone: its connection ended
        and connecting again fails (a killed worker; a frozen one keeps its
        connection and is left to the timeouts). Its tasks, queued there,
        would otherwise wait for their deadlines."""
        Connectivity = grpc.ChannelConnectivity
        last = [Connectivity.IDLE]

        def changed(state: grpc.ChannelConnectivity) -> None:
            if state == Connectivity.IDLE and last[0] == Connectivity.READY:
                grpc.channel_ready_future(channel)  # connect again now, to see
            elif state == Connectivity.TRANSIENT_FAILURE and last[0] != state:
                self._on_lost(worker_id)
            last[0] = state

        return changed

    def close(self) -> None:
        for channel, watcher in self._watchers:
            channel.unsubscribe(watcher)
        self._watchers.clear()
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._stubs.clear()


class ForemanOutbound:
    """Carries out the core's commands for one job."""

    def __init__(
        self,
        discovery: DiscoveryClient,
        inbox: ResultInbox,
        events: EventQueue,
        *,
        assign_timeout: float,
    ) -> None:
        self._discovery = discovery
        self._inbox = inbox
        self._events = events
        self._assign_timeout = assign_timeout
        self._channels = WorkerChannels(lambda worker_id: events.put(WorkerLost(worker_id)))
        self._pool = ThreadPoolExecutor(DISCOVERY_THREADS, thread_name_prefix="discovery")
        # Each settle waits on its own thread (retried while the discovery
        # service is unreachable); those waiting at once share SettleTasks.
        self._settlers = ThreadPoolExecutor(SETTLE_THREADS, thread_name_prefix="settle")
        self._settles = Batcher(discovery.settle_tasks, name="settles")
        self._stop = threading.Event()
        self._stopping = threading.Event()  # the job is over (finish)
        self._pending_lock = threading.Lock()
        self._pending: set = set()  # settles and cancels still under way
        self._drained = threading.Condition(self._pending_lock)
        self.job_id = ""
        self.replication = 0  # RequestTasksRequest.replication: 0 the discovery's default
        self.result_address = ""
        self.result_certificate = ""  # PEM of the result server, "" when plaintext
        self._phase_payload = (b"", "")
        inbox.listen(lambda task, worker, text: events.put(ResultArrived(task, worker, text)))

    def begin_phase(self, payload: bytes, digest: str) -> None:
        self._phase_payload = (payload, digest)

    # -- carrying out ---------------------------------------------------------------

    def execute_all(self, commands: list) -> None:
        """Carry out `commands`: the Assigns to one worker go in one
        AssignTasks (or a few, each within BATCH_BYTES), its Cancels and
        Withdraws in one CancelTasks, the Settles together (see
        `_settle_together`), the rest one by one."""
        assigns: list[Assign] = []
        cancels: list[Cancel | Withdraw] = []
        settles: list[Settle] = []
        for command in commands:
            if isinstance(command, Assign):
                assigns.append(command)
            elif isinstance(command, Cancel | Withdraw):
                cancels.append(command)
            elif isinstance(command, Settle):
                settles.append(command)
            else:
                self.execute(command)
        self._settle_together(settles)
        for group in _by_worker(assigns):
            for batch in _within(group, BATCH_BYTES, MAX_BATCH_ITEMS, self._assign_bytes):
                self._assign(batch)
        self._cancel_each_worker(cancels)

    def _cancel_each_worker(self, commands: list[Cancel | Withdraw]) -> None:
        """One CancelTasks per worker (a few past MAX_BATCH_ITEMS)."""
        for group in _by_worker(commands):
            for batch in _within(group, BATCH_BYTES, MAX_BATCH_ITEMS, lambda command: 0):
                self._cancel(batch)

    def _assign_bytes(self, command: Assign) -> int:
        payload = self._phase_payload[0] if command.send_payload else b""
        return len(command.chunk.rows) + len(payload)

    def execute(self, command: Any) -> None:
        match command:
            case RequestTasks():  # tracked: a job that stops waits for its answer
                self._tracked(self._pool.submit(self._request_tasks, command))
            case Assign():
                self._assign([command])
            case Cancel() | Withdraw():
                self._cancel([command])
            case AddReplica():
                self._in_thread(self._add_replica, command)
            case Settle():
                self._settle_together([command])
            case _:
                raise TypeError(f"not a command for the outbound layer: {command!r}")

    def _in_thread(self, call: Callable, command: Any) -> None:
        self._pool.submit(call, command)

    def _retrying(self, call: Callable, what: str, seconds: float):
        return call_with_retry(
            call, what=what, deadline=time.monotonic() + seconds, stop=self._stop
        )

    def _request_tasks(self, command: RequestTasks) -> None:
        try:
            response = self._retrying(
                lambda: self._discovery.request_tasks(
                    command.n,
                    exclude_workers=sorted(command.exclude),
                    request_id=command.request_id,
                    replication=self.replication,
                ),
                "RequestTasks",
                DISCOVERY_RETRY_SECONDS,
            )
        except Exception as error:
            self._events.put(RequestFailed(command.request_id, error))
            return
        for task in response.tasks:
            for worker in task.workers:
                self._channels.learn(worker.client_id, worker.tls_certificate)
        # A protobuf field gives a new string each time it is read: interned,
        # a worker's id is one string in every task's replicas and verdicts
        # (a job kept 255 bytes a task of copies of the same few ids).
        tasks = [
            (t.task_id, {intern(w.client_id): w.address for w in t.workers}) for t in response.tasks
        ]
        if self._stopping.is_set():  # the job is over: give these back at once
            self._give_back([task_id for task_id, _ in tasks])
            return
        self._events.put(
            Granted(
                command.request_id,
                tasks,
                response.live_workers,
                response.live_networks,
                response.diversity,
            )
        )

    def _add_replica(self, command: AddReplica) -> None:
        logger.debug("AddReplica(%s) releasing %s", command.task_id, sorted(command.release))
        try:
            ref = self._retrying(
                lambda: self._discovery.add_replica(
                    command.task_id,
                    exclude_workers=sorted(command.exclude),
                    release_workers=sorted(command.release),
                    request_id=command.request_id,
                    count_live=command.count_live,
                ),
                f"AddReplica({command.task_id})",
                DISCOVERY_RETRY_SECONDS,
            )
        except Exception as error:
            self._events.put(ReplicaFailed(command.task_id, error))
            return
        if ref.client_id:
            self._channels.learn(ref.client_id, ref.tls_certificate)
        worker = (intern(ref.client_id), ref.address) if ref.client_id else None
        self._events.put(ReplicaAdded(command.task_id, worker, ref.live_workers))

    def _settle_together(self, commands: list[Settle]) -> None:
        """Settles decided at once leave in one SettleTasks: queued one by
        one from their threads, the first took a free place alone and the
        rest waited for an answer, a round trip (issue 16: 1 of about 12 a
        job of 61 tasks paid at 50 ms each way)."""
        if not commands:
            return
        for command in commands:
            self._inbox.close_task(command.task_id)
        self._tracked(self._settlers.submit(self._settle_group, commands))

    def _settle_group(self, commands: list[Settle]) -> None:
        """The first attempt of each, in one call made on this thread (a
        hand-off to a sender thread costs a GIL switch on a busy process);
        those that failed are retried each on its own thread."""
        try:
            pendings = self._settles.call_many([_settle_request(c) for c in commands])
        except Exception as error:  # the batcher closed: the job is over
            for command in commands:
                self._events.put(SettleFailed(command.task_id, error))
            return
        for command, pending in zip(commands, pendings, strict=True):
            try:
                response = pending.wait()
            except Exception:
                self._tracked(
                    self._settlers.submit(self._settle, command, DISCOVERY_RETRY_SECONDS, pending)
                )
                continue
            self._events.put(_settled(command, response))

    def _settle(self, command: Settle, seconds: float, first: Pending | None = None) -> None:
        """Settle `command`, retried while the discovery service is
        unreachable; `first`: an attempt made already, whose error counts
        (its item is the request)."""
        request = first.item if first is not None else _settle_request(command)
        made = [first] if first is not None else []

        def attempt() -> discovery_pb2.SettleTaskResponse:
            return made.pop().wait() if made else self._settles.call(request)

        try:
            response = self._retrying(attempt, f"SettleTask({command.task_id})", seconds)
        except Exception as error:
            self._events.put(SettleFailed(command.task_id, error))
            return
        self._events.put(_settled(command, response))

    def _assign(self, commands: list[Assign]) -> None:
        """One AssignTasks to one worker; each task's answer an event."""
        payload, digest = self._phase_payload
        first = commands[0]
        requests = []
        for command in commands:
            self._inbox.expect(command.task_id, command.worker_id, command.token)
            requests.append(
                worker_pb2.AssignTaskRequest(
                    task_id=command.task_id,
                    job_id=self.job_id,
                    phase=command.chunk.phase,
                    function=payload if command.send_payload else b"",
                    function_sha256=digest,
                    rows=command.chunk.rows,
                    result_address=self.result_address,
                    foreman_id=self._discovery.identity.client_id,
                    submit_token=command.token,
                    result_certificate=self.result_certificate,
                )
            )
        try:
            stub = self._channels.stub(first.worker_id, first.address)
        except UntrustedWorker as error:
            for command in commands:
                self._events.put(
                    AssignAnswered(command.task_id, command.worker_id, "UNAVAILABLE", str(error))
                )
            return
        future = stub.AssignTasks.future(
            worker_pb2.AssignTasksRequest(tasks=requests), timeout=self._assign_timeout
        )

        def answered(call: grpc.Future) -> None:
            code = call.code()
            if code == grpc.StatusCode.OK:
                answers = [
                    (item_code(status).name, status.message) for status in call.result().statuses
                ]
            else:
                answers = [(code.name, call.details() or "")] * len(commands)
            for command, (name, details) in zip(commands, answers, strict=False):
                if name != "OK":
                    logger.info(
                        "worker %s did not take %s (%s: %s)",
                        command.worker_id[:8],
                        command.chunk.label,
                        name,
                        details,
                    )
                self._events.put(AssignAnswered(command.task_id, command.worker_id, name, details))

        future.add_done_callback(answered)

    def _cancel(self, commands: list[Cancel | Withdraw]) -> None:
        """One CancelTasks to one worker. A Cancel's answer only logged; a
        Withdraw (cancel only if unstarted) answered by an event, a failed
        call or item counting as dropped (core.Withdrawn)."""
        first = commands[0]
        try:
            stub = self._channels.stub(first.worker_id, first.address)
        except UntrustedWorker:  # never assigned either
            self._withdrawn(commands, [True] * len(commands))
            return
        future = stub.CancelTasks.future(
            worker_pb2.CancelTasksRequest(
                tasks=[
                    worker_pb2.CancelTaskRequest(
                        task_id=command.task_id,
                        submit_token=command.token,
                        only_queued=isinstance(command, Withdraw),
                    )
                    for command in commands
                ]
            ),
            timeout=CANCEL_DEADLINE,
        )
        self._tracked(future)

        def answered(call: grpc.Future) -> None:
            code = call.code()
            answers = list(call.result().answers) if code == grpc.StatusCode.OK else []
            # The whole call failed, or (a broken worker) left items unanswered.
            unanswered = code.name if code != grpc.StatusCode.OK else "no answer"
            dropped = []
            for n, command in enumerate(commands):
                answer = answers[n] if n < len(answers) else None
                name = item_code(answer.status).name if answer is not None else unanswered
                if name != "OK":
                    logger.debug(
                        "CancelTask(%s%s) to %s: %s",
                        command.task_id,
                        ", only queued" if isinstance(command, Withdraw) else "",
                        command.worker_id[:8],
                        name,
                    )
                dropped.append(name != "OK" or answer.response.cancelled)
            self._withdrawn(commands, dropped)

        future.add_done_callback(answered)

    def _withdrawn(self, commands: list[Cancel | Withdraw], dropped: list[bool]) -> None:
        for command, gone in zip(commands, dropped, strict=True):
            if isinstance(command, Withdraw):
                self._events.put(Withdrawn(command.task_id, command.worker_id, gone))

    def _tracked(self, future) -> None:
        with self._pending_lock:
            self._pending.add(future)

        def done(_: Any) -> None:
            with self._pending_lock:
                self._pending.discard(future)
                self._drained.notify_all()

        future.add_done_callback(done)

    # -- the end of a job -------------------------------------------------------------

    def _give_back(self, task_ids: list[str]) -> None:
        """Settle invalid (refund) tasks granted after the job stopped: no
        credit waits for the lease to end."""
        for task_id in task_ids:
            self._settle(Settle(task_id, False), STOP_SECONDS_FOR_LATE_GRANTS)

    def finish(self, commands: list, within: float) -> None:
        """Carry out the core's last commands (settles and cancels as a job
        stops) and wait up to `within` seconds for them and for those still
        under way; discovery retries stop at that deadline. Tasks a request
        under way is granted now are given back."""
        deadline = time.monotonic() + within
        granted_late = self._job_over()
        # Their own threads: the job's may be stuck retrying an unreachable
        # discovery service for a minute.
        extra = ThreadPoolExecutor(STOP_THREADS, thread_name_prefix="stop")
        futures = []
        for command in commands:
            if isinstance(command, Settle):
                self._inbox.close_task(command.task_id)
                futures.append(extra.submit(self._settle, command, within))
        self._cancel_each_worker([c for c in commands if isinstance(c, Cancel)])
        if granted_late:
            futures.append(extra.submit(self._give_back, granted_late))
        wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        extra.shutdown(wait=False)
        self.drain(max(0.0, deadline - time.monotonic()))

    def _job_over(self) -> list[str]:
        """From now on a request that is answered gives its tasks back; the
        tasks of answers already queued (the core reads no more events)."""
        self._stopping.set()
        return [
            task_id
            for event in self._events.take(timeout=0)
            if isinstance(event, Granted)
            for task_id, _ in event.tasks
        ]

    def drain(self, within: float) -> None:
        """Wait up to `within` seconds for settles, cancels and requests
        under way (the job is over: tasks granted now are given back)."""
        granted_late = self._job_over()
        if granted_late:
            self._tracked(self._pool.submit(self._give_back, granted_late))
        with self._drained:
            self._drained.wait_for(lambda: not self._pending, timeout=within)

    def close(self) -> None:
        """Stop retries, close the channels (calls still in flight, to a
        frozen worker say, end at once) and the threads. The channels close
        on a thread of their own: closing one whose connectivity is watched
        waits for gRPC's polling (0.12 s measured), which a job that has its
        result need not wait for."""
        self._stop.set()
        threading.Thread(target=self._channels.close, name="close-channels", daemon=True).start()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._settlers.shutdown(wait=True, cancel_futures=True)
        self._settles.close()


def _settled(command: Settle, response: discovery_pb2.SettleTaskResponse) -> Settled:
    return Settled(
        command.task_id,
        response.key or None,
        response.quorum_sha256,
        frozenset(response.agreeing_workers),
        frozenset(response.paid_workers) if command.valid else None,
        frozenset(response.late_workers),
    )


def _settle_request(command: Settle) -> discovery_pb2.SettleTaskRequest:
    """The request of a settle, made once per settle (logged here, so each
    settle is logged once, by the group or alone)."""
    logger.debug(
        "SettleTask(%s) valid %s, missing %s, released %s",
        command.task_id,
        command.valid,
        sorted(command.missing),
        sorted(command.released),
    )
    return discovery_pb2.SettleTaskRequest(
        task_id=command.task_id,
        valid=command.valid,
        missing=sorted(command.missing),
        released=sorted(command.released),
    )


def _by_worker(commands: list) -> list[list]:
    """`commands` grouped by the worker they go to, each group in order."""
    groups: dict[tuple[str, str], list] = {}
    for command in commands:
        groups.setdefault((command.worker_id, command.address), []).append(command)
    return list(groups.values())


def _within(items: list, max_bytes: int, max_items: int, size: Callable[[Any], int]) -> list[list]:
    """`items` in order, cut into runs of at most `max_items` and
    `max_bytes` (an item bigger than that alone makes a run of its own)."""
    runs: list[list] = [[]]
    total = 0
    for item in items:
        n = size(item)
        run = runs[-1]
        if run and (len(run) >= max_items or total + n > max_bytes):
            runs.append(run := [])
            total = 0
        run.append(item)
        total += n
    return runs
