"""vLLM's sleep-mode API, as activator drives it (the engine side of a fast swap).

The engine must run with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`; these are
dev endpoints that activator never lets a client reach. Written against vLLM 0.32-0.33
(vllm/entrypoints/serve/dev/{sleep,rpc,cache}/api_router.py):

- `POST /sleep?level=1|2`: level 1 copies the weights to host memory and drops the KV
  cache, level 2 drops both. vLLM aborts requests still running (its default mode), so
  activator drains first and sends none while it sleeps.
- `POST /wake_up` (all tags) or `?tags=weights` / `?tags=kv_cache`.
- `GET /is_sleeping` -> {"is_sleeping": bool}: true until every tag is awake.
- Level 2 wakes in order: weights, `POST /collective_rpc {"method": "reload_weights"}`,
  KV cache, `POST /reset_prefix_cache`; skipping the reload answers garbage.

Every call is bounded by the caller's deadline; any failure raises SleepError with one
line a person can read, and the caller falls back (a failed sleep to a stop, a failed
wake to a stop and a cold start).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

# One sleep-API call: short requests, but a level-1 sleep of a large model copies tens of
# GB before it answers, so the caller's deadline (sleep.timeout) is what bounds it.
CALL_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class SleepError(Exception):
    """A sleep-API call failed, or the engine did not end in the expected state."""


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    payload: Any = None,
) -> Any:
    try:
        async with session.request(
            method, url, headers=headers, json=payload, timeout=CALL_TIMEOUT
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                text = body[:200].decode("utf-8", "replace")
                raise SleepError(f"{method} {url.rsplit('/', 1)[-1]} -> HTTP {resp.status} {text}")
            if not body:
                return None
            try:
                return json.loads(body)
            except ValueError:
                return None
    except aiohttp.ClientError as exc:
        raise SleepError(f"{method} {url.rsplit('/', 1)[-1]} failed: {exc!r}") from exc


async def is_sleeping(session: aiohttp.ClientSession, url: str, *, headers: dict[str, str]) -> bool:
    body = await _call(session, "GET", url + "/is_sleeping", headers=headers)
    value = body.get("is_sleeping") if isinstance(body, dict) else None
    if not isinstance(value, bool):
        raise SleepError(f"/is_sleeping answered {body!r}, not {{'is_sleeping': bool}}")
    return value


async def sleep(
    session: aiohttp.ClientSession, url: str, *, level: int, headers: dict[str, str]
) -> None:
    """Put the engine to sleep and confirm it sleeps."""
    await _call(session, "POST", f"{url}/sleep?level={level}", headers=headers)
    if not await is_sleeping(session, url, headers=headers):
        raise SleepError(f"engine still awake after POST /sleep?level={level}")


async def wake(
    session: aiohttp.ClientSession, url: str, *, level: int, headers: dict[str, str]
) -> None:
    """Wake the engine fully (for level 2, reload the weights first) and confirm it."""
    if level == 2:
        await _call(session, "POST", url + "/wake_up?tags=weights", headers=headers)
        await _call(
            session,
            "POST",
            url + "/collective_rpc",
            headers=headers,
            payload={"method": "reload_weights"},
        )
        await _call(session, "POST", url + "/wake_up?tags=kv_cache", headers=headers)
        # {"success": false} while blocks are held; nothing runs on a woken engine yet, so
        # a refusal here means the cache may be stale: fail the wake rather than guess.
        reset = await _call(session, "POST", url + "/reset_prefix_cache", headers=headers)
        if isinstance(reset, dict) and reset.get("success") is False:
            raise SleepError("POST /reset_prefix_cache answered success=false")
    else:
        await _call(session, "POST", url + "/wake_up", headers=headers)
    if await is_sleeping(session, url, headers=headers):
        raise SleepError("engine still asleep after /wake_up")


async def warm_up(
    session: aiohttp.ClientSession, url: str, *, served_model_name: str, headers: dict[str, str]
) -> None:
    """One tiny completion after an engine's first start, so later wakes do not pay the
    first call's JIT and graph work (vLLM's own advice for sleep mode)."""
    await _call(
        session,
        "POST",
        url + "/v1/completions",
        headers=headers,
        payload={"model": served_model_name, "prompt": "hi", "max_tokens": 1},
    )
