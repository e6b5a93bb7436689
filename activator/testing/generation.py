"""What a request to the stand-in engine produces, and how it is written out.

Owns the generation plan (`plan_generation`: the prompt's words echoed, vLLM's checks of
max_tokens and the context length), a request's run through the engine (`generation`,
`Run`: the concurrency limit, the sleep controller's ticket, the abort and success
counts) and the two ways of answering: one JSON body (`answer`) or SSE events written as
they are produced (`stream`, with the chat and completion chunk shapes).
May import `engine_options` and activator.testing.sleepmode; the routes
(`engine_routes`) and the app (`fake_engine`) import it, never the reverse.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from activator.testing.engine_options import (
    LIMIT,
    OPTIONS,
    STATS,
    EngineOptions,
    JsonObject,
    bad_request,
)
from activator.testing.sleepmode import CONTROLLER as SLEEP
from activator.testing.sleepmode import Ticket

logger = logging.getLogger(__name__)

# What a model with wiped weights writes: token 0 of Llama-3/GPT-2 vocabularies, the
# argmax of all-zero logits. Deterministic, so a test tells it from the real answer.
GARBAGE_TOKEN = "!"


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
