"""One thread that fires callbacks at deadlines, cheaply cancelled.

The sandbox pool arms a deadline for every task; a `threading.Timer` per
task would start a thread each time (a tenth of a millisecond, as much as
the rest of a warm task), so all deadlines share this one thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Watchdog:
    def __init__(self, name: str = "watchdog") -> None:
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def arm(self, seconds: float, action: Callable[[], None]) -> int:
        """Call `action` in `seconds` unless cancelled first; returns a token."""
        token = next(self._ids)
        with self._changed:
            heapq.heappush(self._heap, (time.monotonic() + seconds, token, action))
            self._live.add(token)
            if self._heap[0][1] == token:
                self._changed.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._changed:
            self._live.discard(token)

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    while self._heap and self._heap[0][1] not in self._live:
                        heapq.heappop(self._heap)  # cancelled
                    if not self._heap:
                        self._changed.wait()
                        continue
                    deadline, token, action = self._heap[0]
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        heapq.heappop(self._heap)
                        self._live.discard(token)
                        break
                    self._changed.wait(remaining)
            action()
