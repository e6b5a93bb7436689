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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from activator.testing.sleepmode import CONTROLLER as SLEEP
from activator.testing.sleepmode import SleepController, SleepOptions, Ticket, add_sleep_routes
from activator.testing.sleepmode import options as sleep_options

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Sent by vLLM's OpenAI server on every 401 (a flat string, unlike its other errors).
UNAUTHORIZED_BODY: JsonObject = {"error": "Unauthorized"}
# Always open here (a 200 shows that a proxy let one through); vLLM's sleep routes are
# in activator.testing.sleepmode and exist only in dev mode, as in vLLM.
DEV_PATHS = ("/load_lora_adapter", "/unload_lora_adapter")
STARTUP_PHASES = ("Initializing engine", "Loading weights...", "Capturing CUDA graphs...")
EMBEDDING_DIM = 8
# How long shutdown waits for cancelled handlers to unwind before closing their sockets:
# SIGTERM must end the process promptly even with streams open.
SHUTDOWN_GRACE_S = 0.1
# What a model with wiped weights writes: token 0 of Llama-3/GPT-2 vocabularies, the
# argmax of all-zero logits. Deterministic, so a test tells it from the real answer.
GARBAGE_TOKEN = "!"


@dataclass(frozen=True, slots=True)
class EngineOptions:
    port: int
    host: str = "127.0.0.1"
    served_model_name: str = "fake-model"
    max_model_len: int = 2048
    startup_delay: float = 0.0
    crash_during_startup: bool = False
    never_ready: bool = False
    stream_delay: float = 0.0
    response_delay: float = 0.0
    chunks: int = 16  # tokens generated when a request sets no max_tokens
    api_key: str | None = None
    ignore_sigterm: bool = False
    exit_after: float | None = None
    disable_access_log: bool = False  # benchmarks: per-request log lines cost time
    # Generations at once; more wait their turn (before their headers), as requests do
    # on an engine whose batch is full. None: no limit. With --response-delay, a fixed
    # service time per request: the engine, not the proxy, is the bottleneck.
    max_concurrency: int | None = None
    # Paths answered as vLLM's FastAPI answers a route the model does not serve.
    disable_endpoint: tuple[str, ...] = ()
    sleep: SleepOptions = field(default_factory=SleepOptions)  # see the module docstring


@dataclass(slots=True)
class EngineStats:
    """Counters behind /metrics: one per app, changed only by `generation` (requests
    running and waiting are the sleep controller's)."""

    aborted: int = 0  # by the client going away
    success: dict[str, int] = field(default_factory=dict)  # by finished_reason
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # handlers generating now


OPTIONS = web.AppKey("options", EngineOptions)
STATS = web.AppKey("stats", EngineStats)
LIMIT = web.AppKey("limit", asyncio.Semaphore)


class EngineError(Exception):
    """An error answered in vLLM's envelope."""

    def __init__(self, message: str, *, status: int, type_: str, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        return web.json_response({"error": error}, status=self.status)


def bad_request(message: str, *, param: str | None = None) -> EngineError:
    return EngineError(message, status=400, type_="BadRequestError", param=param)


@dataclass(frozen=True, slots=True)
class Generation:
    """What one request will produce: decided before the first byte is written."""

    tokens: list[str]
    prompt_tokens: int
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def usage(self) -> JsonObject:
        n = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


# ---- request parsing (pure) ----


def text_of(value: Any) -> str:
    """Flatten a prompt, a message content or a list of content parts into plain text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(part) for part in value)
    if isinstance(value, dict):
        return text_of(value.get("text", value.get("content", "")))
    return "" if value is None else str(value)


def plan_generation(prompt: str, *, max_tokens: Any, options: EngineOptions) -> Generation:
    """Deterministic output: the prompt's words echoed in turn, one token each.

    Raises EngineError with vLLM's messages for a bad or too large max_tokens.
    """
    words = prompt.split() or ["tok"]
    prompt_tokens = len(prompt.split())
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    limit = options.max_model_len
    if prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your request "
            f"has {prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is not None and max_tokens > limit - prompt_tokens:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {limit} tokens and your request has {prompt_tokens} "
            f"input tokens ({max_tokens} > {limit} - {prompt_tokens}).",
            param="max_tokens",
        )
    count = options.chunks if max_tokens is None else max_tokens
    tokens = [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]
    finish_reason = "stop" if max_tokens is None else "length"
    return Generation(tokens=tokens, prompt_tokens=prompt_tokens, finish_reason=finish_reason)


async def read_body(request: web.Request, *, options: EngineOptions) -> JsonObject:
    try:
        body = await request.json()
    except ValueError as exc:  # malformed JSON or not UTF-8
        raise bad_request(f"Invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != options.served_model_name:
        raise EngineError(
            f"The model `{model}` does not exist.", status=404, type_="NotFoundError", param="model"
        )
    return body


def max_tokens_of(body: JsonObject, *keys: str) -> Any:
    return next((body[key] for key in keys if body.get(key) is not None), None)


# ---- generation bookkeeping ----


@dataclass(slots=True)
class Run:
    """One request's generation as it happens: parked while the engine sleeps, then its
    tokens one by one; cut short (finish_reason "abort") when a sleep aborts it."""

    planned: Generation
    ticket: Ticket
    tokens: list[str] = field(default_factory=list)
    complete: bool = False

    async def start(self, delay: float) -> bool:
        """Waits for the engine to be awake (the hang), then the time to first token."""
        return await self.ticket.admitted() and await self.ticket.step(delay)

    def produce(self, index: int) -> str:
        token = GARBAGE_TOKEN if self.ticket.garbage else self.planned.tokens[index]
        self.tokens.append(token)
        return token

    @property
    def outcome(self) -> Generation:
        reason = self.planned.finish_reason if self.complete else "abort"
        return Generation(
            tokens=self.tokens, prompt_tokens=self.planned.prompt_tokens, finish_reason=reason
        )


@asynccontextmanager
async def generation(request: web.Request, *, gen: Generation) -> AsyncIterator[Run]:
    """The request's presence in the engine; counts it as a success (by its outcome's
    finish reason: "abort" when a sleep cut it) or, if the client left, as aborted.

    The handler task is registered so shutdown can cancel it; cancellation also arrives
    here when the client disconnects (the server runs with handler_cancellation), and a
    write to a closed connection raises ConnectionResetError.
    """
    stats = request.app[STATS]
    task = asyncio.current_task()
    assert task is not None, "called from a request handler"
    stats.tasks.add(task)
    try:
        async with request.app[LIMIT]:
            with request.app[SLEEP].ticket() as ticket:
                run = Run(planned=gen, ticket=ticket)
                yield run
    except (asyncio.CancelledError, ConnectionResetError):
        stats.aborted += 1
        logger.info("request aborted: %s %s", request.method, request.path)
        raise
    else:
        reason = run.outcome.finish_reason
        stats.success[reason] = stats.success.get(reason, 0) + 1
    finally:
        stats.tasks.discard(task)


async def answer(
    request: web.Request, *, gen: Generation, render: Callable[[Generation], JsonObject]
) -> web.Response:
    async with generation(request, gen=gen) as run:
        if await run.start(request.app[OPTIONS].response_delay):
            for index in range(len(gen.tokens)):
                run.produce(index)
            run.complete = True
    return web.json_response(render(run.outcome))


@dataclass(frozen=True, slots=True)
class StreamShape:
    """One endpoint's SSE events: before the tokens, one per token, after them."""

    head: list[JsonObject]
    token: Callable[[str], JsonObject]
    tail: Callable[[Generation], list[JsonObject]]


async def stream(
    request: web.Request, *, gen: Generation, shape: StreamShape
) -> web.StreamResponse:
    """Writes each SSE event the moment it is produced, then [DONE].

    Headers go out before --response-delay (and before a sleeping engine wakes), as
    vLLM's do; the delay models the time to the first token, --stream-delay the time
    between tokens.
    """
    options = request.app[OPTIONS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})

    async def write(events: list[JsonObject]) -> None:
        for event in events:
            await response.write(b"data: " + dumps(event) + b"\n\n")

    with suppress(ConnectionResetError):  # the client left: counted by `generation`
        async with generation(request, gen=gen) as run:
            await response.prepare(request)
            started = await run.start(options.response_delay)
            await write(shape.head)
            if started:
                for index in range(len(gen.tokens)):
                    if index and not await run.ticket.step(options.stream_delay):
                        break
                    await write([shape.token(run.produce(index))])
                else:
                    run.complete = True
            await write(shape.tail(run.outcome))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
    return response


def dumps(value: JsonObject) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def include_usage(body: JsonObject) -> bool:
    stream_options = body.get("stream_options")
    return isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))


# ---- chunk shapes ----


def chat_shape(head: JsonObject, *, usage: bool) -> StreamShape:
    def chunk(delta: JsonObject, finish_reason: str | None = None) -> JsonObject:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    def tail(gen: Generation) -> list[JsonObject]:
        last = [chunk({}, gen.finish_reason)]
        return last + ([{**head, "choices": [], "usage": gen.usage()}] if usage else [])

    return StreamShape(
        head=[chunk({"role": "assistant", "content": ""})],
        token=lambda token: chunk({"content": token}),
        tail=tail,
    )


def completion_shape(head: JsonObject, *, usage: bool) -> StreamShape:
    def chunk(text: str, finish_reason: str | None = None) -> JsonObject:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice]}

    def tail(gen: Generation) -> list[JsonObject]:
        last = [chunk("", gen.finish_reason)]
        return last + ([{**head, "choices": [], "usage": gen.usage()}] if usage else [])

    return StreamShape(head=[], token=chunk, tail=tail)


# ---- handlers ----


def request_id(request: web.Request) -> str:
    """vLLM bases completion ids on the caller's X-Request-Id when there is one."""
    return request.headers.get("X-Request-Id") or uuid.uuid4().hex


async def chat_completions(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS]
    body = await read_body(request, options=options)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list.", param="messages")
    prompt = " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))
    gen = plan_generation(
        prompt,
        options=options,
        max_tokens=max_tokens_of(body, "max_completion_tokens", "max_tokens"),
    )
    head = {
        "id": f"chatcmpl-{request_id(request)}",
        "created": int(time.time()),
        "model": options.served_model_name,
    }
    if body.get("stream"):
        shape = chat_shape({**head, "object": "chat.completion.chunk"}, usage=include_usage(body))
        return await stream(request, gen=gen, shape=shape)

    def render(out: Generation) -> JsonObject:
        message = {"role": "assistant", "content": out.text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = out.finish_reason
        return {**head, "object": "chat.completion", "choices": [choice], "usage": out.usage()}

    return await answer(request, gen=gen, render=render)


async def completions(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS]
    body = await read_body(request, options=options)
    if body.get("prompt") is None:
        raise bad_request("prompt is required.", param="prompt")
    gen = plan_generation(
        text_of(body["prompt"]), options=options, max_tokens=max_tokens_of(body, "max_tokens")
    )
    head = {
        "id": f"cmpl-{request_id(request)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": options.served_model_name,
    }
    if body.get("stream"):
        shape = completion_shape(head, usage=include_usage(body))
        return await stream(request, gen=gen, shape=shape)

    def render(out: Generation) -> JsonObject:
        choice = {"index": 0, "text": out.text, "logprobs": None}
        choice["finish_reason"] = out.finish_reason
        return {**head, "choices": [choice], "usage": out.usage()}

    return await answer(request, gen=gen, render=render)


def embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 127.5 - 1.0, 6) for byte in digest[:EMBEDDING_DIM]]


async def embeddings(request: web.Request) -> web.Response:
    options = request.app[OPTIONS]
    body = await read_body(request, options=options)
    raw = body.get("input")
    inputs = [text_of(item) for item in raw] if isinstance(raw, list) else [text_of(raw)]
    with request.app[SLEEP].ticket() as ticket:  # an engine asleep holds these too
        if not await ticket.admitted():
            raise EngineError("Request aborted.", status=500, type_="InternalServerError")
    data = [
        {"object": "embedding", "index": i, "embedding": embedding_of(text)}
        for i, text in enumerate(inputs)
    ]
    tokens = sum(len(text.split()) for text in inputs)
    return web.json_response(
        {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": options.served_model_name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def responses(request: web.Request) -> web.StreamResponse:
    """A minimal non-streaming Responses API object."""
    options = request.app[OPTIONS]
    body = await read_body(request, options=options)
    if body.get("stream"):
        raise bad_request(
            "Streaming is not supported by the fake engine's /v1/responses.", param="stream"
        )
    prompt = text_of(body.get("instructions")) + " " + text_of(body.get("input"))
    gen = plan_generation(
        prompt, options=options, max_tokens=max_tokens_of(body, "max_output_tokens")
    )

    def render(out: Generation) -> JsonObject:
        content = {"type": "output_text", "text": out.text, "annotations": []}
        message = {
            "type": "message",
            "id": f"msg_{uuid.uuid4().hex}",
            "status": "completed" if out.finish_reason != "abort" else "incomplete",
            "role": "assistant",
            "content": [content],
        }
        usage = {
            "input_tokens": out.prompt_tokens,
            "output_tokens": len(out.tokens),
            "total_tokens": out.prompt_tokens + len(out.tokens),
        }
        return {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": message["status"],
            "model": options.served_model_name,
            "output": [message],
            "usage": usage,
        }

    return await answer(request, gen=gen, render=render)


async def models(request: web.Request) -> web.Response:
    options = request.app[OPTIONS]
    name = options.served_model_name
    card = {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": name,
        "parent": None,
        "max_model_len": options.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app[OPTIONS].never_ready else 200)


async def metrics(request: web.Request) -> web.Response:
    stats, name = request.app[STATS], request.app[OPTIONS].served_model_name
    sleep = request.app[SLEEP]
    labels = f'engine="0",model_name="{name}"'
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {float(sleep.running)}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {float(sleep.waiting)}",
        "# TYPE vllm:request_success_total counter",
        *(
            f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {float(n)}'
            for reason, n in sorted(stats.success.items())
        ),
        "# TYPE fake_engine_aborted_requests_total counter",
        f"fake_engine_aborted_requests_total{{{labels}}} {float(stats.aborted)}",
        *sleep.metric_lines(labels),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def dev_endpoint(request: web.Request) -> web.Response:
    # Real vLLM serves these unauthenticated; a 200 here shows a proxy let one through.
    return web.json_response({"ok": True})


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


async def debug_timings(request: web.Request) -> web.Response:
    """The engine's own times of its sleep-mode calls (as bench/gpu_engine.py lists
    them), for benchmarks that subtract the engine's part of a swap."""
    return web.json_response({"calls": list(request.app[SLEEP].timings)})


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
    args = vars(parser.parse_args(argv))
    try:
        sleep = sleep_options.take_options(args, simulated=True)
    except ValueError as exc:  # vLLM fails at start on a non-integer VLLM_SERVER_DEV_MODE
        parser.error(f"VLLM_SERVER_DEV_MODE: {exc}")
    # Every other option's dest is the name of an EngineOptions field.
    args["disable_endpoint"] = tuple(args["disable_endpoint"])
    return EngineOptions(**args, sleep=sleep)


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
