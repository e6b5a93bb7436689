"""The stand-in engine, run as a real process on loopback and driven by real clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from activator.testing.engine_options import EngineError, EngineOptions
from activator.testing.generation import plan_generation

MODEL = "fake-model"
# Bounds how long any single wait on the process may take; a healthy run needs far less.
PROCESS_WAIT_S = 15.0


@dataclass
class Engine:
    process: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, *, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "activator.testing.fake_engine",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def read_line_starting(stream: asyncio.StreamReader | None, prefix: str) -> str:
    """The first line of output starting with `prefix` (bounded)."""
    assert stream is not None
    async with asyncio.timeout(PROCESS_WAIT_S):
        while line := (await stream.readline()).decode():
            if line.startswith(prefix):
                return line.strip()
    raise AssertionError(f"output ended without a line starting with {prefix!r}")


async def start(*args: str, ready_word: str = "READY", env: dict[str, str] | None = None) -> Engine:
    process = await spawn("--port", "0", *args, env=env)
    line = await read_line_starting(process.stdout, f"{ready_word} port=")
    return Engine(process=process, port=int(line.split("=")[1]))


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
    async with asyncio.timeout(PROCESS_WAIT_S):
        await process.communicate()


async def exit_code(process: asyncio.subprocess.Process) -> int:
    async with asyncio.timeout(PROCESS_WAIT_S):
        return await process.wait()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    started = await start("--stream-delay", "0", "--max-model-len", "64")
    yield started
    await stop(started.process)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROCESS_WAIT_S)) as s:
        yield s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def metric(http: aiohttp.ClientSession, engine: Engine, name: str) -> float:
    async with http.get(f"{engine.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


async def wait_for_metric(
    http: aiohttp.ClientSession, engine: Engine, name: str, value: float
) -> None:
    """Poll /metrics until `name` equals `value`, within a deadline (no event to wait on)."""
    async with asyncio.timeout(PROCESS_WAIT_S):
        while True:
            if await metric(http, engine, name) == value:
                return
            await asyncio.sleep(0.01)


async def first_data_event(response: aiohttp.ClientResponse) -> str:
    while line := (await response.content.readline()).decode():
        if line.startswith("data: "):
            return line.removeprefix("data: ").strip()
    raise AssertionError("stream ended before any data event")


# ---- pure planning ----


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "chunks", "text", "finish_reason"),
    [
        ("hello there world", 5, 16, "hello there world hello there", "length"),
        ("", 2, 16, "tok tok", "length"),
        ("one", None, 16, " ".join(["one"] * 16), "stop"),
        ("one two", None, 3, "one two one", "stop"),
    ],
)
def test_output_echoes_prompt_words(
    prompt: str, max_tokens: int | None, chunks: int, text: str, finish_reason: str
) -> None:
    options = EngineOptions(port=0, chunks=chunks)
    gen = plan_generation(prompt, max_tokens=max_tokens, options=options)
    assert (gen.text, gen.finish_reason) == (text, finish_reason)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ("a b", 7, "maximum context length is 8 tokens and your request has 2 input tokens"),
        ("a " * 8, None, "maximum context length is 8 tokens. However, your request has 8"),
        ("a", 0, "max_tokens must be at least 1"),
        ("a", True, "max_tokens must be at least 1"),
    ],
)
def test_requests_beyond_the_context_are_refused(
    prompt: str, max_tokens: object, message: str
) -> None:
    with pytest.raises(EngineError) as caught:
        plan_generation(
            prompt, max_tokens=max_tokens, options=EngineOptions(port=0, max_model_len=8)
        )
    assert (caught.value.status, caught.value.type) == (400, "BadRequestError")
    assert message in caught.value.message


# ---- lifecycle ----


async def test_port_stays_closed_while_loading_then_ready(http: aiohttp.ClientSession) -> None:
    port = free_port()
    process = await spawn("--port", str(port), "--startup-delay", "0.9")
    try:
        await read_line_starting(process.stderr, "INFO")  # the loading phase has begun
        assert await connection_refused(port)
        assert await read_line_starting(process.stdout, "READY") == f"READY port={port}"
        async with http.get(f"http://127.0.0.1:{port}/health") as response:
            assert response.status == 200
    finally:
        await stop(process)


async def test_crash_during_startup_exits_1_without_binding() -> None:
    port = free_port()
    process = await spawn("--port", str(port), "--crash-during-startup")
    async with asyncio.timeout(PROCESS_WAIT_S):
        stdout, stderr = await process.communicate()
    assert process.returncode == 1
    assert "RuntimeError: CUDA out of memory (simulated)" in stderr.decode()
    assert b"READY" not in stdout


async def test_sigterm_exits_promptly_with_a_stream_open(http: aiohttp.ClientSession) -> None:
    engine = await start("--stream-delay", "5")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
            await first_data_event(response)
            engine.process.send_signal(signal.SIGTERM)
            assert await exit_code(engine.process) == 0
    finally:
        await stop(engine.process)


async def test_sigterm_while_loading_exits_at_once() -> None:
    process = await spawn("--port", "0", "--startup-delay", "600")
    await read_line_starting(process.stderr, "INFO")  # signal handlers are installed
    process.send_signal(signal.SIGTERM)
    assert await exit_code(process) == 0


async def test_ignore_sigterm_keeps_serving(http: aiohttp.ClientSession) -> None:
    engine = await start("--ignore-sigterm")
    try:
        engine.process.send_signal(signal.SIGTERM)
        # A request sent after the signal is answered only if the process survived it.
        async with http.get(f"{engine.url}/health") as response:
            assert response.status == 200
        assert engine.process.returncode is None
    finally:
        await stop(engine.process)
    assert engine.process.returncode == -signal.SIGKILL


async def test_exit_after_dies_with_code_3() -> None:
    engine = await start("--exit-after", "0.2")
    assert await exit_code(engine.process) == 3
    assert engine.process.stderr is not None
    assert "engine died (simulated)" in (await engine.process.stderr.read()).decode()


async def test_never_ready_binds_but_answers_503(http: aiohttp.ClientSession) -> None:
    engine = await start("--never-ready", ready_word="LISTENING")
    try:
        async with http.get(f"{engine.url}/health") as response:
            assert response.status == 503
        async with http.get(f"{engine.url}/v1/models") as response:
            assert response.status == 503
    finally:
        await stop(engine.process)


# ---- endpoints ----


async def test_health_and_ping_are_empty_200s(engine: Engine, http: aiohttp.ClientSession) -> None:
    for path in ("/health", "/ping"):
        async with http.get(engine.url + path) as response:
            assert response.status == 200
            assert await response.read() == b""
            assert response.headers["x-fake-engine"] == "1"


async def test_models_lists_served_name(engine: Engine) -> None:
    async with engine.client() as client:
        page = await client.models.list()
    assert [(m.id, m.owned_by) for m in page.data] == [(MODEL, "vllm")]
    assert page.data[0].model_extra == {"root": MODEL, "parent": None, "max_model_len": 64}


async def test_chat_completion(engine: Engine) -> None:
    async with engine.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "red green"}], max_tokens=3
        )
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", "red green red")
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)


async def test_chat_stream_with_usage(engine: Engine) -> None:
    async with engine.client() as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a b"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "a b a"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_completion_stream_and_plain(engine: Engine) -> None:
    async with engine.client() as client:
        plain = await client.completions.create(model=MODEL, prompt="x y", max_tokens=4)
        stream = await client.completions.create(
            model=MODEL, prompt="x y", max_tokens=4, stream=True
        )
        streamed = "".join([chunk.choices[0].text async for chunk in stream])
    assert plain.choices[0].text == streamed == "x y x y"


async def test_stream_ends_with_done(engine: Engine, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True}
    async with http.post(f"{engine.url}/v1/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["x-fake-engine"] == "1"
        events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]


async def test_embeddings_are_deterministic(engine: Engine) -> None:
    async with engine.client() as client:
        first = await client.embeddings.create(model=MODEL, input=["a", "b"])
        again = await client.embeddings.create(model=MODEL, input="a")
    assert len(first.data) == 2 and len(first.data[0].embedding) == 8
    assert first.data[0].embedding == again.data[0].embedding != first.data[1].embedding


async def test_responses_api(engine: Engine) -> None:
    async with engine.client() as client:
        response = await client.responses.create(
            model=MODEL, input="ping pong", max_output_tokens=2
        )
    assert response.output_text == "ping pong"


async def test_unknown_model_is_404_in_vllm_envelope(engine: Engine) -> None:
    async with engine.client() as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(
                model="other", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.body == {
        "message": "The model `other` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


async def test_max_tokens_beyond_context_is_400(engine: Engine) -> None:
    async with engine.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=64)
    assert "maximum context length is 64 tokens" in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "BadRequestError"


async def test_invalid_json_is_400(engine: Engine, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{engine.url}/v1/chat/completions", data=b"{nope") as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == 400


async def test_adapter_endpoints_answer_ok(engine: Engine, http: aiohttp.ClientSession) -> None:
    for path in ("/load_lora_adapter", "/unload_lora_adapter"):
        async with http.post(engine.url + path) as response:
            assert (response.status, await response.json()) == (200, {"ok": True})


async def test_sleep_endpoints_need_dev_mode(http: aiohttp.ClientSession) -> None:
    # As in vLLM, they exist only with VLLM_SERVER_DEV_MODE=1 (see test_fake_engine_sleep.py).
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
    engine = await start("--enable-sleep-mode", env=env)
    try:
        for path in ("/sleep", "/wake_up", "/collective_rpc"):
            async with http.post(engine.url + path) as response:
                assert response.status == 404
    finally:
        await stop(engine.process)


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--api-key", "sekret"], {}), ([], {"VLLM_API_KEY": "sekret"})],
    ids=["flag", "env"],
)
async def test_api_key_guards_only_v1(
    http: aiohttp.ClientSession, args: list[str], env: dict[str, str]
) -> None:
    engine = await start(*args, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1", **env})
    try:
        async with http.get(f"{engine.url}/v1/models") as response:
            assert (response.status, await response.json()) == (401, {"error": "Unauthorized"})
        for path in ("/health", "/metrics", "/is_sleeping"):
            async with http.get(engine.url + path) as response:
                assert response.status == 200
        async with engine.client(api_key="sekret") as client:
            assert [m.id for m in (await client.models.list()).data] == [MODEL]
        async with engine.client(api_key="wrong") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
    finally:
        await stop(engine.process)


# ---- streaming behaviour seen by a proxy ----


async def test_slow_stream_is_incremental_and_disconnect_aborts(
    http: aiohttp.ClientSession,
) -> None:
    # 200 chunks 0.5 s apart: the first chunk can only arrive within the test's budget
    # if chunks are written as produced, not buffered until the end.
    engine = await start("--stream-delay", "0.5")
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 200,
            "stream": True,
        }
        async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
            first = json.loads(await first_data_event(response))
            assert first["choices"][0]["delta"]["role"] == "assistant"
            assert await metric(http, engine, "vllm:num_requests_running") == 1
            response.close()  # the client goes away mid-stream
        await wait_for_metric(http, engine, "vllm:num_requests_running", 0)
        assert await metric(http, engine, "fake_engine_aborted_requests_total") == 1
    finally:
        await stop(engine.process)
