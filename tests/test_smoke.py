from __future__ import annotations

import asyncio

import openai

from tests.conftest import ActivatorFactory
from tests.harness import engine_pids, model_config


async def test_concurrent_cold_requests_cause_one_start_and_all_are_answered(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config("m1-served", startup_delay=0.5)}})
    client = openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)
    async with client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="m1", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3
                )
                for i in range(20)
            )
        )
    assert all(r.choices[0].message.content for r in replies)
    assert all(r.model == "m1-served" for r in replies)
    assert (
        running.sample("activator_scale_events_total", model="m1", direction="up", reason="request")
        == 1
    )
    assert len(engine_pids("m1-served")) == 1
