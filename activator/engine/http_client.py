"""Pooled HTTP client sessions for talking to engines: one per model, never one per request.

Why one per model: when a model's engine stops (idle, swap, crash), its pooled keep-alive
connections point at a process or pod that is gone. Behind a Kubernetes Service nothing
may ever close them (the pod's network namespace is just deleted), and the next request
on one would hang until the read timeout. Closing the model's session when its engine
stops drops exactly those connections and no others.

`post` is the one place where activator retries a request to an engine (see its doc).
"""

from __future__ import annotations

import contextvars
import errno
import io
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.client_proto import ResponseHandler

logger = logging.getLogger(__name__)

# Connections to one engine at once. Thousands of held requests released together queue
# for a connection here instead of opening thousands of sockets on one engine.
UPSTREAM_CONNECTIONS = 1024
# A body up to this size goes out with the request's headers in one write. Larger ones
# go in chunks, waiting for the socket between them (aiohttp warns about raw bytes over
# 1 MiB, which it writes at once).
ONE_WRITE_BYTES = 64 * 1024


@dataclass(slots=True)
class _Attempt:
    """One send of `post`: whether its connection came from the pool."""

    reused: bool = False


# The send of `post` under way in this task, for the connector to mark (aiohttp connects
# in the task that awaits the request). A context variable rather than aiohttp's request
# tracing: a TraceConfig makes aiohttp build and send a dozen trace events per request
# where only one is wanted, a cost on every warm request.
_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "activator_upstream_attempt", default=None
)


class HttpClient:
    """Created with the app; sessions exist only while the app runs (a ClientSession must
    be made inside the running loop). Owned by the app; models reset their own."""

    def __init__(self, *, retried: Callable[[str], None] | None = None) -> None:
        """`retried(model)` is called for each request `post` sends again."""
        self._retried = retried
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._fresh: dict[str, aiohttp.ClientSession] = {}
        self._open = False

    def session(self, model: str) -> aiohttp.ClientSession:
        """The model's pooled session, made on first use."""
        return self._get(self._sessions, model, pooled=True)

    async def post(
        self,
        model: str,
        url: str,
        *,
        data: bytes,
        headers: dict[str, str],
        timeouts: aiohttp.ClientTimeout,
        request_id: str,
    ) -> aiohttp.ClientResponse:
        """POST on the model's pool; returns once the status line and headers are in (the
        caller releases the response).

        Retried once, on a new connection that is never pooled, exactly when all hold:
        the connection came from the pool (it carried an earlier exchange), it was closed
        or reset (ServerDisconnectedError, ECONNRESET, EPIPE), and not one byte of the
        response had arrived. That is the keep-alive race: the engine closed an idle
        connection as the request went out on it, so the engine never took the request.
        Never retried: a failure on a new connection (the engine itself failed, and may
        have seen the request), a refused connect, a timeout, anything after the response
        began, a retry, and a connection activator closed itself (`reset` or `close`
        while the request was out: the engine may have taken it; the caller answers with
        the lease's cut error). A retry whose connection is refused raises the first
        failure: the engine is gone, and the first attempt may have reached it (so a
        caller never takes it for a request that went nowhere).
        """
        attempt = _Attempt()
        session = self.session(model)
        token = _ATTEMPT.set(attempt)
        try:
            return await session.post(url, data=_body(data), headers=headers, timeout=timeouts)
        except aiohttp.ClientError as exc:
            # A session closed under the request was closed by activator (`reset` or
            # `close`: the cut at the end of the shutdown grace, an engine stopping), not
            # by the engine: the engine may have taken the request.
            if session.closed or not (attempt.reused and _closed_under_us(exc)):
                raise
            logger.info(
                "model=%s request_id=%s pooled connection closed by the engine before it "
                "answered (%r): retrying once on a new connection",
                model,
                request_id,
                exc,
            )
            first = exc
        finally:
            _ATTEMPT.reset(token)
        if self._retried is not None:
            self._retried(model)
        fresh = self._get(self._fresh, model, pooled=False)
        try:
            return await fresh.post(url, data=_body(data), headers=headers, timeout=timeouts)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as retry:
            raise first from retry

    async def reset(self, model: str) -> None:
        """Drop the model's pooled connections (its engine is gone)."""
        for sessions in (self._sessions, self._fresh):
            session = sessions.pop(model, None)
            if session is not None:
                await session.close()

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        sessions = [*self._sessions.values(), *self._fresh.values()]
        self._sessions, self._fresh = {}, {}
        for session in sessions:
            await session.close()

    def _get(
        self, sessions: dict[str, aiohttp.ClientSession], model: str, *, pooled: bool
    ) -> aiohttp.ClientSession:
        if not self._open:
            raise RuntimeError("the HTTP client is used before the app started")
        session = sessions.get(model)
        if session is None or session.closed:
            connector = (
                _PoolConnector(limit=UPSTREAM_CONNECTIONS)
                if pooled
                else aiohttp.TCPConnector(
                    limit=UPSTREAM_CONNECTIONS, limit_per_host=0, force_close=True
                )
            )
            session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # relay bytes as the engine encoded them
                # An engine's cookies are never kept and sent back: one engine serves many
                # clients (and no jar to look through on every request).
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
            sessions[model] = session
        return session


class _PoolConnector(aiohttp.TCPConnector):
    """Marks `post`'s send (`_ATTEMPT`) reused when its connection carried an earlier
    exchange: a pooled connection goes back to the pool only after one."""

    def __init__(self, *, limit: int) -> None:
        super().__init__(limit=limit, limit_per_host=0)
        self._carried: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[aiohttp.tracing.Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol is not None:
            attempt = _ATTEMPT.get()
            if protocol in self._carried:
                if attempt is not None:
                    attempt.reused = True
            else:
                self._carried.add(protocol)
        return connection


def _body(data: bytes) -> bytes | io.BytesIO:
    """A small body as it is (sent with the headers in one write); a larger one as a
    BytesIO, which aiohttp writes in chunks, waiting for the socket between them. A new
    one per attempt."""
    return data if len(data) <= ONE_WRITE_BYTES else io.BytesIO(data)


def _closed_under_us(exc: aiohttp.ClientError) -> bool:
    """The connection was closed or reset by the other end (not refused, not timed out)."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerTimeoutError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
