"""GPU memory packing (issue 20): several models awake on one GPU, against whole-GPU pools.

  python bench/packing.py --smoke                      # CPU stand-in engines, seconds; CI
  python bench/packing.py --engine gpu --weights-dir /tmp    # the GPU stand-in, real weights
Options: --scenario three|trace|overlap (repeatable; all by default), --requests N,
--rate R (trace), --trials N (overlap), --out DIR, --engine-python PY.

Engines: the CPU stand-in (activator.testing.fake_engine: simulated sizes, sleep and wake
take size x 0.155 s / 8 GiB, the H200's copy) or the GPU stand-in (bench/gpu_engine.py:
the weights on the GPU, a level-1 sleep copies them to pinned host memory, pinned at the
engine's start). Every engine writes a memory report (--memory-report DIR: its gpu_bytes,
weights + KV cache + context awake, the context asleep); an observer thread sums them per
GPU (the engine's CUDA_VISIBLE_DEVICES, read from /proc) and, on a GPU machine, samples
`nvidia-smi --query-gpu=memory.used`; both peaks are reported against the card.

1. three: three engines of 20 GiB of weights in a 1-GPU pool with gpu_memory (the card's
   own size), each model's footprint declared as a size; interleaved traffic after the
   three starts. Targets: 0 swaps, 3 engine processes, the peak under the card.
2. trace: Zipf popularity over 6 models of 4, 4, 8, 8, 15 and 20 GiB of weights (the
   issue's 8, 8, 16, 16, 30 and 40 GiB on an 80 GB card, halved so that the pinned host
   copies of all six fit the machine's RAM twice over: the pool declares a 40 GiB GPU),
   level-1 sleep mode, one open-loop trace (Poisson arrivals, seeded) replayed against
   the whole-GPU policy (no gpu_memory: one model awake at a time) and the memory policy
   (the pool's gpu_memory and each model's footprint), one after the other. Per policy:
   swaps, evictions, engine processes started, p50/p99 time to first byte (from each
   request's scheduled send time), GPU-seconds. Target: >= 3x fewer swaps, lower p99.
3. overlap: A awake and B asleep (level 1), both fitting on the GPU together. A is put
   to sleep (the admin API) and B's request sent at the same instant: the whole-GPU
   policy wakes B once A is asleep (sequenced), the memory policy at once (overlapped).
   B's request -> B's first byte, end to end through activator, for 8 and 20 GiB; the
   engines' own sleep and wake times and how long they overlapped. Target: 8 GiB <= 0.25 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl

from activator.testing.sleepmode.report import read_reports

GIB = 1 << 30
GPU_ENGINE = str(bl.BENCH_DIR / "gpu_engine.py")
KV_GIB = 0.5  # each engine's KV cache
CONTEXT_GIB = 1.0  # what an engine holds beyond weights and KV (CUDA context, cuBLAS)
COPY_S_PER_GIB = 0.155 / 8  # the CPU stand-in's simulated sleep/wake: the H200's copy
TRACE_SIZES = (4.0, 4.0, 8.0, 8.0, 15.0, 20.0)
TRACE_POOL_GIB = 40.0  # the 80 GB card, halved with the sizes
# Popularity rank -> model: big and small models among the popular ones.
TRACE_ORDER = (2, 5, 0, 4, 3, 1)
ZIPF_S = 1.0
SEED = 20
# The same policy timing for both policies: a short residency, a short max wait (the
# defaults, 30 s and 5 min, would make a two-minute trace measure them alone).
DEFAULTS = {"min_residency": "2s", "max_wait": "5s", "drain_timeout": "60s"}


def footprint_gib(weights_gib: float) -> float:
    return weights_gib + KV_GIB + CONTEXT_GIB


def mib(gib: float) -> str:
    return f"{round(gib * 1024)}MiB"


# ---- engines --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Engines:
    kind: str  # "stand-in" or "gpu"
    report_dir: Path
    weights_dir: Path = Path("/tmp")
    python: str = sys.executable
    startup_delay: float = 0.3  # the CPU stand-in's port stays closed this long

    def weights_file(self, gib: float) -> Path:
        return self.weights_dir / f"weights-{gib:g}gib.bin"

    def command(self, served: str, gib: float, *, sleep: bool) -> list[str]:
        common = [
            "--memory-report", str(self.report_dir), "--kv-cache-gib", f"{KV_GIB:g}",
            "--gpu-residue-gib", f"{CONTEXT_GIB:g}",
        ]  # fmt: skip
        if sleep:
            common.append("--enable-sleep-mode")
        if self.kind == "gpu":
            pin = ["--pin-host-memory", "start"] if sleep else []
            return [
                self.python, GPU_ENGINE, "--port", "{port}", "--served-model-name", served,
                "--weights", str(self.weights_file(gib)), "--disable-access-log", *pin, *common,
            ]  # fmt: skip
        delay = f"{gib * COPY_S_PER_GIB:g}"
        return bl.engine_command(
            served, "--weights-gib", f"{gib:g}", "--sleep-delay", delay, "--wake-delay", delay,
            *common, startup_delay=self.startup_delay,
        )  # fmt: skip

    def make_weights(self, sizes: set[float]) -> dict[str, float]:
        """The GPU engine's weights files, made once per size, outside every timing."""
        took: dict[str, float] = {}
        if self.kind != "gpu":
            return took
        for gib in sorted(sizes):
            path = self.weights_file(gib)
            if path.exists():
                continue
            began = time.monotonic()
            subprocess.run(
                [self.python, GPU_ENGINE, "--make-weights", str(path), "--weights-gib", f"{gib:g}"],
                check=True,
            )
            took[f"{gib:g}"] = round(time.monotonic() - began, 1)
            print(f"made {path} in {took[f'{gib:g}']} s", flush=True)
        return took


def model_block(
    engines: Engines, served: str, gib: float, *, sleep: bool, memory: str | None
) -> dict[str, Any]:
    block: dict[str, Any] = {
        "served_model_name": served,
        "pool": "gpu",
        "idle_timeout": "1h",
        "startup_timeout": "10m",
        "process": {
            "command": engines.command(served, gib, sleep=sleep),
            "port": 0,
            "stop_grace": "30s",
            "env": {"VLLM_SERVER_DEV_MODE": "1"},
        },
    }
    if memory is not None:
        block["gpu_memory"] = memory
    if sleep:
        block["sleep"] = {"level": 1, "host_memory": mib(gib), "timeout": "5m"}
    return block


@contextlib.contextmanager
def activator(
    engines: Engines,
    sizes: dict[str, float],
    *,
    sleep: bool,
    pool_gib: float | None,
) -> Iterator[tuple[bl.ActivatorProcess, dict[str, str]]]:
    """activator with `sizes` (model -> GiB of weights) in a 1-GPU pool; with `pool_gib`
    the memory policy (the pool's gpu_memory, each model's footprint), else whole GPUs."""
    served = {m: f"{m}-{os.getpid()}" for m in sizes}
    models = {
        m: model_block(
            engines,
            served[m],
            gib,
            sleep=sleep,
            memory=None if pool_gib is None else mib(footprint_gib(gib)),
        )
        for m, gib in sizes.items()
    }
    pool: dict[str, Any] = {"gpus": 1}
    if pool_gib is not None:
        pool["gpu_memory"] = mib(pool_gib)
    if sleep:
        pool["host_memory"] = mib(sum(sizes.values()) + 2)
    top = {"pools": {"gpu": pool}, "defaults": DEFAULTS}
    with bl.activator_process(models, top=top, ready_timeout=60.0) as running:
        yield running, served


# ---- the observer -----------------------------------------------------------------------


def gpu_of(pid: int) -> str:
    """The GPU an engine was given (CUDA_VISIBLE_DEVICES), "?" when unset or unreadable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for entry in environ:
        if entry.startswith(b"CUDA_VISIBLE_DEVICES="):
            return entry.split(b"=", 1)[1].decode() or "?"
    return "?"


class Observer:
    """From outside activator: the engines' memory reports summed per GPU, every engine
    process seen, and nvidia-smi's memory.used; peaks and a timeline."""

    def __init__(self, report_dir: Path, *, interval: float = 0.01) -> None:
        self._dir = report_dir
        self._interval = interval
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._reports, daemon=True)]
        self._smi: subprocess.Popen[str] | None = None
        if bl.which("nvidia-smi"):
            self._threads.append(threading.Thread(target=self._nvidia_smi, daemon=True))
        self.pids: set[int] = set()
        self.gpus: dict[int, str] = {}
        self.peak_reported: dict[str, int] = {}
        self.peak_used_mib: dict[str, int] = {}
        self.timeline: list[tuple[float, float]] = []  # (time, reported GiB, all GPUs)
        self.smi_timeline: list[tuple[float, float]] = []  # (time, used GiB, all GPUs)
        self.began = time.time()

    def _reports(self) -> None:
        last = -1.0
        while not self._stop.is_set():
            per_gpu: dict[str, int] = {}
            for report in read_reports(self._dir):
                pid = report["pid"]
                if pid not in self.pids:
                    self.pids.add(pid)
                    self.gpus[pid] = gpu_of(pid)
                gpu = self.gpus[pid]
                per_gpu[gpu] = per_gpu.get(gpu, 0) + int(report["gpu_bytes"])
            for gpu, total in per_gpu.items():
                self.peak_reported[gpu] = max(self.peak_reported.get(gpu, 0), total)
            total_gib = sum(per_gpu.values()) / GIB
            if total_gib != last:
                self.timeline.append((time.time() - self.began, total_gib))
                last = total_gib
            self._stop.wait(self._interval)

    def _nvidia_smi(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        with subprocess.Popen(
            [*query, "-lms", "50"], stdout=subprocess.PIPE, text=True, bufsize=1
        ) as proc:
            self._smi = proc
            assert proc.stdout is not None
            batch: dict[str, int] = {}
            for line in proc.stdout:
                try:
                    index, used = (x.strip() for x in line.split(","))
                    used_mib = int(used)
                except ValueError:
                    continue
                self.peak_used_mib[index] = max(self.peak_used_mib.get(index, 0), used_mib)
                if index in batch:  # a new sample of every GPU begins
                    self.smi_timeline.append((time.time() - self.began, sum(batch.values()) / 1024))
                    batch = {}
                batch[index] = used_mib

    def __enter__(self) -> Observer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
        for thread in self._threads:
            thread.join(timeout=10)

    def summary(self, *, card_gib: float, bound_gib: float) -> dict[str, Any]:
        peak = max(self.peak_reported.values(), default=0) / GIB
        used = max(self.peak_used_mib.values(), default=0) / 1024 if self.peak_used_mib else None
        return {
            "engine_processes": len(self.pids),
            "gpus_seen": sorted(set(self.gpus.values())),
            "peak_reported_gib": round(peak, 3),
            "peak_nvidia_smi_gib": None if used is None else round(used, 3),
            "card_gib": round(card_gib, 3),
            "bound_gib": round(bound_gib, 3),
            "reported_within_bound": peak <= bound_gib + 1e-9,
            "nvidia_smi_under_card": None if used is None else used < card_gib,
        }


def card_memory_gib(kind: str) -> float:
    """The first GPU's memory (nvidia-smi); the stand-in pretends to an 80 GiB card."""
    if kind != "gpu":
        return 80.0
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0]) / 1024


# ---- activator's counters ---------------------------------------------------------------


async def counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        "swaps": bl.metric_value(text, "activator_swaps_total"),
        "evictions": bl.metric_value(text, "activator_evictions_total"),
        "evictions_sleep": bl.metric_value(text, "activator_evictions_total", mode="sleep"),
        "evictions_stop": bl.metric_value(text, "activator_evictions_total", mode="stop"),
        "starts": bl.metric_value(text, "activator_scale_events_total", direction="up"),
        "gpu_seconds": bl.metric_value(text, "activator_gpu_seconds_total"),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 3) for k in after}


async def request(session: aiohttp.ClientSession, url: str, model: str) -> float:
    return (await bl.first_byte(session, url, model))[0]


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0)
    )


# ---- 1. three engines awake on one GPU ----------------------------------------------------


async def three(engines: Engines, *, card_gib: float, rounds: int, concurrency: int) -> Any:
    sizes = {f"big{i}": 20.0 for i in (1, 2, 3)}
    with Observer(engines.report_dir) as observer:
        with activator(engines, sizes, sleep=False, pool_gib=card_gib) as (running, _):
            async with session() as client:
                began = time.monotonic()
                starts = await asyncio.gather(*(request(client, running.url, m) for m in sizes))
                started = time.monotonic() - began
                before = await counters(client, running.url)
                order = [m for _ in range(rounds) for m in sizes]
                ttfbs: list[float] = []

                async def worker(index: int) -> None:
                    for model in order[index::concurrency]:
                        ttfbs.append(await request(client, running.url, model))

                began = time.monotonic()
                await asyncio.gather(*(worker(i) for i in range(concurrency)))
                seconds = time.monotonic() - began
                after = await counters(client, running.url)
    counted = delta(after, before)
    bound = card_gib
    result = {
        "sizes_gib": sizes,
        "footprint_gib": footprint_gib(20.0),
        "pool_gpu_memory_gib": round(card_gib, 3),
        "first_requests_s": starts,
        "all_ready_s": round(started, 3),
        "requests": len(order),
        "seconds": round(seconds, 3),
        "ttfb_p50_ms": ms(bl.percentile(ttfbs, 50)),
        "ttfb_p99_ms": ms(bl.percentile(ttfbs, 99)),
        "after_starts": counted,
        "observer": observer.summary(card_gib=card_gib, bound_gib=bound),
        "timeline": observer.timeline,
        "smi_timeline": observer.smi_timeline,
    }
    result["targets"] = [
        target("swaps after the three starts", counted["swaps"], "0", counted["swaps"] == 0),
        target(
            "engine processes", result["observer"]["engine_processes"], "3",
            result["observer"]["engine_processes"] == 3,
        ),
        target(
            "observer's peak (reports) GiB", result["observer"]["peak_reported_gib"],
            f"<= {bound:.1f}", result["observer"]["reported_within_bound"],
        ),
        target(
            "nvidia-smi peak GiB", result["observer"]["peak_nvidia_smi_gib"],
            f"< {card_gib:.1f}", result["observer"]["nvidia_smi_under_card"],
        ),
    ]  # fmt: skip
    return result


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def target(what: str, measured: Any, goal: str, met: bool | None) -> dict[str, Any]:
    return {"target": what, "measured": measured, "goal": goal, "met": met}


# ---- 2. a Zipf trace, whole GPUs against memory ------------------------------------------


@dataclass
class Trace:
    at: list[float]  # seconds from the trace's start
    models: list[str]


def zipf_trace(models: list[str], *, n: int, rate: float, seed: int = SEED) -> Trace:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(models))]
    ranked = [models[i] for i in TRACE_ORDER[: len(models)]]
    at, now = [], 0.0
    for _ in range(n):
        now += rng.expovariate(rate)
        at.append(now)
    return Trace(at=at, models=rng.choices(ranked, weights=weights, k=n))


@dataclass
class Replay:
    ttfb: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def replay(client: aiohttp.ClientSession, url: str, trace: Trace, deadline: float) -> Replay:
    """Open loop: each request is sent at its time whatever the others do; its time to
    first byte counts from that scheduled time."""
    out = Replay()
    began = time.monotonic()

    async def one(at: float, model: str) -> None:
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        scheduled = began + at
        try:
            await request(client, url, model)
            out.ttfb.append(time.monotonic() - scheduled)
        except Exception as exc:  # counted and reported: the trace goes on
            out.errors.append(f"{model}: {exc!r}"[:300])

    tasks = [asyncio.ensure_future(one(a, m)) for a, m in zip(trace.at, trace.models, strict=True)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    out.errors.extend(["unanswered at the deadline"] * len(pending))
    return out


async def trace_policy(
    engines: Engines, *, memory: bool, trace: Trace, sizes: dict[str, float], deadline: float
) -> dict[str, Any]:
    pool_gib = TRACE_POOL_GIB if memory else None
    with Observer(engines.report_dir) as observer:
        with activator(engines, sizes, sleep=True, pool_gib=pool_gib) as (running, _):
            async with session() as client:
                # Warm-up, not measured: every engine's cold start (pinning its host copy),
                # then a second round that wakes each once.
                began = time.monotonic()
                for model in [*sizes, *sizes]:
                    await request(client, running.url, model)
                warm_up = time.monotonic() - began
                processes_warm = len(observer.pids)
                before = await counters(client, running.url)
                began = time.monotonic()
                replayed = await replay(client, running.url, trace, deadline)
                seconds = time.monotonic() - began
                after = await counters(client, running.url)
    counted = delta(after, before)
    card = card_memory_gib(engines.kind)
    return {
        "policy": "memory" if memory else "whole-gpu",
        "pool_gpu_memory_gib": pool_gib,
        "warm_up_s": round(warm_up, 1),
        "requests": len(trace.at),
        "answered": len(replayed.ttfb),
        "errors": len(replayed.errors),
        "error_samples": replayed.errors[:5],
        "seconds": round(seconds, 2),
        "swaps": counted["swaps"],
        "evictions": counted["evictions"],
        "evictions_by_mode": {
            "sleep": counted["evictions_sleep"],
            "stop": counted["evictions_stop"],
        },
        "starts_metric": counted["starts"],
        "cold_starts": len(observer.pids) - processes_warm,
        "engine_processes": len(observer.pids),
        "ttfb_p50_ms": ms(bl.percentile(replayed.ttfb, 50)),
        "ttfb_p99_ms": ms(bl.percentile(replayed.ttfb, 99)),
        "ttfb_max_ms": ms(max(replayed.ttfb, default=None)),
        "gpu_seconds_metric": counted["gpu_seconds"],
        "gpu_seconds_wall": round(seconds * 1, 2),  # one GPU held throughout
        "ttfb_s": [round(x, 4) for x in replayed.ttfb],
        "observer": observer.summary(card_gib=card, bound_gib=TRACE_POOL_GIB if memory else card),
    }


async def trace_both(engines: Engines, *, n: int, rate: float) -> dict[str, Any]:
    names = ["s4a", "s4b", "m8a", "m8b", "l15", "x20"]
    sizes = dict(zip(names, TRACE_SIZES, strict=True))
    trace = zipf_trace(names, n=n, rate=rate)
    deadline = trace.at[-1] + 60.0
    runs = [
        await trace_policy(engines, memory=memory, trace=trace, sizes=sizes, deadline=deadline)
        for memory in (False, True)
    ]
    whole, packed = runs
    ratio = whole["swaps"] / packed["swaps"] if packed["swaps"] else None
    fewer = whole["swaps"] >= 3 * packed["swaps"] and whole["swaps"] > 0
    return {
        "sizes_gib": sizes,
        "footprints_gib": {m: footprint_gib(g) for m, g in sizes.items()},
        "popularity": {m: trace.models.count(m) for m in names},
        "rate_per_s": rate,
        "zipf_s": ZIPF_S,
        "defaults": DEFAULTS,
        "runs": runs,
        "swap_ratio": None if ratio is None else round(ratio, 2),
        "targets": [
            target("swaps whole-gpu / memory", round(ratio, 2) if ratio else (
                f"{whole['swaps']:g} / 0"), ">= 3x", fewer),
            target("p99 TTFB ms, memory vs whole-gpu",
                   f"{packed['ttfb_p99_ms']} vs {whole['ttfb_p99_ms']}", "lower",
                   None if None in (packed["ttfb_p99_ms"], whole["ttfb_p99_ms"])
                   else packed["ttfb_p99_ms"] < whole["ttfb_p99_ms"]),
        ],
    }  # fmt: skip


# ---- 3. an overlapped swap ------------------------------------------------------------------


async def timings(client: aiohttp.ClientSession, engine: str, *, since: float) -> list[Any]:
    async with client.get(engine + "/debug/timings") as resp:
        calls: list[Any] = (await resp.json())["calls"]
    return [c for c in calls if c["at"] >= since]


async def state_of(client: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    async with client.get(f"{url}/admin/models/{model}") as resp:
        described: dict[str, Any] = await resp.json()
        return described


async def until_state(client: aiohttp.ClientSession, url: str, model: str, state: str) -> None:
    deadline = time.monotonic() + 300
    while (await state_of(client, url, model))["state"] != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} never reached {state}")
        await asyncio.sleep(0.02)


async def sleep_by_hand(client: aiohttp.ClientSession, url: str, model: str) -> None:
    async with client.post(f"{url}/admin/models/{model}/sleep") as resp:
        if resp.status != 202:
            raise RuntimeError(f"sleep {model}: HTTP {resp.status} {await resp.text()}")


async def overlap_policy(
    engines: Engines, *, gib: float, memory: bool, trials: int, card_gib: float
) -> dict[str, Any]:
    sizes = {"a": gib, "b": gib}
    pool_gib = card_gib if memory else None
    rows = []
    with Observer(engines.report_dir) as observer:
        with activator(engines, sizes, sleep=True, pool_gib=pool_gib) as (running, _):
            url = running.url
            async with session() as client:
                # Warm-up: both started (host copies pinned), then a slept, b awake.
                for model in ("a", "b", "a", "b"):
                    await request(client, url, model)
                if (await state_of(client, url, "a"))["state"] != "sleeping":
                    await sleep_by_hand(client, url, "a")
                    await until_state(client, url, "a", "sleeping")
                old, new = "b", "a"
                for _ in range(trials):
                    old_engine = (await state_of(client, url, old))["upstream_url"]
                    since = time.time()
                    _, took = await asyncio.gather(
                        sleep_by_hand(client, url, old), request(client, url, new)
                    )
                    await until_state(client, url, old, "sleeping")
                    new_engine = (await state_of(client, url, new))["upstream_url"]
                    warm = await request(client, url, new)
                    slept = [c for c in await timings(client, old_engine, since=since)
                             if c["op"] == "sleep"]  # fmt: skip
                    woke = [c for c in await timings(client, new_engine, since=since)
                            if c["op"] == "wake_up"]  # fmt: skip
                    rows.append(trial_row(took, warm, slept, woke))
                    old, new = new, old
    return {
        "policy": "memory" if memory else "whole-gpu",
        "weights_gib": gib,
        "pool_gpu_memory_gib": None if pool_gib is None else round(pool_gib, 3),
        "trials": rows,
        "first_byte_median_s": bl.median([r["first_byte_s"] for r in rows]),
        "overlap_median_s": bl.median([r["overlap_s"] for r in rows if r["overlap_s"] is not None]),
        "observer": observer.summary(card_gib=card_gib, bound_gib=card_gib),
    }


def trial_row(took: float, warm: float, slept: list[Any], woke: list[Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"first_byte_s": round(took, 4), "warm_s": round(warm, 4)}
    if slept and woke:
        s, w = slept[-1], woke[-1]
        s_start, w_start = s["at"] - s["seconds"], w["at"] - w["seconds"]
        row.update(
            engine_sleep_s=s["seconds"],
            engine_wake_s=w["seconds"],
            overlap_s=round(max(0.0, min(s["at"], w["at"]) - max(s_start, w_start)), 4),
            wake_after_sleep_began_s=round(w_start - s_start, 4),
        )
    else:
        row.update(engine_sleep_s=None, engine_wake_s=None, overlap_s=None)
    return row


async def overlap_all(
    engines: Engines, *, sizes: list[float], trials: int, card_gib: float
) -> dict[str, Any]:
    runs = [
        await overlap_policy(engines, gib=gib, memory=memory, trials=trials, card_gib=card_gib)
        for gib in sizes
        for memory in (False, True)
    ]
    return overlap_targets(runs)


def overlap_targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    eight = next((r for r in runs if r["policy"] == "memory" and r["weights_gib"] == 8.0), None)
    measured = None if eight is None else eight["first_byte_median_s"]
    return {
        "runs": runs,
        "targets": [
            target("8 GiB overlapped swap, B's request -> first byte (median s)",
                   None if measured is None else round(measured, 4), "<= 0.25",
                   None if measured is None else measured <= 0.25),
        ],
    }  # fmt: skip


# ---- report -----------------------------------------------------------------------------


def report(data: dict[str, Any], *, smoke: bool) -> str:
    parts = []
    if "three" in data:
        t = data["three"]
        parts.append("1. three engines of 20 GiB on one GPU")
        parts.append(bl.table(
            ["requests", "swaps", "evictions", "engines", "peak reports GiB", "peak smi GiB",
             "card GiB", "p50 ms", "p99 ms"],
            [[str(t["requests"]), f"{t['after_starts']['swaps']:g}",
              f"{t['after_starts']['evictions']:g}", str(t["observer"]["engine_processes"]),
              bl.fmt(t["observer"]["peak_reported_gib"]),
              bl.fmt(t["observer"]["peak_nvidia_smi_gib"]), bl.fmt(t["observer"]["card_gib"]),
              bl.fmt(t["ttfb_p50_ms"]), bl.fmt(t["ttfb_p99_ms"])]],
        ))  # fmt: skip
    if "trace" in data:
        parts.append("2. Zipf trace over 6 models, one GPU")
        parts.append(bl.table(
            ["policy", "requests", "errors", "swaps", "evictions", "cold starts",
             "p50 ms", "p99 ms", "GPU-s (metric)", "GPU-s (wall)", "peak reports GiB"],
            [[r["policy"], str(r["requests"]), str(r["errors"]), f"{r['swaps']:g}",
              f"{r['evictions']:g}", str(r["cold_starts"]), bl.fmt(r["ttfb_p50_ms"]),
              bl.fmt(r["ttfb_p99_ms"]), bl.fmt(r["gpu_seconds_metric"], 1),
              bl.fmt(r["gpu_seconds_wall"], 1), bl.fmt(r["observer"]["peak_reported_gib"])]
             for r in data["trace"]["runs"]],
        ))  # fmt: skip
    if "overlap" in data:
        parts.append("3. a swap where both fit: sequenced (whole-gpu) against overlapped (memory)")
        rows = []
        for r in data["overlap"]["runs"]:
            trials = r["trials"]
            rows.append([
                f"{r['weights_gib']:g}", r["policy"], str(len(trials)),
                bl.fmt(ms(r["first_byte_median_s"])),
                bl.fmt(ms(bl.median([t["engine_sleep_s"] for t in trials
                                     if t["engine_sleep_s"] is not None]))),
                bl.fmt(ms(bl.median([t["engine_wake_s"] for t in trials
                                     if t["engine_wake_s"] is not None]))),
                bl.fmt(ms(r["overlap_median_s"])),
            ])  # fmt: skip
        parts.append(bl.table(
            ["GiB", "policy", "trials", "first byte ms", "engine sleep ms", "engine wake ms",
             "overlap ms"], rows,
        ))  # fmt: skip
    targets = [t for key in ("three", "trace", "overlap") if key in data
               for t in data[key]["targets"]]  # fmt: skip
    parts.append(bl.table(
        ["target", "measured", "goal", "verdict"],
        [[t["target"], str(t["measured"]), t["goal"], bl.verdict(t["met"], smoke=smoke)]
         for t in targets],
    ))  # fmt: skip
    return "\n\n".join(parts)


def plot(data: dict[str, Any], path: Path) -> None:
    plt = bl.pyplot()
    panels = [k for k in ("three", "trace", "overlap") if k in data]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "three":
            t = data["three"]
            if t["timeline"]:
                xs, ys = zip(*t["timeline"], strict=True)
                ax.step(xs, ys, where="post", label="engines' reports")
            if t["smi_timeline"]:
                xs, ys = zip(*t["smi_timeline"], strict=True)
                ax.plot(xs, ys, label="nvidia-smi memory.used")
            ax.axhline(t["observer"]["card_gib"], color="red", linestyle="--", label="card")
            ax.set_xlabel("seconds")
            ax.set_ylabel("GiB on the GPU")
            ax.set_title("1. three 20 GiB engines awake on one GPU")
            ax.legend()
        elif key == "trace":
            for r in data["trace"]["runs"]:
                values = sorted(r["ttfb_s"])
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    label = f"{r['policy']}: {r['swaps']:g} swaps, p99 {r['ttfb_p99_ms']} ms"
                    ax.plot([v * 1000 for v in values], ys, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("time to first byte, ms (log)")
            ax.set_ylabel("share of requests")
            ax.set_title("2. Zipf trace over 6 models, one GPU")
            ax.legend()
        else:
            runs = data["overlap"]["runs"]
            labels = [f"{r['weights_gib']:g} GiB\n{r['policy']}" for r in runs]
            values = [(r["first_byte_median_s"] or 0) * 1000 for r in runs]
            ax.bar(labels, values, color=["tab:gray" if r["policy"] == "whole-gpu"
                                          else "tab:blue" for r in runs])  # fmt: skip
            ax.axhline(250, color="red", linestyle="--", label="target for 8 GiB")
            ax.set_ylabel("B's request -> first byte, ms (median)")
            ax.set_title("3. A leaving, B arriving")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU stand-in, seconds; CI")
    parser.add_argument("--engine", choices=("stand-in", "gpu"), default="stand-in")
    parser.add_argument(
        "--scenario", action="append", choices=("three", "trace", "overlap"), default=None
    )
    parser.add_argument("--requests", type=int, default=2000, help="trace: requests")
    parser.add_argument("--rate", type=float, default=25.0, help="trace: requests per second")
    parser.add_argument("--rounds", type=int, default=100, help="three: rounds of 3 requests")
    parser.add_argument("--trials", type=int, default=6, help="overlap: swaps per policy")
    parser.add_argument("--overlap-gib", default="8,20", help="overlap: sizes")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--engine-python", default=sys.executable)
    parser.add_argument("--name", default=None, help="results file name (packing[-smoke])")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--resume", action="store_true", help="add to the results file (runs split over calls)"
    )
    args = parser.parse_args(argv)
    scenarios = args.scenario or ["three", "trace", "overlap"]
    if args.smoke:
        args.engine = "stand-in"
        args.requests, args.rate, args.rounds, args.trials = 30, 30.0, 3, 1
        args.overlap_gib = "8"
    name = args.name or ("packing-smoke" if args.smoke else "packing")
    overlap_sizes = [float(x) for x in str(args.overlap_gib).split(",")]
    with tempfile.TemporaryDirectory(prefix="packing-reports-") as reports:
        engines = Engines(
            kind=args.engine,
            report_dir=Path(reports),
            weights_dir=args.weights_dir,
            python=args.engine_python,
        )
        card = card_memory_gib(args.engine)
        data: dict[str, Any] = {
            "benchmark": "packing",
            "command": " ".join(["python", "bench/packing.py", *(argv or sys.argv[1:])]),
            "machine": {**bl.machine(), "engine": args.engine, "card_gib": round(card, 3),
                        "gpu": gpu_name() if args.engine == "gpu" else None},
            "kv_cache_gib": KV_GIB,
            "context_gib": CONTEXT_GIB,
        }  # fmt: skip
        previous = (args.out or bl.RESULTS_DIR) / f"{name}.json"
        if args.resume and previous.exists():
            kept = json.loads(previous.read_text())
            data = {**kept, **data, "command": f"{kept['command']}; {data['command']}"}
        needed = {20.0} if "three" in scenarios else set()
        needed |= set(TRACE_SIZES) if "trace" in scenarios else set()
        needed |= set(overlap_sizes) if "overlap" in scenarios else set()
        made = engines.make_weights(needed)
        data["weights_made_s"] = {**data.get("weights_made_s", {}), **made}
        for scenario in scenarios:
            began = time.monotonic()
            if scenario == "three":
                data["three"] = asyncio.run(
                    three(engines, card_gib=card, rounds=args.rounds, concurrency=6)
                )
            elif scenario == "trace":
                data["trace"] = asyncio.run(trace_both(engines, n=args.requests, rate=args.rate))
            else:
                done = asyncio.run(
                    overlap_all(engines, sizes=overlap_sizes, trials=args.trials, card_gib=card)
                )
                if "overlap" in data:  # --resume: other sizes, run earlier
                    done = overlap_targets(data["overlap"]["runs"] + done["runs"])
                data["overlap"] = done
            print(f"{scenario}: {time.monotonic() - began:.1f} s", flush=True)
            bl.write_results(name, data, out_dir=args.out)  # kept if a later one fails
    bl.publish(name, data, out_dir=args.out, draw=lambda png: plot(data, png),
               report=report(data, smoke=args.smoke))  # fmt: skip
    return 0


def gpu_name() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    return None


if __name__ == "__main__":
    sys.exit(main())
