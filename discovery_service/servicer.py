"""The `Discovery` gRPC servicer (grpc.aio): proto in, one Ledger call,
proto out.

Ledger calls are plain synchronous Python and run on the event loop: each
takes tens of microseconds with SQLite (WAL, no fsync by default), less than
handing it to a thread would cost, and running them one at a time is what
the store's lock would enforce anyway. With Redis a call waits one round
trip on the loop; running calls on a thread pool instead was measured and
was slower (292 vs 399 cycles/s at 2 client processes, bench/
discovery_cycles.py --compare), the GIL handoffs costing more than the
wait."""

from __future__ import annotations

import asyncio

import grpc

from discovery_service.ledger import Ledger
from discovery_service.probe import probe_worker
from discovery_service.store import Assignment, ClientRecord, WorkerRef
from ec262.addresses import network_of, split_address
from ec262.auth import AUTHORIZATION_KEY
from ec262.errors import InvalidRequest
from ec262.grpc_errors import answer_each, translate_errors
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc

RESOLVE_SECONDS = 2.0
MAX_CONCURRENT_PROBES = 16


def client_info(record: ClientRecord, ledger: Ledger) -> pb.ClientInfo:
    config = ledger.config
    return pb.ClientInfo(
        ledger_id=ledger.ledger_id,
        replication=config.replication,
        foreman_lease_seconds=config.foreman_lease,
        client_id=record.client_id,
        credits=record.credits,
        address=record.address,
        expiry_unix=int(record.expiry_unix),
        slots=record.slots,
        busy_slots=record.busy_slots,
        tasks_completed=record.tasks_completed,
        tasks_failed=record.tasks_failed,
        runtime=record.runtime,
        trust=record.trust,
        trusted_after=config.trusted_after,
        adaptive_replication=config.adaptive,
    )


def worker_ref(worker: WorkerRef) -> pb.WorkerRef:
    return pb.WorkerRef(
        client_id=worker.client_id, address=worker.address, tls_certificate=worker.tls_certificate
    )


def peer_host(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's IP address (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`), or
    None for other transports."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0]
    return host.strip("[]") or None


async def resolve_host(address: str) -> str | None:
    """The IP address a worker's host name resolves to (None for an IP
    literal, an unparsable address or a name that does not resolve within
    RESOLVE_SECONDS), off the event loop's thread."""
    try:
        host = split_address(address)[0].strip("[]")
    except InvalidRequest:
        return None  # the ledger says what is wrong with it
    if network_of(host) is not None:
        return None
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None), RESOLVE_SECONDS)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


def task_assignment(task: Assignment) -> pb.TaskAssignment:
    return pb.TaskAssignment(
        task_id=task.task_id,
        workers=[worker_ref(w) for w in task.workers],
        expiry_unix=int(task.expiry_unix),
    )


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == AUTHORIZATION_KEY:
            return value
    return None


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # Address checks under way at once: each is a connection to an
        # address a registered identity chose, so a flood of registrations
        # must not turn the service into a port scanner.
        self._probes = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        return self._ledger.authenticate(authorization(context))

    @translate_errors
    async def CreateClient(self, request, context):
        record, secret = self._ledger.create_client(peer_host(context))
        return pb.CreateClientResponse(
            client_id=record.client_id,
            secret=secret,
            info=client_info(record, self._ledger),
            ledger_id=self._ledger.ledger_id,
        )

    @translate_errors
    async def RegisterWorker(self, request, context):
        caller = self._caller(context)
        if request.ttl_seconds >= 0 and self._ledger.needs_probe(
            caller,
            address=request.address,
            tls_certificate=request.tls_certificate,
            peer_host=peer_host(context),
        ):
            async with self._probes:
                await probe_worker(request.address, request.tls_certificate)
        record = self._ledger.register_worker(
            caller,
            address=request.address,
            ttl_seconds=request.ttl_seconds,
            slots=request.slots,
            runtime=request.runtime,
            tls_certificate=request.tls_certificate,
            resolved=await resolve_host(request.address) if request.ttl_seconds >= 0 else None,
        )
        return client_info(record, self._ledger)

    @translate_errors
    async def GetClient(self, request, context):
        caller = self._caller(context)
        return client_info(self._ledger.get_client(caller), self._ledger)

    @translate_errors
    async def RequestTasks(self, request, context):
        caller = self._caller(context)
        tasks, credits = self._ledger.request_tasks(
            caller,
            n=request.n,
            exclude_workers=request.exclude_workers,
            runtime=request.runtime,
            request_id=request.request_id,
            replication=request.replication,
        )
        live, spots = (0, 0)
        if len(tasks) < max(1, request.n):
            live, spots = self._ledger.live_workers(caller, request.runtime)
        return pb.RequestTasksResponse(
            tasks=[task_assignment(t) for t in tasks],
            credits=credits,
            replication=self._ledger.replication_for(request.replication)[0],
            live_workers=live,
            live_networks=spots,
            diversity=self._ledger.config.diversity,
        )

    def _fetch_key(self, caller: str, request: pb.FetchKeyRequest) -> pb.FetchKeyResponse:
        key, foreman_id = self._ledger.fetch_key(caller, request.task_id)
        return pb.FetchKeyResponse(key=key, foreman_id=foreman_id)

    def _settle_task(self, caller: str, request: pb.SettleTaskRequest) -> pb.SettleTaskResponse:
        settlement = self._ledger.settle_task(
            caller,
            request.task_id,
            valid=request.valid,
            missing=request.missing,
            released=request.released,
        )
        return pb.SettleTaskResponse(
            key=settlement.key or b"",
            credits=settlement.credits,
            quorum_sha256=settlement.quorum_sha256,
            agreeing_workers=list(settlement.agreeing),
            paid_workers=list(settlement.paid),
            late_workers=list(settlement.late),
        )

    def _commit_result(self, caller: str, request: pb.CommitResultRequest) -> None:
        self._ledger.commit_result(caller, request.task_id, request.ciphertext_sha256)

    @translate_errors
    async def FetchKey(self, request, context):
        return self._fetch_key(self._caller(context), request)

    @translate_errors
    async def SettleTask(self, request, context):
        return self._settle_task(self._caller(context), request)

    @translate_errors
    async def CommitResult(self, request, context):
        self._commit_result(self._caller(context), request)
        return pb.CommitResultResponse()

    # The batch forms: one authentication, then each item as its single
    # call (docs/protocol.md section 2, batch calls).

    @translate_errors
    async def FetchKeys(self, request, context):
        caller = self._caller(context)
        answers = answer_each(request.tasks, lambda r: self._fetch_key(caller, r), "FetchKeys")
        return pb.FetchKeysResponse(
            answers=[
                pb.FetchKeyAnswer(status=status, response=response) for status, response in answers
            ]
        )

    @translate_errors
    async def SettleTasks(self, request, context):
        caller = self._caller(context)
        answers = answer_each(request.tasks, lambda r: self._settle_task(caller, r), "SettleTasks")
        return pb.SettleTasksResponse(
            answers=[
                pb.SettleTaskAnswer(status=status, response=response)
                for status, response in answers
            ]
        )

    @translate_errors
    async def CommitResults(self, request, context):
        caller = self._caller(context)
        answers = answer_each(
            request.commitments, lambda r: self._commit_result(caller, r), "CommitResults"
        )
        return pb.CommitResultsResponse(statuses=[status for status, _ in answers])

    @translate_errors
    async def AddReplica(self, request, context):
        worker, _ = self._ledger.add_replica(
            self._caller(context),
            request.task_id,
            exclude_workers=request.exclude_workers,
            release_workers=request.release_workers,
            runtime=request.runtime,
            request_id=request.request_id,
        )
        if worker is not None:
            return worker_ref(worker)
        if not request.count_live:
            return pb.WorkerRef()
        # Found nobody: how many live workers there are tells the foreman
        # whether its exclusions leave the task any (up to LIVE_COUNT_CAP
        # read, as for a RequestTasks made short; so only when asked).
        live, _ = self._ledger.live_workers(self._caller(context), request.runtime)
        return pb.WorkerRef(live_workers=live)
