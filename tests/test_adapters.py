"""LoRA adapters as models (docs/adapters.md): a request for an adapter wakes its base,
loads the adapter once, and is answered by it; LRU past max_adapters, idle unloads,
failed loads. A real activator on loopback, stand-in engines (activator.testing.lora)
as real processes, the openai SDK as the client; the engine's own /v1/models and
/metrics are the outside observer."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ActivatorFactory
from tests.harness import Running, error_of, model_config, post, starts, unique, wait_for
from tests.test_reload import ENDLESS, STREAMING, Start, live  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(120)

LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def make_adapter(root: Path, name: str, *, rank: int = 8) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def base_config(served: str, adapters: dict[str, Any], *flags: str, **keys: Any) -> dict[str, Any]:
    cfg = model_config(served, "--enable-lora", "--max-lora-rank", "16", *flags, **keys)
    cfg["process"]["env"] = LORA_ENV
    cfg["adapters"] = adapters
    return cfg


def aclient(running: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)


async def ask(client: openai.AsyncOpenAI, model: str, text: str = "hello") -> tuple[str, str]:
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=2
    )
    return reply.model, reply.choices[0].message.content or ""


async def engine_metric(running: Running, model: str, name: str, **labels: str) -> float:
    """A sample of the engine's own /metrics, read past activator."""
    url = running.model(model).url
    assert url is not None
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def engine_adapters(running: Running, model: str) -> set[str]:
    url = running.model(model).url
    assert url is not None
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
        cards = (await resp.json())["data"]
    return {card["id"] for card in cards if card.get("parent")}


async def test_cold_burst_to_three_adapters_starts_one_engine_and_loads_each_once(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    names = ("sql", "docs", "chat")
    adapters = {name: {"path": make_adapter(tmp_path, name)} for name in names}
    running = await activator(
        {"models": {"base": base_config(unique("lora"), adapters, "--lora-load-delay", "0.2")}}
    )
    async with aclient(running) as client:
        asked = [name for name in names for _ in range(4)]
        replies = await asyncio.gather(*(ask(client, name) for name in asked))
    for name, (model, text) in zip(asked, replies, strict=True):
        assert model == name and text.startswith(f"[{name}] ")
    assert starts(running, "base") == 1
    for name in names:
        assert (
            await engine_metric(running, "base", "fake_engine_lora_loads_total", adapter=name) == 1
        )
        assert running.sample("activator_adapter_loads_total", adapter=name, outcome="loaded") == 1
    assert running.sample("activator_adapters_loaded", model="base") == 3
    assert running.sample("activator_requests_total", model="sql") == 4  # counted by adapter


async def test_a_cold_stream_to_an_adapter_is_held_with_keepalives_and_relayed(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql")}}
    config = base_config(
        unique("stream"), adapters, "--lora-load-delay", "0.3", stream_keepalive="0.05s"
    )
    running = await activator({"models": {"base": config}})
    async with aclient(running) as client:
        stream = await client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "a b"}], max_tokens=4,
            stream=True,
        )  # fmt: skip
        async with stream:
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model for c in chunks} == {"sql"} and text.startswith("[sql] ")
    assert starts(running, "base") == 1


async def test_max_adapters_bounds_the_loaded_set_under_random_traffic(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    names = ("a1", "a2", "a3", "a4")
    adapters = {name: {"path": make_adapter(tmp_path, name)} for name in names}
    config = base_config(
        unique("lru"), adapters, "--lora-load-delay", "0.02", "--response-delay", "0.02",
        max_adapters=2,
    )  # fmt: skip
    running = await activator({"models": {"base": config}})
    rng = random.Random(21)
    asked = [rng.choice(names) for _ in range(60)]
    limit = asyncio.Semaphore(6)  # a few at once: adapters in use overlap, and change

    async def one(client: openai.AsyncOpenAI, name: str) -> tuple[str, str]:
        async with limit:
            return await ask(client, name)

    async with aclient(running) as client:
        replies = await asyncio.gather(*(one(client, name) for name in asked))
    for name, (model, text) in zip(asked, replies, strict=True):
        assert model == name and text.startswith(f"[{name}] ")
    assert await engine_metric(running, "base", "fake_engine_lora_adapters_peak") <= 2
    assert await engine_metric(running, "base", "fake_engine_lora_unloads_in_use_total") == 0
    assert len(await engine_adapters(running, "base")) <= 2
    assert running.sample("activator_adapter_unloads_total", reason="lru") >= 2


async def test_failed_load_names_the_adapter_and_the_engines_reason_and_base_stays_up(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {
        "good": {"path": make_adapter(tmp_path, "good")},
        "missing": {"path": str(tmp_path / "nowhere")},
        "wide": {"path": make_adapter(tmp_path, "wide", rank=64)},
    }
    served = unique("bad")
    running = await activator({"models": {"base": base_config(served, adapters)}})
    for name, reason in (
        ("missing", f"No adapter found for {tmp_path / 'nowhere'}"),
        ("wide", "LoRA rank 64 is greater than max_lora_rank 16."),
    ):
        status, body, _ = await post(running, "/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
        error = error_of(body)
        assert status == 502 and error["code"] == "adapter_load_failed"
        assert f"adapter {name!r} of model 'base'" in error["message"]
        assert reason in error["message"]
    async with aclient(running) as client:
        assert (await ask(client, "base"))[0] == served
        assert (await ask(client, "good"))[0] == "good"
    assert running.model("base").state == "ready"
    assert running.sample("activator_adapter_loads_total", outcome="failed") == 2


async def test_a_load_past_its_timeout_fails_its_requests_and_the_base_serves_on(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"slow": {"path": make_adapter(tmp_path, "slow")}}
    served = unique("slow")
    config = base_config(served, adapters, "--lora-load-delay", "60", adapter_load_timeout="0.3s")
    running = await activator({"models": {"base": config}})
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}]}
    answers = await asyncio.gather(*(post(running, "/v1/chat/completions", body) for _ in range(3)))
    for status, answer, _ in answers:
        error = error_of(answer)
        assert status == 502 and error["code"] == "adapter_load_failed"
        assert error["message"] == "adapter 'slow' of model 'base' did not load within 0.3s"
    assert running.sample("activator_adapter_loads_total", outcome="timeout") == 1  # one load
    async with aclient(running) as client:
        assert (await ask(client, "base"))[0] == served


async def test_models_list_adapters_with_parent_and_wake_nothing(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql"), "aliases": ["q"]}}
    running = await activator({"models": {"base": base_config(unique("list"), adapters)}})
    async with running.session.get(running.v1 + "/models") as resp:
        cards = {card["id"]: card for card in (await resp.json())["data"]}
    assert cards["sql"]["parent"] == cards["q"]["parent"] == "base"
    assert cards["q"]["activator"]["adapter"] == "sql" and cards["q"]["activator"]["alias"]
    assert cards["sql"]["activator"]["loaded"] is False
    assert running.model("base").state == "stopped" and starts(running, "base") == 0
    async with aclient(running) as client:
        assert (await ask(client, "q"))[0] == "sql"  # an alias is sent as the adapter's name
    async with running.session.get(running.v1 + "/models") as resp:
        cards = {card["id"]: card for card in (await resp.json())["data"]}
    assert cards["sql"]["activator"]["loaded"] is True


async def test_clients_never_reach_the_load_and_unload_endpoints(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql")}}
    running = await activator({"models": {"base": base_config(unique("deny"), adapters)}})
    async with aclient(running) as client:
        await ask(client, "base")
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        body = {"lora_name": "x", "lora_path": str(tmp_path), "model": "base"}
        status, answer, _ = await post(running, path, body)
        assert status == 404 and error_of(answer)["source"] == "activator"
    assert await engine_adapters(running, "base") == set()


async def test_an_idle_adapter_is_unloaded_and_the_base_stays(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql"), "idle_timeout": "0.3s"}}
    running = await activator({"models": {"base": base_config(unique("idle"), adapters)}})
    async with aclient(running) as client:
        assert (await ask(client, "sql"))[0] == "sql"
        assert await engine_adapters(running, "base") == {"sql"}

        async def unloaded() -> bool:
            return not await engine_adapters(running, "base")

        await wait_for(unloaded, what="the idle adapter unloaded from the engine")
        assert running.sample("activator_adapter_unloads_total", reason="idle") == 1
        assert running.model("base").state == "ready"
        assert (await ask(client, "sql"))[0] == "sql"  # loaded again on demand
    assert running.sample("activator_adapter_loads_total", outcome="loaded") == 2


async def test_a_restarted_engine_loads_its_adapters_again(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql")}}
    running = await activator({"models": {"base": base_config(unique("restart"), adapters)}})
    async with aclient(running) as client:
        assert (await ask(client, "sql"))[0] == "sql"
        async with running.session.post(running.url + "/admin/models/base/stop") as resp:
            assert resp.status < 300
        await wait_for(lambda: running.model("base").state == "stopped", what="base stopped")
        assert running.sample("activator_adapters_loaded", model="base") == 0
        assert (await ask(client, "sql"))[0] == "sql"
    assert starts(running, "base") == 2
    assert running.sample("activator_adapter_loads_total", outcome="loaded") == 2


async def test_reload_adds_an_adapter_and_unloads_a_removed_one_after_its_last_request(
    live: Start,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    adapters = {"sql": {"path": make_adapter(tmp_path, "sql")}}
    one = await live({"models": {"base": base_config(unique("reload"), adapters, *STREAMING)}})
    running = one.running
    async with aclient(running) as client:
        stream = await client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "x"}], max_tokens=ENDLESS,
            stream=True,
        )  # fmt: skip
        async with stream:
            async for _ in stream:
                break  # the stream is under way on the adapter
            config = one.edit()
            config["models"]["base"]["adapters"] = {
                "docs": {"path": make_adapter(tmp_path, "docs")}
            }
            await one.applied(config)
            assert (await ask(client, "docs"))[0] == "docs"
            with pytest.raises(openai.NotFoundError):
                await ask(client, "sql")
            assert "sql" in await engine_adapters(running, "base")  # its stream still runs
        # The stream is closed: its last request ended, so the removed adapter goes.

        async def sql_gone() -> bool:
            return "sql" not in await engine_adapters(running, "base")

        await wait_for(sql_gone, what="the removed adapter unloaded")
    assert running.sample("activator_adapter_unloads_total", adapter="sql", reason="removed") == 1
    assert await engine_metric(running, "base", "fake_engine_lora_unloads_in_use_total") == 0
