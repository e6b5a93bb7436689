"""Scale-out through activator: throughput and p99 with 1, 2 and 4 replicas, and a load
step's time to new pods.

  python bench/scale_out.py            # 3 rounds x 8 s per replica count, then the step
  python bench/scale_out.py --smoke    # seconds; CI
Options: --service S (seconds per request)  --clients C  --duration D  --rounds R
         --out DIR  --name NAME

In one process: the fake Kubernetes API server (tests/fakekube/server.py), whose
simulated kubelet runs each pod's stand-in engine as a real process on its own loopback
pod IP, with a fixed service time and one request at a time (`--response-delay S
--max-concurrency 1`: the engine is the bottleneck, as a GPU is); activator itself, the
in-process app (activator.app.build_app) served by aiohttp on a loopback port as
tests/harness.py and bench/kube_wake.py run it, reaching the fake API through a
generated kubeconfig; and C closed-loop aiohttp clients posting chat completions to
activator. The model is scaled out (replicas.max 4, target_concurrency 1, burst_factor
2: each pod carries at most 2 requests, the rest are held in activator; scale_down_delay
10m), so activator routes each request to a pod from the Service's EndpointSlices and
scales the Deployment itself. Requests go client -> activator's proxy -> pod.

Throughput: for N = 1, 2, 4 (interleaved over rounds) a fresh fake cluster whose node
has N GPUs (the workload asks for one per pod), so activator's one config asks for 4
replicas under the clients' demand of 16 and N of them schedule, the others stay
Pending: the same config and the same routing path for every N. Once N pods are
routable (activator's /admin/models) and a warm-up second has passed, D seconds are
measured: completed requests/s and the client's latency (send -> last byte); the target
is N x one replica's throughput within 10 %.

Load step: a cluster without a GPU bound, the model woken by one request to 1 replica
and left idle; then C clients at once. Reported: step -> activator's scale decision (its
`scale up` log line, and activator_scale_decisions_total), -> the API server's record of
the Deployment's spec.replicas write, -> each new pod Ready (the fake kubelet's record),
-> the first request routed to each new pod (the instant activator's router gave it the
pod: its debug line `request routed to pod P`, stamped as it is logged) and the first
answered by it (activator's JSON access log, its `pod` key). Any request routed to a pod
before that pod's Ready time is counted as routed before Ready, in the throughput runs
and in the step (target: none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl
from aiohttp import web

from activator.app import METRICS, build_app
from activator.config.load import parse_config
from activator.testing.polling import poll
from tests.fakekube.server import FakeKube, PodPlan
from tests.fakekube.store import Change

NAMESPACE, MODEL, SERVED = "serving", "coder", "coder-served"
COUNTS = (1, 2, 4)
MAX_REPLICAS = max(COUNTS)
TARGET_CONCURRENCY, BURST = 1, 2
SCALE_DOWN_DELAY = "10m"  # longer than any run: replicas stay once up
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DECISION = re.compile(r"scale (up|down) (\d+) -> (\d+) \((\w+)\): demand (\d+)")
ROUTED = re.compile(r"model=(\S+) request routed to pod (\S+) ")


# ----- what activator logs, stamped with this process's monotonic clock ------------------


@dataclass
class Served:
    """One access-log line of activator."""

    pod: str | None
    status: int
    done: float  # when the line was logged (the answer ended)


@dataclass
class Routed:
    """One request given to a pod: the router's lease on it (its debug line)."""

    pod: str
    at: float


class Logs(logging.Handler):
    """activator's access log (JSON), its routing (each request given to a pod), its scale
    decisions and its re-routes, as they are logged. Handlers run synchronously in the
    logging call, so the stamp is the event's."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.served: list[Served] = []
        self.routed: list[Routed] = []
        self.decisions: list[dict[str, Any]] = []
        self.rerouted = 0  # a pod refused the connection; activator sent it to another

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        message = record.getMessage()
        if record.name == "activator.access":
            line = json.loads(message)
            if line["model"] != MODEL:
                return
            self.served.append(Served(line["pod"], line["status"], now))
        elif record.name == "activator.placement.routing":
            if (routed := ROUTED.match(message)) is not None and routed.group(1) == MODEL:
                self.routed.append(Routed(routed.group(2), now))
        elif (found := DECISION.search(message)) is not None:
            direction, current, desired, reason, demand = found.groups()
            self.decisions.append(
                {
                    "t": now,
                    "direction": direction,
                    "from": int(current),
                    "to": int(desired),
                    "why": reason,
                    "demand": int(demand),
                }
            )
        elif "did not take the connection" in message:
            self.rerouted += 1

    @contextlib.contextmanager
    def attached(self) -> Any:
        levels = {
            "activator.access": logging.INFO,
            "activator.placement.scaleout": logging.INFO,
            "activator.edge.proxy": logging.INFO,
            "activator.placement.routing": logging.DEBUG,
        }
        loggers = [logging.getLogger(n) for n in levels]
        saved = [(lg, lg.level, lg.propagate) for lg in loggers]
        for lg in loggers:
            lg.setLevel(levels[lg.name])
            lg.propagate = False  # not printed: only recorded
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg, level, propagate in saved:
                lg.removeHandler(self)
                lg.setLevel(level)
                lg.propagate = propagate


@dataclass
class Writes:
    """The API server's record of the Deployment's spec.replicas, each change stamped."""

    seen: list[tuple[float, int]] = field(default_factory=list)

    def observe(self, change: Change) -> None:
        if change.resource != "deployments" or change.type == "DELETED":
            return
        if change.obj["metadata"]["name"] != MODEL:
            return
        replicas = int(change.obj.get("spec", {}).get("replicas") or 0)
        if not self.seen or self.seen[-1][1] != replicas:
            self.seen.append((time.monotonic(), replicas))


# ----- the rig: a fake cluster and activator on loopback --------------------------------


@dataclass
class Rig:
    kube: FakeKube
    url: str
    app: web.Application
    session: aiohttp.ClientSession
    logs: Logs
    latencies: list[tuple[float, float, bool]] = field(default_factory=list)  # sent, done, ok
    sending: list[float] = field(default_factory=list)  # per client: its request's send time

    async def routable(self) -> int:
        async with self.session.get(f"{self.url}/admin/models/{MODEL}") as resp:
            described = await resp.json()
        return sum(1 for p in described["replicas"]["pods"] if p["routable"])

    async def until(self, condition: Callable[[], Any], *, what: str, within: float) -> None:
        """Poll another component's state (activator's admin API, the cluster) with a
        deadline: neither reports to the bench by an event."""
        await poll(condition, timeout=within, what=what, interval=0.05)

    def ready_pods(self) -> int:
        return sum(1 for p in self.kube.pods(MODEL) if _is_ready(p))

    async def post(self, slot: int | None = None) -> None:
        sent = time.monotonic()
        if slot is not None:
            self.sending[slot] = sent
        ok = False
        try:
            async with self.session.post(self.url + "/v1/chat/completions", json=BODY) as r:
                await r.read()
                ok = r.status == 200
        except aiohttp.ClientError:
            ok = False
        self.latencies.append((sent, time.monotonic(), ok))

    async def clients(self, count: int, until: list[float]) -> None:
        """`count` closed-loop clients, each sending its next request as soon as the last
        is answered, until the clock passes until[0] (which may be moved while they run)."""

        self.sending = [0.0] * count

        async def loop(slot: int) -> None:
            while time.monotonic() < until[0]:
                await self.post(slot)

        await asyncio.gather(*(loop(i) for i in range(count)))

    def decisions_metric(self) -> float:
        return sum(
            s.value
            for family in self.app[METRICS].registry.collect()
            for s in family.samples
            if s.name == "activator_scale_decisions_total"
            and s.labels.get("model") == MODEL
            and s.labels.get("direction") == "up"
        )


def _is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@contextlib.asynccontextmanager
async def rig(args: argparse.Namespace, *, gpus: int | None) -> AsyncIterator[Rig]:
    """A fake cluster (a node of `gpus` GPUs, None: unbounded) with the model's
    Deployment at 0 replicas, and activator serving it on a loopback port."""
    engine = ("--disable-access-log", "--response-delay", str(args.service))
    engine += ("--max-concurrency", "1")
    plan = PodPlan(engine_args=engine, engine_startup_delay=args.startup_delay, termination_grace=5)
    async with FakeKube(gpus=gpus) as kube:
        workload = kube.add_workload(
            MODEL, namespace=NAMESPACE, served_model_name=SERVED, gpu=gpus is not None, plan=plan
        )
        config = {
            "server": {"access_log": "json"},
            "kubernetes": {"kubeconfig": kube.kubeconfig, "request_timeout": "10s"},
            "models": {
                MODEL: {
                    "served_model_name": SERVED,
                    "startup_timeout": "120s",
                    "replicas": {
                        "max": MAX_REPLICAS,
                        "target_concurrency": TARGET_CONCURRENCY,
                        "burst_factor": BURST,
                        "scale_down_delay": SCALE_DOWN_DELAY,
                    },
                    "kubernetes": {
                        "namespace": NAMESPACE,
                        "deployment": MODEL,
                        "url": workload.url,
                        "service": MODEL,
                    },
                }
            },
        }
        app = build_app(parse_config(config, environ={}))
        runner = web.AppRunner(app, handler_cancellation=True)
        logs = Logs()
        with logs.attached():
            await runner.setup()
            try:
                port = bl.free_port()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as session:
                    yield Rig(kube, f"http://127.0.0.1:{port}", app, session, logs)
            finally:
                await runner.cleanup()


def before_ready(routed: list[Routed], ready_at: dict[str, float]) -> int:
    """Requests routed to a pod before the kubelet marked that pod Ready (or to a pod
    it never marked Ready)."""
    return sum(1 for r in routed if r.pod not in ready_at or r.at < ready_at[r.pod])


def first_ready(kube: FakeKube) -> dict[str, float]:
    ready_at: dict[str, float] = {}
    for pod, at in kube.kubelet.ready_times:
        ready_at.setdefault(pod, at)
    return ready_at


# ----- throughput with N replicas -------------------------------------------------------


async def one_count(args: argparse.Namespace, replicas: int, index: int) -> dict[str, Any]:
    """N GPUs on the node, so N of the 4 replicas activator asks for run."""
    async with rig(args, gpus=replicas) as r:
        until = [math.inf]
        load = asyncio.create_task(r.clients(args.clients, until), name="bench-clients")

        async def up() -> bool:
            if load.done():
                load.result()  # a client loop died: its error, not a timeout
                raise RuntimeError("the clients stopped before the replicas were up")
            return r.ready_pods() == replicas and await r.routable() == replicas

        try:
            await r.until(up, what=f"{replicas} routable pods", within=120)
            # The requests held while the pods came up (the first since the model woke) are
            # not steady state: the window opens once each client has moved past them.
            routable_at = time.monotonic()
            await r.until(
                lambda: min(r.sending) >= routable_at, what="requests held at start", within=120
            )
            begin = time.monotonic() + args.warmup
            end = begin + args.duration
            until[0] = end
        finally:
            if until[0] == math.inf:  # failed before the window: stop the clients
                until[0] = 0.0
            await load
        done = [(s, d, ok) for s, d, ok in r.latencies if begin <= d < end]
        latencies = [d - s for s, d, ok in done if ok]
        served = [s for s in r.logs.served if begin <= s.done < end]
        run = {
            "round": index + 1,
            "replicas": replicas,
            "completed": len(done),
            "errors": sum(1 for _, _, ok in done if not ok),
            "rps": len(done) / (end - begin),
            "p50_ms": (bl.percentile(latencies, 50) or 0) * 1000,
            "p99_ms": (bl.percentile(latencies, 99) or 0) * 1000,
            "pods": sorted({s.pod or "-" for s in served}),
            "per_pod": {p: sum(1 for s in served if s.pod == p) for p in {s.pod for s in served}},
            "routed_before_ready": before_ready(r.logs.routed, first_ready(r.kube)),
            "rerouted": r.logs.rerouted,
            "pending_pods": len(r.kube.pods(MODEL)) - r.ready_pods(),
        }
    print(
        f"round {index + 1}: {replicas} replica(s): {run['rps']:.1f} req/s, "
        f"p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms, {run['errors']} errors, "
        f"{run['routed_before_ready']} routed before Ready",
        flush=True,
    )
    return run


# ----- the load step --------------------------------------------------------------------


async def load_step(args: argparse.Namespace) -> dict[str, Any]:
    """One replica warm and idle, then `args.clients` clients at once."""
    async with rig(args, gpus=None) as r:
        writes = Writes()
        r.kube.store.observe(writes.observe)
        await r.post()  # wakes the model: 0 -> 1
        await r.until(
            lambda: r.kube.replicas(MODEL) == 1 and r.ready_pods() == 1,
            what="one ready replica",
            within=120,
        )
        (first_pod,) = [p["metadata"]["name"] for p in r.kube.pods(MODEL)]
        metric_before = r.decisions_metric()
        served_before = len(r.logs.served)
        routed_before = len(r.logs.routed)
        decisions_before = len(r.logs.decisions)
        r.latencies.clear()

        step = time.monotonic()
        await r.clients(args.clients, [step + args.step_duration])
        end = time.monotonic()

        ready_at = first_ready(r.kube)
        served = r.logs.served[served_before:]
        routed = r.logs.routed[routed_before:]
        decisions = r.logs.decisions[decisions_before:]
        new_pods = sorted((p for p in ready_at if p != first_pod), key=lambda p: ready_at[p])
        pods = []
        for pod in new_pods:
            answered = [s.done for s in served if s.pod == pod and s.status == 200]
            pods.append(
                {
                    "pod": pod,
                    "ready_s": ready_at[pod] - step,
                    "first_routed_s": min((r.at for r in routed if r.pod == pod), default=math.nan)
                    - step,
                    "first_answer_s": min(answered, default=math.nan) - step,
                }
            )
        buckets: dict[int, int] = {}
        for _, done, _ in r.latencies:
            key = int((done - step) / 0.5)
            buckets[key] = buckets.get(key, 0) + 1
        per_pod_ready = {p: ready_at[p] - step for p in ready_at}
        return {
            "clients": args.clients,
            "duration_s": args.step_duration,
            "first_pod": first_pod,
            "decisions": [{**d, "t": d["t"] - step} for d in decisions],
            "decisions_metric": r.decisions_metric() - metric_before,
            "replicas_writes": [(t - step, n) for t, n in writes.seen if t >= step],
            "new_pods": pods,
            "ready_s": per_pod_ready,
            "routed_before_ready": before_ready(routed, ready_at),
            "rerouted": r.logs.rerouted,
            "requests": len(r.latencies),
            "errors": sum(1 for _, _, ok in r.latencies if not ok),
            "completed_per_half_second": [
                buckets.get(i, 0) for i in range(int((end - step) / 0.5))
            ],
            "final_rps": sum(
                1 for _, d, _ in r.latencies if step + args.step_duration / 2 <= d < end
            )
            / max(1e-9, end - step - args.step_duration / 2),
        }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for index in range(args.rounds):
        order = COUNTS if index % 2 == 0 else tuple(reversed(COUNTS))
        for replicas in order:
            runs.append(await one_count(args, replicas, index))
    print("load step: 1 idle replica, then all clients at once", flush=True)
    step = await load_step(args)
    return {"runs": runs, "step": step}


# ----- the report -----------------------------------------------------------------------


def report(data: dict[str, Any], *, service: float) -> tuple[str, dict[str, Any]]:
    by_count: dict[int, dict[str, Any]] = {}
    for n in COUNTS:
        runs = [r for r in data["runs"] if r["replicas"] == n]
        by_count[n] = {
            "rps": bl.median([r["rps"] for r in runs]),
            "p50_ms": bl.median([r["p50_ms"] for r in runs]),
            "p99_ms": bl.median([r["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "routed_before_ready": sum(r["routed_before_ready"] for r in runs),
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
                str(s["routed_before_ready"]),
            ]
        )
    headers = ["replicas", "req/s", "engine max", "vs N x one", "p50 ms", "p99 ms", "errors"]
    lines = [bl.table([*headers, "before Ready"], rows)]
    step = data["step"]
    step_rows = [
        [
            f"{d['direction']} ({d['why']})",
            f"{d['from']} -> {d['to']}",
            str(d["demand"]),
            bl.fmt(d["t"] * 1000, 1),
        ]
        for d in step["decisions"]
    ]
    step_rows += [
        ["API: spec.replicas written", f"-> {n}", "", bl.fmt(t * 1000, 1)]
        for t, n in step["replicas_writes"]
    ]
    lines += [
        "",
        bl.table(["decision", "replicas", "demand", "after step, ms"], step_rows or [["-"] * 4]),
    ]
    pod_rows = [
        [
            p["pod"],
            bl.fmt(p["ready_s"], 3),
            bl.fmt(p["first_routed_s"], 3),
            bl.fmt(p["first_answer_s"], 3),
            bl.fmt((p["first_routed_s"] - p["ready_s"]) * 1000, 1),
        ]
        for p in step["new_pods"]
    ]
    lines += [
        "",
        bl.table(
            ["new pod", "Ready, s", "first routed, s", "first answer, s", "Ready -> routed, ms"],
            pod_rows or [["-"] * 5],
        ),
    ]
    before = step["routed_before_ready"] + sum(s["routed_before_ready"] for s in by_count.values())
    checks = {
        "n2_within_10pct": by_count[2]["vs_n_x_one"] >= 0.9,
        "n4_within_10pct": by_count[4]["vs_n_x_one"] >= 0.9,
        "none_routed_before_ready": before == 0,
        "one_step_to_max": [d["to"] for d in step["decisions"]][:1] == [MAX_REPLICAS],
    }
    lines += [
        "",
        f"| target | N=2 within 10 % of 2 x one: {checks['n2_within_10pct']} | N=4: "
        f"{checks['n4_within_10pct']} | routed before Ready: {before} "
        f"| scaled 1 -> {MAX_REPLICAS} in one step: {checks['one_step_to_max']} "
        f"| step errors: {step['errors']} | re-routed: {step['rerouted']} |",
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
    left.set_title(f"through activator, {service * 1000:.0f} ms per request, 1 at a time per pod")

    step = data["step"]
    half = step["completed_per_half_second"]
    right.step(
        [i * 0.5 for i in range(len(half) + 1)],
        [c * 2 for c in half] + [half[-1] * 2 if half else 0],
        where="post",
        label="completed/s (0.5 s buckets)",
    )
    ready = sorted(step["ready_s"].values())
    if ready:
        # Pods Ready over time, in requests/s they can serve (the first was Ready before).
        times = [0.0, *[t for t in ready if t > 0]]
        levels = [(i + 1) / service for i in range(len(times))]
        right.step(
            [*times, len(half) * 0.5],
            [*levels, levels[-1]],
            where="post",
            alpha=0.6,
            label="Ready pods x one pod's max",
        )
    for d in step["decisions"]:
        right.axvline(d["t"], color="tab:green", linestyle="--")
    for p in step["new_pods"]:
        right.axvline(p["ready_s"], color="tab:gray", linestyle=":")
    right.set_xlabel("seconds after the load step (green: decision, grey: pod Ready)")
    right.set_ylabel("requests/s")
    right.legend(loc="lower right")
    right.set_title(f"load step: {step['clients']} clients onto 1 idle replica")
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
    args.warmup = 0.5 if args.smoke else 1.0
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
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "max_replicas": MAX_REPLICAS,
            "target_concurrency": TARGET_CONCURRENCY,
            "burst_factor": BURST,
            "scale_down_delay": SCALE_DOWN_DELAY,
            "engine_startup_delay_s": args.startup_delay,
            "routing": "client -> activator (in-process app, aiohttp on loopback) -> pod",
            "pinning": "N GPUs on the fake node, 1 per pod: N of the 4 replicas schedule",
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
