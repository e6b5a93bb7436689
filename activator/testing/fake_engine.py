"""A stand-in for vLLM's OpenAI-compatible server, exact where the activator depends on it.

Run as ``python -m activator.testing.fake_engine --port P [options]``. It reproduces the
behaviour the activator is built around (see the upstream notes): the port stays closed
while "loading", /health answers 200 with an empty body once up, /v1/* is guarded by an
optional API key while /health, /metrics and the dev endpoints stay open, errors use
vLLM's envelope, streams are SSE written chunk by chunk, and a client disconnect aborts
the generation at once. Failure modes (crash while loading, a stuck engine, death after
some time, a SIGTERM-deaf process) are switched on by flags.

Sleep mode as vLLM has it (activator.testing.sleepmode): with VLLM_SERVER_DEV_MODE=1 the
/sleep, /wake_up, /is_sleeping, /collective_rpc and /reset_prefix_cache routes exist, and
with --enable-sleep-mode a sleep frees the (simulated) GPU memory: --weights-gib,
--kv-cache-gib, --gpu-residue-gib size it, --sleep-delay, --wake-delay and --reload-delay
time it, and --memory-report DIR keeps DIR/<pid>.json current for outside observers.

Output protocol: once ready it prints exactly ``READY port=<port>`` on stdout. With
``--never-ready`` it prints ``LISTENING port=<port>`` instead (the port is bound but it
never becomes ready). Nothing else goes to stdout. Log lines, one per request included,
go to stderr: a parent must read or redirect it (``--disable-access-log`` under load).

Owns the app (the routes it serves, the gate in front of /v1/*), the process (the
simulated load, signals, shutdown) and the command line. May import `engine_options`,
`generation`, `engine_routes`, `lora`, `lora_options` and activator.testing.sleepmode;
nothing of the engine imports it.

LoRA adapters as vLLM serves them (activator.testing.lora): with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, /v1/load_lora_adapter and /v1/unload_lora_adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

from aiohttp import web

from activator.testing import lora_options
from activator.testing.engine_options import (
    LIMIT,
    OPTIONS,
    STATS,
    EngineError,
    EngineOptions,
    EngineStats,
    JsonObject,
)
from activator.testing.engine_routes import (
    DEV_PATHS,
    chat_completions,
    completions,
    debug_timings,
    dev_endpoint,
    embeddings,
    health,
    metrics,
    models,
    responses,
)
from activator.testing.lora import add_lora_routes
from activator.testing.sleepmode import CONTROLLER as SLEEP
from activator.testing.sleepmode import SleepController, add_sleep_routes
from activator.testing.sleepmode import options as sleep_options

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Sent by vLLM's OpenAI server on every 401 (a flat string, unlike its other errors).
UNAUTHORIZED_BODY: JsonObject = {"error": "Unauthorized"}
STARTUP_PHASES = ("Initializing engine", "Loading weights...", "Capturing CUDA graphs...")
# How long shutdown waits for cancelled handlers to unwind before closing their sockets:
# SIGTERM must end the process promptly even with streams open.
SHUTDOWN_GRACE_S = 0.1


# ---- app ----


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """vLLM's rules for /v1/*: 503 while stuck (--never-ready), then the API key, then errors."""
    options = request.app[OPTIONS]
    if request.path in options.disable_endpoint:
        return web.json_response({"detail": "Not Found"}, status=404)
    if request.path.startswith("/v1/"):
        if options.never_ready:
            return EngineError(
                "Engine is not ready (simulated).", status=503, type_="ServiceUnavailableError"
            ).response()
        expected = f"Bearer {options.api_key}"
        if options.api_key and request.headers.get("Authorization") != expected:
            return web.json_response(UNAUTHORIZED_BODY, status=401)
    try:
        return await handler(request)
    except EngineError as exc:
        return exc.response()


async def mark_response(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-fake-engine"] = "1"


def build_app(options: EngineOptions) -> web.Application:
    app = web.Application(middlewares=[gate])
    app[OPTIONS] = options
    app[STATS] = EngineStats()
    app[LIMIT] = asyncio.Semaphore(options.max_concurrency or 2**31)
    config = options.sleep.config(served_model_name=options.served_model_name)
    controller = SleepController(config, device=options.sleep.simulated_device())
    add_sleep_routes(app, controller)
    add_lora_routes(app, options.lora)
    app.on_response_prepare.append(mark_response)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    for path in DEV_PATHS:
        app.router.add_post(path, dev_endpoint)
    if config.routes:
        app.router.add_get("/debug/timings", debug_timings)
    return app


# ---- process lifetime ----


def install_signal_handlers(stop: asyncio.Event, *, options: EngineOptions) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for a stop signal; True if it came."""
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def load(stop: asyncio.Event, *, options: EngineOptions) -> bool:
    """The simulated cold start, port closed throughout. False if stopped meanwhile."""
    step = options.startup_delay / len(STARTUP_PHASES)
    for phase in STARTUP_PHASES:
        logger.info("%s (simulated)", phase)
        if await stopped_within(stop, step):
            return False
    return True


async def serve(options: EngineOptions) -> int:
    """Runs the engine until a signal or --exit-after; returns the process exit code."""
    stop = asyncio.Event()
    install_signal_handlers(stop, options=options)
    if not await load(stop, options=options):
        return 0
    if options.crash_during_startup:
        print("RuntimeError: CUDA out of memory (simulated)", file=sys.stderr, flush=True)
        return 1
    app = build_app(options)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        access_log=None if options.disable_access_log else logger,
        access_log_format='%a "%r" %s %b %Tf',
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port).start()
        port = runner.addresses[0][1]
        app[SLEEP].open_report(port=port)
        word = "LISTENING" if options.never_ready else "READY"
        print(f"{word} port={port}", flush=True)
        logger.info("serving %s on %s:%d", options.served_model_name, options.host, port)
        if options.exit_after is None:
            await stop.wait()
        elif not await stopped_within(stop, options.exit_after):
            print("engine died (simulated)", file=sys.stderr, flush=True)
            return 3
        return 0
    finally:
        # Abort open generations, as vLLM does on SIGTERM, so shutdown never waits on them.
        logger.info("shutting down, aborting %d running requests", len(app[STATS].tasks))
        for task in list(app[STATS].tasks):
            task.cancel()
        await runner.cleanup()
        app[SLEEP].close_report()


def parse_args(argv: Sequence[str] | None) -> EngineOptions:
    parser = argparse.ArgumentParser(
        prog="python -m activator.testing.fake_engine",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, required=True, help="0 picks a free port (see the READY line)")
    add("--served-model-name", default="fake-model")
    add("--max-model-len", type=int, default=2048)
    add("--startup-delay", type=float, default=0.0, help="seconds with the port closed")
    add("--crash-during-startup", action="store_true", help="exit 1 after the startup delay")
    add(
        "--never-ready",
        action="store_true",
        help="bind, but answer 503 on /health and /v1/* forever (a stuck engine; real vLLM "
        "would keep its port closed)",
    )
    add("--stream-delay", type=float, default=0.0, help="seconds between streamed chunks")
    add(
        "--response-delay",
        type=float,
        default=0.0,
        help="seconds before a non-streamed answer or the first chunk",
    )
    add("--chunks", type=int, default=16, help="tokens generated when max_tokens is not set")
    add("--api-key", default=os.environ.get("VLLM_API_KEY") or None)
    add("--ignore-sigterm", action="store_true")
    add("--exit-after", type=float, default=None, help="exit 3 this many seconds after ready")
    add("--disable-access-log", action="store_true")
    add(
        "--max-concurrency",
        type=int,
        default=None,
        help="generations at once; the rest wait their turn (a full batch)",
    )
    add("--disable-endpoint", action="append", type=str, default=[], help="404 as FastAPI does")
    sleep_options.add_arguments(parser, simulated=True)
    lora_options.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    lora = lora_options.take_options(args)
    try:
        sleep = sleep_options.take_options(args, simulated=True)
    except ValueError as exc:  # vLLM fails at start on a non-integer VLLM_SERVER_DEV_MODE
        parser.error(f"VLLM_SERVER_DEV_MODE: {exc}")
    # Every other option's dest is the name of an EngineOptions field.
    args["disable_endpoint"] = tuple(args["disable_endpoint"])
    return EngineOptions(**args, sleep=sleep, lora=lora)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(asctime)s [fake-engine] %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(options))
    return uvloop.run(serve(options))


if __name__ == "__main__":
    sys.exit(main())
