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
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ec262.defaults import MAX_BATCH_ITEMS
from ec262.errors import (
    AddressRefused,
    AuthenticationError,
    CommitConflict,
    Ec262Error,
    FunctionNotCached,
    InsufficientCredits,
    InvalidRequest,
    LateTask,
    NoCommittedQuorum,
    NoFreeSlot,
    PermissionDenied,
    ServiceUnavailable,
    SettleConflict,
    TaskConflict,
    TooManyNewClients,
    UnknownTask,
)
from ec262.v1 import batch_pb2

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "ec262"
INTERNAL_MESSAGE = "internal error in the service; its log has the traceback"

# (exception class, status code, ErrorInfo reason); first match wins.
_TABLE: tuple[tuple[type[Ec262Error], grpc.StatusCode, str], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (LateTask, grpc.StatusCode.NOT_FOUND, "LATE_TASK"),
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


def _classified(error: Ec262Error) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(status code, ErrorInfo reason, ErrorInfo metadata) of one of ec262's errors."""
    code, reason = next(
        ((code, reason) for cls, code, reason in _TABLE if isinstance(error, cls)),
        (grpc.StatusCode.INTERNAL, "INTERNAL"),
    )
    metadata: dict[str, str] = {}
    if isinstance(error, InsufficientCredits):
        metadata = {"needed": str(error.needed), "available": str(error.available)}
    return code, reason, metadata


def status_for(error: Ec262Error) -> grpc.Status:
    """The rich status a server sends for one of ec262's errors."""
    code, reason, metadata = _classified(error)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(error), details=[detail])
    )


def _error(reason: str, message: str, metadata) -> Ec262Error | None:
    cls = _BY_REASON.get(reason)
    if cls is None:
        return None
    if cls is InsufficientCredits:
        return InsufficientCredits(int(metadata["needed"]), int(metadata["available"]), message)
    return cls(message)


# -- one item of a batch call (docs/protocol.md section 2, batch calls) ---------

ITEM_OK = batch_pb2.ItemStatus()


def item_status(error: Exception | None) -> batch_pb2.ItemStatus:
    """How one item of a batch call ended: OK for None, the code and reason
    a single call would carry for ec262's errors, INTERNAL (logged by the
    caller, never its text) for anything else."""
    if error is None:
        return ITEM_OK
    if not isinstance(error, Ec262Error):
        internal = grpc.StatusCode.INTERNAL.value[0]
        return batch_pb2.ItemStatus(code=internal, message=INTERNAL_MESSAGE)
    code, reason, metadata = _classified(error)
    return batch_pb2.ItemStatus(
        code=code.value[0], message=str(error), reason=reason, metadata=metadata
    )


class ItemFailed(Exception):
    """An item of a batch call that failed with a code ec262 has no
    exception for (INTERNAL, or a newer service's reason)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def item_code(status: batch_pb2.ItemStatus) -> grpc.StatusCode:
    return _CODES.get(status.code, grpc.StatusCode.UNKNOWN)


def error_from_item(status: batch_pb2.ItemStatus) -> Exception | None:
    """None for an item that succeeded, else the exception its single call
    would have raised on the client (error_from_rpc's counterpart)."""
    if status.code == 0:
        return None
    return _error(status.reason, status.message, status.metadata) or ItemFailed(
        item_code(status), status.message
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
    if info is None:
        return error
    return _error(info.reason, message, info.metadata) or error


def checked_batch(items: Sequence, what: str) -> Sequence:
    """`items` of a batch call, or InvalidRequest when there are none or
    more than MAX_BATCH_ITEMS (the whole call is refused then)."""
    if not items:
        raise InvalidRequest(f"{what} carries no items")
    if len(items) > MAX_BATCH_ITEMS:
        raise InvalidRequest(
            f"{what} carries {len(items)} items; at most {MAX_BATCH_ITEMS} in one call"
        )
    return items


def answer_each(
    items: Sequence[T], handle: Callable[[T], R], what: str
) -> list[tuple[batch_pb2.ItemStatus, R | None]]:
    """Each item of a batch call handled as its single call would be: (OK,
    the result) or (its error's status, None); one item's failure never
    stops the others. Anything unexpected is logged with its traceback and
    answered INTERNAL, as translate_errors does for a single call."""
    answers: list[tuple[batch_pb2.ItemStatus, R | None]] = []
    for item in checked_batch(items, what):
        try:
            answers.append((ITEM_OK, handle(item)))
        except Ec262Error as error:
            answers.append((item_status(error), None))
        except Exception as error:
            logger.exception("%s: an item failed", what)
            answers.append((item_status(error), None))
    return answers


Method = TypeVar("Method", bound=Callable)
T = TypeVar("T")
R = TypeVar("R")


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
