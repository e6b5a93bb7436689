"""Readiness of an engine, probed through the URL requests will be forwarded to.

vLLM keeps its port closed until it has loaded, then /health answers 200 at once; a
refused connection is the normal "not yet", not an error. /health only says the process
is alive, so once it answers we check, once, that /v1/models lists the served name.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from activator.core.errors import StartFailed

logger = logging.getLogger(__name__)

# Probing is the one place we poll: no event says "the port opened". The interval starts
# short (a warm local engine is ready in well under a second, and every millisecond
# between the port opening and our probe is wake overhead) and backs off to a ceiling that
# bounds both the load on a slow-starting engine and the overhead on a long start. A
# `nudge` (the engine printed a line, a pod became Ready) probes at once.
FIRST_INTERVAL = 0.02
MAX_INTERVAL = 0.25
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


async def wait_ready(
    session: aiohttp.ClientSession,
    *,
    url: str,
    health_path: str,
    served_model_name: str,
    api_key: str | None,
    nudge: asyncio.Event,
) -> None:
    """Return once `url` answers `health_path` with 200 and lists the served model.

    Runs until then: the caller bounds it (startup_timeout) and races it against the
    engine failing. Safe to cancel. Raises StartFailed if the engine answers but does not
    serve `served_model_name` (a configuration error no retry fixes).
    """
    interval = FIRST_INTERVAL
    while True:
        # Cleared before the probe, so a nudge that arrives while it runs is not lost.
        nudge.clear()
        if await _healthy(session, url + health_path):
            break
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
        # that races the event, and a cancelled probe must stop at once.
        try:
            async with asyncio.timeout(interval):
                await nudge.wait()
        except TimeoutError:
            interval = min(interval * 1.5, MAX_INTERVAL)
    await _check_served(session, url=url, served_model_name=served_model_name, api_key=api_key)


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=PROBE_TIMEOUT) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def _check_served(
    session: aiohttp.ClientSession, *, url: str, served_model_name: str, api_key: str | None
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(url + "/v1/models", headers=headers, timeout=PROBE_TIMEOUT) as r:
            if r.status != 200:
                raise StartFailed(f"engine answered /v1/models with HTTP {r.status}")
            body: Any = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise StartFailed(f"engine /v1/models failed: {exc!r}") from exc
    served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
    if served_model_name not in served:
        raise StartFailed(
            f"engine serves {served!r}, not {served_model_name!r}: check served_model_name"
        )
