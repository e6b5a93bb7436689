"""bench/gpu_engine.py on CPU, tiny: start, chat, sleep level 1 and 2, wake, reload.

The benchmark's GPU stand-in needs torch, which the project's venv does not carry; the
real-vLLM venv has it (CPU build), so the test runs the engine with that venv's python,
found as the e2e tests find it (tests/tools.py): $VLLM_PYTHON, else
$VLLM_VENV/bin/python, else <repo>/.vllm-venv/bin/python. Without it the test skips,
unless ACTIVATOR_REQUIRE_VLLM=1 (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from activator.testing.sleepmode import read_reports
from tests.tools import REPO, vllm_venv_python

ENGINE = REPO / "bench" / "gpu_engine.py"
# Budgets, not expectations: importing torch alone takes seconds on a busy 2-core machine.
START_BUDGET_S = 180.0
CALL_BUDGET_S = 60.0
TINY = ("--hidden", "64", "--device", "cpu", "--dtype", "bf16")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2 * START_BUDGET_S + 120)]


@dataclass
class Engine:
    process: asyncio.subprocess.Process
    url: str


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=CALL_BUDGET_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    python = vllm_venv_python(needs="torch")
    weights = tmp_path / "weights.bin"
    make = await asyncio.create_subprocess_exec(
        python, ENGINE, "--make-weights", weights, "--weights-gib", "0.001", *TINY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(START_BUDGET_S):
        output, _ = await make.communicate()
    assert make.returncode == 0, output.decode()
    process = await asyncio.create_subprocess_exec(
        python, ENGINE, "--port", "0", "--weights", weights, *TINY,
        "--enable-sleep-mode", "--kv-cache-gib", "0.001",
        "--memory-report", tmp_path / "reports", "--disable-access-log",
        env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_BUDGET_S):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("READY port="), line
        yield Engine(process=process, url=f"http://127.0.0.1:{line.strip().split('=')[1]}")
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(CALL_BUDGET_S):
            await process.communicate()


async def call(http: aiohttp.ClientSession, engine: Engine, path: str, body: Any = None) -> Any:
    method = "GET" if path in ("/is_sleeping", "/debug/timings") else "POST"
    async with http.request(method, engine.url + path, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json() if response.content_length != 0 else None


async def chat(http: aiohttp.ClientSession, engine: Engine, *, stream: bool = False) -> str:
    body = {
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 8,
        "stream": stream,
    }
    async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        if not stream:
            answer = await response.json()
            assert answer["choices"][0]["finish_reason"] == "length"
            text: str = answer["choices"][0]["message"]["content"]
            return text
        data = [
            line.removeprefix("data: ")
            for line in (await response.text()).splitlines()
            if line.startswith("data: ")
        ]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item)["choices"][0] for item in data[:-1]]
    assert chunks[-1]["finish_reason"] == "length"
    return "".join(chunk["delta"].get("content", "") for chunk in chunks)


def reports(directory: Path) -> list[dict[str, Any]]:
    return read_reports(directory)


async def test_sleep_and_wake_keep_the_answers(
    engine: Engine, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    answer = await chat(http, engine)
    assert len(answer.split()) == 8
    assert await chat(http, engine, stream=True) == answer

    # Level 1: weights to host memory and back.
    assert await call(http, engine, "/sleep?level=1") == {"status": "sleeping", "level": 1}
    assert await call(http, engine, "/is_sleeping") == {"is_sleeping": True}
    (report,) = reports(tmp_path / "reports")
    assert (report["state"], report["weights"], report["holds_gpu"]) == ("sleeping", "host", False)
    assert report["host_bytes"] == report["footprint"]["weights"] > 0
    assert await call(http, engine, "/wake_up") == {"status": "awake", "tags": None}
    assert await chat(http, engine) == answer

    # Level 2, woken without reloading: the weights are back as zeros, the answer wrong.
    assert (await call(http, engine, "/sleep?level=2"))["level"] == 2
    assert (await call(http, engine, "/wake_up"))["status"] == "awake"
    assert set((await chat(http, engine)).split()) == {"!"}

    # Level 2, vLLM's full wake sequence: the weights read from the file again.
    assert (await call(http, engine, "/sleep?level=2"))["level"] == 2
    assert (await call(http, engine, "/wake_up?tags=weights"))["status"] == "sleeping"
    assert await call(http, engine, "/collective_rpc", {"method": "reload_weights"}) == {
        "results": [None]
    }
    assert (await call(http, engine, "/wake_up?tags=kv_cache"))["status"] == "awake"
    assert await call(http, engine, "/reset_prefix_cache") == {"success": True}
    assert await chat(http, engine) == answer

    timings = await call(http, engine, "/debug/timings")
    ops = [entry["op"] for entry in timings["calls"]]
    assert ops == [*("sleep", "wake_up") * 3, "reload_weights", "wake_up"]
    print("gpu_engine CPU smoke timings:", json.dumps(timings, indent=1))  # for the report

    engine.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(CALL_BUDGET_S):
        assert await engine.process.wait() == 0
    assert reports(tmp_path / "reports") == []
