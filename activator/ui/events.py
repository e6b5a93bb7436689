"""Server-sent events for the status page: a snapshot whenever what it shows changed.

Why SSE rather than polling: one long response per open page instead of a request per
second, changes arrive within one tick, the browser's EventSource reconnects by itself,
and the session cookie rides along like on any same-origin request.

What nothing here hooks into: the model and pool owners raise no events a stream could
wait on, so each stream looks at the state every TICK (a snapshot is built at most once
per half tick for all streams together) and writes only when the JSON differs from what
it sent last.

Bounds: at most MAX_STREAMS streams at once, and MAX_STREAMS_PER_CLIENT of them from one
client address (a 429 beyond either); a heartbeat comment after HEARTBEAT quiet seconds
(proxies keep the stream, a dead peer shows up); a write whose bytes the client has not
taken within WRITE_TIMEOUT (a client that stopped reading) ends the stream and closes its
connection; a client that goes away cancels its handler (the server runs with
handler_cancellation);
at shutdown every stream gets a `closing` event and ends at once, so open pages never
hold up a shutdown (`close` is an on_shutdown hook, which aiohttp runs before it waits
for handlers).

Why every write waits for the client to take it: aiohttp's own write waits only once 64
KiB went out since its last wait, and the kernel's buffers take more again, so a client
that never reads took heartbeats and small snapshots for hours while holding its slot.
Each stream gets a small kernel send buffer and write-buffer high-water mark, and each
write waits (up to WRITE_TIMEOUT) until the transport is below that mark again: a stalled
reader is found once a few tens of KiB are stuck, not megabytes. A client whose receive
buffer still has room cannot be told from one that reads (SSE has no way back), so the
per-address cap is what stops one client from taking every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from activator.core.errors import ActivatorError, ShuttingDown

logger = logging.getLogger(__name__)

# A handful of operators' pages; each stream costs a connection and a check per tick.
MAX_STREAMS = 16
# One browser with a few tabs open; the rest stay free for everyone else. Counted by the
# peer's address (request.remote): behind a reverse proxy that is the proxy's.
MAX_STREAMS_PER_CLIENT = 4
# How often a stream looks for a change: the page's latency, and its cost.
TICK = 0.25
# Quiet this long -> a comment line. Below the common 30-60 s proxy idle timeouts.
HEARTBEAT = 15.0
# A client that has not taken a write for this long is gone or stuck: free its slot.
# Below HEARTBEAT: a client that reads nothing for a heartbeat interval is dropped.
WRITE_TIMEOUT = 10.0
# Bytes a stream may leave unsent in user space before a write waits for the client
# (the transport's high-water mark), and the kernel send buffer it asks for. A snapshot
# is a few KiB; an SSE stream needs no throughput, only to notice a reader that stalled.
WRITE_BUFFER_HIGH = 8 * 1024
SEND_BUFFER = 8 * 1024
# EventSource waits this long (ms) before reconnecting after the stream ends.
RETRY_MS = 2000


class TooManyStreams(ActivatorError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_streams"
    retryable = True


class TooManyStreamsFromClient(TooManyStreams):
    code = "too_many_streams_from_client"


class EventStreams:
    """Owns the open event streams of one app. Not thread-safe: event loop only."""

    def __init__(
        self,
        snapshot: Callable[[], Any],
        *,
        limit: int = MAX_STREAMS,
        per_client: int = MAX_STREAMS_PER_CLIENT,
        tick: float = TICK,
        heartbeat: float = HEARTBEAT,
        write_timeout: float = WRITE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._limit = limit
        self._per_client = per_client
        self._tick = tick
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._clock = clock
        self._closing = asyncio.Event()
        self._cached: tuple[float, bytes] | None = None
        # Open streams per client address; entries go at zero, so at most `limit` keys.
        self._by_client: dict[str, int] = {}
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
        client = request.remote or ""
        held = self._by_client.get(client, 0)
        if held >= self._per_client:
            raise TooManyStreamsFromClient(
                f"{held} status event streams are open from this address already, "
                f"the most one client may hold; close a status page",
                retry_after=self._heartbeat,
            )
        self.active += 1
        self._by_client[client] = held + 1
        try:
            return await self._stream(request)
        finally:
            self.active -= 1
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache, no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events on as they come
            }
        )
        await response.prepare(request)
        _keep_buffers_small(request)
        sent = b""
        quiet_since = self._clock()
        try:
            await self._write(request, response, b"retry: %d\n\n" % RETRY_MS)
            while not self._closing.is_set():
                data = self.current()
                if data != sent:
                    await self._write(
                        request, response, b"event: snapshot\ndata: " + data + b"\n\n"
                    )
                    sent, quiet_since = data, self._clock()
                elif self._clock() - quiet_since >= self._heartbeat:
                    await self._write(request, response, b": heartbeat\n\n")
                    quiet_since = self._clock()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick):
                        await self._closing.wait()
            await self._write(request, response, b"event: closing\ndata: {}\n\n")
        except ConnectionError as exc:
            # The client went away: its slot is freed by handle().
            logger.debug("status event stream ended: %r", exc)
        except TimeoutError:
            # The client stopped reading. Its connection is aborted, not closed: a close
            # would wait for the unread bytes to go out, and aiohttp's end of the response
            # would wait for them too, holding the connection for as long as the client
            # likes. Its slot is freed by handle().
            logger.info(
                "status event stream from %s dropped: it took no data for %.0f s",
                request.remote,
                self._write_timeout,
            )
            if request.transport is not None:
                request.transport.abort()
        return response

    async def _write(self, request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        """Write `data` and wait until the transport is below its high-water mark again:
        TimeoutError when the client does not take it within the write timeout."""
        async with asyncio.timeout(self._write_timeout):
            await response.write(data)
            await request.writer.drain()

    def current(self) -> bytes:
        """The snapshot as one line of JSON, shared by the streams (and the page's first
        paint) within half a tick."""
        now = self._clock()
        if self._cached is None or now - self._cached[0] >= self._tick / 2:
            body = json.dumps(self._snapshot(), separators=(",", ":"), default=str)
            self._cached = (now, body.encode())
        return self._cached[1]


def _keep_buffers_small(request: web.Request) -> None:
    """A small high-water mark and kernel send buffer for this stream's connection, so a
    client that stopped reading shows up after a few KiB (see the module's docstring).
    The connection serves nothing else: a stream ends only when it does, or at shutdown."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Best effort: a socket that refuses (not TCP) keeps its buffer; the cap holds.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
