"""activator in front of a real vLLM engine (CPU build), driven with the official openai SDK.

One activator and one engine are shared by most tests (a cold start costs ~30 s on two
cores), so the first test is the one that sees the engine cold; the rest reuse it warm.
The idle-stop and pool tests run their own activators with their own settings.
Run: `pytest -m vllm tests/e2e` (see conftest.py for where vLLM comes from).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.tools import poll

from .conftest import (
    ENGINE_START_BUDGET,
    SHUTDOWN_BUDGET,
    Activator,
    ActivatorFactory,
    engine_metric,
    http,
    load_template,
    model_config,
    new_tag,
)

CLIENT_NAME = "tiny-chat"  # what clients send
SERVED_NAME = "tiny-llama-served"  # what vLLM serves; activator rewrites the one to the other
MESSAGES: list[Any] = [{"role": "user", "content": "Hello engine, are you awake?"}]

# Each test may include a cold start and an activator shutdown (which stops vLLM).
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(ENGINE_START_BUDGET + 2 * SHUTDOWN_BUDGET)]


@pytest.fixture(scope="module")
def activator(activator_factory: ActivatorFactory) -> Iterator[Activator]:
    template = load_template()
    model = model_config(template, served_name=SERVED_NAME, tag=new_tag())
    with activator_factory({**template, "models": {CLIENT_NAME: model}}) as running:
        yield running


@pytest.fixture
def client(activator: Activator) -> Iterator[openai.OpenAI]:
    with activator.client() as sdk:
        yield sdk


@pytest.fixture
def engine(activator: Activator, client: openai.OpenAI) -> str:
    """URL of the running engine (woken first, in case this test runs on its own)."""
    client.chat.completions.create(model=CLIENT_NAME, messages=MESSAGES, max_tokens=1)
    return activator.engine_url(CLIENT_NAME)


def direct_client(engine_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_cold_request_is_held_until_vllm_is_ready_then_answered(
    activator: Activator, client: openai.OpenAI
) -> None:
    assert activator.engine_pids(CLIENT_NAME) == [], "engine running before any request"

    reply = client.chat.completions.create(
        model=CLIENT_NAME, messages=MESSAGES, max_tokens=8, temperature=0
    )

    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert activator.engine_pids(CLIENT_NAME), "answered, but no engine process is running"


def test_stream_is_relayed_as_vllm_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CLIENT_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)

    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 1, "expected the answer in several chunks, not one"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_lists_the_client_facing_name(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]

    assert CLIENT_NAME in ids


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_temperature_zero_answer_is_identical_through_activator_and_direct(
    client: openai.OpenAI, engine: str, endpoint: str
) -> None:
    def ask(via: openai.OpenAI, model: str) -> str | None:
        if endpoint == "completions":
            completion = via.completions.create(
                model=model, prompt="Once upon a time", max_tokens=24, temperature=0
            )
            return completion.choices[0].text
        chat = via.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=24, temperature=0
        )
        return chat.choices[0].message.content

    through_activator = ask(client, CLIENT_NAME)
    with direct_client(engine) as direct:
        directly = ask(direct, SERVED_NAME)

    assert through_activator
    assert through_activator == directly


def test_stream_usage_arrives_with_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CLIENT_NAME,
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)

    usage = chunks[-1].usage
    assert usage is not None, "the last chunk carries no usage"
    assert chunks[-1].choices == []
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 0


def test_client_disconnect_mid_stream_aborts_the_generation_in_vllm(
    client: openai.OpenAI, engine: str
) -> None:
    running = "vllm:num_requests_running"
    finished_by_length = 'vllm:request_success_total{engine="0",finished_reason="length"'
    generated = "vllm:generation_tokens_total"

    def finished_full_length() -> float:
        _, body = http("GET", f"{engine}/metrics")
        lines = [line for line in body.decode().splitlines() if line.startswith(finished_by_length)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    # Long enough (seconds on CPU) that only an abort can end it before the stream closes.
    max_tokens = 3500
    tokens_before = engine_metric(engine, generated)
    full_before = finished_full_length()
    stream = client.chat.completions.create(
        model=CLIENT_NAME,
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for index, _ in enumerate(stream):
        if index == 3:
            break
    assert engine_metric(engine, running) == 1

    stream.close()  # the client goes away mid-stream

    poll(
        lambda: engine_metric(engine, running) == 0,
        timeout=30,
        what="vLLM to drop the request (num_requests_running back to 0)",
    )
    assert finished_full_length() == full_before, "vLLM generated the full answer: not aborted"
    assert engine_metric(engine, generated) - tokens_before < max_tokens


def test_engine_400_is_passed_through_unchanged(activator: Activator, engine: str) -> None:
    # max_tokens beyond --max-model-len: vLLM itself rejects it; activator must not rewrite it.
    request: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 100_000}

    status, body = http(
        "POST", f"{activator.url}/v1/chat/completions", body={**request, "model": CLIENT_NAME}
    )
    direct_status, direct_body = http(
        "POST", f"{engine}/v1/chat/completions", body={**request, "model": SERVED_NAME}
    )

    assert (status, json.loads(body)) == (direct_status, json.loads(direct_body))
    assert status == 400
    error = json.loads(body)["error"]
    assert "max_tokens" in error["message"]
    assert "source" not in error, "an engine error must not be marked as activator's own"


def test_engine_400_reaches_the_sdk_as_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=CLIENT_NAME, messages=MESSAGES, max_tokens=100_000)

    assert raised.value.status_code == 400
    assert "max_tokens" in raised.value.message


def test_idle_model_is_stopped_and_leaves_no_vllm_process(
    activator_factory: ActivatorFactory,
) -> None:
    template = load_template()
    model = model_config(template, served_name=SERVED_NAME, tag=new_tag(), idle_timeout="3s")
    with activator_factory({**template, "models": {CLIENT_NAME: model}}) as idle_activator:
        # A cold streaming request: held, then relayed.
        with idle_activator.client() as client:
            stream = client.chat.completions.create(
                model=CLIENT_NAME, messages=MESSAGES, max_tokens=8, stream=True
            )
            chunks = list(stream)
        assert any(chunk.choices and chunk.choices[0].delta.content for chunk in chunks)
        assert idle_activator.engine_pids(CLIENT_NAME), "answered, but no engine process"

        # The engine forks workers; all of them carry the tag, so none may remain.
        poll(
            lambda: not idle_activator.engine_pids(CLIENT_NAME),
            timeout=SHUTDOWN_BUDGET,
            what="the idle engine's processes to be gone",
        )
        (entry,) = idle_activator.admin_models()
        assert entry["state"] == "stopped"


@pytest.mark.skipif(
    os.environ.get("ACTIVATOR_E2E_SKIP_POOL") == "1",
    reason="ACTIVATOR_E2E_SKIP_POOL=1 (this test starts vLLM three times)",
)
@pytest.mark.timeout(3 * ENGINE_START_BUDGET + 2 * SHUTDOWN_BUDGET)  # three cold starts
def test_pool_of_one_gpu_swaps_between_two_real_engines(
    activator_factory: ActivatorFactory,
) -> None:
    template = load_template()
    names = {"tiny-a": "tiny-a-served", "tiny-b": "tiny-b-served"}
    models = {
        name: model_config(
            template, served_name=served, tag=new_tag(), pool="cpu", min_residency="1s"
        )
        for name, served in names.items()
    }
    config = {**template, "pools": {"cpu": {"gpus": 1}}, "models": models}
    with activator_factory(config) as pooled, pooled.client() as client:

        def ask(name: str) -> None:
            reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4)
            assert reply.choices[0].message.content
            other = next(n for n in names if n != name)
            # One GPU: the other engine was stopped (and is gone) before this one started.
            assert pooled.engine_pids(name)
            assert pooled.engine_pids(other) == [], f"{other} still running beside {name}"

        ask("tiny-a")
        ask("tiny-b")
        ask("tiny-a")
