"""Pooled HTTP client sessions for talking to engines: one per model, never one per request.

Why one per model: when a model's engine stops (idle, swap, crash), its pooled keep-alive
connections point at a process or pod that is gone. Behind a Kubernetes Service nothing
may ever close them (the pod's network namespace is just deleted), and the next request
on one would hang until the read timeout. Closing the model's session when its engine
stops drops exactly those connections and no others.
"""

from __future__ import annotations

import aiohttp

# Connections to one engine at once. Thousands of held requests released together queue
# for a connection here instead of opening thousands of sockets on one engine.
UPSTREAM_CONNECTIONS = 1024


class HttpClient:
    """Created with the app; sessions exist only while the app runs (a ClientSession must
    be made inside the running loop). Owned by the app; models reset their own."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._open = False

    def session(self, model: str) -> aiohttp.ClientSession:
        """The model's pooled session, made on first use."""
        if not self._open:
            raise RuntimeError("the HTTP client is used before the app started")
        session = self._sessions.get(model)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, limit_per_host=0),
                auto_decompress=False,  # relay bytes as the engine encoded them
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
            self._sessions[model] = session
        return session

    async def reset(self, model: str) -> None:
        """Drop the model's pooled connections (its engine is gone)."""
        session = self._sessions.pop(model, None)
        if session is not None:
            await session.close()

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
