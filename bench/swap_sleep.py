"""Sleep-mode swaps for bench/swap.py: what a swap costs when the pool puts the model it
swaps out to sleep (vLLM sleep mode) and wakes the one asked for, against the stop and
cold start of the same engines.

Engines: the CPU stand-in (activator.testing.fake_engine: sleep and wake take the
simulated --sleep-delay/--wake-delay) or the GPU stand-in (bench/gpu_engine.py: real
weights of --weights-gib on the GPU, a level-1 sleep copies them to pinned host memory
and a wake copies them back). Both list their own sleep and wake times at
GET /debug/timings, which is how the engine's part is told from activator's.

Per trial (A ready, B asleep; one streaming request for B):
    first byte   = B's request -> B's first byte, end to end through activator
    engine       = A's /sleep + B's wake calls, as the engines timed them
    warm         = the next request for B, now awake (the engine's own TTFB + relay)
    overhead     = first byte - engine - warm: activator's part (decide, drain an idle
                   model, call the sleep API and confirm with /is_sleeping, release)
In stop mode the same request costs A's stop and B's cold start (process spawn, import,
weights from disk); the end-to-end first byte is compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl

POOL = "gpu"
A, B = "coder-chat", "coder-fim"
GPU_ENGINE = str(bl.BENCH_DIR / "gpu_engine.py")
WAKE_OPS = ("wake_up", "reload_weights")


@dataclass(frozen=True, kw_only=True)
class Engines:
    kind: str  # "stand-in" or "gpu"
    gib: float  # weights of each model
    device: str = "cuda"
    weights_dir: Path = Path("/tmp")
    startup_delay: float = 2.0  # stand-in: port closed this long (a cold start)
    sleep_delay: float = 0.155  # stand-in: seconds a sleep / wake takes (8 GB on the H200)
    wake_delay: float = 0.155
    python: str = sys.executable

    def weights_file(self) -> Path:
        return self.weights_dir / f"weights-{self.gib:g}gib.bin"

    def command(self, served: str) -> list[str]:
        if self.kind == "gpu":
            return [
                self.python, GPU_ENGINE, "--port", "{port}", "--served-model-name", served,
                "--weights", str(self.weights_file()), "--weights-gib", f"{self.gib:g}",
                "--device", self.device, "--enable-sleep-mode", "--disable-access-log",
            ]  # fmt: skip
        return bl.engine_command(
            served,
            "--enable-sleep-mode",
            "--weights-gib", f"{self.gib:g}",
            "--sleep-delay", f"{self.sleep_delay:g}",
            "--wake-delay", f"{self.wake_delay:g}",
            startup_delay=self.startup_delay,
        )  # fmt: skip


def models_config(engines: Engines, *, sleep: bool, served: dict[str, str]) -> dict[str, Any]:
    gib = f"{engines.gib:g}GiB"
    models: dict[str, Any] = {}
    for m in (A, B):
        block: dict[str, Any] = {
            "served_model_name": served[m],
            "pool": POOL,
            "idle_timeout": "1h",
            "startup_timeout": "10m",
            "process": {
                "command": engines.command(served[m]),
                "port": 0,
                "stop_grace": "20s",
                "env": {"VLLM_SERVER_DEV_MODE": "1"},
            },
        }
        if sleep:
            # The first sleep pins the host buffer (seconds per 10 GB): a long timeout.
            block["sleep"] = {"level": 1, "host_memory": gib, "timeout": "5m"}
        models[m] = block
    return models


@contextlib.contextmanager
def pooled(
    engines: Engines, *, sleep: bool
) -> Iterator[tuple[bl.ActivatorProcess, dict[str, str]]]:
    served = {m: f"{m}-{'sleep' if sleep else 'stop'}-{os.getpid()}" for m in (A, B)}
    host = 2 * engines.gib + 1
    with bl.activator_process(
        models_config(engines, sleep=sleep, served=served),
        top={
            "pools": {POOL: {"gpus": 1, "host_memory": f"{host:g}GiB"}},
            # A swap waits only for what the policy asks: no residency to sit out.
            "defaults": {"min_residency": "0s", "max_wait": "10ms", "drain_timeout": "60s"},
        },
        ready_timeout=60.0,
    ) as running:
        yield running, served


async def first_byte(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """Seconds from sending one streaming request to its first body byte."""
    return (await bl.first_byte(session, url, model))[0]


async def engine_url(session: aiohttp.ClientSession, url: str, model: str) -> str:
    async with session.get(f"{url}/admin/models/{model}") as resp:
        found: str | None = (await resp.json())["upstream_url"]
    if found is None:
        raise RuntimeError(f"{model} has no engine")
    return found


async def engine_calls(session: aiohttp.ClientSession, url: str, *, since: float) -> list[Any]:
    async with session.get(url + "/debug/timings") as resp:
        calls: list[Any] = (await resp.json())["calls"]
    return [c for c in calls if c["at"] >= since]


@dataclass
class SleepTrial:
    to_model: str
    first_byte: float
    engine_sleep: float  # the old model's /sleep, as its engine timed it
    engine_wake: float  # the new model's wake calls, as its engine timed them
    warm: float  # the next request, the model awake
    overhead: float


async def sleep_trials(url: str, n: int) -> list[SleepTrial]:
    trials: list[SleepTrial] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        # Warm-up, not measured: both cold starts, and each engine's first sleep (which
        # pins its host buffer) and first wake.
        for model in (A, B, A, B, A):
            await first_byte(session, url, model)
        for i in range(n):
            old, new = (A, B) if i % 2 == 0 else (B, A)
            old_engine = await engine_url(session, url, old)
            since = time.time()
            took = await first_byte(session, url, new)
            new_engine = await engine_url(session, url, new)
            slept = [c for c in await engine_calls(session, old_engine, since=since)
                     if c["op"] == "sleep"]  # fmt: skip
            woke = [c for c in await engine_calls(session, new_engine, since=since)
                    if c["op"] in WAKE_OPS]  # fmt: skip
            if not slept or not woke:
                raise RuntimeError(f"trial {i}: no engine timing (sleep {slept}, wake {woke})")
            warm = await first_byte(session, url, new)
            engine_sleep = sum(c["seconds"] for c in slept)
            engine_wake = sum(c["seconds"] for c in woke)
            trials.append(
                SleepTrial(
                    to_model=new,
                    first_byte=took,
                    engine_sleep=engine_sleep,
                    engine_wake=engine_wake,
                    warm=warm,
                    overhead=took - engine_sleep - engine_wake - warm,
                )
            )
    return trials


async def stop_trials(url: str, n: int) -> list[float]:
    """First-byte seconds of swaps by stop and cold start (no sleep configured)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await first_byte(session, url, A)
        return [await first_byte(session, url, (B, A)[i % 2]) for i in range(n)]


def summarize(trials: list[SleepTrial], stops: list[float]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float | None]:
        return {
            "median": bl.median(values),
            "p90": bl.percentile(values, 90),
            "min": min(values) if values else None,
            "max": max(values) if values else None,
        }

    keys = ("first_byte", "engine_sleep", "engine_wake", "warm", "overhead")
    summary: dict[str, Any] = {k: stats([getattr(t, k) for t in trials]) for k in keys}
    summary["stop_first_byte"] = stats(stops)
    sleep_median, stop_median = (
        summary["first_byte"]["median"],
        summary["stop_first_byte"]["median"],
    )
    summary["speedup"] = stop_median / sleep_median if sleep_median and stop_median else None
    return summary


async def measure(engines: Engines, *, trials: int, stop_trials_n: int) -> dict[str, Any]:
    with pooled(engines, sleep=True) as (running, _):
        sleep_results = await sleep_trials(running.url, trials)
    with pooled(engines, sleep=False) as (running, _):
        stops = await stop_trials(running.url, stop_trials_n)
    return {
        "engines": {
            "kind": engines.kind,
            "weights_gib": engines.gib,
            "device": engines.device if engines.kind == "gpu" else None,
            "sleep_delay": engines.sleep_delay if engines.kind != "gpu" else None,
            "wake_delay": engines.wake_delay if engines.kind != "gpu" else None,
            "startup_delay": engines.startup_delay if engines.kind != "gpu" else None,
        },
        "trials": [t.__dict__ for t in sleep_results],
        "stop_first_bytes": stops,
        "summary": summarize(sleep_results, stops),
    }


def make_weights(engines: Engines) -> None:
    """The GPU engine's weights file, made once per size (outside every timed start)."""
    if engines.kind != "gpu" or engines.weights_file().exists():
        return
    import subprocess

    subprocess.run(
        [engines.python, GPU_ENGINE, "--make-weights", str(engines.weights_file()),
         "--weights-gib", f"{engines.gib:g}", "--device", engines.device],
        check=True,
    )  # fmt: skip


def run_sleep_mode(engines: Engines, *, trials: int, stop_trials_n: int) -> dict[str, Any]:
    make_weights(engines)
    return asyncio.run(measure(engines, trials=trials, stop_trials_n=stop_trials_n))
