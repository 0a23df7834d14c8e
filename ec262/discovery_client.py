"""The client side of the Discovery service, for workers, foremen and the
CLI: bearer metadata on every call, timeouts, and status codes turned back
into ec262's exceptions."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc

from ec262.discovery_trust import DiscoveryTrust
from ec262.envelope import ciphertext_sha256
from ec262.errors import AuthenticationError, TrustError
from ec262.grpc_errors import error_from_item, error_from_rpc
from ec262.identity import Identity, load_identities, save_identity
from ec262.retry import TRANSIENT_CODES
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def this_runtime() -> str:
    """What can load a function payload made here, e.g. `cpython-3.11`."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


class DiscoveryClient:
    """A discovery service, acting as one identity. `address` may list
    several front-ends of one ledger, `HOST:PORT,HOST:PORT`: a call that finds
    the current one unreachable moves on to the next (docs/protocol.md
    section 9); the callers' retries do the waiting."""

    def __init__(
        self,
        address: str,
        identity: Identity | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        certificate: str | os.PathLike | None = None,
        pins: Path | None = None,
        trust_environment: bool = True,
    ) -> None:
        """`certificate` (else $EC262_DISCOVERY_CERT) is the service's
        certificate or a CA for it; `pins` the identity file that pins
        certificates trusted on first use (docs/protocol.md section 8;
        `load_or_create_identity` sets it when not given)."""
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("a discovery address is HOST:PORT (or several, comma-separated)")
        self.address = ",".join(self.addresses)
        self.identity = identity
        self._checked_info: pb.ClientInfo | None = None  # see fresh_client_info
        self.timeout = timeout
        self._current = 0
        # A stub per channel, made once: making one builds a callable per RPC
        # of the service, which cost as much as a small call's own work.
        self._channels: dict[str, tuple[grpc.Channel, discovery_pb2_grpc.DiscoveryStub]] = {}
        self._channels_lock = threading.Lock()
        self.trust = DiscoveryTrust(certificate, pins, environment=trust_environment)

    @property
    def uses_tls(self) -> bool:
        """Whether calls go over TLS (so a foreman's result server must too)."""
        return any(self.trust.uses_tls(a) for a in self.addresses)

    @property
    def _stub(self) -> discovery_pb2_grpc.DiscoveryStub:
        address = self.addresses[self._current]
        with self._channels_lock:
            made = self._channels.get(address)
            if made is None:
                channel = self.trust.channel(address)
                made = self._channels[address] = (
                    channel,
                    discovery_pb2_grpc.DiscoveryStub(channel),
                )
        return made[1]

    def _trust_problem(self, error: grpc.RpcError) -> TrustError | None:
        address = self.addresses[self._current]
        problem = self.trust.explain(address, error)
        if problem is not None:
            with self._channels_lock:
                made = self._channels.pop(address, None)
            if made is not None:
                made[0].close()
        return problem

    def _next_front_end(self, error: grpc.RpcError) -> bool:
        """Move to the next address after a transient failure; False when
        there is no other."""
        if len(self.addresses) < 2 or error.code() not in TRANSIENT_CODES:
            return False
        failed = self.addresses[self._current]
        self._current = (self._current + 1) % len(self.addresses)
        logger.info(
            "discovery %s unreachable (%s); trying %s",
            failed,
            error.code().name,
            self.addresses[self._current],
        )
        return True

    def close(self) -> None:
        with self._channels_lock:
            made, self._channels = list(self._channels.values()), {}
        for channel, _ in made:
            channel.close()

    def __enter__(self) -> DiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        request,
        *,
        authenticated: bool = True,
        timeout=None,
        identity: Identity | None = None,
    ):
        """`identity` (default: the client's own) signs the call."""
        metadata = None
        if authenticated:
            identity = identity or self.identity
            if identity is None:
                raise AuthenticationError("this client has no identity yet")
            metadata = identity.metadata()
        for attempt in range(len(self.addresses)):
            try:
                return getattr(self._stub, method)(
                    request, metadata=metadata, timeout=timeout or self.timeout
                )
            except grpc.RpcError as error:
                problem = self._trust_problem(error)
                if problem is not None:
                    raise problem from None
                if attempt + 1 < len(self.addresses) and self._next_front_end(error):
                    continue
                raise error_from_rpc(error) from None
        raise AssertionError("unreachable")

    def create_client(self) -> Identity:
        made = self._call("CreateClient", pb.CreateClientRequest(), authenticated=False)
        return Identity(made.client_id, made.secret, self.address, made.ledger_id)

    def load_or_create_identity(self, path: Path) -> Identity:
        """This service's ledger's identity from the file at `path`, made
        (and added to the file, mode 0600) on first use.

        A stored secret is sent only to an address it was used at before
        (an unknown address might be anyone's). At an address new to the
        file, a new identity is made; if it turns out to belong to a ledger
        the file already has an identity for (another front-end of it), that
        one is used instead and the new, empty one is left unused."""
        if self.trust.pins is None:
            self.trust.pins = path
        identities = load_identities(path)
        here = [
            i for i in identities
            if not i.addresses() or set(self.address.split(",")) & set(i.addresses())
        ]  # fmt: skip
        for identity in reversed(here):
            try:
                info = self._call("GetClient", pb.GetClientRequest(), identity=identity)
            except AuthenticationError:
                continue  # this address serves another ledger now
            known = replace(identity, ledger_id=info.ledger_id or identity.ledger_id)
            self._checked_info = info
            return self._use(path, known.used_at(self.address), identity)
        made = self.create_client()
        same_ledger = [i for i in identities if made.ledger_id and i.ledger_id == made.ledger_id]
        if same_ledger:
            logger.info(
                "%s is another front-end of ledger %s: using identity %s (the one just made,"
                " %s, stays unused)",
                self.address,
                made.ledger_id,
                same_ledger[-1].client_id,
                made.client_id,
            )
            return self._use(path, same_ledger[-1].used_at(self.address), None)
        logger.info("created identity %s in %s (ledger %s)", made.client_id, path, made.ledger_id)
        return self._use(path, made, None)

    def _use(self, path: Path, identity: Identity, stored: Identity | None) -> Identity:
        if identity != stored:
            save_identity(path, identity)
        self.identity = identity
        return identity

    def get_client(self) -> pb.ClientInfo:
        return self._call("GetClient", pb.GetClientRequest())

    def fresh_client_info(self) -> pb.ClientInfo:
        """The caller's record: the one `load_or_create_identity` just read
        when there is one (once: a round trip saved as a job starts, which
        on a network is what a small job costs), else GetClient's."""
        info, self._checked_info = self._checked_info, None
        return info if info is not None else self.get_client()

    def register_worker(
        self,
        *,
        address: str,
        ttl_seconds: int,
        slots: int,
        runtime: str | None = None,
        tls_certificate: str = "",
    ) -> pb.ClientInfo:
        return self._call(
            "RegisterWorker",
            pb.RegisterWorkerRequest(
                address=address,
                ttl_seconds=ttl_seconds,
                slots=slots,
                runtime=this_runtime() if runtime is None else runtime,
                tls_certificate=tls_certificate,
            ),
        )

    def leave_pool(self) -> pb.ClientInfo:
        return self._call("RegisterWorker", pb.RegisterWorkerRequest(ttl_seconds=-1))

    def request_tasks(
        self,
        n: int,
        *,
        exclude_workers: Sequence[str] = (),
        runtime: str | None = None,
        request_id: str = "",
        replication: int = 0,
    ) -> pb.RequestTasksResponse:
        """`request_id` (1-64 characters) makes a repeat safe: the same
        tasks again, nothing charged twice. `replication`: 0 the service's,
        1-99 workers per task, -1 adaptive (ec262/replication.py)."""
        return self._call(
            "RequestTasks",
            pb.RequestTasksRequest(
                n=n,
                exclude_workers=list(exclude_workers),
                runtime=this_runtime() if runtime is None else runtime,
                request_id=request_id,
                replication=replication,
            ),
        )

    def fetch_key(self, task_id: str) -> pb.FetchKeyResponse:
        return self._call("FetchKey", pb.FetchKeyRequest(task_id=task_id))

    def settle_task(
        self,
        task_id: str,
        *,
        valid: bool,
        missing: Sequence[str] = (),
        released: Sequence[str] = (),
    ) -> pb.SettleTaskResponse:
        return self._call(
            "SettleTask",
            pb.SettleTaskRequest(
                task_id=task_id, valid=valid, missing=list(missing), released=list(released)
            ),
        )

    def commit_result(self, task_id: str, ciphertext: str) -> None:
        """Commit to a result before sending it: the SHA-256 of its exact
        text (docs/protocol.md section 10)."""
        self._call(
            "CommitResult",
            pb.CommitResultRequest(
                task_id=task_id, ciphertext_sha256=ciphertext_sha256(ciphertext)
            ),
        )

    # -- batch forms (docs/protocol.md section 2, batch calls): one result or
    # exception per item, in order; a failure of the call itself raises.

    def fetch_keys(self, task_ids: Sequence[str]) -> list[pb.FetchKeyResponse | Exception]:
        response = self._call(
            "FetchKeys",
            pb.FetchKeysRequest(tasks=[pb.FetchKeyRequest(task_id=t) for t in task_ids]),
        )
        return [error_from_item(a.status) or a.response for a in response.answers]

    def commit_results(self, results: Sequence[tuple[str, str]]) -> list[Exception | None]:
        """Commit to several results, each (task id, ciphertext)."""
        response = self._call(
            "CommitResults",
            pb.CommitResultsRequest(
                commitments=[
                    pb.CommitResultRequest(
                        task_id=task_id, ciphertext_sha256=ciphertext_sha256(ciphertext)
                    )
                    for task_id, ciphertext in results
                ]
            ),
        )
        return [error_from_item(status) for status in response.statuses]

    def settle_tasks(
        self, requests: Sequence[pb.SettleTaskRequest]
    ) -> list[pb.SettleTaskResponse | Exception]:
        response = self._call("SettleTasks", pb.SettleTasksRequest(tasks=list(requests)))
        return [error_from_item(a.status) or a.response for a in response.answers]

    def add_replica(
        self,
        task_id: str,
        *,
        exclude_workers: Sequence[str] = (),
        release_workers: Sequence[str] = (),
        request_id: str = "",
        count_live: bool = False,
    ) -> pb.WorkerRef:
        """One more worker for an open task of ours; an empty `client_id`
        when none is free now (the releases took effect all the same), then
        with `count_live` the pool's live workers in `live_workers`."""
        return self._call(
            "AddReplica",
            pb.AddReplicaRequest(
                task_id=task_id,
                exclude_workers=list(exclude_workers),
                release_workers=list(release_workers),
                request_id=request_id,
                runtime=this_runtime(),
                count_live=count_live,
            ),
        )
