"""GPU memory packing end to end: several models awake on one GPU, memory-aware eviction,
no needless swaps (docs/pools.md, "Packing several models on one GPU").

Stand-in engines run with vLLM's sleep API and keep a memory report each, with the GPUs
activator placed them on (CUDA_VISIBLE_DEVICES) and the bytes they hold. An observer
thread sums the reports per GPU throughout: "no GPU over its memory" is a fact about
the engines, not about what activator believes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from activator.engine.memory_errors import memory_verdict
from activator.testing.sleepmode import read_reports
from tests.conftest import ActivatorFactory
from tests.harness import Sampler, chat, engine_pids, post, unique
from tests.test_sleep_mode import GIB, SleepPool, ask, sleep_model

CARD = 24 * GIB  # the reference platform's L4


class PerGpuObserver(Sampler):
    """The most any GPU held at one sampled moment, and the most models awake at once."""

    def __init__(self, reports: Path, served: set[str]) -> None:
        super().__init__(name="gpu-observer")
        self._reports = reports
        self._served = served
        self.peak: dict[str, int] = {}
        self.most_awake = 0
        self.samples = 0

    def sample(self) -> None:
        ours = [
            r for r in read_reports(self._reports) if r.get("served_model_name") in self._served
        ]
        per_gpu: dict[str, int] = {}
        for report in ours:
            # An engine on several GPUs holds its footprint on each of them.
            for gpu in str(report.get("cuda_visible_devices") or "unplaced").split(","):
                per_gpu[gpu] = per_gpu.get(gpu, 0) + int(report.get("gpu_bytes", 0))
        for gpu, used in per_gpu.items():
            self.peak[gpu] = max(self.peak.get(gpu, 0), used)
        self.most_awake = max(self.most_awake, sum(r.get("state") != "sleeping" for r in ours))
        self.samples += 1


async def packed_pool(
    activator: ActivatorFactory,
    tmp_path: Path,
    *,
    models: dict[str, dict[str, Any]],
    gpus: int = 1,
) -> SleepPool:
    """A pool `gpu` of `gpus` 24 GiB GPUs; `models` maps a name to (share, weights GiB,
    and sleep_model() keys). The share is the engine's --gpu-memory-utilization, which
    activator reads from the command."""
    reports = tmp_path / "memory"
    served = {m: unique(m) for m in models}
    config: dict[str, Any] = {
        "pools": {"gpu": {"gpus": gpus, "gpu_memory": "24GiB", "host_memory": "64GiB"}},
        "defaults": {"min_residency": "0s"},
        "models": {},
    }
    for name, spec in models.items():
        spec = dict(spec)
        share = spec.pop("share")
        sleeps = spec.pop("sleeps", True)
        flags = ("--gpu-memory-utilization", str(share), "--kv-cache-gib", "1")
        flags += spec.pop("flags", ())
        cfg = sleep_model(served[name], reports, pool="gpu", flags=flags, **spec)
        if not sleeps:
            cfg.pop("sleep")
        config["models"][name] = cfg
    return SleepPool(running=await activator(config), served=served, reports=reports)


def sum_of(of: SleepPool, metric: str, **labels: str) -> float:
    return of.running.sample(metric, **labels)


async def test_two_models_that_fit_one_gpu_stay_awake_side_by_side(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    # The reference platform: two coder models at 0.45 of one 24 GiB L4 (8 + 1 GiB each).
    pool = await packed_pool(
        activator,
        tmp_path,
        models={"coder-chat": {"share": 0.45, "gib": 8}, "coder-fim": {"share": 0.45, "gib": 8}},
    )
    observer = PerGpuObserver(pool.reports, set(pool.served.values()))
    with observer:
        for _ in range(4):  # alternating traffic: each turn would be a swap on whole GPUs
            await ask(pool, "coder-chat")
            await ask(pool, "coder-fim")
    assert observer.samples > 0
    assert observer.most_awake == 2  # both engines awake at once
    assert all(used <= CARD for used in observer.peak.values()), observer.peak
    assert sum_of(pool, "activator_evictions_total", pool="gpu", reason="swap", mode="sleep") == 0
    assert sum_of(pool, "activator_evictions_total", pool="gpu", reason="swap", mode="stop") == 0
    for model in pool.served:
        assert len(pool.engine(model)) == 1  # one engine each: no restart
        assert pool.wakes(model, "zero") == 1  # one cold start each, and no other wake
        assert pool.wakes(model, "sleep") == 0
    committed = sum_of(pool, "activator_pool_gpu_memory_committed_ratio", pool="gpu", gpu="0")
    assert committed == pytest.approx(0.9)
    async with pool.running.session.get(pool.running.url + "/admin/pools") as resp:
        (described,) = [p for p in (await resp.json())["pools"] if p["name"] == "gpu"]
    (gpu,) = described["memory"]
    assert {m["name"] for m in gpu["models"]} == {"coder-chat", "coder-fim"}
    assert gpu["committed"] == 0.9 and gpu["free"] == 0.1


async def test_where_two_of_three_fit_the_model_cheapest_to_bring_back_leaves(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    # a and b sleep (back from sleep at once); c has no sleep mode: coming back is a cold
    # start, which the pool measures (2 s here). Any two fit; the third needs one of the
    # others to leave.
    pool = await packed_pool(
        activator,
        tmp_path,
        models={
            "a": {"share": 0.45, "gib": 8},
            "b": {"share": 0.45, "gib": 8},
            "c": {"share": 0.45, "gib": 8, "sleeps": False, "flags": ("--startup-delay", "2")},
        },
    )
    observer = PerGpuObserver(pool.reports, set(pool.served.values()))
    with observer:
        await ask(pool, "c")
        await ask(pool, "a")
        await ask(pool, "b")  # room for b: a (a sleeper) leaves, c (a cold start) stays
        await ask(pool, "c")
    assert all(used <= CARD for used in observer.peak.values()), observer.peak
    assert sum_of(pool, "activator_swaps_total", pool="gpu", from_model="a", to_model="b") == 1
    assert sum_of(pool, "activator_evictions_total", pool="gpu", reason="swap", mode="sleep") == 1
    assert sum_of(pool, "activator_evictions_total", pool="gpu", reason="swap", mode="stop") == 0
    assert len(pool.engine("c")) == 1 and pool.wakes("c", "zero") == 1  # never stopped


async def test_a_two_gpu_model_beside_small_ones_never_overfills_a_gpu(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    pool = await packed_pool(
        activator,
        tmp_path,
        gpus=2,
        models={
            "x": {"share": 0.45, "gib": 8},
            "y": {"share": 0.45, "gib": 8},
            "big": {"share": 0.6, "gib": 12, "gpus": 2},
        },
    )
    observer = PerGpuObserver(pool.reports, set(pool.served.values()))
    with observer:
        for model in ("x", "y", "big", "x", "big", "y"):
            await ask(pool, model)
    assert observer.samples > 0
    assert set(observer.peak) <= {"0", "1"}  # every engine was placed
    assert all(used <= CARD for used in observer.peak.values()), observer.peak
    # big ran on both GPUs of the pool.
    big = [r for r in read_reports(pool.reports) if r["served_model_name"] == pool.served["big"]]
    assert all(r["cuda_visible_devices"] == "0,1" for r in big)
    assert engine_pids(pool.served["big"])


async def test_an_engine_refused_its_share_of_the_gpu_is_logged_loudly(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # vLLM's own words when its share of the card is not free at start.
    said = (
        "ValueError: Free memory on device (1.2/23.6 GiB) on startup is less than desired "
        "GPU memory utilization (0.45, 10.62 GiB)."
    )
    config = {
        "pools": {"gpu": {"gpus": 1, "gpu_memory": "24GiB"}},
        "models": {
            "m": {
                "pool": "gpu",
                "gpu_memory": 0.45,
                "process": {"command": ["sh", "-c", f"echo '{said}' {{port}}; exit 1"]},
            }
        },
    }
    running = await activator(config)
    caplog.set_level(logging.INFO, logger="activator")
    status, body, _ = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 503, body
    loud = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    loud = [m for m in loud if "GPU memory" in m]
    assert loud and "less free memory than this model's share" in loud[0], body


@pytest.mark.parametrize(
    ("line", "meaning"),
    [
        (
            "ValueError: Free memory on device ... is less than desired GPU memory utilization",
            "less free memory",
        ),
        ("AssertionError: Error in memory profiling. Initial free memory 82.94 GiB", "released"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "ran out"),
        ("INFO 12-07 serving on 0.0.0.0:8000", None),
    ],
)
def test_what_an_engine_says_about_gpu_memory(line: str, meaning: str | None) -> None:
    verdict = memory_verdict(["starting", line])
    assert (verdict is None) if meaning is None else (meaning in (verdict or ""))
