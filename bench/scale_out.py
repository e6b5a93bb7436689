"""Scale-out: throughput and p99 with 1, 2 and 4 replicas, and a load step's time to new pods.

  python bench/scale_out.py            # 3 rounds x 8 s per replica count, then the step
  python bench/scale_out.py --smoke    # seconds; CI
Options: --service S (seconds per request)  --clients C  --duration D  --rounds R
         --out DIR  --name NAME

In one process: the fake Kubernetes API server (activator/testing/fake_kube.py), whose
simulated kubelet runs each pod's stand-in engine as a real process on its own loopback
pod IP, with a fixed service time and one request at a time (`--response-delay S
--max-concurrency 1`: the engine is the bottleneck, as a GPU is); activator's
EndpointSlice watch (activator/backends/kube/endpoints.py) and PodRouter
(activator/routing.py), which probes each pod itself and routes least-in-flight with
at most target_concurrency x burst_factor = 1 x 2 requests per pod; and C closed-loop
aiohttp clients. Requests go client -> PodRouter -> pod directly: the router is not
wired into activator's proxy yet, so this measures routing and scaling, not the proxy
(bench/overhead.py has the proxy's own cost).

Throughput: for N = 1, 2, 4 replicas (interleaved over rounds), completed requests/s and
latency (from asking the router for a pod to the last byte) over D seconds of C clients;
the target is N x one replica's throughput within 10 %.

Load step: one replica, no load; then C clients at once. A scaling loop stands in for
the lead's wiring: on every change of the router's demand (in flight + waiting) it asks
activator/scaling.py for the desired replicas (max 4, target_concurrency 1) and patches
the Deployment's scale subresource through the API. Reported: step -> scale decision,
-> each new pod Ready (the kubelet's record), -> the first request each new pod
answered; and whether any request went to a pod before that pod was Ready (target:
none).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl

from activator.backends.kube.calls import Op, RetryPolicy
from activator.backends.kube.cluster import KubeCluster, KubeTuning
from activator.backends.kube.endpoints import EndpointSliceWatch
from activator.readiness import wait_ready
from activator.routing import PodRouter, Probe, RouterSettings, sent_nothing
from activator.scaling import ReplicaPolicy, Sample, ScaleView, decide
from activator.settings import KubernetesSettings
from activator.testing.fake_kube import FakeKube, PodPlan

NAMESPACE, WORKLOAD, SERVED = "serving", "coder", "coder-served"
COUNTS = (1, 2, 4)
TARGET_CONCURRENCY, BURST = 1.0, 2.0
BODY = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class Request:
    pod: str
    asked: float  # asked the router for a pod
    sent: float  # the POST went out
    done: float
    ok: bool


@dataclass
class Rig:
    kube: FakeKube
    cluster: KubeCluster
    watch: EndpointSliceWatch
    router: PodRouter
    session: aiohttp.ClientSession
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[Request] = field(default_factory=list)
    refused: int = 0

    async def until(self, predicate: Callable[[], bool], *, within: float = 120.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def scale(self, replicas: int) -> None:
        """PATCH the scale subresource, as the Kubernetes backend does."""
        await self.cluster.call(
            Op(verb="patch", resource="deployments/scale", namespace=NAMESPACE, name=WORKLOAD),
            self.cluster.apps.patch_namespaced_deployment_scale,
            WORKLOAD,
            NAMESPACE,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )

    async def settle(self, replicas: int) -> None:
        """Scaled to `replicas`, every pod routable and no other pod left."""
        await self.scale(replicas)
        await self.until(
            lambda: (
                self.router.routable == replicas
                and len(self.router.describe()) == replicas
                and len(self.kube.pods(WORKLOAD)) == replicas
            )
        )

    async def forward(self) -> None:
        """One request, as the proxy will send it: retried on another pod when the
        connection is refused before any byte went out."""
        asked = time.monotonic()
        tried: set[str] = set()
        for _ in range(3):
            lease = await self.router.acquire(exclude=tried)
            sent = time.monotonic()
            try:
                async with self.session.post(lease.url + "/v1/chat/completions", json=BODY) as r:
                    await r.read()
                    ok = r.status == 200
                self.requests.append(Request(lease.pod, asked, sent, time.monotonic(), ok))
                return
            except aiohttp.ClientError as exc:
                if not sent_nothing(exc):
                    self.requests.append(Request(lease.pod, asked, sent, time.monotonic(), False))
                    return
                self.refused += 1
                lease.connect_failed()
                tried.add(lease.pod)
            finally:
                lease.release()


def probe_with(session: aiohttp.ClientSession) -> Probe:
    async def probe(url: str, nudge: asyncio.Event) -> None:
        await wait_ready(
            session,
            url=url,
            health_path="/health",
            served_model_name=SERVED,
            api_key=None,
            nudge=nudge,
        )

    return probe


async def clients(rig: Rig, count: int, until: float) -> None:
    async def loop() -> None:
        while time.monotonic() < until:
            await rig.forward()

    await asyncio.gather(*(loop() for _ in range(count)))


def summarize(requests: list[Request], start: float, end: float) -> dict[str, Any]:
    done = [r for r in requests if start <= r.done < end]
    latencies = [r.done - r.asked for r in done if r.ok]
    return {
        "completed": len(done),
        "errors": sum(1 for r in done if not r.ok),
        "rps": len(done) / (end - start),
        "p50_ms": (bl.percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (bl.percentile(latencies, 99) or 0) * 1000,
        "pods": sorted({r.pod for r in done}),
    }


async def throughput(rig: Rig, *, clients_n: int, duration: float, rounds: int) -> list[Any]:
    runs: list[dict[str, Any]] = []
    for index in range(rounds):
        order = COUNTS if index % 2 == 0 else tuple(reversed(COUNTS))
        for replicas in order:
            await rig.settle(replicas)
            warm = time.monotonic() + min(1.0, duration / 4)
            begin = warm
            end = begin + duration
            await clients(rig, clients_n, end)
            run = {"round": index + 1, "replicas": replicas, **summarize(rig.requests, begin, end)}
            runs.append(run)
            print(
                f"round {index + 1}: {replicas} replica(s): {run['rps']:.1f} req/s, "
                f"p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms, "
                f"{run['errors']} errors",
                flush=True,
            )
    return runs


async def load_step(rig: Rig, *, clients_n: int, duration: float) -> dict[str, Any]:
    """One replica, then `clients_n` clients at once; a scaling loop decides."""
    await rig.settle(1)
    (first_pod,) = [p["name"] for p in rig.router.describe()]
    policy = ReplicaPolicy(max=max(COUNTS), target_concurrency=TARGET_CONCURRENCY)
    decisions: list[dict[str, Any]] = []
    # (t, routable pods, in flight, waiting) whenever the routable count changes
    timeline: list[tuple[float, int, int, int]] = []
    stop = asyncio.Event()

    async def autoscale() -> None:
        window: tuple[Sample, ...] = ()
        current = 1
        while not stop.is_set():
            rig.changed.clear()
            now = time.monotonic()
            router = rig.router
            if not timeline or timeline[-1][1] != router.routable:
                timeline.append((now, router.routable, router.in_flight, router.waiting))
            d = decide(
                policy,
                ScaleView(in_flight=router.in_flight, held=router.waiting, current=current),
                now=now,
                window=window,
            )
            window = d.window
            if d.desired != current:
                decisions.append(
                    {
                        "t": now,
                        "from": current,
                        "to": d.desired,
                        "demand": d.demand,
                        "why": d.reason,
                    }
                )
                current = d.desired
                await rig.scale(current)
            waker = asyncio.ensure_future(rig.changed.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            stopper.cancel()

    scaler = asyncio.create_task(autoscale(), name="bench-autoscale")
    step = time.monotonic()
    first_index = len(rig.requests)
    await clients(rig, clients_n, step + duration)
    stop.set()
    await scaler
    end = time.monotonic()

    ready_at: dict[str, float] = {}
    for pod, at in rig.kube.kubelet.ready_times:
        ready_at.setdefault(pod, at)
    requests = rig.requests[first_index:]
    early = [r for r in requests if r.pod not in ready_at or r.sent < ready_at[r.pod]]
    first_answer: dict[str, float] = {}
    for r in sorted(requests, key=lambda r: r.done):
        if r.ok:
            first_answer.setdefault(r.pod, r.done)
    new_pods = sorted(
        (p for p in first_answer if p != first_pod), key=lambda p: ready_at.get(p, end)
    )
    pods = [
        {
            "pod": pod,
            "ready_s": ready_at[pod] - step if pod in ready_at else None,
            "first_answer_s": first_answer[pod] - step,
            "first_sent_s": min(r.sent for r in requests if r.pod == pod) - step,
        }
        for pod in new_pods
    ]
    buckets: dict[int, int] = {}
    for r in requests:
        buckets[int((r.done - step) / 0.5)] = buckets.get(int((r.done - step) / 0.5), 0) + 1
    return {
        "clients": clients_n,
        "duration_s": duration,
        "decisions": [{**d, "t": d["t"] - step} for d in decisions],
        "new_pods": pods,
        "routed_before_ready": len(early),
        "requests": len(requests),
        "errors": sum(1 for r in requests if not r.ok),
        "completed_per_half_second": [buckets.get(i, 0) for i in range(int((end - step) / 0.5))],
        "timeline": [(t - step, routable, f, w) for t, routable, f, w in timeline],
        "final": summarize(requests, step + duration / 2, step + duration),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    engine = (
        "--disable-access-log",
        "--response-delay",
        str(args.service),
        "--max-concurrency",
        "1",
        "--startup-delay",
        str(args.startup_delay),
    )
    async with FakeKube() as kube:
        kube.add_workload(
            WORKLOAD,
            namespace=NAMESPACE,
            served_model_name=SERVED,
            plan=PodPlan(engine_args=engine, termination_grace=5),
        )
        settings = KubernetesSettings(kubeconfig=kube.kubeconfig, request_timeout=10.0)
        tuning = KubeTuning(
            retry=RetryPolicy(attempts=4, initial=0.05, max_wait=0.5, total=20.0),
            watch_backoff_initial=0.05,
            watch_backoff_max=0.5,
        )
        cluster = await KubeCluster.connect(settings, tuning=tuning)
        watch = EndpointSliceWatch.for_cluster(cluster)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        changed = asyncio.Event()  # the router's on_change: demand or room changed
        router = PodRouter(
            WORKLOAD,
            settings=RouterSettings(target_concurrency=TARGET_CONCURRENCY, burst_factor=BURST),
            probe=probe_with(session),
            on_change=changed.set,
        )
        rig = Rig(kube, cluster, watch, router, session, changed)
        try:
            watch.subscribe(NAMESPACE, WORKLOAD, router.update)
            await watch.synced(NAMESPACE, timeout=30)
            runs = await throughput(
                rig, clients_n=args.clients, duration=args.duration, rounds=args.rounds
            )
            print("load step: 1 replica, then all clients at once", flush=True)
            step = await load_step(rig, clients_n=args.clients, duration=args.step_duration)
            return {"runs": runs, "step": step, "refused_connections": rig.refused}
        finally:
            await router.aclose()
            await watch.aclose()
            await cluster.aclose()
            await session.close()


def report(data: dict[str, Any], *, service: float) -> tuple[str, dict[str, Any]]:
    by_count: dict[int, dict[str, Any]] = {}
    for n in COUNTS:
        runs = [r for r in data["runs"] if r["replicas"] == n]
        by_count[n] = {
            "rps": bl.median([r["rps"] for r in runs]),
            "p50_ms": bl.median([r["p50_ms"] for r in runs]),
            "p99_ms": bl.median([r["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
        }
    one = by_count[1]["rps"] or 0.0
    rows = []
    for n, s in by_count.items():
        ratio = (s["rps"] or 0) / (n * one) if one else 0.0
        s["vs_n_x_one"] = ratio
        s["ideal_rps"] = n / service
        rows.append(
            [
                str(n),
                bl.fmt(s["rps"], 1),
                bl.fmt(n / service, 1),
                f"{ratio:.2f}x",
                bl.fmt(s["p50_ms"], 0),
                bl.fmt(s["p99_ms"], 0),
                str(s["errors"]),
            ]
        )
    lines = [
        bl.table(
            ["replicas", "req/s", "engine max", "vs N x one", "p50 ms", "p99 ms", "errors"], rows
        )
    ]
    step = data["step"]
    step_rows = [
        [
            d["why"],
            f"{d['from']} -> {d['to']}",
            str(d["demand"]),
            bl.fmt(d["t"] * 1000, 1),
        ]
        for d in step["decisions"]
    ]
    lines += ["", bl.table(["decision", "replicas", "demand", "after step, ms"], step_rows or [])]
    pod_rows = [
        [
            p["pod"],
            bl.fmt(p["ready_s"], 2),
            bl.fmt(p["first_sent_s"], 2),
            bl.fmt(p["first_answer_s"], 2),
            bl.fmt(
                (p["first_sent_s"] - p["ready_s"]) * 1000 if p["ready_s"] is not None else None,
                1,
            ),
        ]
        for p in step["new_pods"]
    ]
    lines += [
        "",
        bl.table(
            ["new pod", "Ready, s", "first request, s", "first answer, s", "Ready -> routed, ms"],
            pod_rows or [["-"] * 5],
        ),
    ]
    checks = {
        "n2_within_10pct": by_count[2]["vs_n_x_one"] >= 0.9,
        "n4_within_10pct": by_count[4]["vs_n_x_one"] >= 0.9,
        "none_routed_before_ready": step["routed_before_ready"] == 0,
        "one_step_to_max": [d["to"] for d in step["decisions"]][:1] == [max(COUNTS)],
    }
    lines += [
        "",
        f"| target | N=2 within 10 % of 2 x one: {checks['n2_within_10pct']} | N=4: "
        f"{checks['n4_within_10pct']} | routed before Ready: {step['routed_before_ready']} "
        f"| scaled 1 -> {max(COUNTS)} in one step: {checks['one_step_to_max']} |",
    ]
    return "\n".join(lines), {"by_replicas": by_count, "targets": checks}


def plot(data: dict[str, Any], summary: dict[str, Any], path: Path, *, service: float) -> None:
    plt = bl.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    by = summary["by_replicas"]
    counts = list(COUNTS)
    one = by[1]["rps"] or 0
    left.plot(counts, [by[n]["rps"] for n in counts], marker="o", label="measured")
    left.plot(counts, [n * one for n in counts], linestyle="--", label="N x one replica")
    left.plot(counts, [n / service for n in counts], linestyle=":", label="engines' limit")
    left.set_xlabel("replicas")
    left.set_ylabel("requests/s")
    left.set_xticks(counts)
    p99 = left.twinx()
    p99.bar(counts, [by[n]["p99_ms"] for n in counts], alpha=0.2, color="tab:red", width=0.4)
    p99.set_ylabel("p99 ms (bars)")
    left.legend(loc="upper left")
    left.set_title(f"throughput, {service * 1000:.0f} ms per request, one at a time per pod")

    step = data["step"]
    half = step["completed_per_half_second"]
    right.step(
        [i * 0.5 for i in range(len(half) + 1)],
        [c * 2 for c in half] + [half[-1] * 2 if half else 0],
        where="post",
        label="completed/s (0.5 s buckets)",
    )
    t = [x[0] for x in step["timeline"]]
    right.step(
        t,
        [x[1] * (1 / service) for x in step["timeline"]],
        where="post",
        alpha=0.6,
        label="routable pods x one pod's max",
    )
    for d in step["decisions"]:
        right.axvline(d["t"], color="tab:green", linestyle="--")
    for p in step["new_pods"]:
        if p["ready_s"] is not None:
            right.axvline(p["ready_s"], color="tab:gray", linestyle=":")
    right.set_xlabel("seconds after the load step (green: decision, grey: pod Ready)")
    right.set_ylabel("requests/s")
    right.legend(loc="lower right")
    right.set_title(f"load step: {step['clients']} clients onto 1 replica")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI")
    parser.add_argument("--service", type=float, help="seconds per request (engine)")
    parser.add_argument("--clients", type=int, help="closed-loop clients")
    parser.add_argument("--duration", type=float, help="seconds measured per replica count")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    parser.add_argument("--name", help="results file name (default scale_out[-smoke])")
    args = parser.parse_args()
    args.service = args.service or (0.05 if args.smoke else 0.1)
    args.clients = args.clients or 16
    args.duration = args.duration or (1.5 if args.smoke else 8.0)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.step_duration = 4.0 if args.smoke else 10.0
    args.startup_delay = 0.2 if args.smoke else 1.0
    started = time.time()
    data = asyncio.run(measure(args))
    text, summary = report(data, service=args.service)
    name = args.name or ("scale_out-smoke" if args.smoke else "scale_out")
    result = {
        "benchmark": "scale_out",
        "command": " ".join(["python bench/scale_out.py", *sys.argv[1:]]),
        "machine": bl.machine(),
        "seconds": round(time.time() - started, 1),
        "settings": {
            "service_s": args.service,
            "clients": args.clients,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "target_concurrency": TARGET_CONCURRENCY,
            "burst_factor": BURST,
            "engine_startup_delay_s": args.startup_delay,
            "routing": "client -> PodRouter -> pod (not through activator's proxy yet)",
        },
        **summary,
        **data,
    }
    bl.publish(
        name,
        result,
        out_dir=args.out,
        draw=lambda png: plot(data, summary, png, service=args.service),
        report=text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
