"""The one pooled HTTP client session for talking to engines (never one per request)."""

from __future__ import annotations

import aiohttp

# Connections to engines at once. Thousands of held requests released together queue for
# a connection here instead of opening thousands of sockets on one engine.
UPSTREAM_CONNECTIONS = 1024


class HttpClient:
    """Created with the app; the session itself exists only while the app runs (a
    ClientSession must be made inside the running loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the HTTP client is used before the app started")
        return self._session

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS, limit_per_host=0),
            auto_decompress=False,  # relay bytes as the engine encoded them
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
