"""Sleep mode end to end: swaps that put a model to sleep instead of stopping it, wakes,
level 2's reload, fallbacks, host memory and idle rules.

Stand-in engines run with vLLM's sleep API (`--enable-sleep-mode`, VLLM_SERVER_DEV_MODE=1)
and keep a memory report each (`--memory-report DIR`: one JSON file per engine process).
The observer reads those files from a thread of its own, so "never two awake at once" and
"never over host_memory" are facts about the engines, not about what activator believes.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from activator.testing.sleepmode import read_reports
from tests.conftest import ActivatorFactory
from tests.harness import (
    Running,
    Sampler,
    engine_pids,
    model_config,
    post,
    unique,
    wait_for,
)

GIB = 2**30
HELLO: Any = [{"role": "user", "content": "one two three"}]


def sleep_model(
    served: str,
    reports: Path,
    *,
    level: int = 1,
    gib: float = 4,
    flags: tuple[str, ...] = (),
    dev_mode: bool = True,
    **keys: Any,
) -> dict[str, Any]:
    """A model with sleep mode on a stand-in engine that simulates `gib` GiB of weights."""
    cfg = model_config(
        served,
        "--enable-sleep-mode",
        "--memory-report",
        str(reports),
        "--weights-gib",
        str(gib),
        *flags,
        startup_delay=0.05,
        sleep={"level": level, "host_memory": f"{gib}GiB", "timeout": "10s"},
        **keys,
    )
    if dev_mode:
        cfg["process"]["env"] = {"VLLM_SERVER_DEV_MODE": "1"}
    return cfg


class MemoryObserver(Sampler):
    """Samples the engines' memory reports until closed; keeps the worst moments."""

    def __init__(self, reports: Path, served: set[str]) -> None:
        super().__init__(name="memory-observer")
        self._reports = reports
        self._served = served
        self.max_awake = 0
        self.max_host = 0
        self.samples = 0

    def sample(self) -> None:
        ours = [
            r for r in read_reports(self._reports) if r.get("served_model_name") in self._served
        ]
        awake = [r for r in ours if r.get("state") != "sleeping"]
        self.max_awake = max(self.max_awake, len(awake))
        self.max_host = max(self.max_host, sum(int(r.get("host_bytes", 0)) for r in ours))
        self.samples += 1


@dataclass
class SleepPool:
    running: Running
    served: dict[str, str]
    reports: Path
    pids: dict[str, set[int]] = field(default_factory=dict)

    def observer(self) -> MemoryObserver:
        return MemoryObserver(self.reports, set(self.served.values()))

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.running.v1, api_key="unused", max_retries=0)

    def engine(self, model: str) -> set[int]:
        return set(engine_pids(self.served[model]))

    def sample(self, metric: str, **labels: str) -> float:
        return self.running.sample(metric, **labels)

    def wakes(self, model: str, source: str, outcome: str = "ready") -> float:
        return self.sample(
            "activator_wake_duration_seconds_count",
            model=model,
            backend="process",
            outcome=outcome,
            **{"from": source},
        )


async def start_sleep_pool(
    activator: ActivatorFactory,
    tmp_path: Path,
    *,
    models: dict[str, dict[str, Any]],
    host_memory: str = "64GiB",
    gpus: int = 1,
    **keys: Any,
) -> SleepPool:
    """A pool `gpu` of `gpus` GPUs; `models` maps a name to sleep_model() keyword args."""
    reports = tmp_path / "memory"
    served = {m: unique(m) for m in models}
    config = {
        "pools": {"gpu": {"gpus": gpus, "host_memory": host_memory}},
        "defaults": {"min_residency": "0s", **keys},
        "models": {
            m: sleep_model(served[m], reports, pool="gpu", **args) for m, args in models.items()
        },
    }
    return SleepPool(running=await activator(config), served=served, reports=reports)


async def ask(pool: SleepPool, model: str) -> str:
    async with pool.client() as client:
        reply = await client.chat.completions.create(model=model, messages=HELLO, max_tokens=3)
    return reply.choices[0].message.content or ""


async def test_a_swap_puts_the_ready_model_to_sleep_and_wakes_it_without_a_cold_start(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(activator, tmp_path, models={"a": {}, "b": {}})
    with pool.observer() as observer:
        assert await ask(pool, "a") == "one two three"
        first_a = pool.engine("a")
        assert await ask(pool, "b") == "one two three"  # a falls asleep, b starts cold
        assert pool.running.model("a").state == "sleeping"
        assert await ask(pool, "a") == "one two three"  # b falls asleep, a wakes
        assert await ask(pool, "b") == "one two three"  # and back
    assert pool.engine("a") == first_a  # the same process: woken, never restarted
    assert pool.wakes("a", "zero") == 1 and pool.wakes("a", "sleep") == 1
    assert pool.wakes("b", "zero") == 1 and pool.wakes("b", "sleep") == 1
    assert (
        pool.sample("activator_swaps_total", pool="gpu", from_model="a", to_model="b", mode="sleep")
        == 2
    )
    assert observer.samples > 0 and observer.max_awake == 1
    pools = await (await pool.running.session.get(pool.running.url + "/admin/pools")).json()
    (view,) = pools["pools"]
    assert [s["name"] for s in view["sleeping"]] == ["a"]
    # Both engines have slept once: each keeps its weights' host memory until it stops.
    assert view["host_memory_in_use"] == 8 * GIB


async def test_level_two_wake_reloads_the_weights_so_answers_stay_right(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(
        activator, tmp_path, models={"a": {"level": 2}, "b": {"level": 2}}, host_memory="1GiB"
    )
    before = await ask(pool, "a")
    await ask(pool, "b")
    assert pool.running.model("a").state == "sleeping"
    assert pool.running.model("a").host_held == 0  # level 2 keeps nothing in host memory
    assert await ask(pool, "a") == before == "one two three"  # no "!" garbage
    assert pool.wakes("a", "sleep") == 1


async def test_a_failed_sleep_falls_back_to_a_stop_and_nothing_is_lost(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    # Without VLLM_SERVER_DEV_MODE the engine has no /sleep (404): the sleep fails.
    pool = await start_sleep_pool(activator, tmp_path, models={"a": {"dev_mode": False}, "b": {}})
    await ask(pool, "a")
    assert await ask(pool, "b") == "one two three"
    await wait_for(lambda: not pool.engine("a"), what="a's engine stopped")
    assert pool.running.model("a").state == "stopped"
    assert pool.sample("activator_sleep_duration_seconds_count", model="a", outcome="failed") == 1
    assert "sleep failed" in (pool.running.model("a").last_error or "")
    assert await ask(pool, "a") == "one two three"  # a cold start brings it back
    assert pool.wakes("a", "zero") == 2


async def test_a_failed_wake_falls_back_to_a_cold_start_and_the_held_request_is_answered(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    # a's wake takes longer than its sleep.timeout (10 s): the wake fails.
    pool = await start_sleep_pool(
        activator, tmp_path, models={"a": {"flags": ("--wake-delay", "30")}, "b": {}}
    )
    await ask(pool, "a")
    first_a = pool.engine("a")
    await ask(pool, "b")
    assert await ask(pool, "a") == "one two three"
    assert pool.engine("a") and pool.engine("a") != first_a  # a new process
    assert pool.wakes("a", "sleep", outcome="failed") == 1
    assert pool.wakes("a", "zero") == 2


async def test_requests_for_a_model_falling_asleep_are_held_not_sent(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(
        activator, tmp_path, models={"a": {"flags": ("--sleep-delay", "1")}, "b": {}}
    )
    await ask(pool, "a")
    b = asyncio.create_task(ask(pool, "b"))
    model_a = pool.running.model("a")
    await wait_for(lambda: model_a.state == "falling_asleep", what="a falling asleep")
    again = asyncio.create_task(ask(pool, "a"))
    await wait_for(lambda: model_a.queued == 1, what="the request for a is held")
    assert model_a.in_flight == 0
    assert await b == "one two three"
    assert await again == "one two three"  # after b's turn, a woke for it


async def test_a_full_host_memory_stops_the_least_recently_used_sleeper(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    # Room in host memory for one sleeping model only.
    pool = await start_sleep_pool(
        activator, tmp_path, models={"a": {}, "b": {}, "c": {}}, host_memory="4GiB"
    )
    with pool.observer() as observer:
        await ask(pool, "a")
        await ask(pool, "b")  # a sleeps
        await ask(pool, "c")  # b must sleep: a, least recently used, is stopped first
        await wait_for(lambda: pool.running.model("b").state == "sleeping", what="b asleep")
    assert pool.running.model("a").state == "stopped" and not pool.engine("a")
    assert observer.max_host <= 4 * GIB
    assert (
        pool.sample(
            "activator_scale_events_total", model="a", direction="down", reason="host_memory"
        )
        == 1
    )


async def test_an_idle_sleeping_model_is_stopped_after_its_idle_timeout(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(
        activator, tmp_path, models={"a": {"idle_timeout": "1s"}, "b": {}}
    )
    await ask(pool, "a")
    await ask(pool, "b")
    await wait_for(lambda: pool.running.model("a").state == "stopped", what="a stopped idle")
    assert not pool.engine("a")


async def test_admin_sleep_puts_a_model_to_sleep_by_hand(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(activator, tmp_path, models={"a": {}})
    await ask(pool, "a")
    async with pool.running.session.post(pool.running.url + "/admin/models/a/sleep") as resp:
        assert resp.status == 202
    await wait_for(lambda: pool.running.model("a").state == "sleeping", what="a asleep")
    assert await ask(pool, "a") == "one two three"
    assert pool.wakes("a", "sleep") == 1


async def test_admin_sleep_of_a_model_without_sleep_mode_is_a_clear_409(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    running = await activator({"models": {"m": model_config(unique("plain"))}})
    status, body, _ = await post(running, "/admin/models/m/sleep", None)
    assert status == 409
    assert "sleep" in body["error"]["message"]


async def test_the_first_start_runs_one_warm_up_request_before_clients(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(activator, tmp_path, models={"a": {}})
    await ask(pool, "a")
    url = pool.running.model("a").url
    assert url is not None
    async with pool.running.session.get(url + "/metrics") as resp:
        text = await resp.text()
    # One warm-up (max_tokens 1: finished by length) and the client's one request
    # (max_tokens 3 for a three-word prompt: finished by length too).
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total{")]
    assert all('finished_reason="length"' in ln for ln in lines), lines
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) == 2


async def test_dev_endpoints_stay_unreachable_for_clients(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await start_sleep_pool(activator, tmp_path, models={"a": {}})
    await ask(pool, "a")
    for path in ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache", "/v1/sleep"):
        status, _, _ = await post(pool.running, path, {"model": "a"})
        assert status == 404, path
    async with pool.running.session.get(pool.running.url + "/is_sleeping") as resp:
        assert resp.status == 404
    assert pool.running.model("a").state == "ready"


@pytest.mark.timeout(300)
async def test_random_interleavings_never_wake_two_at_once_nor_overflow_host_memory(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    """1,000 requests in random order and bursts across three sleep models in a 1-GPU
    pool whose host memory holds two sleepers: every request answered, never two engines
    awake at once, never more host memory held than the pool has."""
    pool = await start_sleep_pool(
        activator,
        tmp_path,
        models={"a": {"gib": 2}, "b": {"gib": 2}, "c": {"gib": 2}},
        host_memory="4GiB",
    )
    rng = random.Random(20261202)
    order = [rng.choice("abc") for _ in range(1000)]
    with pool.observer() as observer:
        async with pool.client() as client:

            async def one(model: str) -> str:
                reply = await client.chat.completions.create(
                    model=model, messages=HELLO, max_tokens=3
                )
                return reply.choices[0].message.content or ""

            answers: list[str] = []
            i = 0
            while i < len(order):
                burst = order[i : i + rng.randint(1, 40)]
                i += len(burst)
                answers += await asyncio.gather(*(one(m) for m in burst))
    assert answers == ["one two three"] * len(order)
    assert observer.max_awake == 1
    assert observer.max_host <= 4 * GIB
    for name in "abc":
        assert pool.running.model(name).in_flight == 0 and pool.running.model(name).queued == 0
