"""Retrying calls with capped exponential backoff and jitter."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from ec262.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the peer is down or slow (or its store is), not refusing."""
    if isinstance(error, ServiceUnavailable):
        return True
    return isinstance(error, grpc.RpcError) and error.code() in TRANSIENT_CODES


def backoff_delays(initial: float = 0.05, maximum: float = 2.0):
    """0.05, 0.1, 0.2, ... capped at `maximum`, each with ±25% jitter so a
    crowd of workers does not retry in step."""
    delay = initial
    while True:
        yield delay * random.uniform(0.75, 1.25)
        delay = min(delay * 2, maximum)


def call_with_retry(
    call: Callable[[], T],
    *,
    what: str,
    deadline: float,
    retry_if: Callable[[BaseException], bool] = is_transient,
    stop: threading.Event | None = None,
    initial: float = 0.05,
    maximum: float = 2.0,
) -> T:
    """`call()` until it succeeds, raises something not worth retrying, the
    monotonic `deadline` passes, or `stop` is set (then the last error is
    raised)."""
    stop = stop or threading.Event()
    for attempt, delay in enumerate(backoff_delays(initial, maximum), start=1):
        try:
            return call()
        except Exception as error:
            remaining = deadline - time.monotonic()
            if not retry_if(error) or remaining <= 0 or stop.is_set():
                raise
            reason = error.code().name if isinstance(error, grpc.RpcError) else repr(error)
            logger.info(
                "%s failed (attempt %d: %s); retrying in %.2f s",
                what,
                attempt,
                reason,
                min(delay, remaining),
            )
            if stop.wait(min(delay, remaining)):
                raise
    raise AssertionError("unreachable")
