"""Metrics at scale: /metrics size and scrape time, start-up, RSS, and warm-request latency
while Prometheus-rate scrapes run, for 10 / 200 / 1000 configured models.

  python bench/metrics_scale.py            # 10, 200 and 1000 models
  python bench/metrics_scale.py --smoke    # 3 and 30 models, a second per phase; CI
Options: --models 10,200,1000  --seconds S  --rounds N  --rate R  --scrape-interval S
         --name NAME  --baseline JSON (an earlier run, drawn and tabled beside this one)
         --note TEXT (kept in the JSON)  --out DIR

Per model count, activator runs as a subprocess (`activator serve`, uvloop) with that many
models configured. One, `warm`, runs the stand-in engine and is woken by one request; the
others are never started (no engine runs for them). Measured:
- start-up: process spawned -> /readyz 200; RSS right after, and the peak (VmHWM) at the end;
- /metrics with nothing else running: series, bytes, and the scrape time a client sees
  (request -> last byte), over several scrapes;
- warm requests (`--rate` a second, non-streamed, one connection) for `--seconds`, in
  three interleaved modes: no scrapes, a scrape every `--scrape-interval` (Prometheus'
  pace at its fastest usual setting), and back-to-back scrapes (a scraper as fast as it
  can go). Latency is taken from each request's scheduled send time (as wrk2 does), so
  a request queued behind a stalled event loop counts the stall.
The scraper is a separate process, so its parsing never competes with the load client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import shlex
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import benchlib as bl

WARM = "warm"
MODES = ("none", "interval", "busy")
MODE_LABELS = {"none": "no scrapes", "interval": "1 scrape / interval", "busy": "back-to-back"}
CHAT = {"model": WARM, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}


# ---- the scraper process ------------------------------------------------------------


def scrape_loop(url: str, interval: float, ready: Any, stop: Any, results: Any) -> None:
    """Runs in a child process: GET /metrics every `interval` s (0: back to back) until
    `stop` is set; puts [(start, end)] (time.monotonic, shared by the processes of one
    machine) on `results`."""
    ready.set()  # the interpreter's start-up (CPU-heavy) is over before the load begins
    scrapes: list[tuple[float, float]] = []
    next_at = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        bl.http_text(url + "/metrics", timeout=120)
        scrapes.append((started, time.monotonic()))
        if interval > 0:
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))
    results.put(scrapes)


class Scraper:
    """A scrape loop in a child process, for the length of a `with` block."""

    def __init__(self, url: str, interval: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._results: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=scrape_loop,
            args=(url, interval, self._ready, self._stop, self._results),
            daemon=True,
        )
        self.scrapes: list[tuple[float, float]] = []

    def __enter__(self) -> Scraper:
        self._proc.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the scraper process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.scrapes = self._results.get(timeout=300)
        self._proc.join(timeout=30)


# ---- load and scrapes from this process ---------------------------------------------


def warm_requests(url: str, *, seconds: float, rate: float) -> list[tuple[float, float]]:
    """Paced warm requests on one keep-alive connection for `seconds`: [(scheduled send
    time, latency)], the latency running from the scheduled send time to the end of the
    answer. Requests still unsent when the time is up are dropped, so a stalled server
    is not waited out (its latencies are, if anything, understated)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=120)
    body = json.dumps(CHAT).encode()
    headers = {"Content-Type": "application/json"}
    period = 1.0 / rate
    done: list[tuple[float, float]] = []
    start = time.monotonic()
    try:
        for i in range(int(seconds * rate)):
            scheduled = start + i * period
            if time.monotonic() > start + seconds:
                break
            wait = scheduled - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200 or b'"choices"' not in data:
                raise RuntimeError(f"warm request got {resp.status}: {data[:200]!r}")
            done.append((scheduled, time.monotonic() - scheduled))
    finally:
        conn.close()
    return done


def overlapping(
    requests: list[tuple[float, float]], scrapes: list[tuple[float, float]]
) -> list[float]:
    """Latencies of the requests that were in progress during some scrape."""
    return [
        latency
        for sent, latency in requests
        if any(start < sent + latency and sent < end for start, end in scrapes)
    ]


def idle_scrapes(act: bl.ActivatorProcess, count: int) -> dict[str, Any]:
    """Scrapes with nothing else running: size, series and time per scrape."""
    durations: list[float] = []
    text = ""
    for _ in range(count):
        started = time.perf_counter()
        text = act.metrics()
        durations.append(time.perf_counter() - started)
    lines = text.splitlines()
    return {
        "bytes": len(text.encode()),
        "series": sum(1 for line in lines if line and not line.startswith("#")),
        "created_series": sum(1 for line in lines if line.split("{")[0].endswith("_created")),
        "scrape_ms": [d * 1000 for d in durations],
        "scrape_ms_p50": (bl.median(durations) or 0) * 1000,
        "scrape_ms_max": max(durations) * 1000,
    }


def models_config(count: int) -> dict[str, Any]:
    """`warm` on the stand-in engine, and count - 1 models that are never started."""

    def block(name: str) -> dict[str, Any]:
        return {
            "process": {
                "command": bl.engine_command(name, startup_delay=0),
                "port": 0,
                "stop_grace": "5s",
            },
            "idle_timeout": "1h",
        }

    models = {WARM: block(WARM)}
    models.update({f"idle-{i:04d}": block(f"idle-{i:04d}") for i in range(1, count)})
    return models


def measure(
    count: int, *, seconds: float, rounds: int, rate: float, interval: float, scrapes: int
) -> dict[str, Any]:
    print(f"{count} models: starting activator", flush=True)
    with bl.activator_process(models_config(count), ready_timeout=600) as act:
        rss_started = bl.rss_kib(act.pid)
        # One request wakes `warm`; every later one is warm.
        bl.http_json(act.url + "/v1/chat/completions", method="POST", body=CHAT, timeout=120)
        idle = idle_scrapes(act, scrapes)
        print(
            f"  up in {act.startup_s:.2f}s, RSS {rss_started / 1024:.1f} MiB; /metrics "
            f"{idle['bytes'] / 1e6:.2f} MB, {idle['series']} series, "
            f"{idle['scrape_ms_p50']:.1f} ms",
            flush=True,
        )
        requests: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        scrapes: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for round_ in range(rounds):
            for mode in MODES:
                if mode == "none":
                    requests[mode] += warm_requests(act.url, seconds=seconds, rate=rate)
                    continue
                with Scraper(act.url, interval if mode == "interval" else 0.0) as scraper:
                    requests[mode] += warm_requests(act.url, seconds=seconds, rate=rate)
                scrapes[mode] += scraper.scrapes
                p99 = (bl.percentile([r[1] for r in requests[mode]], 99) or 0) * 1000
                print(
                    f"  round {round_ + 1} {mode}: p99 so far {p99:.2f} ms, "
                    f"{len(scraper.scrapes)} scrapes",
                    flush=True,
                )
        rss_end = bl.rss_kib(act.pid)
        hwm = bl.rss_kib(act.pid, "VmHWM")
    warm: dict[str, Any] = {}
    for mode in MODES:
        values = [latency for _, latency in requests[mode]]
        during = overlapping(requests[mode], scrapes[mode])
        took = [end - start for start, end in scrapes[mode]]
        warm[mode] = {
            "requests": len(values),
            "p50_ms": (bl.percentile(values, 50) or 0) * 1000,
            "p99_ms": (bl.percentile(values, 99) or 0) * 1000,
            "max_ms": max(values, default=0) * 1000,
            "during_scrapes": len(during),
            "during_scrapes_p50_ms": (bl.percentile(during, 50) or 0) * 1000,
            "during_scrapes_max_ms": max(during, default=0) * 1000,
            "scrapes": len(took),
            "scrape_ms_p50": (bl.median(took) or 0) * 1000,
            "scrape_ms_max": max(took, default=0) * 1000,
        }
    return {
        "models": count,
        "startup_s": act.startup_s,
        "rss_started_kib": rss_started,
        "rss_end_kib": rss_end,
        "rss_peak_kib": hwm,
        "idle_scrape": idle,
        "warm": warm,
        "p99_ratio_interval": ratio(warm["interval"]["p99_ms"], warm["none"]["p99_ms"]),
        "p99_ratio_busy": ratio(warm["busy"]["p99_ms"], warm["none"]["p99_ms"]),
    }


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ---- report -------------------------------------------------------------------------


def report(results: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> str:
    runs = [("", results)] if baseline is None else [("before", baseline), ("after", results)]
    headers = [
        "models", "run", "series", "/metrics KB", "scrape ms", "start-up s", "RSS MiB",
        "p50 / p99 ms, no scrapes", "p50 / p99 ms, 1 s scrapes", "p99 ms, back-to-back",
        "p99 1 s / none",
    ]  # fmt: skip
    rows = []
    counts = sorted({r["models"] for _, rs in runs for r in rs})
    for count in counts:
        for label, rs in runs:
            for r in rs:
                if r["models"] != count:
                    continue
                w = r["warm"]
                rows.append([
                    str(count), label or "-", f"{r['idle_scrape']['series']:,}",
                    f"{r['idle_scrape']['bytes'] / 1000:,.0f}",
                    bl.fmt(r["idle_scrape"]["scrape_ms_p50"], 1), bl.fmt(r["startup_s"], 2),
                    bl.fmt(r["rss_started_kib"] / 1024, 1),
                    f"{bl.fmt(w['none']['p50_ms'], 1)} / {bl.fmt(w['none']['p99_ms'], 1)}",
                    f"{bl.fmt(w['interval']['p50_ms'], 1)} / {bl.fmt(w['interval']['p99_ms'], 1)}",
                    bl.fmt(w["busy"]["p99_ms"], 1), bl.fmt(r["p99_ratio_interval"], 2) + "x",
                ])  # fmt: skip
    return bl.table(headers, rows)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    largest = max(results, key=lambda r: r["models"])
    measured = largest["p99_ratio_interval"]
    return [
        {
            "target": f"warm p99 during 1 s scrapes vs without, {largest['models']} models",
            "measured": measured,
            "goal": "<= 2x",
            "met": measured is not None and measured <= 2,
        }
    ]


def plot(results: list[dict[str, Any]], baseline: list[dict[str, Any]] | None, path: Path) -> None:
    plt = bl.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    runs = [("after" if baseline else "", "-", results)]
    if baseline:
        runs.insert(0, ("before", "--", baseline))

    def xs(rs: list[dict[str, Any]]) -> list[int]:
        return [r["models"] for r in rs]

    size, scrape, latency, startup = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    rss = startup.twinx()
    for label, style, rs in runs:
        tag = f" ({label})" if label else ""
        size.plot(xs(rs), [r["idle_scrape"]["bytes"] / 1e6 for r in rs], style, marker="o",
                  label="MB per scrape" + tag)  # fmt: skip
        scrape.plot(xs(rs), [r["idle_scrape"]["scrape_ms_p50"] for r in rs], style, marker="o",
                    label="scrape time p50" + tag)  # fmt: skip
        for mode, color in zip(MODES, ("tab:green", "tab:orange", "tab:red"), strict=True):
            latency.plot(xs(rs), [r["warm"][mode]["p99_ms"] for r in rs], style, marker="o",
                         color=color, label=f"p99, {MODE_LABELS[mode]}{tag}")  # fmt: skip
        startup.plot(xs(rs), [r["startup_s"] for r in rs], style, marker="o",
                     color="tab:blue", label="start-up s" + tag)  # fmt: skip
        rss.plot(xs(rs), [r["rss_started_kib"] / 1024 for r in rs], style, marker="s",
                 color="tab:purple", label="RSS MiB" + tag)  # fmt: skip
    for ax, title in (
        (size, "/metrics size, MB"),
        (scrape, "/metrics scrape time, ms (request -> last byte, nothing else running)"),
        (latency, "warm requests' p99, ms"),
        (startup, "start-up, s (left), and RSS after it, MiB (right)"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("configured models")
        ax.legend(fontsize=7, loc="upper left")
    rss.legend(fontsize=7, loc="lower right")
    for ax in (size, scrape, latency):
        ax.set_yscale("log")
    fig.suptitle("activator /metrics at scale: one warm model, the rest never started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI")
    parser.add_argument("--models", help="comma-separated model counts (default 10,200,1000)")
    parser.add_argument("--seconds", type=float, help="seconds of warm requests per phase")
    parser.add_argument("--rounds", type=int, help="rounds of the three modes, interleaved")
    parser.add_argument("--rate", type=float, default=50.0, help="warm requests per second")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--name", help="results file name (default metrics_scale)")
    parser.add_argument("--baseline", type=Path, help="an earlier run's JSON, to compare")
    parser.add_argument("--note", help="what was measured (e.g. which activator commit)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    args = parser.parse_args()
    counts = [int(c) for c in (args.models or ("3,30" if args.smoke else "10,200,1000")).split(",")]
    seconds = args.seconds or (1.0 if args.smoke else 10.0)
    rounds = args.rounds or (1 if args.smoke else 2)
    started = time.time()
    results = [
        measure(
            count,
            seconds=seconds,
            rounds=rounds,
            rate=args.rate,
            interval=args.scrape_interval,
            scrapes=3 if args.smoke else 10,
        )
        for count in counts
    ]
    baseline = None
    if args.baseline is not None:
        baseline = json.loads(args.baseline.read_text())["results"]
    checks = targets(results)
    name = args.name or ("metrics_scale-smoke" if args.smoke else "metrics_scale")
    data = {
        "benchmark": "metrics_scale",
        # The clone's own path is left out (the command names it as <repo>).
        "command": shlex.join(["python", "bench/metrics_scale.py", *sys.argv[1:]]).replace(
            str(bl.BENCH_DIR.parent), "<repo>"
        ),
        "note": args.note,
        "machine": bl.machine(),
        "seconds": round(time.time() - started, 1),
        "settings": {
            "seconds_per_phase": seconds,
            "rounds": rounds,
            "rate_per_s": args.rate,
            "scrape_interval_s": args.scrape_interval,
        },
        "targets": checks,
        "results": results,
    }
    verdicts = [
        [
            c["target"],
            bl.fmt(c["measured"], 2) + "x",
            c["goal"],
            bl.verdict(c["met"], smoke=args.smoke),
        ]
        for c in checks
    ]
    bl.publish(
        name,
        data,
        out_dir=args.out,
        draw=lambda png: plot(results, baseline, png),
        report=report(results, baseline) + "\n\n" + bl.table(["target", "", "goal", ""], verdicts),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
