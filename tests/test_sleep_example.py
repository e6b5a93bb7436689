"""config/sleep-mode.yaml, the shipped sleep-mode example, runs as shipped on the
stand-in engine: a request for the model that is not on the GPU puts the other one to
sleep, and a request for a sleeping model wakes it, with no cold start."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import yaml

from activator.config.load import load_config
from tests.conftest import ActivatorFactory

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "sleep-mode.yaml"


def test_the_sleep_mode_example_is_valid_and_sleeps_on_the_stand_in() -> None:
    settings = load_config(EXAMPLE, environ={})
    assert sorted(settings.models) == ["sleepy-a", "sleepy-b"]
    for model in settings.models.values():
        assert model.sleep is not None and model.pool == "gpu"
        assert model.process is not None
        assert "activator.testing.fake_engine" in model.process.command
        assert "--enable-sleep-mode" in model.process.command
        assert model.process.env == {"VLLM_SERVER_DEV_MODE": "1"}


@pytest.mark.timeout(90)
async def test_the_sleep_mode_example_serves_through_a_sleep_swap(
    activator: ActivatorFactory,
) -> None:
    running = await activator(yaml.safe_load(EXAMPLE.read_text()))  # on a free port

    def wakes(model: str, source: str) -> float:
        return running.sample(
            "activator_wake_duration_seconds_count",
            model=model,
            outcome="ready",
            **{"from": source},
        )

    async with openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0) as client:

        async def ask(name: str) -> str:
            reply = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=3
            )
            return reply.choices[0].message.content or ""

        assert await ask("a") == "hello hello hello"  # cold
        assert await ask("b") == "hello hello hello"  # a falls asleep, b starts cold
        assert running.model("sleepy-a").state == "sleeping"
        assert await ask("a") == "hello hello hello"  # b falls asleep, a wakes
    assert running.model("sleepy-b").state == "sleeping"
    assert wakes("sleepy-a", "sleep") == 1 and wakes("sleepy-a", "zero") == 1
    assert wakes("sleepy-b", "zero") == 1
    assert running.sample("activator_swaps_total", mode="sleep") == 2
