"""Per-request observability: the X-Activator-* and X-Request-Id response headers, the
request id's way to the engine and back, and the access log (one line per request).

The stand-in engine bases its completion ids on the X-Request-Id it receives, as vLLM
does, so a reply's `id` shows which request id reached the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from tests.conftest import ActivatorFactory
from tests.harness import Running, chat, model_config, post, unique, wait_for

ACCESS = "activator.access"
HELLO: Any = [{"role": "user", "content": "hello"}]
FIELDS = [
    "model",
    "endpoint",
    "status",
    "cold",
    "held_ms",
    "ttfb_ms",
    "duration_ms",
    "request_id",
    "pod",
]
CLIENT_KEY = "sk-client-" + uuid.uuid4().hex
ENGINE_KEY = "sk-engine-" + uuid.uuid4().hex


def client(running: Running, *, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key=api_key, max_retries=0)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def parse_text(line: str) -> dict[str, str]:
    return dict(field.split("=", 1) for field in line.split(" "))


# ----- response headers ----------------------------------------------------------------


async def test_cold_and_warm_replies_say_whether_and_how_long_they_were_held(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"), startup_delay=0.3)}})
    async with client(running) as c:
        cold = await c.chat.completions.with_raw_response.create(
            model="m1", messages=HELLO, max_tokens=2
        )
        warm = await c.chat.completions.with_raw_response.create(
            model="m1", messages=HELLO, max_tokens=2
        )
    assert cold.headers["X-Activator-Cold-Start"] == "true"
    held_ms = int(cold.headers["X-Activator-Held-Ms"])
    # The request waited for the whole wake (which includes the engine's startup delay).
    wake = (await running.admin("m1"))["last_wake_seconds"]
    assert held_ms >= int(wake * 1000) - 1
    assert warm.headers["X-Activator-Cold-Start"] == "false"
    assert warm.headers["X-Activator-Held-Ms"] == "0"
    # The engine's own headers are relayed too.
    assert warm.headers["x-fake-engine"] == "1"


async def test_a_streamed_reply_carries_the_headers(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with client(running) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="m1", messages=HELLO, max_tokens=3, stream=True
        )
        assert raw.headers["X-Activator-Cold-Start"] == "true"
        assert int(raw.headers["X-Activator-Held-Ms"]) > 0
        assert raw.headers["X-Request-Id"]
        chunks = [chunk async for chunk in raw.parse()]
    assert chunks


async def test_a_held_stream_with_keepalive_sends_the_hold_so_far(
    activator: ActivatorFactory,
) -> None:
    """Keep-alive comments mean headers go out before the wake ends: they say cold, and
    the hold up to then (at least one keep-alive interval)."""
    engine = model_config(unique("m1"), startup_delay=1.0, stream_keepalive="0.2s")
    running = await activator({"models": {"m1": engine}})
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("m1", stream=True, max_tokens=2)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Activator-Cold-Start"] == "true"
        assert int(resp.headers["X-Activator-Held-Ms"]) >= 200
        body = await resp.text()
    assert body.startswith(": waiting for m1 to start")
    assert body.rstrip().endswith("data: [DONE]")


async def test_error_replies_carry_the_headers_too(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    # Activator's own error (no such model): never held.
    status, _, headers = await post(running, "/v1/chat/completions", chat("nope"))
    assert status == 404
    assert CIMultiDict(headers)["X-Activator-Cold-Start"] == "false"
    assert CIMultiDict(headers)["X-Activator-Held-Ms"] == "0"
    assert CIMultiDict(headers)["X-Request-Id"]
    # The engine's error (empty messages), relayed with its status, after a wake.
    status, body, headers = await post(
        running, "/v1/chat/completions", {"model": "m1", "messages": []}
    )
    assert status == 400, body
    assert CIMultiDict(headers)["X-Activator-Cold-Start"] == "true"
    assert CIMultiDict(headers)["X-Request-Id"]


# ----- request ids -----------------------------------------------------------------------


async def test_a_client_request_id_reaches_the_engine_and_comes_back(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with client(running) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="m1",
            messages=HELLO,
            max_tokens=2,
            extra_headers={"X-Request-Id": "trace-7f3a.1"},
        )
    assert raw.headers["X-Request-Id"] == "trace-7f3a.1"
    assert raw.parse().id == "chatcmpl-trace-7f3a.1"


async def test_a_generated_request_id_reaches_the_engine_and_comes_back(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with client(running) as c:
        first = await c.completions.with_raw_response.create(model="m1", prompt="hi", max_tokens=2)
        second = await c.completions.with_raw_response.create(model="m1", prompt="hi", max_tokens=2)
    ids = [r.headers["X-Request-Id"] for r in (first, second)]
    assert ids[0] != ids[1]
    for raw, request_id in zip((first, second), ids, strict=True):
        assert len(request_id) == 32
        assert raw.parse().id == f"cmpl-{request_id}"


@pytest.mark.parametrize("given", ["x" * 129, "has space", "tab\there"])
async def test_an_unusable_client_request_id_is_replaced(
    activator: ActivatorFactory, given: str
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    status, body, headers = await post(
        running, "/v1/chat/completions", chat("m1", max_tokens=2), headers={"X-Request-Id": given}
    )
    assert status == 200, body
    request_id = CIMultiDict(headers)["X-Request-Id"]
    assert request_id != given
    assert body["id"] == f"chatcmpl-{request_id}"


# ----- access log ------------------------------------------------------------------------


async def test_the_text_access_log_has_one_line_per_request_and_no_secrets(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = model_config(
        unique("m1"), "--api-key", ENGINE_KEY, upstream_api_key=ENGINE_KEY, startup_delay=0.3
    )
    running = await activator({"server": {"api_keys": [CLIENT_KEY]}, "models": {"m1": engine}})
    async with client(running, api_key=CLIENT_KEY) as c:
        cold = await c.chat.completions.with_raw_response.create(
            model="m1", messages=HELLO, max_tokens=2, extra_headers={"X-Request-Id": "abc-1"}
        )
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="nope", messages=HELLO)

    lines = access_lines(caplog)
    assert len(lines) == 3
    records = [parse_text(line) for line in lines]
    for record in records:
        assert list(record) == FIELDS
    first, warm, missing = records
    assert first["model"] == "m1"
    assert first["endpoint"] == "chat_completions"
    assert first["status"] == "200"
    assert first["cold"] == "true"
    assert first["request_id"] == "abc-1"
    assert float(first["held_ms"]) == pytest.approx(int(cold.headers["X-Activator-Held-Ms"]), abs=1)
    assert 0 < float(first["held_ms"]) <= float(first["ttfb_ms"]) <= float(first["duration_ms"])
    assert warm["cold"] == "false"
    assert warm["held_ms"] == "0.0"
    assert (missing["model"], missing["status"], missing["ttfb_ms"]) == ("__unknown__", "404", "-")
    # No secret anywhere in what activator logged (the engine's output included).
    for secret in (CLIENT_KEY, ENGINE_KEY):
        assert secret not in caplog.text
    assert not any("Authorization" in r.getMessage() for r in caplog.records)


async def test_the_json_access_log_is_one_object_per_request(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    running = await activator(
        {"server": {"access_log": "json"}, "models": {"m1": model_config(unique("m1"))}}
    )
    async with client(running) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="m1", messages=HELLO, max_tokens=3, stream=True
        )
        _ = [chunk async for chunk in raw.parse()]
    await wait_for(lambda: access_lines(caplog), what="the access log line")
    (line,) = access_lines(caplog)
    record = json.loads(line)
    assert list(record) == FIELDS
    assert record["model"] == "m1"
    assert record["status"] == 200
    assert record["cold"] is True
    assert record["request_id"] == raw.headers["X-Request-Id"]
    assert 0 < record["held_ms"] <= record["ttfb_ms"] <= record["duration_ms"]


async def test_the_access_log_can_be_off(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    running = await activator(
        {"server": {"access_log": "off"}, "models": {"m1": model_config(unique("m1"))}}
    )
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
    assert access_lines(caplog) == []
    # Metrics do not depend on the log.
    assert (
        running.sample(
            "activator_requests_total",
            model="m1",
            endpoint="chat_completions",
            code="200",
            cold="true",
        )
        == 1
    )


async def test_a_client_that_leaves_while_held_is_logged_as_499_with_its_hold(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    running = await activator(
        {
            "server": {"access_log": "json"},
            "models": {"m1": model_config(unique("m1"), startup_delay=2.0)},
        }
    )

    async def ask() -> None:
        async with aiohttp.ClientSession() as session:
            await session.post(running.v1 + "/chat/completions", json=chat("m1"))

    leaving = asyncio.create_task(ask())
    await wait_for(
        lambda: running.sample("activator_held_requests", model="m1", reason="starting") == 1,
        what="the request held",
    )
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    await wait_for(lambda: access_lines(caplog), what="the access log line")
    (line,) = access_lines(caplog)
    record = json.loads(line)
    assert (record["status"], record["cold"], record["ttfb_ms"]) == (499, True, None)
    assert record["held_ms"] > 0
    assert (
        running.sample("activator_hold_duration_seconds_count", model="m1", outcome="disconnected")
        == 1
    )
