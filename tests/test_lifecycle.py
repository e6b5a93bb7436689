"""A model's lifecycle seen from outside: holding, waking once, failing, idling, re-waking.

Every test runs a real activator on loopback with stand-in engines as real processes and
talks to it with real clients (the openai SDK, sync and async, and aiohttp).
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.conftest import ActivatorFactory
from tests.harness import (
    Running,
    chat,
    engine_pids,
    error_of,
    header,
    model_config,
    post,
    starts,
    unique,
    wait_for,
)


def aclient(running: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)


def held(running: Running, model: str) -> float:
    return running.sample("activator_held_requests", model=model, reason="starting")


async def test_concurrent_cold_requests_from_every_client_kind_share_one_start(
    activator: ActivatorFactory,
) -> None:
    served = unique("cold")
    running = await activator({"models": {"m": model_config(served, startup_delay=0.5)}})
    messages: Any = [{"role": "user", "content": "one two three"}]

    def sync_calls() -> list[str]:
        with openai.OpenAI(base_url=running.v1, api_key="unused", max_retries=0) as client:
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=3)
            chunks = client.chat.completions.create(
                model="m", messages=messages, max_tokens=3, stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return [reply.choices[0].message.content or "", streamed]

    async def async_stream(client: openai.AsyncOpenAI) -> str:
        chunks = await client.chat.completions.create(
            model="m", messages=messages, max_tokens=3, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def async_plain(client: openai.AsyncOpenAI) -> str:
        reply = await client.chat.completions.create(model="m", messages=messages, max_tokens=3)
        return reply.choices[0].message.content or ""

    async with aclient(running) as client:
        results = await asyncio.gather(
            asyncio.to_thread(sync_calls),
            *(async_plain(client) for _ in range(5)),
            *(async_stream(client) for _ in range(5)),
        )
    texts = [*results[0], *results[1:]]
    assert texts == ["one two three"] * 12
    assert starts(running, "m") == 1
    assert len(engine_pids(served)) == 1


async def test_start_goes_on_for_others_when_the_first_client_disconnects(
    activator: ActivatorFactory,
) -> None:
    served = unique("first-leaves")
    running = await activator({"models": {"m": model_config(served, startup_delay=0.5)}})
    model = running.model("m")
    first = asyncio.create_task(post(running, "/v1/chat/completions", chat("m")))
    await wait_for(lambda: model.queued == 1, what="first request held")
    async with aclient(running) as client:
        others = [
            asyncio.create_task(
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
            )
            for _ in range(2)
        ]
        await wait_for(lambda: model.queued == 3, what="all three held")
        first.cancel()  # closes its connection: the server cancels that handler
        with pytest.raises(asyncio.CancelledError):
            await first
        replies = await asyncio.gather(*others)
    assert [r.choices[0].finish_reason for r in replies] == ["stop", "stop"]
    assert starts(running, "m") == 1
    wakes = running.sample(
        "activator_wake_duration_seconds_count",
        model="m",
        backend="process",
        outcome="ready",
        **{"from": "zero"},
    )
    assert wakes == 1


async def test_waiter_that_disconnects_leaves_the_queue_at_once(
    activator: ActivatorFactory,
) -> None:
    # A start far longer than the test: the waiter can only leave by disconnecting.
    running = await activator({"models": {"m": model_config(unique("leaves"), startup_delay=60)}})
    model = running.model("m")
    waiter = asyncio.create_task(post(running, "/v1/chat/completions", chat("m")))
    await wait_for(lambda: held(running, "m") == 1, what="request held")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await wait_for(lambda: held(running, "m") == 0, what="held gauge back to 0")
    assert model.queued == 0
    assert model.state == "starting"  # the start belongs to the model and goes on
    assert (
        running.sample("activator_hold_duration_seconds_count", model="m", outcome="disconnected")
        == 1
    )


async def test_idle_model_is_stopped_and_woken_again_by_the_next_request(
    activator: ActivatorFactory,
) -> None:
    served = unique("idle")
    running = await activator(
        {"models": {"m": model_config(served, startup_delay=0.1, idle_timeout="1s")}}
    )
    model = running.model("m")
    status, _, headers = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 200
    assert header(headers, "X-Activator-Cold-Start") == "true"
    await wait_for(lambda: model.state == "stopped", what="idle stop")
    await wait_for(lambda: not engine_pids(served), what="engine process gone")
    assert (
        running.sample("activator_scale_events_total", model="m", direction="down", reason="idle")
        == 1
    )
    status, _, headers = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 200
    assert header(headers, "X-Activator-Cold-Start") == "true"
    assert starts(running, "m") == 2


async def test_open_stream_keeps_the_model_from_idling_until_its_last_byte(
    activator: ActivatorFactory,
) -> None:
    # The stream lasts 12 x 0.1 s, several times the idle timeout, with no new request.
    config = model_config(
        unique("stream-busy"), "--stream-delay", "0.1", startup_delay=0.1, idle_timeout="0.5s"
    )
    running = await activator({"models": {"m": config}})
    model = running.model("m")
    states: list[str] = []
    async with aclient(running) as client:
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b"}], max_tokens=12, stream=True
        )
        async for _ in chunks:
            states.append(model.state)
    assert len(states) == 14  # role, 12 tokens, finish
    assert set(states) == {"ready"}
    await wait_for(lambda: model.state == "stopped", what="idle stop after the stream ended")


async def test_request_arriving_while_stopping_waits_and_wakes_the_model_again(
    activator: ActivatorFactory,
) -> None:
    served = unique("stopping")
    # The engine ignores SIGTERM, so "stopping" lasts the whole stop_grace.
    config = model_config(served, "--ignore-sigterm", startup_delay=0.1)
    config["process"]["stop_grace"] = "1s"
    running = await activator({"models": {"m": config}})
    model = running.model("m")
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200
    first_pid = engine_pids(served)
    async with running.session.post(running.url + "/admin/models/m/stop") as resp:
        assert resp.status == 202
    await wait_for(lambda: model.state == "stopping", what="stopping")
    status, body, _ = await post(running, "/v1/chat/completions", chat("m", "again", max_tokens=1))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "again"
    assert starts(running, "m") == 2
    pids = engine_pids(served)
    assert len(pids) == 1 and pids != first_pid


async def test_crash_during_start_fails_every_waiter_with_the_engine_log_tail(
    activator: ActivatorFactory,
) -> None:
    config = model_config(unique("crash"), "--crash-during-startup", startup_delay=0.1)
    running = await activator({"models": {"m": config}})
    results = await asyncio.gather(
        *(post(running, "/v1/chat/completions", chat("m")) for _ in range(3))
    )
    for status, body, headers in results:
        assert status == 503
        error = error_of(body)
        assert error["code"] == "model_start_failed"
        assert error["source"] == "activator"
        assert "exited with code 1" in error["message"]
        assert any("CUDA out of memory" in line for line in error["engine_log_tail"])
        assert int(header(headers, "Retry-After")) >= 1
    assert starts(running, "m") == 1
    # Waiters learn first; the model is failed once the engine is cleaned up.
    await wait_for(lambda: running.model("m").state == "failed", what="failed")
    # The next request tries again (and fails again, the same way).
    status, body, _ = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 503
    assert error_of(body)["code"] == "model_start_failed"
    assert starts(running, "m") == 2


async def test_engine_that_never_becomes_ready_fails_at_startup_timeout(
    activator: ActivatorFactory,
) -> None:
    served = unique("never")
    running = await activator(
        {
            "models": {
                "m": model_config(served, "--never-ready", startup_delay=0.1, startup_timeout="1s")
            }
        }
    )
    status, body, headers = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 503
    assert "startup_timeout" in error_of(body)["message"]
    assert header(headers, "Retry-After")
    assert (
        running.sample(
            "activator_wake_duration_seconds_count",
            model="m",
            backend="process",
            outcome="timeout",
            **{"from": "zero"},
        )
        == 1
    )
    # Waiters learn first; the stuck engine is stopped right after.
    await wait_for(lambda: running.model("m").state == "failed", what="failed")
    assert not engine_pids(served)


async def test_queue_overflow_is_429_with_retry_after(activator: ActivatorFactory) -> None:
    # A never-ready engine keeps the first two held for as long as the test needs.
    running = await activator(
        {"models": {"m": model_config(unique("full"), "--never-ready", max_queued=2)}}
    )
    model = running.model("m")
    holders = [
        asyncio.create_task(post(running, "/v1/chat/completions", chat("m"))) for _ in range(2)
    ]
    await wait_for(lambda: model.queued == 2, what="two requests held")
    status, body, headers = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 429
    assert error_of(body)["code"] == "queue_full"
    assert int(header(headers, "Retry-After")) >= 1
    for holder in holders:
        holder.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    await wait_for(lambda: held(running, "m") == 0, what="held gauge back to 0")


async def test_admin_wake_starts_and_admin_stop_stops_the_engine(
    activator: ActivatorFactory,
) -> None:
    served = unique("admin")
    running = await activator({"models": {"m": model_config(served, startup_delay=0.1)}})
    model = running.model("m")
    async with running.session.post(running.url + "/admin/models/m/wake") as resp:
        assert resp.status == 202
        assert (await resp.json())["name"] == "m"
    await wait_for(lambda: model.state == "ready", what="ready after admin wake")
    assert len(engine_pids(served)) == 1
    described = await running.admin("m")
    assert described["state"] == "ready"
    assert described["upstream_url"].startswith("http://127.0.0.1:")
    async with running.session.post(running.url + "/admin/models/m/stop") as resp:
        assert resp.status == 202
        assert (await resp.json())["stopping"] is True
    await wait_for(lambda: model.state == "stopped", what="stopped after admin stop")
    assert not engine_pids(served)
    assert (
        running.sample("activator_scale_events_total", model="m", direction="down", reason="admin")
        == 1
    )
    async with running.session.post(running.url + "/admin/models/nope/wake") as resp:
        assert resp.status == 404
