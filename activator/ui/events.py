"""Server-sent events for the status page: a snapshot whenever what it shows changed.

Why SSE rather than polling: one long response per open page instead of a request per
second, changes arrive within one tick, the browser's EventSource reconnects by itself,
and the session cookie rides along like on any same-origin request.

What nothing here hooks into: the model and pool owners raise no events a stream could
wait on, so each stream looks at the state every TICK (a snapshot is built at most once
per half tick for all streams together) and writes only when the JSON differs from what
it sent last.

Bounds: at most MAX_STREAMS streams at once (a 429 beyond); a heartbeat comment after
HEARTBEAT quiet seconds (proxies keep the stream, a dead peer shows up); a write that
cannot complete within WRITE_TIMEOUT (a client that stopped reading) ends the stream; a
client that goes away cancels its handler (the server runs with handler_cancellation);
at shutdown every stream gets a `closing` event and ends at once, so open pages never
hold up a shutdown (`close` is an on_shutdown hook, which aiohttp runs before it waits
for handlers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from activator.errors import ActivatorError, ShuttingDown

logger = logging.getLogger(__name__)

# A handful of operators' pages; each stream costs a connection and a check per tick.
MAX_STREAMS = 16
# How often a stream looks for a change: the page's latency, and its cost.
TICK = 0.25
# Quiet this long -> a comment line. Below the common 30-60 s proxy idle timeouts.
HEARTBEAT = 15.0
# A client that has not taken a write for this long is gone or stuck: free its slot.
WRITE_TIMEOUT = 10.0
# EventSource waits this long (ms) before reconnecting after the stream ends.
RETRY_MS = 2000


class TooManyStreams(ActivatorError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_streams"
    retryable = True


class EventStreams:
    """Owns the open event streams of one app. Not thread-safe: event loop only."""

    def __init__(
        self,
        snapshot: Callable[[], Any],
        *,
        limit: int = MAX_STREAMS,
        tick: float = TICK,
        heartbeat: float = HEARTBEAT,
        write_timeout: float = WRITE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._limit = limit
        self._tick = tick
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._clock = clock
        self._closing = asyncio.Event()
        self._cached: tuple[float, bytes] | None = None
        self.active = 0

    async def close(self, app: web.Application) -> None:
        """on_shutdown: every stream sends `closing` and ends at its next step."""
        self._closing.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._closing.is_set():
            raise ShuttingDown("activator is shutting down", retry_after=5)
        if self.active >= self._limit:
            raise TooManyStreams(
                f"{self._limit} status event streams are open already; close a status page",
                retry_after=self._heartbeat,
            )
        self.active += 1
        try:
            return await self._stream(request)
        finally:
            self.active -= 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events on as they come
            }
        )
        await response.prepare(request)
        sent = b""
        quiet_since = self._clock()
        try:
            await self._write(response, b"retry: %d\n\n" % RETRY_MS)
            while not self._closing.is_set():
                data = self._current()
                if data != sent:
                    await self._write(response, b"event: snapshot\ndata: " + data + b"\n\n")
                    sent, quiet_since = data, self._clock()
                elif self._clock() - quiet_since >= self._heartbeat:
                    await self._write(response, b": heartbeat\n\n")
                    quiet_since = self._clock()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick):
                        await self._closing.wait()
            await self._write(response, b"event: closing\ndata: {}\n\n")
        except (ConnectionError, TimeoutError) as exc:
            # The client went away or stopped reading: its slot is freed by handle().
            logger.debug("status event stream ended: %r", exc)
        return response

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        async with asyncio.timeout(self._write_timeout):
            await response.write(data)

    def _current(self) -> bytes:
        """The snapshot as one line of JSON, shared by the streams within half a tick."""
        now = self._clock()
        if self._cached is None or now - self._cached[0] >= self._tick / 2:
            body = json.dumps(self._snapshot(), separators=(",", ":"), default=str)
            self._cached = (now, body.encode())
        return self._cached[1]
