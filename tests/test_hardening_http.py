"""Bad input on the request path (issue 10): every case gets an enveloped answer, logged and
counted, and never disturbs other clients.

A real activator on loopback; the stand-in engine (or tests/engine_variants.py, the same
engine with test-only connection behaviours) as a real process; aiohttp, raw sockets and
the openai SDK as clients.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.edge.body import BodyReads
from activator.edge.payload import OFFLOAD_BYTES
from activator.edge.proxy import Proxy
from activator.edge.responses import errors_middleware
from activator.engine.http_client import HttpClient
from activator.fleet.registry import ModelRegistry
from activator.model.lifecycle import Model
from activator.observability.metrics import UNKNOWN_MODEL, Metrics
from tests.conftest import ActivatorFactory
from tests.harness import Running, chat, error_of, model_config, unique

ACCESS = "activator.access"
REPO = Path(__file__).resolve().parent.parent


def variant_config(variant: str, served: str, *flags: str, **keys: Any) -> dict[str, Any]:
    """A model on tests/engine_variants.py: the stand-in engine plus `variant`."""
    config = model_config(served, *flags, **keys)
    command: list[str] = config["process"]["command"]
    command[1:3] = ["-m", "tests.engine_variants", "--variant", variant]
    config["process"]["cwd"] = str(REPO)
    return config


async def raw_post(
    running: Running,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    """POST bytes as they are (aiohttp would neither encode nor check them)."""
    async with running.session.post(
        running.url + path,
        data=io.BytesIO(body),  # raw bytes over 1 MiB make aiohttp warn
        headers={"Content-Type": "application/json", **(headers or {})},
        auto_decompress=False,
    ) as resp:
        data = await resp.read()
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = data
        return resp.status, parsed, resp.headers


async def held_stream(running: Running) -> tuple[str, Any]:
    """A streamed chat for model "m", answered 200 while it starts (stream_keepalive):
    the whole body, and its last event."""
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("m", stream=True)
    ) as resp:
        assert resp.status == 200
        text = await resp.text()
    return text, json.loads(text.rstrip().rsplit("\n", 1)[-1].removeprefix("data: "))


def requests_counted(running: Running, code: int, model: str = UNKNOWN_MODEL) -> float:
    return running.sample(
        "activator_requests_total",
        model=model,
        endpoint="chat_completions",
        code=str(code),
        cold="false",
    )


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def activator_error(body: Any, code: str) -> dict[str, Any]:
    error = error_of(body)
    assert error["source"] == "activator", error
    assert error["code"] == code, error
    return error


# ---- 1. bodies that are not usable JSON ------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 5_000, 200_000])
@pytest.mark.parametrize("where", ["value", "top"])
async def test_deeply_nested_json_is_a_400_envelope_logged_and_counted(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture, depth: int, where: str
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    running = await activator({"models": {"m": model_config(unique("nested"))}})
    nested = b"[" * depth + b"]" * depth
    body = b'{"model": "m", "messages": ' + nested + b"}" if where == "value" else nested
    status, reply, _ = await raw_post(running, body)
    assert status == 400, reply
    activator_error(reply, "invalid_request")
    assert requests_counted(running, 400) == 1
    (line,) = access_lines(caplog)
    assert "status=400" in line
    assert running.model("m").state == "stopped"


async def test_json_nested_just_below_the_limit_still_reaches_the_engine(
    activator: ActivatorFactory,
) -> None:
    # Depth that the parser takes: the model name is rewritten and the engine answers.
    running = await activator({"models": {"m": model_config(unique("shallow"))}})
    nested = b"[" * 200 + b"]" * 200
    body = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],'
    status, reply, _ = await raw_post(running, body + b' "extra": ' + nested + b"}")
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == "x"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "temperature": NaN}',
        b'{"model": "m", "x": 1' + b"0" * 5000 + b"}",  # an int over Python's digit limit
        b'{"model": "m"} trailing',
        b'\xff\xfe{"model": "m"}',
        '{"model": "m"}'.encode("utf-16"),
        b"",
    ],
    ids=["nan", "huge-int", "trailing", "bad-utf8", "utf16", "empty"],
)
async def test_bodies_that_are_not_strict_utf8_json_are_400(
    activator: ActivatorFactory, body: bytes
) -> None:
    running = await activator({"models": {"m": model_config(unique("strict"))}})
    status, reply, _ = await raw_post(running, body)
    assert status == 400, reply
    activator_error(reply, "invalid_request")
    assert requests_counted(running, 400) == 1


# ---- 2. and 3. Content-Encoding ---------------------------------------------------------


def deflate_raw(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 9110's deflate: zlib-wrapped
    "deflate-raw": deflate_raw,  # what many clients send as "deflate"
}


@pytest.mark.parametrize("encoding", list(ENCODERS))
async def test_an_encoded_body_reaches_the_engine_decoded_without_its_encoding(
    activator: ActivatorFactory, encoding: str
) -> None:
    running = await activator({"models": {"m": variant_config("echo", unique("encoded"))}})
    body = json.dumps(chat("m", "zipped words", max_tokens=2)).encode()
    header = encoding.removesuffix("-raw")
    status, reply, headers = await raw_post(
        running, ENCODERS[encoding](body), headers={"Content-Encoding": header}
    )
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == "zipped words"
    received = {k.lower(): v for k, v in json.loads(headers["x-received-headers"])}
    assert "content-encoding" not in received


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b'{"model": "m"}'),
        ("deflate", b"\x78\x9c garbage that is not deflate"),
        ("deflate", b"not deflate either"),
        ("gzip", gzip.compress(b'{"model": "m", "messages": []}')[:-12]),  # truncated
        ("gzip", gzip.compress(b'{"model": "m"}') + b"junk after the end"),
    ],
    ids=["plain-as-gzip", "bad-zlib", "bad-raw-deflate", "truncated", "trailing-junk"],
)
async def test_a_body_that_does_not_decode_is_400(
    activator: ActivatorFactory, encoding: str, body: bytes
) -> None:
    running = await activator({"models": {"m": model_config(unique("undecodable"))}})
    status, reply, _ = await raw_post(running, body, headers={"Content-Encoding": encoding})
    assert status == 400, reply
    activator_error(reply, "invalid_request")
    assert requests_counted(running, 400) == 1
    assert running.model("m").state == "stopped"


@pytest.mark.parametrize("encoding", ["br", "zstd", "x-unknown", "compress", "gzip, br"])
async def test_an_unsupported_content_encoding_is_415(
    activator: ActivatorFactory, encoding: str
) -> None:
    running = await activator({"models": {"m": model_config(unique("unsupported"))}})
    body = json.dumps(chat("m")).encode()
    status, reply, _ = await raw_post(running, body, headers={"Content-Encoding": encoding})
    assert status == 415, reply
    activator_error(reply, "unsupported_content_encoding")
    assert requests_counted(running, 415) == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compression_bomb_is_413_on_its_decoded_size(
    activator: ActivatorFactory, encoding: str
) -> None:
    running = await activator(
        {"server": {"max_body_bytes": "64KiB"}, "models": {"m": model_config(unique("bomb"))}}
    )
    compress = ENCODERS[encoding]
    # Under the cap on the wire, and once decoded: accepted.
    fits = json.dumps(chat("m", "x", max_tokens=1, pad="a" * 40_000)).encode()
    assert len(fits) < 64 * 1024
    status, reply, _ = await raw_post(
        running, compress(fits), headers={"Content-Encoding": encoding}
    )
    assert status == 200, reply
    # A few KiB on the wire, 64 MiB decoded.
    bomb = compress(b'{"model": "m", "pad": "' + b"0" * (64 * 1024 * 1024) + b'"}')
    assert len(bomb) < 64 * 1024
    status, reply, _ = await raw_post(running, bomb, headers={"Content-Encoding": encoding})
    assert status == 413, reply
    activator_error(reply, "request_too_large")


async def test_encoded_requests_never_break_other_clients_requests(
    activator: ActivatorFactory,
) -> None:
    """Issue 10's reproduction: deflate requests mixed with plain ones. The encoded
    request's header once reached the engine with a plain body; the engine closed those
    connections and plain requests that then reused them failed (7 of 300)."""
    running = await activator({"models": {"m": model_config(unique("mixed"))}})
    plain = json.dumps(chat("m", "plain", max_tokens=1)).encode()
    encoded = zlib.compress(json.dumps(chat("m", "deflated", max_tokens=1)).encode())

    async def one(i: int) -> tuple[int, int]:
        if i % 2:
            status, _, _ = await raw_post(running, encoded, headers={"Content-Encoding": "deflate"})
            return 1, status
        status, _, _ = await raw_post(running, plain)
        return 0, status

    outcomes = [outcome for _ in range(6) for outcome in await asyncio.gather(*map(one, range(50)))]
    failed = [outcome for outcome in outcomes if outcome[1] != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:10]}"


# ---- 3. the one retry -------------------------------------------------------------------


async def engine_received(running: Running, model: str = "m") -> int:
    url = running.model(model).url
    if url is None:
        return 0  # not started yet
    async with aiohttp.ClientSession() as session, session.get(url + "/test/received") as resp:
        count: int = (await resp.json())["received"]
        return count


async def test_a_reused_connection_the_engine_closed_is_retried_once_on_a_fresh_one(
    activator: ActivatorFactory,
) -> None:
    # The engine drops every request that arrives on a connection it already used (the
    # readiness probes leave one in the pool).
    running = await activator({"models": {"m": variant_config("drop-reused", unique("race"))}})
    deltas = []
    for text in ("one", "two", "three", "four"):
        before = await engine_received(running)
        status, reply, _ = await raw_post(
            running, json.dumps(chat("m", text, max_tokens=1)).encode()
        )
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == text
        deltas.append(await engine_received(running) - before)
    # Each request reached the engine once, or twice when its pooled connection was dropped.
    assert set(deltas) == {1, 2}, deltas
    assert running.sample("activator_upstream_errors_total", model="m", kind="connect") == 0
    retried = running.sample(
        "activator_upstream_retries_total", model="m", reason="closed_connection"
    )
    assert retried == sum(deltas) - len(deltas)  # one per request the engine saw twice


async def test_a_retry_happens_once_and_never_on_a_fresh_connection(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": variant_config("drop-all", unique("dead"))}})
    received = [await engine_received(running)]
    for _ in range(2):
        status, reply, _ = await raw_post(running, json.dumps(chat("m")).encode())
        assert status == 502, reply
        activator_error(reply, "upstream_connection_error")
        received.append(await engine_received(running))
    first, second = received[1] - received[0], received[2] - received[1]
    # The first went out on the probes' pooled connection: retried once, not twice.
    assert first == 2
    # Nothing is left in the pool after that: the second one's connection was new.
    assert second == 1
    assert running.sample("activator_upstream_retries_total", model="m") == 1


async def test_a_connection_that_dies_after_response_bytes_is_not_retried(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": variant_config("cut-after-headers", unique("cut"))}})
    for _ in range(2):  # the second request runs on a reused connection, if any
        status, reply, _ = await raw_post(running, json.dumps(chat("m")).encode())
        assert status == 502, reply
    assert await engine_received(running) == 2


# ---- 8. a slow body ---------------------------------------------------------------------


async def test_a_body_that_trickles_in_is_cut_with_408_after_body_timeout(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    running = await activator(
        {"server": {"body_timeout": "1s"}, "models": {"m": model_config(unique("slow"))}}
    )
    assert running.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    body = json.dumps(chat("m")).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode())

    async def trickle() -> None:
        # A byte every 0.2 s: each one arrives well within any idle timeout, and the
        # whole body would take longer than body_timeout.
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(30):
            answer = await reader.read(65536)
            while b"\r\n\r\n" not in answer:
                answer += await reader.read(65536)
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
        writer.close()
    head_text, _, rest = answer.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 408 "), answer
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head_text.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(rest) < length:
        rest += await reader.read(65536)
    activator_error(json.loads(rest), "request_timeout")
    assert requests_counted(running, 408) == 1
    assert any("status=408" in line for line in access_lines(caplog))
    assert running.model("m").state == "stopped"


# ---- 9. headers -------------------------------------------------------------------------

CREDENTIALS = {
    "Cookie": "session=secret-cookie",
    "X-Api-Key": "secret-x-api-key",
    "Api-Key": "secret-api-key",
    "Proxy-Authorization": "Basic c2VjcmV0",
    "X-Amz-Security-Token": "secret-token",
}
PASSED = {
    "OpenAI-Organization": "org-1",
    "OpenAI-Beta": "assistants=v2",
    "X-Stainless-Lang": "python",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=1",
    "User-Agent": "test-agent/1.0",
}


@pytest.mark.parametrize("api_keys", [[], ["client-key"]])
async def test_only_allowed_headers_reach_the_engine(
    activator: ActivatorFactory, api_keys: list[str]
) -> None:
    running = await activator(
        {"server": {"api_keys": api_keys}, "models": {"m": variant_config("echo", unique("hdr"))}}
    )
    headers = {**CREDENTIALS, **PASSED, "Authorization": "Bearer client-key"}
    status, reply, got = await raw_post(
        running, json.dumps(chat("m", max_tokens=1)).encode(), headers=headers
    )
    assert status == 200, reply
    received = {k.lower(): v for k, v in json.loads(got["x-received-headers"])}
    for name in CREDENTIALS:
        assert name.lower() not in received, name
    for name, value in PASSED.items():
        assert received[name.lower()] == value, name
    # Without api_keys the client's Authorization is the engine's business (its own key).
    assert ("authorization" in received) == (not api_keys)
    assert received["content-type"] == "application/json"
    assert received["x-request-id"] == got["X-Request-Id"]


@pytest.mark.parametrize(
    # (control bytes never get this far: aiohttp's parser answers 400 to the request line)
    "given",
    ["caf\u00e9-id", "\u200bzero-width", "x" * 129],
)
async def test_a_request_id_that_is_not_printable_ascii_is_replaced(
    activator: ActivatorFactory, given: str
) -> None:
    running = await activator({"models": {"m": variant_config("echo", unique("rid"))}})
    assert running.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    body = json.dumps(chat("m", max_tokens=1)).encode()
    head = (
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        + b"X-Request-Id: "
        + given.encode("utf-8")
        + b"\r\n\r\n"
    )
    writer.write(head + body)
    async with asyncio.timeout(30):
        answer = await reader.read()
    writer.close()
    head_text = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head_text.startswith("HTTP/1.1 200 "), answer
    fields = dict(line.split(": ", 1) for line in head_text.split("\r\n")[1:])
    request_id = next(v for k, v in fields.items() if k.lower() == "x-request-id")
    assert request_id.isascii() and request_id.isprintable()
    assert request_id != given
    received = {k.lower(): v for k, v in json.loads(fields["x-received-headers"])}
    assert received["x-request-id"] == request_id


# ---- 10. methods ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_another_method_on_a_proxied_endpoint_is_405_allowing_post(
    activator: ActivatorFactory, method: str, path: str
) -> None:
    running = await activator({"models": {"m": model_config(unique("method"))}})
    async with running.session.request(method, running.url + path) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        if method != "HEAD":
            activator_error(await resp.json(), "method_not_allowed")
    async with running.session.get(running.url + "/v1/nothing-here") as resp:
        assert resp.status == 404  # a path that is not proxied at all stays a 404


# ---- engine errors ----------------------------------------------------------------------


async def test_an_engine_error_that_is_not_an_envelope_is_wrapped_keeping_its_status(
    activator: ActivatorFactory,
) -> None:
    config = model_config(unique("detail"), "--disable-endpoint", "/v1/embeddings")
    running = await activator({"models": {"m": config}})
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.embeddings.create(model="m", input="x")
        error = error_of(caught.value.response.json())
        assert error["source"] == "engine"
        assert json.loads(error["message"]) == {"detail": "Not Found"}
        assert "Not Found" in caught.value.message
        # An engine envelope passes through as the engine wrote it.
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=-1
            )
    engine_error = error_of(bad.value.response.json())
    assert "source" not in engine_error
    assert engine_error["type"] == "BadRequestError"


async def test_a_held_stream_gets_a_wrapped_engine_error_as_an_event(
    activator: ActivatorFactory,
) -> None:
    config = model_config(
        unique("held-detail"),
        "--disable-endpoint",
        "/v1/chat/completions",
        startup_delay=1.0,
        stream_keepalive="0.2s",
    )
    running = await activator({"models": {"m": config}})
    _, event = await held_stream(running)
    assert error_of(event)["source"] == "engine"
    assert json.loads(error_of(event)["message"]) == {"detail": "Not Found"}


async def test_a_held_stream_whose_engine_fails_gets_the_error_as_an_event(
    activator: ActivatorFactory,
) -> None:
    # The status line (200) went out while the request was held: the engine's failure
    # can only travel inside the stream, never as a second status line.
    config = variant_config(
        "drop-all", unique("held-drop"), startup_delay=1.0, stream_keepalive="0.2s"
    )
    running = await activator({"models": {"m": config}})
    text, event = await held_stream(running)
    assert text.startswith(": waiting for m to start")
    activator_error(event, "upstream_connection_error")
    assert requests_counted(running, 502, model="m") == 0  # counted as cold, below
    assert (
        running.sample(
            "activator_requests_total",
            model="m",
            endpoint="chat_completions",
            code="502",
            cold="true",
        )
        == 1
    )


# ---- the model rewrite and large bodies --------------------------------------------------


async def test_the_model_is_rewritten_in_place_whatever_comes_before_it(
    activator: ActivatorFactory,
) -> None:
    # Only the top-level "model" value changes (the engine 404s any other name); multi-byte
    # text before it, a nested "model" and a repeated key (the last wins, as in json.loads).
    running = await activator({"models": {"m": model_config(unique("rewrite"))}})
    body = (
        '{"messages": [{"role": "user", "content": "h\u00e9llo \u2713", "model": "keep"}],'
        ' "model": "nope", "max_tokens": 2, "model": "m"}'
    ).encode()
    status, reply, _ = await raw_post(running, body)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == "h\u00e9llo \u2713"


async def test_a_large_body_is_parsed_and_rewritten_like_a_small_one(
    activator: ActivatorFactory,
) -> None:
    # Over OFFLOAD_BYTES: parsed in the worker process. (Under 1 MiB, the stand-in
    # engine's own limit.)
    running = await activator({"models": {"m": model_config(unique("large"))}})
    body = json.dumps(chat("m", "big one", max_tokens=2, pad=[0] * 300_000)).encode()
    assert OFFLOAD_BYTES < len(body) < 1024 * 1024
    status, reply, _ = await raw_post(running, body)
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == "big one"
    status, reply, _ = await raw_post(running, body[:-1])
    assert status == 400, reply
    activator_error(reply, "invalid_request")


# ---- defence in depth -------------------------------------------------------------------


class BrokenRegistry(ModelRegistry):
    """A registry with a bug: resolving any name raises."""

    def resolve(self, name: Any) -> Model:
        raise RuntimeError("a bug in resolve")


async def test_an_unexpected_error_in_the_proxy_is_a_logged_500_envelope(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    proxy = Proxy(
        registry=BrokenRegistry([], []),
        http=HttpClient(),
        metrics=metrics,
        max_body_bytes=1024,
        body_reads=BodyReads(body_timeout=5, per_client=8),
        strip_client_auth=False,
        access_log="text",
    )
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_post("/v1/chat/completions", proxy.handle)

    async def other(request: web.Request) -> web.Response:
        raise KeyError("a bug elsewhere")

    app.router.add_get("/elsewhere", other)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        chat_url = server.make_url("/v1/chat/completions")
        async with session.post(chat_url, json=chat("m")) as resp:
            assert resp.status == 500
            error = error_of(await resp.json())
            request_id = resp.headers["X-Request-Id"]
        async with session.get(server.make_url("/elsewhere")) as resp:
            assert resp.status == 500
            assert error_of(await resp.json())["code"] == "internal_error"
    assert (error["code"], error["source"]) == ("internal_error", "activator")
    assert request_id in error["message"]
    (line,) = access_lines(caplog)
    assert "status=500" in line and request_id in line
    sample = metrics.registry.get_sample_value(
        "activator_requests_total",
        {"model": UNKNOWN_MODEL, "endpoint": "chat_completions", "code": "500", "cold": "false"},
    )
    assert sample == 1
    assert "a bug in resolve" in caplog.text  # the traceback is logged
