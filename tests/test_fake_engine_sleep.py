"""The stand-in engine's sleep mode, as vLLM has it: the transition table, then the real
process on loopback driven by a real aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from activator.testing.sleepmode import read_reports, report_path
from activator.testing.sleepmode.state import (
    DISCARD_KV,
    DISCARD_WEIGHTS,
    MAP_KV,
    MAP_WEIGHTS,
    OFFLOAD_WEIGHTS,
    RELOAD_WEIGHTS,
    RESTORE_WEIGHTS,
    SLEEP_TAGS,
    Footprint,
    SleepError,
    SleepState,
    memory_of,
    plan_reload,
    plan_sleep,
    plan_wake_up,
)
from tests.harness import wait_for
from tests.test_fake_engine import (
    PROCESS_WAIT_S,
    Engine,
    exit_code,
    first_data_event,
    metric,
    start,
    stop,
    wait_for_metric,
)

GIB = 1 << 30
AWAKE = SleepState()
LEVEL1 = SleepState(pause="paused_new", sleeping_tags=SLEEP_TAGS, weights="host", kv_cache="gone")
LEVEL2 = SleepState(
    pause="paused_new",
    sleeping_tags=SLEEP_TAGS,
    weights="gone",
    kv_cache="gone",
    weights_valid=False,
)
KV_ONLY_ASLEEP = SleepState(
    pause="paused_new", sleeping_tags=frozenset({"kv_cache"}), weights="gpu", kv_cache="gone"
)


# ---- the transitions (pure) ----


@pytest.mark.parametrize(
    ("state", "level", "pooled", "effects", "tags", "warned"),
    [
        (AWAKE, 1, True, (OFFLOAD_WEIGHTS, DISCARD_KV), SLEEP_TAGS, False),
        (AWAKE, 2, True, (DISCARD_WEIGHTS, DISCARD_KV), SLEEP_TAGS, False),
        (AWAKE, 0, True, (), None, False),
        # Without --enable-sleep-mode nothing is in vLLM's pool: tags asleep, memory kept.
        (AWAKE, 1, False, (), SLEEP_TAGS, False),
        (LEVEL1, 2, True, (), None, True),  # already asleep: vLLM warns, nothing changes
        (KV_ONLY_ASLEEP, 1, True, (OFFLOAD_WEIGHTS,), SLEEP_TAGS, False),
    ],
    ids=["level1", "level2", "level0", "not-pooled", "again", "after-partial-wake"],
)
def test_sleep_plan(
    state: SleepState,
    level: int,
    pooled: bool,
    effects: tuple[object, ...],
    tags: frozenset[str] | None,
    warned: bool,
) -> None:
    plan = plan_sleep(state, level=level, pooled=pooled)
    assert (plan.effects, plan.sleeping_tags, plan.warning is not None) == (effects, tags, warned)


@pytest.mark.parametrize(
    ("state", "tags", "effects", "left", "warned"),
    [
        (LEVEL1, None, (RESTORE_WEIGHTS, MAP_KV), frozenset(), False),
        (LEVEL2, None, (MAP_WEIGHTS, MAP_KV), frozenset(), False),
        (LEVEL1, ("weights",), (RESTORE_WEIGHTS,), frozenset({"kv_cache"}), False),
        (LEVEL2, ("kv_cache",), (MAP_KV,), frozenset({"weights"}), False),
        # One tag not asleep makes vLLM's whole call a no-op (#31618).
        (LEVEL1, ("weights", "bogus"), (), None, True),
        (KV_ONLY_ASLEEP, ("weights", "kv_cache"), (), None, True),
        (LEVEL1, ("scheduling",), (), None, False),  # level-0 tag: no executor call
        (AWAKE, None, (), None, True),  # not sleeping
    ],
    ids=["l1-all", "l2-all", "l1-weights", "l2-kv", "stray", "awake-tag", "scheduling", "awake"],
)
def test_wake_up_plan(
    state: SleepState,
    tags: tuple[str, ...] | None,
    effects: tuple[object, ...],
    left: frozenset[str] | None,
    warned: bool,
) -> None:
    plan = plan_wake_up(state, tags=tags)
    assert (plan.effects, plan.sleeping_tags, plan.warning is not None) == (effects, left, warned)


def test_level2_weights_come_back_wrong_until_reloaded() -> None:
    state = plan_wake_up(LEVEL2, tags=None).apply(LEVEL2)
    assert (state.sleeping_tags, state.weights, state.weights_valid) == (frozenset(), "gpu", False)
    reload = plan_reload(state)
    assert reload.effects == (RELOAD_WEIGHTS,) and reload.apply(state).weights_valid


@pytest.mark.parametrize("state", [LEVEL1, LEVEL2, KV_ONLY_ASLEEP.after(DISCARD_WEIGHTS)])
def test_reload_with_weights_asleep_is_refused(state: SleepState) -> None:
    with pytest.raises(SleepError) as caught:
        plan_reload(state)
    assert caught.value.status == 500


@pytest.mark.parametrize(
    ("state", "gpu", "host"),
    [(AWAKE, 10 + 4 + 1, 0), (LEVEL1, 1, 10), (LEVEL2, 1, 0), (KV_ONLY_ASLEEP, 10 + 1, 0)],
    ids=["awake", "level1", "level2", "kv-asleep"],
)
def test_memory_follows_the_state(state: SleepState, gpu: int, host: int) -> None:
    assert memory_of(state, Footprint(weights=10, kv_cache=4, residue=1)) == (gpu, host)


# ---- the process ----

DEV_ENV = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
NO_DEV_ENV = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
SIZES = ("--weights-gib", "8", "--kv-cache-gib", "2", "--gpu-residue-gib", "0.5")
PROMPT = "alpha beta gamma"
ANSWER = "alpha beta gamma alpha"  # 4 tokens, echoed


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROCESS_WAIT_S)) as s:
        yield s


async def sleepy(*args: str, report: Path | None = None) -> Engine:
    """A stand-in with sleep mode on, as vLLM needs it: the flag and the environment."""
    flags = ["--enable-sleep-mode", *SIZES, *args]
    if report is not None:
        flags += ["--memory-report", str(report)]
    return await start(*flags, env=DEV_ENV)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    started = await sleepy(report=tmp_path)
    yield started
    await stop(started.process)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def chat(http: aiohttp.ClientSession, engine: Engine, *, max_tokens: int = 4) -> Any:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    status, answer = await call(http, "POST", f"{engine.url}/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def text_of(answer: Any) -> str:
    content: str = answer["choices"][0]["message"]["content"]
    return content


async def is_sleeping(http: aiohttp.ClientSession, engine: Engine) -> bool:
    status, body = await call(http, "GET", f"{engine.url}/is_sleeping")
    assert status == 200
    asleep: bool = body["is_sleeping"]
    return asleep


async def sleep_state(http: aiohttp.ClientSession, engine: Engine) -> dict[str, float]:
    """vllm:engine_sleep_state, by its sleep_state label."""
    async with http.get(f"{engine.url}/metrics") as response:
        lines = (await response.text()).splitlines()
    return {
        line.split('sleep_state="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("vllm:engine_sleep_state{")
    }


def data_events(text: str) -> list[Any]:
    """The JSON events of an SSE body (or of its rest), up to [DONE], which must be there."""
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", text
    return [json.loads(item) for item in data[:-1]]


def report_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.json"))


def report_of(directory: Path, engine: Engine) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(report_path(directory, engine.process.pid).read_text())
    return body


async def test_routes_are_404_without_dev_mode(http: aiohttp.ClientSession) -> None:
    engine = await start("--enable-sleep-mode", env=NO_DEV_ENV)
    try:
        for method, path in [
            ("POST", "/sleep"),
            ("POST", "/wake_up"),
            ("GET", "/is_sleeping"),
            ("POST", "/collective_rpc"),
            ("POST", "/reset_prefix_cache"),
        ]:
            status, _ = await call(http, method, engine.url + path)
            assert status == 404, path
    finally:
        await stop(engine.process)


async def test_dev_mode_without_the_flag_pauses_but_frees_nothing(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # vLLM 0.32 registers the routes on VLLM_SERVER_DEV_MODE alone; without
    # --enable-sleep-mode its memory is outside the sleep allocator's pool.
    engine = await start(*SIZES, "--memory-report", str(tmp_path), env=DEV_ENV)
    try:
        assert (await call(http, "POST", f"{engine.url}/sleep"))[0] == 200
        assert await is_sleeping(http, engine)
        report = report_of(tmp_path, engine)
        assert (report["gpu_bytes"], report["host_bytes"]) == (int(10.5 * GIB), 0)
    finally:
        await stop(engine.process)


async def test_malformed_dev_mode_stops_the_engine_at_start() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "activator.testing.fake_engine",
        "--port",
        "0",
        env={**os.environ, "VLLM_SERVER_DEV_MODE": "yes"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PROCESS_WAIT_S):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"VLLM_SERVER_DEV_MODE" in stderr


async def test_level1_sleep_and_wake(
    engine: Engine, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    before = text_of(await chat(http, engine))
    assert before == ANSWER
    assert not await is_sleeping(http, engine)
    assert await sleep_state(http, engine) == {
        "awake": 1,
        "weights_offloaded": 0,
        "discard_all": 0,
    }

    status, body = await call(http, "POST", f"{engine.url}/sleep?level=1")
    assert (status, body) == (200, {"status": "sleeping", "level": 1})
    assert await is_sleeping(http, engine)
    async with http.get(f"{engine.url}/health") as response:
        assert response.status == 200
    assert await sleep_state(http, engine) == {
        "awake": 0,
        "weights_offloaded": 1,
        "discard_all": 0,
    }
    asleep = report_of(tmp_path, engine)
    assert (asleep["state"], asleep["level"], asleep["holds_gpu"]) == ("sleeping", 1, False)
    assert (asleep["gpu_bytes"], asleep["host_bytes"]) == (GIB // 2, 8 * GIB)

    status, body = await call(http, "POST", f"{engine.url}/wake_up")
    assert (status, body) == (200, {"status": "awake", "tags": None})
    assert not await is_sleeping(http, engine)
    assert text_of(await chat(http, engine)) == before
    awake = report_of(tmp_path, engine)
    assert (awake["state"], awake["gpu_bytes"], awake["host_bytes"]) == (
        "awake",
        int(10.5 * GIB),
        0,
    )


async def test_a_request_while_asleep_hangs_until_woken(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    assert (await call(http, "POST", f"{engine.url}/sleep"))[0] == 200
    held = asyncio.create_task(chat(http, engine))
    embedding = asyncio.create_task(
        call(http, "POST", f"{engine.url}/v1/embeddings", {"input": PROMPT})
    )
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True}
    async with http.post(f"{engine.url}/v1/chat/completions", json=body) as stream:
        assert stream.status == 200  # headers out at once, as vLLM's, then nothing
        await wait_for_metric(http, engine, "vllm:num_requests_waiting", 3)
        assert not held.done() and not embedding.done()

        # Half awake is still asleep: generation resumes only with every tag awake.
        status, answer = await call(http, "POST", f"{engine.url}/wake_up?tags=weights")
        assert (status, answer) == (200, {"status": "sleeping", "tags": ["weights"]})
        assert await is_sleeping(http, engine)
        assert await metric(http, engine, "vllm:num_requests_waiting") == 3

        status, answer = await call(http, "POST", f"{engine.url}/wake_up?tags=kv_cache")
        assert (status, answer) == (200, {"status": "awake", "tags": ["kv_cache"]})
        assert text_of(await held) == ANSWER
        assert (await embedding)[0] == 200
        events = (await stream.text()).split("\n\n")
    deltas = [json.loads(e.removeprefix("data: "))["choices"] for e in events[:-2]]
    assert "".join(c[0]["delta"].get("content", "") for c in deltas if c) == ANSWER
    assert events[-2:] == ["data: [DONE]", ""]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
async def test_sleep_aborts_requests_in_flight(http: aiohttp.ClientSession, streamed: bool) -> None:
    # Each request would take 10 minutes (to its first token, or between tokens).
    delay = "--stream-delay" if streamed else "--response-delay"
    engine = await sleepy(delay, "600")
    try:
        body = {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4,
            "stream": streamed,
        }

        first_token: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def send() -> Any:
            async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
                if not streamed:
                    return await response.json()
                events = []
                while (data := await first_data_event(response)) != "[DONE]":
                    events.append(json.loads(data))
                    if len(events) == 2:  # the role, then the first token
                        first_token.set_result(None)
                return events

        answered = asyncio.create_task(send())
        await wait_for_metric(http, engine, "vllm:num_requests_running", 1)
        if streamed:
            await first_token  # the next token would take 10 minutes
        status, answer = await call(http, "POST", f"{engine.url}/sleep")
        assert (status, answer) == (200, {"status": "sleeping", "level": 1})
        got = await answered
        if streamed:
            content = "".join(e["choices"][0]["delta"].get("content", "") for e in got)
            assert (content, got[-1]["choices"][0]["finish_reason"]) == ("alpha", "abort")
        else:
            choice = got["choices"][0]
            assert (choice["message"]["content"], choice["finish_reason"]) == ("", "abort")
        async with http.get(f"{engine.url}/metrics") as response:
            lines = (await response.text()).splitlines()
        assert [line.rsplit(" ", 1)[1] for line in lines if 'finished_reason="abort"' in line] == [
            "1.0"
        ]
    finally:
        await stop(engine.process)


async def test_sleep_mode_wait_lets_requests_in_flight_finish(
    http: aiohttp.ClientSession,
) -> None:
    engine = await sleepy("--stream-delay", "0.2")
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True}
        async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
            await first_data_event(response)
            assert (await call(http, "POST", f"{engine.url}/sleep?mode=wait"))[0] == 200
            rest = data_events(await response.text())
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert await is_sleeping(http, engine)
    finally:
        await stop(engine.process)


async def test_sleep_mode_keep_keeps_requests_for_after_the_wake(
    http: aiohttp.ClientSession,
) -> None:
    engine = await sleepy("--stream-delay", "0.1")
    try:
        prompt = [{"role": "user", "content": PROMPT}]
        body = {"messages": prompt, "max_tokens": 20, "stream": True}
        async with http.post(f"{engine.url}/v1/chat/completions", json=body) as response:
            await first_data_event(response)
            assert (await call(http, "POST", f"{engine.url}/sleep?mode=keep"))[0] == 200
            assert await is_sleeping(http, engine)
            assert (await call(http, "POST", f"{engine.url}/wake_up"))[0] == 200
            rest = data_events(await response.text())
        chunks = [event["choices"][0] for event in rest]
        assert len([c for c in chunks if c["delta"].get("content")]) in (19, 20)  # all
        assert chunks[-1]["finish_reason"] == "length"
    finally:
        await stop(engine.process)


async def test_level2_answers_garbage_until_weights_are_reloaded(
    engine: Engine, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    assert text_of(await chat(http, engine)) == ANSWER
    assert (await call(http, "POST", f"{engine.url}/sleep?level=2"))[0] == 200
    assert await sleep_state(http, engine) == {"awake": 0, "weights_offloaded": 0, "discard_all": 1}
    asleep = report_of(tmp_path, engine)
    assert (asleep["level"], asleep["gpu_bytes"], asleep["host_bytes"]) == (2, GIB // 2, 0)

    # Woken without reload_weights: fresh memory, wrong (and deterministic) answers.
    assert (await call(http, "POST", f"{engine.url}/wake_up"))[0] == 200
    assert text_of(await chat(http, engine)) == "!!!!"
    assert report_of(tmp_path, engine)["weights_valid"] is False

    status, body = await call(
        http, "POST", f"{engine.url}/collective_rpc", {"method": "reload_weights"}
    )
    assert (status, body) == (200, {"results": [None]})
    assert text_of(await chat(http, engine)) == ANSWER


async def test_level2_wake_sequence_of_the_docs(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    assert (await call(http, "POST", f"{engine.url}/sleep?level=2"))[0] == 200
    steps = [
        ("/wake_up?tags=weights", None, {"status": "sleeping", "tags": ["weights"]}),
        ("/collective_rpc", {"method": "reload_weights"}, {"results": [None]}),
        ("/wake_up?tags=kv_cache", None, {"status": "awake", "tags": ["kv_cache"]}),
        ("/reset_prefix_cache", None, {"success": True}),
    ]
    for path, body, expected in steps:
        assert await call(http, "POST", engine.url + path, body) == (200, expected), path
    assert not await is_sleeping(http, engine)
    assert text_of(await chat(http, engine)) == ANSWER


async def test_a_stray_tag_wakes_nothing(
    engine: Engine, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    assert (await call(http, "POST", f"{engine.url}/sleep"))[0] == 200
    status, body = await call(http, "POST", f"{engine.url}/wake_up?tags=weights&tags=bogus")
    assert (status, body) == (200, {"status": "sleeping", "tags": ["weights", "bogus"]})
    assert report_of(tmp_path, engine)["weights"] == "host"
    assert await is_sleeping(http, engine)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "message"),
    [
        ("POST", "/sleep?level=3", None, 400, "level", "between 0 and 2"),
        ("POST", "/sleep?level=one", None, 400, "level", "valid integer"),
        ("POST", "/sleep?mode=later", None, 400, "mode", "'abort', 'wait' or 'keep'"),
        ("POST", "/collective_rpc", {"args": []}, 400, None, "Missing 'method'"),
        ("POST", "/collective_rpc", [1], 400, None, "must be a JSON object"),
        ("POST", "/collective_rpc", {"method": "nope"}, 500, None, "no attribute 'nope'"),
        ("POST", "/reset_prefix_cache?reset_running_requests=maybe", None, 400, None, "boolean"),
    ],
    ids=["level-range", "level-type", "mode", "no-method", "not-object", "unknown", "flag"],
)
async def test_bad_control_calls_are_refused_in_vllms_envelope(
    engine: Engine,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    message: str,
) -> None:
    got, answer = await call(http, method, engine.url + path, body)
    assert got == status
    error = answer["error"]
    assert (error["code"], error["param"] if param else None) == (status, param)
    assert message in error["message"]
    assert not await is_sleeping(http, engine)  # nothing happened


async def test_invalid_json_to_collective_rpc_is_400(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{engine.url}/collective_rpc", data=b"{nope") as response:
        assert response.status == 400
        assert "JSON decode error" in (await response.json())["error"]["message"]


async def test_reload_with_weights_asleep_is_a_500(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    assert (await call(http, "POST", f"{engine.url}/sleep?level=2"))[0] == 200
    status, body = await call(
        http, "POST", f"{engine.url}/collective_rpc", {"method": "reload_weights"}
    )
    assert (status, body["error"]["type"]) == (500, "InternalServerError")


async def test_reset_prefix_cache_fails_while_requests_run(http: aiohttp.ClientSession) -> None:
    engine = await sleepy("--response-delay", "600")
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}]}
        held = asyncio.create_task(call(http, "POST", f"{engine.url}/v1/chat/completions", body))
        await wait_for_metric(http, engine, "vllm:num_requests_running", 1)
        reset = f"{engine.url}/reset_prefix_cache"
        assert await call(http, "POST", reset) == (200, {"success": False})
        assert await call(http, "POST", f"{reset}?reset_running_requests=true") == (
            200,
            {"success": True},
        )
        held.cancel()
    finally:
        await stop(engine.process)


async def test_memory_report_shows_a_sleep_in_progress_then_goes_at_exit(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    engine = await sleepy("--sleep-delay", "600", report=tmp_path)
    try:
        (awake,) = read_reports(tmp_path)
        assert (awake["pid"], awake["port"], awake["served_model_name"]) == (
            engine.process.pid,
            engine.port,
            "fake-model",
        )
        sleeping = asyncio.create_task(call(http, "POST", f"{engine.url}/sleep"))

        def falling_asleep() -> dict[str, Any] | None:
            (report,) = read_reports(tmp_path)
            return report if report["state"] == "falling_asleep" else None

        report = await wait_for(falling_asleep, what="the report of a sleep in progress")
        # During the copy out both copies exist: the observer never undercounts.
        assert (report["gpu_bytes"], report["host_bytes"]) == (int(10.5 * GIB), 8 * GIB)
        async with http.get(f"{engine.url}/health") as response:
            assert response.status == 200
        engine.process.send_signal(signal.SIGTERM)
        assert await exit_code(engine.process) == 0
        sleeping.cancel()
        assert report_files(tmp_path) == []
    finally:
        await stop(engine.process)
