"""Cold start: for each model, N trials of stop -> first request, against any activator.

  python bench/cold_start.py --local                 # starts activator with stand-in engines
  python bench/cold_start.py --local --smoke         # seconds; CI
  python bench/cold_start.py --url http://127.0.0.1:8080 [--models a,b] [--trials 5]
                             [--api-key K] [--admin-key K]   # a running activator (any backend)

Per trial: POST /admin/models/<m>/stop, wait until it is stopped, then one streaming chat
request; its time to first byte is the cold TTFB. Then a few warm requests (warm TTFB).
From the admin API: activator's wake duration and phases, and the engine's log tail.

Wake overhead is what activator adds to a cold start: the time from the engine being
able to answer (its /health turning 200) to the held request's first byte. Where the
engine's log says when it began serving (the stand-in engine logs `serving <name> on ...`
with a millisecond wall-clock stamp, right after its port opened) it is measured directly:
first byte - that moment (the stamp is truncated to the ms, so this errs up to 1 ms
high). Everywhere, the issue's estimate is reported too: cold TTFB - engine ready time
- warm TTFB, with activator's own wake duration as the engine ready time when the log
has no stamp (that estimate then excludes activator's probe delay).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str | None
    admin_key: str | None
    # An engine /health URL polled from outside during each cold start (the engine must
    # listen on a fixed port): its first 200 is the engine-ready moment, for engines
    # whose logs carry no precise stamp (real vLLM logs whole seconds).
    engine_health: str | None = None

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def admin(session: aiohttp.ClientSession, target: Target, path: str, **kw: Any) -> Any:
    method = kw.pop("method", "GET")
    async with session.request(
        method, target.url + path, headers=target.admin_headers(), **kw
    ) as resp:
        resp.raise_for_status()
        return await resp.json()


async def first_healthy(session: aiohttp.ClientSession, url: str) -> float:
    """Wall-clock time at which `url` first answered 200, polled every 2 ms (bounded)."""
    deadline = time.monotonic() + 1800
    probe = aiohttp.ClientTimeout(total=1)
    while time.monotonic() < deadline:
        try:
            async with session.get(url, timeout=probe) as resp:
                if resp.status == 200:
                    return time.time()
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.002)  # another process's port: nothing to wait on but time
    raise TimeoutError(f"{url} never answered 200")


async def wait_stopped(
    session: aiohttp.ClientSession, target: Target, model: str, *, within: float
) -> None:
    deadline = time.monotonic() + within
    while (await admin(session, target, f"/admin/models/{model}"))["state"] not in (
        "stopped",
        "failed",
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {model} did not stop within {within:.0f}s")
        await asyncio.sleep(0.05)  # another process's state: polled, with a deadline


async def trial(
    session: aiohttp.ClientSession, target: Target, model: str, *, warm_requests: int
) -> dict[str, Any]:
    async def probe() -> tuple[float, float]:
        return await bl.first_byte(
            session, target.url, model, prompt="cold start probe", headers=target.api_headers()
        )

    await admin(session, target, f"/admin/models/{model}/stop", method="POST")
    await wait_stopped(session, target, model, within=300)
    sent_wall = time.time()
    watcher = (
        asyncio.ensure_future(first_healthy(session, target.engine_health))
        if target.engine_health
        else None
    )
    cold_ttfb, first_wall = await probe()
    healthy_wall = await watcher if watcher is not None else None
    warm = [(await probe())[0] for _ in range(warm_requests)]
    described = await admin(session, target, f"/admin/models/{model}")
    logs = await admin(session, target, f"/admin/models/{model}/logs")
    ready_wall = healthy_wall or bl.engine_ready_wallclock(
        logs["lines"], described["served_model_name"]
    )
    warm_ttfb = bl.median(warm) or 0.0
    wake = described.get("last_wake_seconds")
    engine_ready = ready_wall - sent_wall if ready_wall is not None else wake
    return {
        "cold_ttfb_s": cold_ttfb,
        "warm_ttfb_s": warm_ttfb,
        "activator_wake_s": wake,
        "wake_phases": described.get("wake_phases"),
        "engine_ready_s": engine_ready,
        "engine_ready_source": (
            "engine /health watcher"
            if healthy_wall is not None
            else "engine log"
            if ready_wall is not None
            else "activator wake"
        ),
        # Measured: engine began serving -> the held request's first byte.
        "wake_overhead_s": first_wall - ready_wall if ready_wall is not None else None,
        # The estimate: cold TTFB - engine ready time - warm TTFB.
        "wake_overhead_estimate_s": (
            cold_ttfb - engine_ready - warm_ttfb if engine_ready is not None else None
        ),
    }


async def measure(
    target: Target, models: list[str] | None, *, trials: int, warm_requests: int
) -> dict[str, list[dict[str, Any]]]:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if not models:
            listed = await admin(session, target, "/admin/models")
            models = [m["name"] for m in listed["models"]]
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
        for index in range(trials):
            for model in models:  # interleaved: drift on the machine hits every model alike
                r = await trial(session, target, model, warm_requests=warm_requests)
                results[model].append(r)
                print(
                    f"trial {index + 1} {model}: cold TTFB {r['cold_ttfb_s'] * 1000:.1f} ms, "
                    f"warm {r['warm_ttfb_s'] * 1000:.2f} ms, engine ready "
                    f"{_ms(r['engine_ready_s'])} ms ({r['engine_ready_source']}), wake overhead "
                    f"{_ms(r['wake_overhead_s'])} ms "
                    f"(estimate {_ms(r['wake_overhead_estimate_s'])})",
                    flush=True,
                )
        return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


KEYS = (
    ("cold_ttfb_s", "cold TTFB"),
    ("warm_ttfb_s", "warm TTFB"),
    ("engine_ready_s", "engine ready"),
    ("activator_wake_s", "activator wake"),
    ("wake_overhead_s", "wake overhead"),
    ("wake_overhead_estimate_s", "overhead estimate"),
)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for model, runs in results.items():
        summary[model] = {}
        for key, _ in KEYS:
            values = [r[key] for r in runs if r[key] is not None]
            summary[model][key] = {
                "p50": bl.percentile(values, 50),
                "p90": bl.percentile(values, 90),
                "n": len(values),
            }
    overheads = [
        r["wake_overhead_s"] for runs in results.values() for r in runs if r["wake_overhead_s"]
    ]
    p50 = bl.percentile(overheads, 50)
    summary["target"] = {
        "target": "wake overhead p50 (local backend), ms",
        "measured": None if p50 is None else p50 * 1000,
        "goal": "<= 50",
        "met": None if p50 is None else p50 * 1000 <= 50,
    }
    return summary


def report(summary: dict[str, Any], *, smoke: bool = False) -> str:
    rows = []
    for model, by_key in summary.items():
        if model == "target":
            continue
        for key, label in KEYS:
            s = by_key[key]
            p50 = None if s["p50"] is None else s["p50"] * 1000
            p90 = None if s["p90"] is None else s["p90"] * 1000
            rows.append([model, label, bl.fmt(p50, 2), bl.fmt(p90, 2), str(s["n"])])
    t = summary["target"]
    verdict = bl.verdict(t["met"], smoke=smoke)
    return (
        bl.table(["model", "ms", "p50", "p90", "n"], rows)
        + f"\n\ntarget: {t['target']} {bl.fmt(t['measured'], 2)} (goal {t['goal']}): {verdict}"
    )


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = bl.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, runs in results.items():
        xs = list(range(1, len(runs) + 1))
        left.plot(xs, [r["cold_ttfb_s"] * 1000 for r in runs], "o-", label=f"{model} cold TTFB")
        ready = [(r["engine_ready_s"] or 0) * 1000 for r in runs]
        left.plot(xs, ready, "x--", label=f"{model} engine ready")
        over = [(r["wake_overhead_s"] or r["wake_overhead_estimate_s"] or 0) * 1000 for r in runs]
        right.plot(xs, over, "o-", label=model)
    left.set_title("cold start per trial (ms)")
    left.set_xlabel("trial")
    left.legend(fontsize="small")
    right.axhline(50, color="red", linestyle=":", label="target 50 ms")
    right.set_title("wake overhead: engine serving -> first byte (ms)")
    right.set_xlabel("trial")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def local_models(count: int, *, startup_delay: float) -> dict[str, Any]:
    return {
        f"cold-{index}": {
            "process": {
                "command": bl.engine_command(f"cold-{index}", startup_delay=startup_delay),
                "port": 0,
                "stop_grace": "5s",
            },
            "idle_timeout": "1h",
            "startup_timeout": "2m",
        }
        for index in range(1, count + 1)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running activator's base URL")
    where.add_argument("--local", action="store_true", help="start activator with stand-ins")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--models", help="comma-separated (default: all)")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--warm-requests", type=int, default=5)
    parser.add_argument("--startup-delay", type=float, help="--local: stand-in engine delay")
    parser.add_argument("--local-models", type=int, default=2, help="--local: how many")
    parser.add_argument("--api-key")
    parser.add_argument("--admin-key")
    parser.add_argument(
        "--engine-health",
        help="with --url: an engine /health URL (fixed port) polled during cold starts",
    )
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    args = parser.parse_args()
    trials = args.trials or (2 if args.smoke else 10)
    warm = 2 if args.smoke else args.warm_requests
    models = [m for m in (args.models or "").split(",") if m]
    started = time.time()
    if args.local:
        delay = (
            args.startup_delay if args.startup_delay is not None else (0.1 if args.smoke else 1.0)
        )
        count = 1 if args.smoke else args.local_models
        with bl.activator_process(local_models(count, startup_delay=delay)) as act:
            target = Target(act.url, None, None)
            results = asyncio.run(measure(target, models, trials=trials, warm_requests=warm))
        where_ = f"local activator, stand-in engines with --startup-delay {delay}"
    else:
        target = Target(args.url.rstrip("/"), args.api_key, args.admin_key, args.engine_health)
        results = asyncio.run(measure(target, models, trials=trials, warm_requests=warm))
        where_ = "remote activator (URL not recorded)"
    summary = summarize(results)
    name = "cold_start-smoke" if args.smoke else "cold_start"
    data = {
        "benchmark": "cold_start",
        "command": "python bench/cold_start.py "
        + " ".join(a for a in sys.argv[1:] if not a.startswith("http")),
        "target": where_,
        "machine": bl.machine(),
        "seconds": round(time.time() - started, 1),
        "summary": summary,
        "trials": results,
    }
    bl.publish(
        name,
        data,
        out_dir=args.out,
        draw=lambda png: plot(results, png),
        report=report(summary, smoke=args.smoke),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
