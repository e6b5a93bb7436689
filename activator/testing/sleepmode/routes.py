"""vLLM's sleep-mode routes, with its request and response shapes and status codes.

From vllm/entrypoints/serve/dev/sleep/api_router.py, dev/rpc/api_router.py and
dev/cache/api_router.py; errors in vLLM's envelope (FastAPI's validation errors become
400 "Bad Request", exceptions from the engine 500 "InternalServerError").
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from activator.testing.sleepmode.controller import SleepController
from activator.testing.sleepmode.state import PAUSE_MODES, SLEEP_LEVELS, PauseMode, SleepError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bad_query(message: str, *, param: str) -> SleepError:
    # FastAPI's validation errors, through vLLM's handler: 400, type "Bad Request".
    return SleepError(
        f"1 validation error:\n  {message}", status=400, type_="Bad Request", param=param
    )


# vLLM's query booleans (FastAPI/pydantic spellings).
TRUE_WORDS = frozenset(("1", "true", "yes", "on", "t", "y"))
FALSE_WORDS = frozenset(("0", "false", "no", "off", "f", "n"))


CONTROLLER = web.AppKey("sleep_controller", SleepController)


def parse_level(request: web.Request) -> int:
    raw = request.query.get("level", "1")
    try:
        level = int(raw)
    except ValueError:
        raise bad_query(
            f"('query', 'level'): Input should be a valid integer, unable to parse string "
            f"as an integer [input: {raw[:50]!r}]",
            param="level",
        ) from None
    if level not in SLEEP_LEVELS:
        raise bad_query(
            f"('query', 'level'): Input should be between 0 and 2 [input: {raw[:50]!r}]",
            param="level",
        )
    return level


def parse_mode(request: web.Request) -> PauseMode:
    raw = request.query.get("mode", "abort")
    if (mode := PAUSE_MODES.get(raw)) is not None:
        return mode
    raise bad_query(
        f"('query', 'mode'): Input should be 'abort', 'wait' or 'keep' [input: {raw[:50]!r}]",
        param="mode",
    )


def parse_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in TRUE_WORDS | FALSE_WORDS:
        return raw in TRUE_WORDS
    raise bad_query(f"('query', '{name}'): Input should be a valid boolean", param=name)


def timed(response: web.Response, started: float) -> web.Response:
    # Not vLLM's: lets a benchmark read the engine's own time for the call.
    response.headers["x-engine-seconds"] = f"{time.perf_counter() - started:.6f}"
    return response


async def sleep_route(request: web.Request) -> web.Response:
    started = time.perf_counter()
    level, mode = parse_level(request), parse_mode(request)
    await request.app[CONTROLLER].sleep(level=level, mode=mode)
    return timed(web.json_response({"status": "sleeping", "level": level}), started)


async def wake_up_route(request: web.Request) -> web.Response:
    started = time.perf_counter()
    tags = tuple(request.query.getall("tags", ())) or None
    awake = await request.app[CONTROLLER].wake_up(tags=tags)
    body = {
        "status": "awake" if awake else "sleeping",
        "tags": None if tags is None else list(tags),
    }
    return timed(web.json_response(body), started)


async def is_sleeping_route(request: web.Request) -> web.Response:
    return web.json_response({"is_sleeping": await request.app[CONTROLLER].is_sleeping()})


async def collective_rpc_route(request: web.Request) -> web.Response:
    started = time.perf_counter()
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        raise SleepError(f"JSON decode error: {exc}", status=400, type_="Bad Request") from exc
    if not isinstance(body, dict):
        raise SleepError("Request body must be a JSON object", status=400, type_="Bad Request")
    method = body.get("method")
    if method is None:
        raise SleepError("Missing 'method' in request body", status=400, type_="Bad Request")
    if method != "reload_weights":
        raise SleepError(
            f"'Worker' object has no attribute {str(method)[:100]!r} "
            "(this stand-in implements reload_weights only)",
            status=500,
            type_="InternalServerError",
        )
    await request.app[CONTROLLER].reload_weights()
    return timed(web.json_response({"results": [None]}), started)  # one worker, None


async def reset_prefix_cache_route(request: web.Request) -> web.Response:
    reset_running = parse_flag(request, "reset_running_requests")
    parse_flag(request, "reset_external")  # no external cache here
    success = await request.app[CONTROLLER].reset_prefix_cache(reset_running_requests=reset_running)
    return web.json_response({"success": success})


def vllm_errors(handler: Handler) -> Handler:
    """Answers a SleepError in vLLM's envelope (these routes only)."""

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SleepError as exc:
            return web.json_response(exc.body(), status=exc.status)

    return route


def add_sleep_routes(app: web.Application, controller: SleepController) -> None:
    """Registers vLLM's sleep-mode routes when the config says they exist (dev mode)."""
    app[CONTROLLER] = controller
    if not controller.config.routes:
        return
    app.router.add_post("/sleep", vllm_errors(sleep_route))
    app.router.add_post("/wake_up", vllm_errors(wake_up_route))
    app.router.add_get("/is_sleeping", vllm_errors(is_sleeping_route))
    app.router.add_post("/collective_rpc", vllm_errors(collective_rpc_route))
    app.router.add_post("/reset_prefix_cache", vllm_errors(reset_prefix_cache_route))
