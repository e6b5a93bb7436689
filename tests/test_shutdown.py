"""Graceful shutdown of a real `activator serve` process on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import chat, engine_pids, model_config, unique, wait_for
from tests.serve_process import serving


async def test_sigterm_lets_in_flight_finish_fails_held_and_leaves_no_engine(
    tmp_path: Path,
) -> None:
    busy, stuck = unique("busy"), unique("stuck")
    config = {
        "server": {"shutdown_grace": "30s"},
        "models": {
            # 20 chunks 0.1 s apart: the stream is still running when SIGTERM arrives.
            "busy": model_config(busy, "--stream-delay", "0.1", startup_delay=0.1),
            # Never ready: a request for it stays held until shutdown.
            "stuck": model_config(stuck, "--never-ready", startup_delay=0.1),
        },
    }
    async with (
        serving(config, workdir=tmp_path, engines=[busy, stuck]) as served,
        aiohttp.ClientSession() as session,
    ):
        first_chunk = asyncio.Event()

        async def stream() -> bytes:
            body = chat("busy", "w", max_tokens=20, stream=True)
            async with session.post(served.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                received = b""
                async for chunk in resp.content.iter_any():
                    received += chunk
                    first_chunk.set()
                return received

        async def held() -> tuple[int, Any]:
            async with session.post(served.url + "/v1/chat/completions", json=chat("stuck")) as r:
                return r.status, await r.json()

        async def stuck_queued() -> bool:
            async with session.get(served.url + "/admin/models/stuck") as resp:
                return bool((await resp.json())["queued"] == 1)

        streaming = asyncio.create_task(stream())
        holding = asyncio.create_task(held())
        await first_chunk.wait()
        await wait_for(stuck_queued, what="request held for the stuck model")
        assert len(engine_pids(busy)) == 1 and len(engine_pids(stuck)) == 1

        served.process.send_signal(signal.SIGTERM)

        status, body = await holding
        assert status == 503
        assert body["error"]["code"] == "shutting_down"
        text = (await streaming).decode()
        assert text.endswith("data: [DONE]\n\n")  # the in-flight stream ran to its end
        assert text.count('"content":"') == 21  # the role chunk's "" and all 20 tokens
        assert await served.exit_code() == 0, served.output()
        # Checked before `serving` cleans up after a failure: nothing may be left.
        assert not engine_pids(busy)
        assert not engine_pids(stuck)
