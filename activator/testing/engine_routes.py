"""The stand-in engine's HTTP routes: vLLM's OpenAI API, /health, /metrics, dev endpoints.

Owns each route's handler: reading and checking the body (`read_body`), the response
shapes of /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and
/v1/models, vLLM's metric lines, and the open dev routes. The app that registers them
and the gate in front (API key, a stuck engine, errors to responses) are `fake_engine`'s.
May import `engine_options`, `generation`, `lora` and activator.testing.sleepmode; only
`fake_engine` (and tests) import it.
"""

from __future__ import annotations

import hashlib
import time
import uuid

from aiohttp import web

from activator.testing.engine_options import (
    OPTIONS,
    STATS,
    EngineError,
    EngineOptions,
    JsonObject,
    bad_request,
)
from activator.testing.generation import (
    Generation,
    answer,
    chat_shape,
    completion_shape,
    include_usage,
    max_tokens_of,
    plan_generation,
    stream,
    text_of,
)
from activator.testing.lora import LORA
from activator.testing.sleepmode import CONTROLLER as SLEEP

# Always open here (a 200 shows that a proxy let one through); vLLM's sleep routes are
# in activator.testing.sleepmode and exist only in dev mode, as in vLLM.
DEV_PATHS = ("/load_lora_adapter", "/unload_lora_adapter")
EMBEDDING_DIM = 8


async def read_body(request: web.Request, *, options: EngineOptions) -> JsonObject:
    try:
        body = await request.json()
    except ValueError as exc:  # malformed JSON or not UTF-8
        raise bad_request(f"Invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = body.get("model")
    adapters = request.app[LORA].loaded
    if model is not None and model != options.served_model_name and model not in adapters:
        raise EngineError(
            f"The model `{model}` does not exist.", status=404, type_="NotFoundError", param="model"
        )
    return body


def adapter_of(request: web.Request, body: JsonObject) -> str | None:
    """The LoRA adapter a request names (read_body checked it is loaded), else None."""
    model = body.get("model")
    return model if isinstance(model, str) and model in request.app[LORA].loaded else None


def by_adapter(gen: Generation, adapter: str | None) -> Generation:
    """The answer of `adapter`: its first token names it (vLLM's answers carry the
    adapter as their `model`; the text says so too, for tests that read only text)."""
    if adapter is None:
        return gen
    tokens = [f"[{adapter}] {gen.tokens[0]}", *gen.tokens[1:]] if gen.tokens else []
    return Generation(tokens=tokens, prompt_tokens=gen.prompt_tokens,
                      finish_reason=gen.finish_reason)  # fmt: skip


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
    adapter = adapter_of(request, body)
    gen = plan_generation(
        prompt,
        options=options,
        max_tokens=max_tokens_of(body, "max_completion_tokens", "max_tokens"),
    )
    gen = by_adapter(gen, adapter)
    head = {
        "id": f"chatcmpl-{request_id(request)}",
        "created": int(time.time()),
        "model": adapter or options.served_model_name,
    }
    if body.get("stream"):
        shape = chat_shape({**head, "object": "chat.completion.chunk"}, usage=include_usage(body))
        with request.app[LORA].serving(adapter):
            return await stream(request, gen=gen, shape=shape)

    def render(out: Generation) -> JsonObject:
        message = {"role": "assistant", "content": out.text, "tool_calls": []}
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = out.finish_reason
        return {**head, "object": "chat.completion", "choices": [choice], "usage": out.usage()}

    with request.app[LORA].serving(adapter):
        return await answer(request, gen=gen, render=render)


async def completions(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS]
    body = await read_body(request, options=options)
    if body.get("prompt") is None:
        raise bad_request("prompt is required.", param="prompt")
    adapter = adapter_of(request, body)
    gen = plan_generation(
        text_of(body["prompt"]), options=options, max_tokens=max_tokens_of(body, "max_tokens")
    )
    gen = by_adapter(gen, adapter)
    head = {
        "id": f"cmpl-{request_id(request)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": adapter or options.served_model_name,
    }
    if body.get("stream"):
        shape = completion_shape(head, usage=include_usage(body))
        with request.app[LORA].serving(adapter):
            return await stream(request, gen=gen, shape=shape)

    def render(out: Generation) -> JsonObject:
        choice = {"index": 0, "text": out.text, "logprobs": None}
        choice["finish_reason"] = out.finish_reason
        return {**head, "choices": [choice], "usage": out.usage()}

    with request.app[LORA].serving(adapter):
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
    adapters = request.app[LORA].cards(parent=name)
    return web.json_response({"object": "list", "data": [card, *adapters]})


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
        *request.app[LORA].metric_lines(labels),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def dev_endpoint(request: web.Request) -> web.Response:
    # Real vLLM serves these unauthenticated; a 200 here shows a proxy let one through.
    return web.json_response({"ok": True})


async def debug_timings(request: web.Request) -> web.Response:
    """The engine's own times of its sleep-mode calls (as bench/gpu_engine.py lists
    them), for benchmarks that subtract the engine's part of a swap."""
    return web.json_response({"calls": list(request.app[SLEEP].timings)})
