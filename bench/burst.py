"""Burst: 10,000 concurrent requests (half streaming) arrive while one model is cold.

  python bench/burst.py            # 10,000 requests, 4 client processes
  python bench/burst.py --smoke    # 200 requests; CI
Options: --requests N  --clients P  --startup-delay S  --out DIR

Activator runs as a subprocess (`activator serve`, uvloop) with one model on the stand-in
engine, whose start takes --startup-delay seconds, long enough for every request to be
held. The clients, in P processes (one event loop cannot open 10,000 sockets quickly),
all fire at once. Meanwhile this process samples activator's /proc/<pid>/status and the
admin API. Reported: answers by status (0 lost means every request got a 200 and a
complete body), activator's RSS growth per held request (at the moment most were held,
and from the peak VmHWM), the time from the engine being ready (its `serving` log line)
to the last request's first byte, and how many times the engine was started (must be 1).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl

MODEL = "burst"


# ---- client processes ------------------------------------------------------------------


def client_process(url: str, first: int, count: int, start_at: float) -> dict[str, Any]:
    """Runs in a child process: `count` requests at once, from index `first` (even
    indices stream). Returns counts by outcome and first-byte times (wall clock)."""
    bl.raise_fd_limit(count + 1024)
    try:
        import uvloop

        return uvloop.run(_clients(url, first, count, start_at))
    except ImportError:
        return asyncio.run(_clients(url, first, count, start_at))


async def _clients(url: str, first: int, count: int, start_at: float) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # every process fires together
        outcomes = await asyncio.gather(
            *(_one(session, url, index) for index in range(first, first + count))
        )
    by_status = collections.Counter(status.split(":", 1)[0] for status, _ in outcomes)
    errors = collections.Counter(status for status, _ in outcomes if ":" in status)
    firsts = [t for _, t in outcomes if t is not None]
    return {
        "by_status": dict(by_status),
        "errors": dict(errors.most_common(5)),
        "first_byte_min": min(firsts, default=None),
        "first_byte_max": max(firsts, default=None),
    }


async def _one(session: aiohttp.ClientSession, url: str, index: int) -> tuple[str, float | None]:
    stream = index % 2 == 0
    body = {
        "model": MODEL,
        "stream": stream,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": f"burst request {index}"}],
    }
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if not stream:
                first = time.time()  # activator writes a non-streamed answer in one piece
                data = await resp.read()
                ok = resp.status == 200 and b'"choices"' in data
            else:
                first = None
                data = b""
                async for chunk in resp.content.iter_any():
                    if first is None:
                        first = time.time()
                    data += chunk
                ok = resp.status == 200 and data.endswith(b"data: [DONE]\n\n")
            status = str(resp.status) if ok or resp.status != 200 else "200-incomplete"
            return status, first
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}", None


# ---- the run ------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples activator's RSS and the admin API until stopped (another process: polled)."""

    def __init__(self, act: bl.ActivatorProcess) -> None:
        super().__init__(name="sampler", daemon=True)
        self.act = act
        self.stop = threading.Event()
        self.peak_queued = 0
        self.rss_at_peak_queued = 0
        self.peak_rss = 0
        self.ready_seen: float | None = None
        self.samples: list[tuple[float, int, int]] = []  # (t, queued, rss KiB)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss = bl.rss_kib(self.act.pid)
                described = self.act.model(MODEL)
            except (OSError, LookupError, ValueError):
                self.stop.wait(0.05)
                continue
            queued = int(described["queued"])
            self.samples.append((time.time(), queued, rss))
            self.peak_rss = max(self.peak_rss, rss)
            # RSS keeps growing for a moment after the last request is queued (buffers,
            # GC): take the highest RSS seen while the most requests were held.
            if queued > self.peak_queued:
                self.peak_queued, self.rss_at_peak_queued = queued, rss
            elif queued == self.peak_queued:
                self.rss_at_peak_queued = max(self.rss_at_peak_queued, rss)
            if described["state"] == "ready" and self.ready_seen is None:
                self.ready_seen = time.time()
            self.stop.wait(0.05)


def run(*, requests: int, clients: int, startup_delay: float) -> dict[str, Any]:
    limit = bl.raise_fd_limit(requests + 4096)
    models = {
        MODEL: {
            "process": {
                "command": bl.engine_command(MODEL, startup_delay=startup_delay),
                "port": 0,
                "stop_grace": "5s",
            },
            "idle_timeout": "1h",
            "startup_timeout": "5m",
            "max_queued": requests + 1000,
        }
    }
    server = {"max_queued_total": requests + 1000}
    with bl.activator_process(models, server=server) as act:
        baseline = bl.rss_kib(act.pid)
        sampler = Sampler(act)
        sampler.start()
        share = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
        starts = [sum(share[:i]) for i in range(clients)]
        start_at = time.time() + 1.0 + 0.2 * clients  # time for the processes to spawn
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(clients, mp_context=ctx) as pool:
            futures = [
                pool.submit(client_process, act.url, starts[i], share[i], start_at)
                for i in range(clients)
            ]
            parts = [f.result() for f in futures]
        sampler.stop.set()
        sampler.join()
        hwm = bl.rss_kib(act.pid, "VmHWM")
        metrics = act.metrics()
        logs = bl.http_json(f"{act.url}/admin/models/{MODEL}/logs")["lines"]
        described = act.model(MODEL)
    ready_wall = bl.engine_ready_wallclock(logs, MODEL)
    by_status: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for part in parts:
        by_status.update(part["by_status"])
        errors.update(part["errors"])
    firsts = [p["first_byte_max"] for p in parts if p["first_byte_max"] is not None]
    last_first_byte = max(firsts, default=None)
    starts_count = bl.metric_value(
        metrics, "activator_scale_events_total", model=MODEL, direction="up"
    )
    held = bl.metric_value(
        metrics, "activator_hold_duration_seconds_count", model=MODEL, outcome="released"
    )
    growth_held = (
        (sampler.rss_at_peak_queued - baseline) / sampler.peak_queued
        if sampler.peak_queued
        else None
    )
    growth_peak = (hwm - baseline) / requests
    ok = by_status.get("200", 0)
    return {
        "requests": requests,
        "client_processes": clients,
        "fd_limit": limit,
        "startup_delay_s": startup_delay,
        "by_status": dict(by_status),
        "errors": dict(errors.most_common(5)),
        "answered_200": ok,
        "lost": requests - ok,
        "held_and_released": held,
        "peak_queued_seen": sampler.peak_queued,
        "rss_baseline_kib": baseline,
        "rss_at_peak_queued_kib": sampler.rss_at_peak_queued,
        "rss_peak_kib": hwm,
        "kib_per_held_request": growth_held,
        "kib_per_request_peak": growth_peak,
        "engine_starts": starts_count,
        "wake_seconds": described.get("last_wake_seconds"),
        "ready_to_last_first_byte_s": (
            last_first_byte - ready_wall if last_first_byte and ready_wall else None
        ),
        "samples": sampler.samples,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    per_held = None if r["kib_per_held_request"] is None else r["kib_per_held_request"] * 1.024
    return [
        {"target": "all answered, 0 lost", "measured": r["lost"], "goal": "0 lost",
         "met": r["lost"] == 0},
        {"target": "RSS per held request (KB)", "measured": per_held, "goal": "<= 20",
         "met": per_held is not None and per_held <= 20},
        {"target": "engine starts", "measured": r["engine_starts"], "goal": "== 1",
         "met": r["engine_starts"] == 1},
    ]  # fmt: skip


def report(r: dict[str, Any], checks: list[dict[str, Any]], *, smoke: bool = False) -> str:
    rows = [
        ["requests (half streaming)", f"{r['requests']:,}"],
        ["answers by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(r["by_status"].items()))],
        ["lost", str(r["lost"])],
        ["errors (most common)", "; ".join(f"{k} x{v}" for k, v in r["errors"].items()) or "-"],
        ["held, then released on ready", f"{r['held_and_released']:,.0f}"],
        ["most held at once (sampled)", f"{r['peak_queued_seen']:,}"],
        ["activator RSS before / with most held / peak (MiB)",
         f"{r['rss_baseline_kib'] / 1024:.1f} / {r['rss_at_peak_queued_kib'] / 1024:.1f} / "
         f"{r['rss_peak_kib'] / 1024:.1f}"],
        ["RSS growth per held request (KiB)", bl.fmt(r["kib_per_held_request"], 1)],
        ["peak RSS growth per request (KiB)", bl.fmt(r["kib_per_request_peak"], 1)],
        ["engine starts", f"{r['engine_starts']:.0f}"],
        ["engine ready -> last first byte (s)", bl.fmt(r["ready_to_last_first_byte_s"], 3)],
        ["wake (activator's view, s)", bl.fmt(r["wake_seconds"], 3)],
    ]  # fmt: skip
    verdicts = [
        [c["target"], str(c["measured"]) if isinstance(c["measured"], int) else
         bl.fmt(c["measured"], 1), c["goal"], bl.verdict(c["met"], smoke=smoke)]
        for c in checks
    ]  # fmt: skip
    return (
        bl.table(["burst", "result"], rows)
        + "\n\n"
        + bl.table(["target", "measured", "goal", ""], verdicts)
    )


def plot(r: dict[str, Any], path: Path) -> None:
    plt = bl.pyplot()
    samples = r["samples"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if samples:
        t0 = samples[0][0]
        xs = [s[0] - t0 for s in samples]
        ax.plot(xs, [s[1] for s in samples], label="held requests", color="tab:blue")
        ax.set_ylabel("held requests")
        ax2 = ax.twinx()
        ax2.plot(xs, [s[2] / 1024 for s in samples], label="activator RSS (MiB)", color="tab:red")
        ax2.set_ylabel("RSS, MiB")
        ax.set_xlabel("seconds")
    ax.set_title(f"burst: {r['requests']:,} requests onto a cold model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--clients", type=int, help="client processes")
    parser.add_argument("--startup-delay", type=float)
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    args = parser.parse_args()
    requests = args.requests or (200 if args.smoke else 10_000)
    clients = args.clients or (2 if args.smoke else 4)
    delay = args.startup_delay or (1.5 if args.smoke else 10.0)
    started = time.time()
    result = run(requests=requests, clients=clients, startup_delay=delay)
    checks = targets(result)
    name = "burst-smoke" if args.smoke else "burst"
    data = {
        "benchmark": "burst",
        "command": "python bench/burst.py " + " ".join(sys.argv[1:]),
        "machine": bl.machine(),
        "seconds": round(time.time() - started, 1),
        "targets": checks,
        "result": result,
    }
    bl.publish(
        name,
        data,
        out_dir=args.out,
        draw=lambda png: plot(result, png),
        report=report(result, checks, smoke=args.smoke),
    )
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
