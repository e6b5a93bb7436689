"""The stand-in engine's LoRA adapter API, as vLLM's source has it (activator.testing.lora),
run as a real process and driven by aiohttp and the openai SDK."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.test_fake_engine import MODEL, Engine, start, stop

pytestmark = pytest.mark.timeout(60)

LORA_ENV = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def make_adapter(root: Path, name: str, *, rank: int = 8) -> str:
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


@pytest.fixture
async def lora_engine() -> AsyncIterator[Engine]:
    engine = await start("--enable-lora", "--max-lora-rank", "16", env=LORA_ENV)
    try:
        yield engine
    finally:
        await stop(engine.process)


async def post(url: str, body: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.text()


async def test_load_serve_list_and_unload(lora_engine: Engine, tmp_path: Path) -> None:
    path = make_adapter(tmp_path, "sql")
    url = lora_engine.url
    status, text = await post(
        url + "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": path}
    )
    assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    async with lora_engine.client() as client:
        listed = await client.models.list()
        cards = {card.id: card.model_dump() for card in listed.data}
        assert cards["sql"]["parent"] == MODEL and cards["sql"]["root"] == path
        reply = await client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.model == "sql"
        assert (reply.choices[0].message.content or "").startswith("[sql] ")
        base = await client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
        assert "[" not in base.choices[0].text
    status, text = await post(url + "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    async with lora_engine.client() as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.completions.create(model="sql", prompt="hi")
    assert caught.value.message.endswith("The model `sql` does not exist.")


async def test_errors_as_vllm_has_them(lora_engine: Engine, tmp_path: Path) -> None:
    url = lora_engine.url + "/v1/load_lora_adapter"
    path = make_adapter(tmp_path, "sql")
    wide = make_adapter(tmp_path, "wide", rank=64)
    assert (await post(url, {"lora_name": "sql", "lora_path": path}))[0] == 200
    cases = [
        ({"lora_name": "sql", "lora_path": path}, 400, "InvalidUserInput",
         "The lora adapter 'sql' has already been loaded."),
        ({"lora_name": "x"}, 400, "InvalidUserInput",
         "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "gone", "lora_path": "/nowhere/gone"}, 404, "NotFoundError",
         "Loading lora gone failed: No adapter found for /nowhere/gone"),
        ({"lora_name": "wide", "lora_path": wide}, 400, "BadRequestError",
         "LoRA rank 64 is greater than max_lora_rank 16."),
    ]  # fmt: skip
    for body, status, kind, message in cases:
        got_status, text = await post(url, body)
        error = json.loads(text)["error"]
        assert (got_status, error["type"], error["message"]) == (status, kind, message)
    status, text = await post(lora_engine.url + "/v1/unload_lora_adapter", {"lora_name": "no"})
    assert status == 404
    assert json.loads(text)["error"]["message"] == "The lora adapter 'no' cannot be found."


async def test_routes_exist_only_with_runtime_updating() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}
    engine = await start("--enable-lora", env=env)
    try:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert (await post(engine.url + path, {"lora_name": "a", "lora_path": "/a"}))[0] == 404
    finally:
        await stop(engine.process)


async def test_load_needs_enable_lora(tmp_path: Path) -> None:
    engine = await start(env=LORA_ENV)
    try:
        body = {"lora_name": "a", "lora_path": make_adapter(tmp_path, "a")}
        status, text = await post(engine.url + "/v1/load_lora_adapter", body)
        assert status == 400
        assert "--enable-lora" in json.loads(text)["error"]["message"]
    finally:
        await stop(engine.process)
