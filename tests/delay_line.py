"""An in-order TCP delay line: latency between the parties, where this
kernel has no netem (issue 16, item 3).

A `DelayLine(target, delay)` listens on a loopback port and forwards every
connection to `target`, each byte in each direction leaving `delay`
seconds after it arrived, in order. A server that should be far away sits
behind one and advertises the line's address; both directions are delayed,
so a round trip costs 2 x delay, as on a real path. Bandwidth is not
limited and nothing is reordered or lost: latency alone.

It runs its own asyncio loop in a thread, so tests and benches use it as a
context manager around synchronous code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

_READ_BYTES = 1 << 16


class DelayLine:
    def __init__(self, target: str, delay: float, host: str = "127.0.0.1", port: int = 0) -> None:
        """`port` 0 picks a free one; a worker's line takes the worker's own
        port on another loopback address, so `--advertise HOST` points at it."""
        target_host, _, target_port = target.rpartition(":")
        self.target = (target_host, int(target_port))
        self.delay = delay
        self.host = host
        self.port = port
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="delay-line", daemon=True
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> DelayLine:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, self.port), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
            # Cancelling a pump's task starts none, but a connection accepted
            # meanwhile may: until none is left.
            while tasks := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer),
                self._pump(upstream_reader, writer),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # the line is closing: asyncio's stream callback must not see a cancel
        finally:
            for end in (writer, upstream_writer):
                end.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads as fast as the sender sends; each piece is written when its
        delay is up, in arrival order (a constant delay keeps FIFO order)."""
        pending: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        done = False

        async def deliver() -> None:
            while True:
                while not pending:
                    if done:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = pending.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data:
                    writer.write(data)
                    await writer.drain()
                else:
                    writer.write_eof() if writer.can_write_eof() else writer.close()
                    return

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(_READ_BYTES):
                pending.append((time.monotonic() + self.delay, data))
                arrived.set()
            pending.append((time.monotonic() + self.delay, b""))  # the EOF, delayed too
            arrived.set()
            done = True
            await delivering
        finally:
            delivering.cancel()
