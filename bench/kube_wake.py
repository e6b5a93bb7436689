"""Wake overhead on the Kubernetes backend: fake pod turning Ready -> held request's first byte.

  python bench/kube_wake.py            # 10 trials
  python bench/kube_wake.py --smoke    # 2 trials, seconds; CI

In one process: the fake Kubernetes API server (tests/fakekube/server.py) with its
simulated kubelet running a stand-in engine per pod, and a real activator on loopback that
reaches the fake API through kubernetes_asyncio with a generated kubeconfig, as in a
cluster. Per trial: the model is stopped (scaled to 0, pod deleted), then one streaming
request wakes it. The fake records when the pod turned Ready; the client records its first
byte. The model's `url` points straight at the engine, like a pod IP: no Service endpoint
lag is simulated, so this is activator's own share of the wake.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
from aiohttp import web

from activator.app import build_app
from activator.config.load import parse_config
from tests.fakekube.server import FakeKube


async def first_byte(session: aiohttp.ClientSession, url: str) -> float:
    body = {
        "model": "coder",
        "stream": True,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "wake"}],
    }
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for _ in resp.content.iter_any():
            return time.monotonic()
    raise RuntimeError("empty stream")


async def measure(trials: int) -> list[dict[str, float]]:
    async with FakeKube(gpus=1) as kube:
        workload = kube.add_workload("coder", served_model_name="coder-served", gpu=True)
        settings = parse_config(
            {
                "server": {"access_log": "off"},
                "kubernetes": {"kubeconfig": kube.kubeconfig},
                "models": {
                    "coder": {
                        "served_model_name": "coder-served",
                        "startup_timeout": "60s",
                        "kubernetes": {
                            "namespace": "serving",
                            "deployment": "coder",
                            "url": workload.url,
                        },
                    }
                },
            },
            environ={},
        )
        runner = web.AppRunner(build_app(settings), handler_cancellation=True)
        await runner.setup()
        port = bl.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        results = []
        try:
            async with aiohttp.ClientSession() as session:
                for index in range(trials):
                    async with session.post(url + "/admin/models/coder/stop") as resp:
                        resp.raise_for_status()
                    await kube.wait_until(
                        lambda: kube.replicas("coder") == 0 and not kube.pods("coder"),
                        within=60,
                    )
                    sent = time.monotonic()
                    got = await first_byte(session, url)
                    ready = kube.ready_time("coder")
                    assert ready is not None and ready >= sent, "pod Ready time not recorded"
                    r = {"cold_ttfb_s": got - sent, "wake_overhead_s": got - ready}
                    results.append(r)
                    print(
                        f"trial {index + 1}: cold TTFB {r['cold_ttfb_s'] * 1000:.1f} ms, "
                        f"pod Ready -> first byte {r['wake_overhead_s'] * 1000:.1f} ms",
                        flush=True,
                    )
        finally:
            await runner.cleanup()
        return results


def plot(results: list[dict[str, float]], png: Path) -> None:
    plt = bl.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["wake_overhead_s"] * 1000 for r in results], marker="o")
    ax.set_xlabel("trial")
    ax.set_ylabel("pod Ready -> first byte (ms)")
    ax.set_title("Kubernetes backend wake overhead (fake API server)")
    fig.tight_layout()
    fig.savefig(png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="2 trials, for CI")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()
    trials = 2 if args.smoke else args.trials
    results = asyncio.run(measure(trials))
    summary: dict[str, Any] = {}
    rows = []
    for key, label in (
        ("cold_ttfb_s", "cold TTFB"),
        ("wake_overhead_s", "pod Ready -> first byte"),
    ):
        values = [r[key] for r in results]
        p50, p90 = bl.percentile(values, 50), bl.percentile(values, 90)
        summary[key] = {"p50": p50, "p90": p90, "n": len(values)}
        rows.append(
            [label, bl.fmt(p50 and p50 * 1000), bl.fmt(p90 and p90 * 1000), str(len(values))]
        )
    print()
    print(bl.table(["ms", "p50", "p90", "n"], rows))
    name = "kube_wake-smoke" if args.smoke else "kube_wake"
    data = {
        "benchmark": "kube_wake",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": bl.machine(),
        "summary": summary,
        "trials": results,
    }
    bl.publish(name, data, out_dir=args.out, draw=lambda png: plot(results, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
