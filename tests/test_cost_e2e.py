"""Tokens, GPU time and cost with a real activator, stand-in engines and the openai SDK:
the usage activator counts is the usage the client got, for answers and streams; GPU
time shows up by state in /metrics and in /admin/models.

The arithmetic against a scripted timeline: tests/test_cost.py.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from activator.observability.cost import figure
from tests.conftest import ActivatorFactory
from tests.harness import Running, chat, model_config, post, unique, wait_for

HELLO: Any = [{"role": "user", "content": "count these five words"}]
# Token prices only: the dollars are then exactly the tokens' (GPU time is not priced).
TOKEN_PRICES = {"input_per_million": 2.0, "output_per_million": 8.0}


def client(running: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)


def tokens(running: Running, model: str = "m") -> tuple[float, float]:
    return (
        running.sample("activator_tokens_total", model=model, kind="input"),
        running.sample("activator_tokens_total", model=model, kind="output"),
    )


def gpu_seconds(text: str, model: str) -> dict[str, float]:
    """activator_gpu_seconds_total of `model` in an exposition, by state."""
    found = {}
    for line in text.splitlines():
        if line.startswith("activator_gpu_seconds_total{") and f'model="{model}"' in line:
            labels, value = line.rsplit(" ", 1)
            state = labels.split('state="', 1)[1].split('"', 1)[0]
            found[state] = float(value)
    return found


async def scrape(running: Running) -> str:
    async with running.session.get(running.url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_tokens_are_the_usage_the_client_got_answers_and_streams(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("m"), cost=TOKEN_PRICES)}})
    expected = [0, 0]
    async with client(running) as c:
        answer = await c.chat.completions.create(model="m", messages=HELLO, max_tokens=3)
        assert answer.usage is not None
        expected = [answer.usage.prompt_tokens, answer.usage.completion_tokens]
        assert tokens(running) == tuple(expected)

        # A stream that asked for its usage: the last event before [DONE] carries it.
        stream = await c.chat.completions.create(
            model="m",
            messages=HELLO,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1
        expected[0] += usage[0].prompt_tokens
        expected[1] += usage[0].completion_tokens
        assert tokens(running) == tuple(expected)

        # A stream that did not ask has no usage: nothing to count.
        stream = await c.chat.completions.create(
            model="m", messages=HELLO, max_tokens=4, stream=True
        )
        assert [chunk async for chunk in stream]
        assert tokens(running) == tuple(expected)

        completion = await c.completions.create(model="m", prompt="one two three", max_tokens=2)
        assert completion.usage is not None
        expected[0] += completion.usage.prompt_tokens
        expected[1] += completion.usage.completion_tokens
        embedding = await c.embeddings.create(model="m", input=["one two", "three"])
        expected[0] += embedding.usage.prompt_tokens
        response = await c.responses.create(model="m", input="four five six", max_output_tokens=2)
        assert response.usage is not None
        expected[0] += response.usage.input_tokens
        expected[1] += response.usage.output_tokens
        assert tokens(running) == tuple(expected)

    dollars = running.sample("activator_cost_dollars_total", model="m")
    assert dollars == pytest.approx(expected[0] * 2e-6 + expected[1] * 8e-6)
    report = (await running.admin("m"))["cost"]
    assert report["tokens"] == {"input": expected[0], "output": expected[1]}
    assert report["dollars"] == figure(dollars)


async def test_an_engine_error_counts_no_tokens(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m": model_config(unique("m"))}})
    status, _, _ = await post(running, "/v1/chat/completions", chat("m", max_tokens=10**9))
    assert status == 400  # the engine's: max_tokens beyond its context
    assert tokens(running) == (0, 0)


async def test_gpu_time_by_state_in_metrics_and_the_admin_api(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"models": {"m": model_config(unique("m"), gpus=2, cost={"gpu_hour": 36.0})}}
    )
    assert gpu_seconds(await scrape(running), "m") == {}
    async with client(running) as c:
        await c.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
    text = await scrape(running)
    held = gpu_seconds(text, "m")
    # The cold start and the request's time, and ready with nothing in flight after it.
    assert held.keys() == {"starting", "ready", "idle"}
    assert held["starting"] > 0 and held["ready"] > 0
    assert 'activator_model_gpus{model="m",pool=""} 2.0' in text

    status, _, _ = await post(running, "/admin/models/m/stop", {})
    assert status == 202

    async def stopped() -> bool:
        return bool((await running.admin("m"))["state"] == "stopped")

    await wait_for(stopped, what="the model stopped")
    final = gpu_seconds(await scrape(running), "m")
    assert final.keys() == {"starting", "ready", "idle", "draining", "stopping"}
    assert all(final[state] >= held[state] for state in held)
    # Stopped, it holds nothing: later scrapes count no more time.
    assert gpu_seconds(await scrape(running), "m") == final
    # $36 a GPU-hour is a cent a GPU-second.
    dollars = running.sample("activator_cost_dollars_total", model="m")
    assert dollars == pytest.approx(sum(final.values()) / 100)
    report = (await running.admin("m"))["cost"]
    assert report["gpus"] == 2
    assert report["gpu_hours"] == figure(sum(final.values()) / 3600)
    assert report["dollars"] == figure(dollars)
    assert report["sleeping_gpu_hours"] == 0
