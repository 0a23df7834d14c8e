"""The client side of the Discovery service, for workers, foremen and the
CLI: bearer metadata on every call, timeouts, and status codes turned back
into ec262's exceptions."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from ec262.errors import AuthenticationError
from ec262.grpc_errors import error_from_rpc
from ec262.identity import Identity, load_identity, save_identity
from ec262.v1 import discovery_pb2 as pb
from ec262.v1 import discovery_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def this_runtime() -> str:
    """What can load a function payload made here, e.g. `cpython-3.11`."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


class DiscoveryClient:
    """One channel to a discovery service, acting as one identity."""

    def __init__(
        self, address: str, identity: Identity | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.address = address
        self.identity = identity
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = discovery_pb2_grpc.DiscoveryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DiscoveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request, *, authenticated: bool = True, timeout=None):
        metadata = None
        if authenticated:
            if self.identity is None:
                raise AuthenticationError("this client has no identity yet")
            metadata = self.identity.metadata()
        try:
            return getattr(self._stub, method)(
                request, metadata=metadata, timeout=timeout or self.timeout
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def create_client(self) -> Identity:
        made = self._call("CreateClient", pb.CreateClientRequest(), authenticated=False)
        return Identity(made.client_id, made.secret, self.address)

    def load_or_create_identity(self, path: Path) -> Identity:
        """The identity stored at `path`, made (and saved, mode 0600) on
        first use. Refuses an identity made for another discovery service
        rather than silently starting a new account."""
        identity = load_identity(path)
        if identity is not None and identity.discovery not in ("", self.address):
            raise ValueError(
                f"identity {path} belongs to discovery {identity.discovery}, not {self.address};"
                " pass another --identity (or EC262_IDENTITY) for this service"
            )
        if identity is None:
            identity = self.create_client()
            save_identity(path, identity)
            logger.info("created identity %s in %s", identity.client_id, path)
        self.identity = identity
        return identity

    def get_client(self) -> pb.ClientInfo:
        return self._call("GetClient", pb.GetClientRequest())

    def register_worker(
        self, *, address: str, ttl_seconds: int, slots: int, runtime: str | None = None
    ) -> pb.ClientInfo:
        return self._call(
            "RegisterWorker",
            pb.RegisterWorkerRequest(
                address=address,
                ttl_seconds=ttl_seconds,
                slots=slots,
                runtime=this_runtime() if runtime is None else runtime,
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
    ) -> pb.RequestTasksResponse:
        """`request_id` (1-64 characters) makes a repeat safe: the same
        tasks again, nothing charged twice."""
        return self._call(
            "RequestTasks",
            pb.RequestTasksRequest(
                n=n,
                exclude_workers=list(exclude_workers),
                runtime=this_runtime() if runtime is None else runtime,
                request_id=request_id,
            ),
        )

    def fetch_key(self, task_id: str) -> pb.FetchKeyResponse:
        return self._call("FetchKey", pb.FetchKeyRequest(task_id=task_id))

    def settle_task(
        self, task_id: str, *, valid: bool, missing: Sequence[str] = ()
    ) -> pb.SettleTaskResponse:
        return self._call(
            "SettleTask", pb.SettleTaskRequest(task_id=task_id, valid=valid, missing=list(missing))
        )
