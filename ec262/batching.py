"""Calls of one kind from many threads, carried as few batch calls.

Why: a job's task cycle makes the same call (FetchKey, CommitResult,
SubmitResult, SettleTask, AssignTask) once per task or replica, and on a
network each costs a round trip. The batch forms (docs/protocol.md section
2, batch calls) carry many items in one. A Batcher sends an item at once
while fewer than `max_in_flight` of its batches are under way, so a lone
call waits for nothing; otherwise the item waits for the next batch, which
leaves the moment one returns. Batches form exactly when calls come faster
than round trips end, with no timer and no added delay.

Each batch is one attempt. A failure of the whole call (the peer
unreachable) is every item's failure, and callers retry as they retried
the single call; an item's own failure comes back as its own exception.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from ec262.defaults import MAX_BATCH_ITEMS

# Batch calls of one kind under way at once: a lone call never waits, and
# calls that come while these are out share the next one.
IN_FLIGHT = 2

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Abandoned(Exception):
    """The caller gave up on this item (its task was cancelled)."""


class Pending(Generic[Result]):
    """One item's answer, to wait for."""

    __slots__ = ("_batch", "_batcher", "_done", "_error", "_result", "item")

    def __init__(self, batcher: Batcher, item: object) -> None:
        self._batcher = batcher
        self._batch: _Sent | None = None  # the call it went in, once sent
        self.item = item
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None

    def _answer(self, result: Result | None, error: BaseException | None) -> None:
        if self._done.is_set():  # abandoned meanwhile
            return
        self._result, self._error = result, error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Result:
        """The item's result, or its exception raised (TimeoutError after
        `timeout` seconds; Abandoned once `abandon` ran)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no answer for {self.item!r} within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def abandon(self) -> None:
        """Give up on the item: it is not sent if it has not left yet, and a
        waiter gets Abandoned now (quick: safe under another lock)."""
        self._answer(None, Abandoned(f"{self.item!r} was abandoned"))
        self._batcher._withdraw(self)


class Call(Protocol):
    """A batch call under way that can be cancelled (a gRPC future's shape)."""

    def result(self) -> Sequence: ...
    def cancel(self) -> bool: ...


class _Sent:
    """One batch call under way: cancelled once every item in it is abandoned."""

    __slots__ = ("call", "items")

    def __init__(self, items: list[Pending]) -> None:
        self.items = items
        self.call: Call | None = None

    def cancel_if_abandoned(self) -> None:
        if self.call is not None and all(p.done for p in self.items):
            self.call.cancel()


class Batcher(Generic[Item, Result]):
    """`send(items)` makes one batch call and returns one result or
    exception per item, in order; it may raise, which fails every item.
    It may instead return a Call whose result() is those answers: a call
    whose every item is abandoned is then cancelled on the wire."""

    def __init__(
        self,
        send: Callable[[list[Item]], Sequence[Result | BaseException]],
        *,
        name: str,
        max_items: int = MAX_BATCH_ITEMS,
        max_bytes: int | None = None,
        size: Callable[[Item], int] = lambda item: 0,
        max_in_flight: int = IN_FLIGHT,
    ) -> None:
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("a batcher needs max_items >= 1 and max_in_flight >= 1")
        self._send = send
        self._name = name
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._size = size
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._queue: deque[Pending[Result]] = deque()
        self._in_flight = 0
        self._closed = False
        self._senders = ThreadPoolExecutor(max_in_flight, thread_name_prefix=name)
        self.batches = 0  # calls made, for tests and benches
        self.items = 0

    def _enqueue(self, pendings: list[Pending[Result]]) -> bool:
        """Queue `pendings`; True when a call may go now (its place taken)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._queue.extend(pendings)
            if self._in_flight >= self._max_in_flight:
                return False
            self._in_flight += 1
            return True

    def submit(self, item: Item) -> Pending[Result]:
        """Queue `item`; a sender thread carries it (see call_many for the
        caller's own thread)."""
        pending: Pending[Result] = Pending(self, item)
        if self._enqueue([pending]):
            self._senders.submit(self._drain)
        return pending

    def call_many(self, items: Sequence[Item]) -> list[Pending[Result]]:
        """Queue `items` and, when a call may go now, make it on this thread
        until they are answered (a hand-off to a sender thread costs a GIL
        switch, up to 5 ms on a busy process); the answers to wait for."""
        pendings: list[Pending[Result]] = [Pending(self, item) for item in items]
        if self._enqueue(pendings):
            self._drain(until=pendings)
        return pendings

    def call(self, item: Item, timeout: float | None = None) -> Result:
        """One item, answered: the single call's shape."""
        return self.call_many([item])[0].wait(timeout)

    def _withdraw(self, pending: Pending) -> None:
        """Take an abandoned item out of the queue, or cancel the call it
        went in when every item of that call is abandoned now."""
        with self._lock:
            sent = pending._batch
            if sent is None:
                with contextlib.suppress(ValueError):  # answered already
                    self._queue.remove(pending)
                return
        sent.cancel_if_abandoned()

    def _next_batch(self) -> list[Pending[Result]]:
        """The items of the next call, oldest first; at least one when any
        waits, even one bigger than max_bytes alone (the peer then says
        what is wrong with it)."""
        batch: list[Pending[Result]] = []
        total = 0
        while self._queue and len(batch) < self._max_items:
            size = self._size(self._queue[0].item)
            if batch and self._max_bytes is not None and total + size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            total += size
        return batch

    def _drain(self, until: Sequence[Pending] = ()) -> None:
        """Send batches while items wait; with `until` (a caller's own), only
        until those are answered, then the rest goes to a sender thread."""
        while True:
            with self._lock:
                if until and all(p.done for p in until):
                    if self._queue:
                        self._senders.submit(self._drain)  # this call's place passes on
                    else:
                        self._in_flight -= 1
                    return
                batch = self._next_batch()
                if not batch:
                    self._in_flight -= 1
                    return
                self.batches += 1
                self.items += len(batch)
                sent = _Sent(batch)
                for pending in batch:
                    pending._batch = sent
            try:
                outcome = self._send([p.item for p in batch])
                if hasattr(outcome, "cancel"):
                    with self._lock:
                        sent.call = outcome
                    sent.cancel_if_abandoned()  # abandoned while it was made
                    outcome = outcome.result()
                answers = list(outcome)
                if len(answers) != len(batch):
                    raise ValueError(f"{self._name}: {len(answers)} answers for {len(batch)} items")
            except Exception as error:
                for pending in batch:
                    pending._answer(None, error)
                continue
            for pending, answer in zip(batch, answers, strict=True):
                if isinstance(answer, BaseException):
                    pending._answer(None, answer)
                else:
                    pending._answer(answer, None)

    def close(self) -> None:
        """No more items; those still queued fail with Abandoned."""
        with self._lock:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
        for pending in left:
            pending._answer(None, Abandoned(f"{self._name} closed"))
        self._senders.shutdown(wait=False)
