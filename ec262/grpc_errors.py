"""One table between ec262's exceptions and gRPC status codes.

Servers abort with `abort_with_error`; clients turn an `RpcError` back into
the same exception with `error_from_rpc`. Details travel as a
`google.rpc.ErrorInfo` (reason + metadata), so `InsufficientCredits` keeps
its `needed` and `available` as numbers, not just as prose.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ec262.errors import (
    AddressRefused,
    AuthenticationError,
    CommitConflict,
    Ec262Error,
    FunctionNotCached,
    InsufficientCredits,
    InvalidRequest,
    NoCommittedQuorum,
    NoFreeSlot,
    PermissionDenied,
    ServiceUnavailable,
    SettleConflict,
    TaskConflict,
    TooManyNewClients,
    UnknownTask,
)

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "ec262"
INTERNAL_MESSAGE = "internal error in the service; its log has the traceback"

# (exception class, status code, ErrorInfo reason); first match wins.
_TABLE: tuple[tuple[type[Ec262Error], grpc.StatusCode, str], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (UnknownTask, grpc.StatusCode.NOT_FOUND, "UNKNOWN_TASK"),
    (InsufficientCredits, grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS"),
    (ServiceUnavailable, grpc.StatusCode.UNAVAILABLE, "SERVICE_UNAVAILABLE"),
    (NoFreeSlot, grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_FREE_SLOT"),
    (FunctionNotCached, grpc.StatusCode.FAILED_PRECONDITION, "FUNCTION_NOT_CACHED"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (TaskConflict, grpc.StatusCode.ALREADY_EXISTS, "TASK_CONFLICT"),
    (SettleConflict, grpc.StatusCode.FAILED_PRECONDITION, "SETTLE_CONFLICT"),
    (AddressRefused, grpc.StatusCode.FAILED_PRECONDITION, "ADDRESS_REFUSED"),
    (TooManyNewClients, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_NEW_CLIENTS"),
    (CommitConflict, grpc.StatusCode.FAILED_PRECONDITION, "COMMIT_CONFLICT"),
    (NoCommittedQuorum, grpc.StatusCode.FAILED_PRECONDITION, "NO_COMMITTED_QUORUM"),
)
_BY_REASON = {reason: cls for cls, _, reason in _TABLE}


def status_for(error: Ec262Error) -> grpc.Status:
    """The rich status a server sends for one of ec262's errors."""
    code, reason = next(
        ((code, reason) for cls, code, reason in _TABLE if isinstance(error, cls)),
        (grpc.StatusCode.INTERNAL, "INTERNAL"),
    )
    metadata: dict[str, str] = {}
    if isinstance(error, InsufficientCredits):
        metadata = {"needed": str(error.needed), "available": str(error.available)}
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(error), details=[detail])
    )


def error_from_rpc(error: grpc.RpcError) -> Exception:
    """The ec262 exception a failed call stands for, or the RpcError itself."""
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    info = None
    for detail in status.details if status else ():
        candidate = error_details_pb2.ErrorInfo()
        if detail.Unpack(candidate) and candidate.domain == ERROR_DOMAIN:
            info = candidate
            break
    message = error.details() if hasattr(error, "details") else str(error)
    if info is None or info.reason not in _BY_REASON:
        return error
    cls = _BY_REASON[info.reason]
    if cls is InsufficientCredits:
        return InsufficientCredits(
            int(info.metadata["needed"]), int(info.metadata["available"]), message
        )
    return cls(message)


Method = TypeVar("Method", bound=Callable)


def translate_errors(method: Method) -> Method:
    """Wrap a servicer method so ec262's errors become their status codes and
    anything unexpected is logged once with its traceback and answered
    INTERNAL (never UNKNOWN, never the exception's text to a stranger)."""
    name = method.__qualname__

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self, request, context):
            try:
                return await method(self, request, context)
            except Ec262Error as error:
                await context.abort_with_status(status_for(error))
            except Exception:
                logger.exception("%s failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Ec262Error as error:
            context.abort_with_status(status_for(error))
        except Exception:
            logger.exception("%s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    return wrapper  # type: ignore[return-value]
