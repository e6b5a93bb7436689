"""LiteLLM in front of activator, end to end: the official openai SDK -> LiteLLM proxy ->
activator -> stand-in engine, each a real process on loopback.

LiteLLM runs from its own virtualenv (bench/litellm_env.sh builds it, with the pinned
version): $LITELLM_VENV, else ~/.cache/activator-bench/litellm-venv. Without it the tests
skip, unless ACTIVATOR_REQUIRE_LITELLM=1 or CI=true (.ci/run builds it), where they fail.

One activator (`activator serve`) and one LiteLLM proxy serve the whole module; each test
has models of its own, so start counts never mix. LiteLLM's config is what `activator
litellm-config` prints for activator's config, plus a few entries that show what happens
without its settings (named `*-defaults` and `impatient`). activator checks an API key
(server.api_keys), which LiteLLM reads from the environment, as the generated config says.

What the tests pin is what LiteLLM does with activator's answers; docs/litellm.md tells it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import engine_pids, model_config, unique, wait_for
from tests.serve_process import free_port
from tests.tools import in_ci, poll, stop_process, unavailable

# Setting the proxy up takes most of the first test's time (LiteLLM imports for ~15 s).
pytestmark = pytest.mark.timeout(240)

DEFAULT_VENV = Path.home() / ".cache" / "activator-bench" / "litellm-venv"
MASTER_KEY = "sk-litellm-test-master"  # the client's key to LiteLLM
KEY_ENV = "ACTIVATOR_API_KEY"  # the generated config's default reference
# Budgets, not expectations: LiteLLM takes ~15 s to start on an idle machine.
LITELLM_READY_S = 180.0
ACTIVATOR_READY_S = 60.0
STOP_S = 30.0
# activator's Retry-After while a model starts: min(startup_timeout, 30 s).
LIMITED_STARTUP_TIMEOUT_S = 30
HELLO: Any = [{"role": "user", "content": "hello there"}]
# activator's models, one or two per test (see activator_config).
MODELS = (
    "cold", "streamed", "crowd", "broken", "broken-too", "kept-broken", "limited", "slow", "keyed"
)  # fmt: skip


def litellm_binary() -> Path:
    venv = Path(os.environ.get("LITELLM_VENV") or DEFAULT_VENV)
    binary = venv / "bin" / "litellm"
    if binary.exists():
        return binary
    unavailable(
        f"no LiteLLM proxy at {binary}; build it with bench/litellm_env.sh (or set LITELLM_VENV)",
        required=os.environ.get("ACTIVATOR_REQUIRE_LITELLM") == "1" or in_ci(),
    )


@dataclass(frozen=True)
class Stack:
    litellm_url: str
    activator_url: str
    served: dict[str, str]  # activator model -> the stand-in engine's served name

    def client(self, **options: Any) -> openai.AsyncOpenAI:
        # No SDK retries: a retry would hide what LiteLLM answered.
        return openai.AsyncOpenAI(
            base_url=self.litellm_url + "/v1",
            api_key=MASTER_KEY,
            max_retries=0,
            timeout=options.pop("timeout", 60.0),
            **options,
        )

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of activator's samples `name` whose labels include `labels`."""
        async with aiohttp.ClientSession() as session:
            async with session.get(self.activator_url + "/metrics") as resp:
                text = await resp.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    async def starts(self, model: str) -> float:
        return await self.metric(
            "activator_scale_events_total", model=model, direction="up", reason="request"
        )

    async def requests(self, model: str) -> float:
        """Requests for `model` that reached activator (LiteLLM's retries included)."""
        return await self.metric("activator_requests_total", model=model)

    async def model(self, name: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.activator_url}/admin/models/{name}") as resp:
                body: dict[str, Any] = await resp.json()
                return body


def activator_config(port: int, served: dict[str, str]) -> dict[str, Any]:
    def engine(name: str, *flags: str, startup_delay: float = 1.0, **keys: Any) -> Any:
        return model_config(served[name], *flags, startup_delay=startup_delay, **keys)

    return {
        "server": {"host": "127.0.0.1", "port": port, "api_keys": [f"${{{KEY_ENV}}}"]},
        "models": {
            "cold": engine("cold", aliases=["cold-alias"]),
            "streamed": engine("streamed"),
            "crowd": engine("crowd"),
            "broken": engine(
                "broken", "--crash-during-startup", startup_delay=0.0, startup_timeout="5s"
            ),
            # A short startup_timeout: activator's Retry-After, which LiteLLM waits, is it.
            "broken-too": engine(
                "broken-too", "--crash-during-startup", startup_delay=0.0, startup_timeout="2s"
            ),
            "kept-broken": engine(
                "kept-broken", "--crash-during-startup", startup_delay=2.0, stream_keepalive="250ms"
            ),
            "limited": engine(
                "limited",
                startup_delay=5.0,
                max_queued=1,
                startup_timeout=f"{LIMITED_STARTUP_TIMEOUT_S}s",
            ),
            "slow": engine("slow", startup_delay=4.0),
            "keyed": engine("keyed"),
        },
    }


def generated_litellm_config(activator_yaml: Path, env: dict[str, str]) -> dict[str, Any]:
    """`activator litellm-config` for `activator_yaml`, as the docs tell users to run it."""
    done = subprocess.run(
        [sys.executable, "-m", "activator", "litellm-config", "--config", str(activator_yaml)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert env[KEY_ENV] not in done.stdout, "the key itself must never be in the config"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def with_test_entries(config: dict[str, Any]) -> dict[str, Any]:
    """The generated config plus entries that show LiteLLM without its settings."""
    by_name = {entry["model_name"]: entry for entry in config["model_list"]}

    def variant(name: str, of: str, **params: Any) -> dict[str, Any]:
        litellm_params = {**by_name[of]["litellm_params"], **params}
        return {
            "model_name": name,
            "litellm_params": {k: v for k, v in litellm_params.items() if v is not None},
        }

    defaults = {"num_retries": None, "cooldown_time": None}  # LiteLLM's own defaults
    extra = [
        variant("impatient", "slow", timeout=1, stream_timeout=1),
        variant("broken-defaults", "broken-too", **defaults),
        variant("wrong-key", "keyed", api_key="not-the-key"),
        variant("wrong-key-defaults", "keyed", api_key="not-the-key", **defaults),
    ]
    return {
        "model_list": [*config["model_list"], *extra],
        "general_settings": {"master_key": MASTER_KEY},
    }


def answers(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"{process.args!r} exited ({process.returncode}):\n{tail(log)}")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = litellm_binary()
    workdir = tmp_path_factory.mktemp("litellm")
    served = {name: unique(name) for name in MODELS}
    port, litellm_port = free_port(), free_port()
    activator_yaml = workdir / "activator.yaml"
    activator_yaml.write_text(yaml.safe_dump(activator_config(port, served), sort_keys=False))
    env = {**os.environ, KEY_ENV: f"activator-key-{uuid.uuid4().hex}"}
    litellm_yaml = workdir / "litellm.yaml"
    litellm_yaml.write_text(
        yaml.safe_dump(with_test_entries(generated_litellm_config(activator_yaml, env)))
    )
    logs = {"activator": workdir / "activator.log", "litellm": workdir / "litellm.log"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with logs["activator"].open("wb") as log:
            activator = subprocess.Popen(
                [sys.executable, "-m", "activator", "serve", "--config", str(activator_yaml)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        processes.append(activator)
        command = [str(binary), "--config", str(litellm_yaml), "--num_workers", "1"]
        with logs["litellm"].open("wb") as log:
            litellm = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(litellm_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                # No network here: LiteLLM's price list from its package, not a download.
                env={**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
                start_new_session=True,
            )
        processes.append(litellm)
        activator_url = f"http://127.0.0.1:{port}"
        litellm_url = f"http://127.0.0.1:{litellm_port}"
        poll(
            lambda: answers(activator_url + "/readyz", activator, logs["activator"]),
            timeout=ACTIVATOR_READY_S,
            what="activator /readyz",
        )
        poll(
            lambda: answers(litellm_url + "/health/liveliness", litellm, logs["litellm"]),
            timeout=LITELLM_READY_S,
            what="LiteLLM /health/liveliness",
        )
        yield Stack(litellm_url=litellm_url, activator_url=activator_url, served=served)
    finally:
        for process in reversed(processes):
            stop_process(process, grace=STOP_S)
        for name in served.values():
            for pid in engine_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name, log in logs.items():  # shown by pytest when a test failed
            if log.exists():
                print(f"--- {name} log ---\n{tail(log)}")


async def test_cold_request_through_an_alias_is_held_and_answered(stack: Stack) -> None:
    async with stack.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="cold-alias", messages=HELLO, max_tokens=4
        )
    reply = raw.parse()
    assert reply.choices[0].message.content == "hello there hello there"
    # LiteLLM passes activator's headers on, prefixed.
    assert raw.headers["llm_provider-x-activator-cold-start"] == "true"
    assert await stack.starts("cold") == 1


async def test_a_cold_stream_arrives_chunk_by_chunk(stack: Stack) -> None:
    async with stack.client() as client:
        stream = await client.chat.completions.create(
            model="streamed", messages=HELLO, max_tokens=4, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == "hello there hello there"
    assert sum(1 for piece in pieces if piece) == 4
    assert await stack.starts("streamed") == 1


async def test_ten_concurrent_cold_requests_cause_one_start(stack: Stack) -> None:
    async with stack.client() as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="crowd", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=1
                )
                for i in range(10)
            )
        )
    assert sorted(reply.choices[0].message.content or "" for reply in replies) == sorted(
        f"n{i}" for i in range(10)
    )
    assert await stack.starts("crowd") == 1
    assert await stack.requests("crowd") == 10  # none lost, none sent twice


async def test_a_failed_start_reaches_the_client_as_an_error_naming_the_reason(
    stack: Stack,
) -> None:
    async with stack.client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="broken", messages=HELLO)
    assert failed.value.status_code == 503
    assert "model 'broken' failed to start: engine process exited with code 1" in str(
        failed.value.message
    )
    # activator's Retry-After, renamed by LiteLLM.
    assert failed.value.response.headers["llm_provider-retry-after"] == "5"
    # The generated num_retries: 0: LiteLLM sent the request once, so one start.
    assert await stack.requests("broken") == 1
    assert await stack.starts("broken") == 1


async def test_litellm_default_retries_would_start_a_failed_engine_again(stack: Stack) -> None:
    """Why the generated config says num_retries: 0. LiteLLM's default (2 retries of a 5xx,
    each after activator's Retry-After) sends the request three times, and each time the
    model is `failed`, so each is a new start of the engine."""
    async with stack.client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="broken-defaults", messages=HELLO)
    assert failed.value.status_code == 503
    assert await stack.requests("broken-too") == 3
    assert await stack.starts("broken-too") == 3


async def test_a_failed_start_under_stream_keepalive_is_still_an_error(stack: Stack) -> None:
    """activator answered 200 and kept the stream alive with comments; the failure came as
    an error event. LiteLLM reads the first event before it answers, so the client gets an
    HTTP error (500) naming the reason, not an empty 200 stream."""
    async with stack.client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            stream = await client.chat.completions.create(
                model="kept-broken", messages=HELLO, stream=True
            )
            async for _ in stream:
                pass
    assert failed.value.status_code == 500
    assert "model 'kept-broken' failed to start" in str(failed.value.message)
    assert await stack.starts("kept-broken") == 1


async def test_queue_full_429_is_passed_on_with_retry_after_renamed(stack: Stack) -> None:
    async with stack.client() as client:
        held = asyncio.create_task(
            client.chat.completions.create(model="limited", messages=HELLO, max_tokens=1)
        )

        async def queued() -> bool:
            return (await stack.model("limited")).get("queued") == 1

        await wait_for(queued, what="the first request held by activator")
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="limited", messages=HELLO, max_tokens=1)
        reply = await held
    assert refused.value.status_code == 429
    assert "too many requests are waiting for model 'limited'" in str(refused.value.message)
    headers = refused.value.response.headers
    # LiteLLM 1.108 keeps activator's Retry-After only as llm_provider-retry-after: a client
    # that wants to honour it reads that header (docs/litellm.md).
    assert headers["llm_provider-retry-after"] == str(LIMITED_STARTUP_TIMEOUT_S)
    assert "retry-after" not in headers
    assert reply.choices[0].message.content == "hello"
    assert await stack.requests("limited") == 2  # the 429 was not retried
    assert await stack.starts("limited") == 1


async def test_a_litellm_timeout_shorter_than_the_start_fails_the_client_not_the_start(
    stack: Stack,
) -> None:
    """`impatient` gives up after 1 s on a model that takes 4 s to start: the client gets
    LiteLLM's 408, activator sees the client leave (499) and goes on starting the engine,
    so the next request finds it ready."""
    async with stack.client() as client:
        with pytest.raises(openai.APIStatusError) as timed_out:
            await client.chat.completions.create(model="impatient", messages=HELLO)
        assert timed_out.value.status_code == 408

        async def ready() -> bool:
            return (await stack.model("slow")).get("state") == "ready"

        await wait_for(ready, what="the start LiteLLM gave up on to finish")
        raw = await client.chat.completions.with_raw_response.create(
            model="slow", messages=HELLO, max_tokens=1
        )
    assert raw.headers["llm_provider-x-activator-cold-start"] == "false"
    assert await stack.metric("activator_requests_total", model="slow", code="499") == 1
    assert await stack.starts("slow") == 1


async def test_an_error_never_puts_the_deployment_in_cooldown(stack: Stack) -> None:
    """With the generated cooldown_time: 0 every request reaches activator (here: a 401 for
    a wrong key). With LiteLLM's defaults a 401 (or a 404) benches the model's only
    deployment: the next requests get LiteLLM's own 429 without reaching activator."""
    async with stack.client() as client:
        for _ in range(2):
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(model="wrong-key", messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="wrong-key-defaults", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as benched:
            await client.chat.completions.create(model="wrong-key-defaults", messages=HELLO)
    assert "cooldown" in str(benched.value.message)
    assert await stack.starts("keyed") == 0
