"""Swap: two models share a 1-GPU pool; what does activator add to a swap?

  python bench/swap.py            # 10 swaps, 2 s engine starts, 12 alternating rounds
  python bench/swap.py --smoke    # seconds; CI
Options: --trials N  --rounds R  --concurrency C  --startup-delay S  --out DIR

Sleep mode (vLLM's sleep API; bench/swap_sleep.py has the details):
  python bench/swap.py --mode sleep                       # stand-in engines, 8 GiB simulated
  python bench/swap.py --mode sleep --engine gpu --weights-gib 8,20 --weights-dir /data
      # the GPU stand-in (bench/gpu_engine.py) with real weights: sleep swaps against stop +
      # cold start of the same engines, and activator's overhead over the engines' own wake

The reference platform: coder-chat and coder-fim on one L4 (`pools: {l4: {gpus: 1}}`)
behind LiteLLM, here on stand-in engines that keep their port closed for --startup-delay
seconds, as vLLM does while it loads. Activator runs as a subprocess (`activator serve`,
uvloop).

Swap overhead, per trial: A is ready and idle; one streaming request for B is sent.
    overhead = (B's first byte - B's request) - (A's stop time + B's start time)
A's stop time runs from A's engine logging that it got SIGTERM (`shutting down`, a
millisecond wall-clock stamp) to A's process being gone; B's start time from B's
process appearing to its engine logging `serving` (its port open). Process appearance
and exit come from a thread of this script polling /proc every millisecond, outside
activator. What is left is activator's own part: deciding and signalling, reaping A and
spawning B, and noticing B is ready and relaying the first byte. activator's own view
(its wake duration for B) is reported beside it.

Alternating load: R rounds of C concurrent requests, each round for the other model
(every round is a swap), against the same rounds all for one model (no swap).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
import swap_sleep

POOL = "l4"
A, B = "coder-chat", "coder-fim"
ENGINE = "activator.testing.fake_engine"


# ---- the engine processes, seen from outside --------------------------------------------


class ProcessWatch:
    """Wall-clock times engines (by served name) appear and disappear, from /proc."""

    def __init__(self, served: set[str], *, interval: float = 0.001) -> None:
        self._served = served
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)
        self.events: list[tuple[float, str, str]] = []  # (time, served, "up" | "down")

    def _alive(self) -> dict[int, str]:
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                if ENGINE not in argv:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except OSError:
                continue
            for name in self._served.intersection(argv):
                found[int(entry)] = name
        return found

    def _run(self) -> None:
        seen: dict[int, str] = {}
        while not self._stop.is_set():
            now_alive = self._alive()
            now = time.time()
            for pid, name in now_alive.items():
                if pid not in seen:
                    self.events.append((now, name, "up"))
            for pid, name in seen.items():
                if pid not in now_alive:
                    self.events.append((now, name, "down"))
            seen = now_alive
            self._stop.wait(self._interval)

    def first(self, served: str, kind: str, *, after: float) -> float | None:
        return next(
            (t for t, n, k in list(self.events) if n == served and k == kind and t >= after),
            None,
        )

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def log_stamp(lines: list[str], marker: str) -> float | None:
    """Wall-clock time of the last engine log line containing `marker`
    ("INFO 2026-11-20 10:11:12,345 [fake-engine] ..."; millisecond resolution)."""
    for line in reversed(lines):
        if marker in line:
            parts = line.split()
            stamp = dt.datetime.strptime(f"{parts[1]} {parts[2]}", "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


# ---- activator with a pool --------------------------------------------------------------


@contextlib.contextmanager
def pooled_activator(startup_delay: float) -> Iterator[tuple[bl.ActivatorProcess, dict[str, str]]]:
    """activator serve with A and B in one 1-GPU pool; yields it and model -> served name."""
    served = {m: f"{m}-bench-{os.getpid()}" for m in (A, B)}
    models = {
        m: {
            "served_model_name": served[m],
            "pool": POOL,
            "gpus": 1,
            "idle_timeout": "1h",
            "process": {
                "command": bl.engine_command(served[m], startup_delay=startup_delay),
                "port": 0,
                "stop_grace": "10s",
            },
        }
        for m in (A, B)
    }
    top = {
        "pools": {POOL: {"gpus": 1}},
        # A swap only waits for what the policy asks: no residency to sit out, an idle
        # model goes at once. The defaults (30 s, 5 min) would measure the policy.
        "defaults": {"min_residency": "10ms", "max_wait": "10ms", "drain_timeout": "60s"},
    }
    with bl.activator_process(models, top=top) as running:
        yield running, served


# ---- one swap ---------------------------------------------------------------------------


@dataclass
class Trial:
    to_model: str
    first_byte: float  # B's request -> B's first byte (s)
    stop: float  # A: SIGTERM logged -> process gone
    start: float  # B: process appeared -> engine serving
    overhead: float  # first_byte - stop - start
    decide: float  # B's request -> A's SIGTERM (decision, drain of an idle model, signal)
    gap: float  # A gone -> B's process appeared (reap, decide, spawn)
    relay: float  # B serving -> first byte (readiness probe, release, relay)
    activator_wake: float  # activator's own wake duration for B


async def chat(session: aiohttp.ClientSession, url: str, model: str, *, stream: bool) -> float:
    """One request; returns the wall-clock time of its first body byte."""
    body = {
        "model": model,
        "stream": stream,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "def fib(n):"}],
    }
    first: float | None = None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        async for _ in resp.content.iter_any():
            first = first or time.time()
        if resp.status != 200 or first is None:
            raise RuntimeError(f"{model}: HTTP {resp.status}")
    return first


async def wake_sum(session: aiohttp.ClientSession, url: str, model: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return bl.metric_value(
        text, "activator_wake_duration_seconds_sum", model=model, outcome="ready"
    )


async def logs(session: aiohttp.ClientSession, url: str, model: str) -> list[str]:
    async with session.get(f"{url}/admin/models/{model}/logs") as resp:
        lines: list[str] = (await resp.json())["lines"]
        return lines


async def swap_trials(url: str, served: dict[str, str], watch: ProcessWatch, n: int) -> list[Trial]:
    trials = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await chat(session, url, A, stream=False)  # A is ready: the first swap is A -> B
        for i in range(n):
            old, new = (A, B) if i % 2 == 0 else (B, A)
            wake_before = await wake_sum(session, url, new)
            sent = time.time()
            first = await chat(session, url, new, stream=True)
            old_logs, new_logs = await logs(session, url, old), await logs(session, url, new)
            sigterm = log_stamp(old_logs, "shutting down")
            serving = log_stamp(new_logs, f"serving {served[new]} on")
            gone = watch.first(served[old], "down", after=sent)
            spawned = watch.first(served[new], "up", after=sent)
            if None in (sigterm, serving, gone, spawned):
                raise RuntimeError(f"trial {i}: missing a time {sigterm, serving, gone, spawned}")
            assert sigterm and serving and gone and spawned
            stop, start = gone - sigterm, serving - spawned
            trials.append(
                Trial(
                    to_model=new,
                    first_byte=first - sent,
                    stop=stop,
                    start=start,
                    overhead=(first - sent) - stop - start,
                    decide=sigterm - sent,
                    gap=spawned - gone,
                    relay=first - serving,
                    activator_wake=await wake_sum(session, url, new) - wake_before,
                )
            )
    return trials


# ---- alternating load -------------------------------------------------------------------


async def rounds(url: str, *, count: int, concurrency: int, alternate: bool) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await chat(session, url, A, stream=False)  # start from A ready, as the trials end
        durations = []
        began = time.monotonic()
        for r in range(count):
            model = (B if r % 2 == 0 else A) if alternate else A
            t0 = time.monotonic()
            await asyncio.gather(
                *(chat(session, url, model, stream=i % 2 == 0) for i in range(concurrency))
            )
            durations.append(time.monotonic() - t0)
        elapsed = time.monotonic() - began
    return {
        "alternate": alternate,
        "rounds": count,
        "requests": count * concurrency,
        "seconds": elapsed,
        "requests_per_s": count * concurrency / elapsed,
        "round_seconds": durations,
    }


# ---- report -----------------------------------------------------------------------------


def summarize(trials: list[Trial]) -> dict[str, dict[str, float | None]]:
    keys = ("first_byte", "stop", "start", "overhead", "decide", "gap", "relay", "activator_wake")
    return {
        k: {
            "median": bl.median([getattr(t, k) for t in trials]),
            "p90": bl.percentile([getattr(t, k) for t in trials], 90),
            "max": max(getattr(t, k) for t in trials),
        }
        for k in keys
    }


def plot(trials: list[Trial], loads: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = bl.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = list(range(1, len(trials) + 1))
    stop = [t.stop * 1000 for t in trials]
    start = [t.start * 1000 for t in trials]
    over = [max(t.overhead, 0) * 1000 for t in trials]
    left.bar(xs, stop, label="A stop (engine)")
    left.bar(xs, start, bottom=stop, label="B start (engine)")
    left.bar(xs, over, bottom=[a + b for a, b in zip(stop, start, strict=True)],
             label="activator overhead")  # fmt: skip
    left.set_xticks(xs)
    left.set_xlabel("swap")
    left.set_ylabel("ms from B's request to its first byte")
    left.set_title("Where a swap's time goes")
    left.legend()
    for load in loads:
        label = "alternating (swap each round)" if load["alternate"] else "one model (no swap)"
        right.plot(range(1, load["rounds"] + 1), load["round_seconds"], marker="o", label=label)
    right.set_xlabel("round")
    right.set_yscale("log")  # a swap round is ~100x a warm one
    right.set_ylabel("seconds per round")
    right.set_title("Rounds of concurrent requests")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with pooled_activator(args.startup_delay) as (running, served):
        with ProcessWatch(set(served.values())) as watch:
            trials = await swap_trials(running.url, served, watch, args.trials)
        loads = [
            await rounds(running.url, count=args.rounds, concurrency=args.concurrency,
                         alternate=alternate)
            for alternate in (True, False)
        ]  # fmt: skip
    return {"trials": trials, "loads": loads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few swaps, seconds; CI")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--startup-delay", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=("stop", "sleep"), default="stop")
    parser.add_argument("--engine", choices=("stand-in", "gpu"), default="stand-in")
    parser.add_argument("--weights-gib", default="8", help="sizes, comma-separated (sleep)")
    parser.add_argument("--weights-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--device", default="cuda", help="gpu engine: cuda, cuda:N or cpu")
    parser.add_argument(
        "--engine-python", default=sys.executable, help="gpu engine: a python with torch"
    )
    parser.add_argument("--stop-trials", type=int, default=3, help="sleep mode: cold swaps")
    args = parser.parse_args(argv)
    if args.mode == "sleep":
        return main_sleep(args, argv)
    if args.smoke:
        args.trials, args.rounds, args.concurrency = 2, 4, 4
        args.startup_delay = min(args.startup_delay, 0.3)
    name = "swap-smoke" if args.smoke else "swap"

    # Other work on the machine shows in every figure here; record how busy it was.
    load_before = os.getloadavg()
    result = asyncio.run(run(args))
    trials: list[Trial] = result["trials"]
    loads: list[dict[str, Any]] = result["loads"]
    summary = summarize(trials)

    def ms(seconds: float | None) -> str:
        return bl.fmt(None if seconds is None else seconds * 1000, 1)

    print(bl.table(
        ["swap", "first byte ms", "A stop ms", "B start ms", "overhead ms", "decide ms",
         "gap ms", "relay ms", "activator wake ms"],
        [[f"{i + 1} -> {t.to_model}", ms(t.first_byte), ms(t.stop), ms(t.start), ms(t.overhead),
          ms(t.decide), ms(t.gap), ms(t.relay), ms(t.activator_wake)]
         for i, t in enumerate(trials)]
        + [["median", *(ms(summary[k]["median"]) for k in (
            "first_byte", "stop", "start", "overhead", "decide", "gap", "relay",
            "activator_wake"))]],
    ))  # fmt: skip
    print()
    print(bl.table(
        ["load", "rounds x concurrency", "seconds", "requests/s"],
        [["alternating" if x["alternate"] else "one model", f"{x['rounds']} x {args.concurrency}",
          bl.fmt(x["seconds"]), bl.fmt(x["requests_per_s"], 1)] for x in loads],
    ))  # fmt: skip
    data = {
        "benchmark": "swap",
        "command": " ".join(["python", "bench/swap.py", *(argv or sys.argv[1:])]),
        "machine": {**bl.machine(), "load_average_before": load_before},
        "config": {
            "startup_delay": args.startup_delay,
            "trials": args.trials,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "pool": {POOL: {"gpus": 1}},
            "models": [A, B],
        },
        "summary": summary,
        "trials": [asdict(t) for t in trials],
        "loads": loads,
    }
    title = f"Swap in a 1-GPU pool, stand-in engines starting in {args.startup_delay:g}s"
    bl.publish(name, data, out_dir=args.out, draw=lambda png: plot(trials, loads, png, title))
    return 0


def main_sleep(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--mode sleep: per weights size, sleep swaps against stop + cold start swaps."""
    if args.smoke:
        args.trials, args.stop_trials = 2, 1
        args.startup_delay = min(args.startup_delay, 0.3)
    sizes = [float(x) for x in str(args.weights_gib).split(",")]
    load_before = os.getloadavg()
    runs = []
    for gib in sizes:
        engines = swap_sleep.Engines(
            kind=args.engine,
            gib=gib,
            device=args.device,
            weights_dir=args.weights_dir,
            python=args.engine_python,
            startup_delay=args.startup_delay,
            sleep_delay=0.155 * gib / 8,  # the H200's PCIe copy for these weights
            wake_delay=0.155 * gib / 8,
        )
        run_ = swap_sleep.run_sleep_mode(
            engines, trials=args.trials, stop_trials_n=args.stop_trials
        )
        runs.append(run_)
        summary = run_["summary"]

        def ms(x: float | None) -> str:
            return bl.fmt(None if x is None else x * 1000, 1)

        print(f"\n{args.engine} engines, {gib:g} GiB of weights each")
        print(bl.table(
            ["swap", "first byte ms", "engine sleep ms", "engine wake ms", "warm ms",
             "overhead ms"],
            [[f"{i + 1} -> {t['to_model']}", ms(t["first_byte"]), ms(t["engine_sleep"]),
              ms(t["engine_wake"]), ms(t["warm"]), ms(t["overhead"])]
             for i, t in enumerate(run_["trials"])]
            + [["median", *(ms(summary[k]["median"]) for k in (
                "first_byte", "engine_sleep", "engine_wake", "warm", "overhead"))]],
        ))  # fmt: skip
        print(
            f"stop + cold start: first byte median {ms(summary['stop_first_byte']['median'])} ms "
            f"over {len(run_['stop_first_bytes'])} swaps; sleep swap is "
            f"{bl.fmt(summary['speedup'], 1)}x faster"
        )
    name = "swap-sleep-smoke" if args.smoke else f"swap-sleep-{args.engine}"
    data = {
        "benchmark": "swap --mode sleep",
        "command": " ".join(["python", "bench/swap.py", *(argv or sys.argv[1:])]),
        "machine": {**bl.machine(), "load_average_before": load_before},
        "runs": runs,
    }
    bl.publish(
        name, data, out_dir=args.out, draw=lambda png: plot_sleep(runs, png, engine=args.engine)
    )
    return 0


def plot_sleep(runs: list[dict[str, Any]], path: Path, *, engine: str) -> None:
    plt = bl.pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run_ in zip(axes[0], runs, strict=True):
        trials = run_["trials"]
        xs = list(range(1, len(trials) + 1))
        sleep = [t["engine_sleep"] * 1000 for t in trials]
        wake = [t["engine_wake"] * 1000 for t in trials]
        rest = [
            max(t["first_byte"] * 1000 - a - b, 0)
            for t, a, b in zip(trials, sleep, wake, strict=True)
        ]
        ax.bar(xs, sleep, label="A's sleep (engine)")
        ax.bar(xs, wake, bottom=sleep, label="B's wake (engine)")
        ax.bar(xs, rest, bottom=[a + b for a, b in zip(sleep, wake, strict=True)],
               label="activator + first token")  # fmt: skip
        stop = run_["summary"]["stop_first_byte"]["median"]
        if stop:
            ax.set_title(f"{run_['engines']['weights_gib']:g} GiB: stop + cold start {stop:.1f} s")
        ax.set_xlabel("swap (sleep mode)")
        ax.set_ylabel("ms from B's request to its first byte")
        ax.legend()
    fig.suptitle(f"Sleep-mode swaps in a 1-GPU pool ({engine} engines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
