"""Proxy overhead: the same fast upstream, called directly and through nginx, activator
(model warm) and the LiteLLM proxy, interleaved in one run.

  python bench/overhead.py            # full run (a few minutes)
  python bench/overhead.py --smoke    # seconds; CI
Options: --peers direct,nginx,activator,litellm  --duration S  --rounds N  --out DIR
         --litellm PATH (the `litellm` binary; default: bench/litellm_env.sh's venv)

Non-streaming load: wrk (one thread, one fixed POST body from a Lua script) at each
concurrency. Streaming: an aiohttp client in this process; chunks/s on back-to-back
streams, and per-chunk latency on paced streams (the upstream writes its CLOCK_MONOTONIC
time into each chunk; we subtract it on arrival). Every peer sees the same upstream
processes: activator starts them (its local backend), the other peers are pointed at them.
Peers that are not installed are skipped with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchlib as bl

UPSTREAM = Path(__file__).resolve().parent / "upstream.py"
PEERS = ("direct", "nginx", "activator", "litellm")
LITELLM_KEY = "sk-bench-master"
CHAT = {"messages": [{"role": "user", "content": "Say hello."}]}
CONTENT_NS = re.compile(rb'"content":"(\d{6,})"')
DEFAULT_LITELLM = Path.home() / ".cache" / "activator-bench" / "litellm-venv" / "bin" / "litellm"


@dataclass
class Peer:
    """A way to reach the two upstreams: `fast` (answers at once) and `paced` streams."""

    name: str
    base: dict[str, str]  # upstream kind -> OpenAI base URL (".../v1")
    headers: dict[str, str] = field(default_factory=dict)

    def url(self, kind: str) -> str:
        return self.base[kind] + "/chat/completions"


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    duration: int  # seconds per wrk run
    rounds: int
    stream_concurrency: tuple[int, ...]
    stream_seconds: float
    stream_chunks: int  # chunks per back-to-back stream
    paced_streams: int
    paced_chunks: int
    chunk_interval: float


FULL = Plan((1, 32, 256), 5, 3, (1, 32), 5.0, 200, 20, 50, 0.005)
SMOKE = Plan((1, 8), 1, 1, (4,), 0.5, 20, 2, 10, 0.002)


# ---- peers ----------------------------------------------------------------------------


def upstream_model(kind: str, interval: float) -> dict[str, Any]:
    command = [sys.executable, str(UPSTREAM), "--port", "{port}", "--served-model-name", kind]
    if kind == "paced":
        command += ["--chunk-interval", str(interval)]
    return {"process": {"command": command, "port": 0, "stop_grace": "5s"}, "idle_timeout": "24h"}


@contextlib.contextmanager
def nginx_peer(upstreams: dict[str, str]) -> Iterator[Peer | None]:
    binary = bl.which("nginx")
    if binary is None:
        print("nginx: not installed (Debian package nginx or nginx-light) - skipped")
        yield None
        return
    port = bl.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        blocks, locations = [], []
        for kind, url in upstreams.items():
            blocks.append(
                f"upstream {kind} {{ server {url.removeprefix('http://')}; keepalive 512; }}"
            )
            locations.append(
                f"location /{kind}/ {{ proxy_pass http://{kind}/; proxy_http_version 1.1; "
                'proxy_set_header Connection ""; proxy_buffering off; }'
            )
        temp_paths = " ".join(
            f"{name}_temp_path {tmp}/{name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = Path(tmp) / "nginx.conf"
        # Debian's defaults where they matter (worker_processes auto), logs off as ours are.
        conf.write_text(
            f"""daemon off; worker_processes auto; pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; {temp_paths}
  {" ".join(blocks)}
  server {{ listen 127.0.0.1:{port}; {" ".join(locations)} }}
}}
"""
        )
        proc = subprocess.Popen(
            [binary, "-p", tmp, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            bl.wait_until(
                lambda: proc.poll() is not None or _get_ok(f"http://127.0.0.1:{port}/fast/health"),
                timeout=15,
                what="nginx",
            )
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                print(f"nginx: failed to start - skipped: {err.strip()}")
                yield None
                return
            base = f"http://127.0.0.1:{port}"
            yield Peer("nginx", {kind: f"{base}/{kind}/v1" for kind in upstreams})
        finally:
            bl.stop_process(proc, grace=10)


@contextlib.contextmanager
def litellm_peer(upstreams: dict[str, str], binary: str | None) -> Iterator[Peer | None]:
    path = Path(binary) if binary else DEFAULT_LITELLM
    env_venv = os.environ.get("LITELLM_VENV")
    if not binary and env_venv:
        path = Path(env_venv) / "bin" / "litellm"
    if not path.exists():
        print(f"litellm: not installed (run bench/litellm_env.sh; looked for {path}) - skipped")
        yield None
        return
    port = bl.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-litellm-") as tmp:
        config = {
            "model_list": [
                {
                    "model_name": kind,
                    "litellm_params": {
                        "model": f"openai/{kind}",
                        "api_base": url + "/v1",
                        "api_key": "unused",
                    },
                }
                for kind, url in upstreams.items()
            ],
            "general_settings": {"master_key": LITELLM_KEY},
        }
        conf = Path(tmp) / "litellm.yaml"
        conf.write_text(json.dumps(config))  # JSON is YAML
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        with (Path(tmp) / "litellm.log").open("wb") as log:
            proc = subprocess.Popen(
                [str(path), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            bl.wait_until(
                lambda: proc.poll() is not None or _get_ok(base + "/health/liveliness"),
                timeout=120,
                what="litellm proxy",
                interval=0.25,
            )
            if proc.poll() is not None:
                print(f"litellm: exited at start-up - skipped (log: {tmp}/litellm.log)")
                yield None
                return
            peer = Peer(
                "litellm",
                {kind: base + "/v1" for kind in upstreams},
                headers={"Authorization": f"Bearer {LITELLM_KEY}"},
            )
            yield peer
        finally:
            bl.stop_process(proc, grace=10)


def _get_ok(url: str) -> bool:
    try:
        bl.http_text(url, timeout=2)
    except Exception:  # not up yet: any failure means "poll again"
        return False
    return True


# ---- non-streaming load (wrk) ---------------------------------------------------------

LUA = """
wrk.method = "POST"
wrk.body = %(body)s
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"errors":%%d,"non2xx":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk(peer: Peer, *, concurrency: int, duration: int, workdir: Path) -> dict[str, Any]:
    body = json.dumps({"model": "fast", **CHAT})
    headers = {"Content-Type": "application/json", **peer.headers}
    script = workdir / f"{peer.name}.lua"
    script.write_text(
        LUA
        % {
            "body": lua_string(body),
            "headers": "\n".join(
                f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}" for k, v in headers.items()
            ),
        }
    )
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        peer.url("fast"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line.removeprefix("WRKJSON "))
            seconds = raw["duration_us"] / 1e6
            return {
                "rps": raw["requests"] / seconds if seconds else 0.0,
                "p50_ms": raw["p50_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "requests": raw["requests"],
                "errors": raw["errors"] + raw["non2xx"],
            }
    raise RuntimeError(f"wrk printed no result: {done.stdout}\n{done.stderr}")


# ---- streaming (aiohttp client) ---------------------------------------------------------


async def stream_throughput(
    session: aiohttp.ClientSession, peer: Peer, *, concurrency: int, seconds: float, chunks: int
) -> dict[str, Any]:
    """Back-to-back streams of `chunks` chunks from `concurrency` clients for `seconds`."""
    body = {"model": "fast", "stream": True, "max_tokens": chunks, **CHAT}
    events = streams = errors = 0
    deadline = time.monotonic() + seconds

    async def client() -> None:
        nonlocal events, streams, errors
        while time.monotonic() < deadline:
            async with session.post(peer.url("fast"), json=body, headers=peer.headers) as resp:
                if resp.status != 200:
                    errors += 1
                    await resp.read()
                    continue
                tail = b""
                async for data in resp.content.iter_any():
                    seen = tail + data
                    events += seen.count(b"data: ")
                    tail = seen[-5:]  # shorter than the marker: never counted twice
                streams += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "chunks_per_s": events / elapsed,
        "streams_per_s": streams / elapsed,
        "chunks": events,
        "errors": errors,
    }


async def chunk_latency(
    session: aiohttp.ClientSession, peer: Peer, *, streams: int, chunks: int
) -> dict[str, Any]:
    """One paced stream at a time; each chunk's delay from upstream write to our read."""
    body = {"model": "paced", "stream": True, "max_tokens": chunks, **CHAT}
    delays: list[float] = []
    for _ in range(streams):
        async with session.post(peer.url("paced"), json=body, headers=peer.headers) as resp:
            resp.raise_for_status()
            async for data in resp.content.iter_any():
                now = time.monotonic_ns()
                delays += [(now - int(m)) / 1e6 for m in CONTENT_NS.findall(data)]
    return {
        "p50_ms": bl.percentile(delays, 50),
        "p99_ms": bl.percentile(delays, 99),
        "chunks": len(delays),
    }


# ---- the run ------------------------------------------------------------------------------


def run(plan: Plan, peers_wanted: list[str], *, litellm: str | None) -> dict[str, Any]:
    upstream_models = {
        kind: upstream_model(kind, plan.chunk_interval) for kind in ("fast", "paced")
    }
    with contextlib.ExitStack() as stack:
        act = stack.enter_context(bl.activator_process(upstream_models))
        for kind in upstream_models:  # wake both: the measurement is of a warm model
            bl.http_json(
                f"{act.url}/v1/chat/completions", method="POST", body={"model": kind, **CHAT}
            )
        upstreams = {kind: act.model(kind)["upstream_url"] for kind in upstream_models}
        peers: list[Peer] = []
        for name in peers_wanted:
            if name == "direct":
                peers.append(Peer("direct", {k: u + "/v1" for k, u in upstreams.items()}))
            elif name == "activator":
                peers.append(Peer("activator", {k: act.url + "/v1" for k in upstreams}))
            elif name == "nginx":
                peer = stack.enter_context(nginx_peer(upstreams))
                if peer is not None:
                    peers.append(peer)
            elif name == "litellm":
                peer = stack.enter_context(litellm_peer(upstreams, litellm))
                if peer is not None:
                    peers.append(peer)
        if bl.which("wrk") is None:
            print("wrk: not installed (Debian package wrk) - non-streaming load skipped")
        results: dict[str, Any] = {
            "wrk": {p.name: {} for p in peers},
            "stream": {p.name: {} for p in peers},
            "chunk_latency": {},
        }
        with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
            if bl.which("wrk") is not None:
                for peer in peers:  # warm-up: connections, caches, LiteLLM's first-call paths
                    wrk(peer, concurrency=4, duration=1, workdir=Path(tmp))
                for round_ in range(plan.rounds):
                    for conc in plan.concurrency:
                        for peer in peers:
                            r = wrk(
                                peer, concurrency=conc, duration=plan.duration, workdir=Path(tmp)
                            )
                            results["wrk"][peer.name].setdefault(str(conc), []).append(r)
                            print(
                                f"round {round_ + 1} c={conc:<3} {peer.name:<9} "
                                f"{r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                                f"p99 {r['p99_ms']:.3f} ms  errors {r['errors']}",
                                flush=True,
                            )
        results["stream"], results["chunk_latency"] = asyncio.run(streaming(plan, peers))
    return results


async def streaming(plan: Plan, peers: list[Peer]) -> tuple[dict[str, Any], dict[str, Any]]:
    throughput: dict[str, Any] = {p.name: {} for p in peers}
    latency: dict[str, Any] = {p.name: [] for p in peers}
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(plan.rounds):
            for conc in plan.stream_concurrency:
                for peer in peers:
                    r = await stream_throughput(
                        session,
                        peer,
                        concurrency=conc,
                        seconds=plan.stream_seconds,
                        chunks=plan.stream_chunks,
                    )
                    throughput[peer.name].setdefault(str(conc), []).append(r)
                    print(
                        f"stream c={conc:<3} {peer.name:<9} {r['chunks_per_s']:>9,.0f} chunks/s",
                        flush=True,
                    )
            for peer in peers:
                r = await chunk_latency(
                    session, peer, streams=plan.paced_streams, chunks=plan.paced_chunks
                )
                latency[peer.name].append(r)
                print(
                    f"chunk latency {peer.name:<9} p50 {bl.fmt(r['p50_ms'], 3)} ms "
                    f"p99 {bl.fmt(r['p99_ms'], 3)} ms",
                    flush=True,
                )
    return throughput, latency


NO_WRK = (
    "requests/s and latency: not measured, wrk is not installed "
    "(apt-get install wrk, or brew install wrk; then run this again)"
)


# ---- summary ------------------------------------------------------------------------------


def summarize(results: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Medians over rounds, ratios to direct and nginx, and the targets."""
    wrk_rows: dict[str, dict[str, dict[str, float | None]]] = {}
    for peer, by_conc in results["wrk"].items():
        for conc, runs in by_conc.items():
            wrk_rows.setdefault(conc, {})[peer] = {
                key: bl.median([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms")
            } | {"errors": sum(r["errors"] for r in runs)}
    stream_rows: dict[str, dict[str, float | None]] = {}
    for peer, by_conc in results["stream"].items():
        for conc, runs in by_conc.items():
            stream_rows.setdefault(conc, {})[peer] = bl.median([r["chunks_per_s"] for r in runs])
    chunk_rows = {
        peer: {
            key: bl.median([r[key] for r in runs if r[key] is not None])
            for key in ("p50_ms", "p99_ms")
        }
        for peer, runs in results["chunk_latency"].items()
    }
    return {
        "wrk": wrk_rows,
        "stream_chunks_per_s": stream_rows,
        "chunk_latency": chunk_rows,
        "targets": targets(wrk_rows, stream_rows, chunk_rows, plan),
    }


def targets(
    wrk_rows: dict[str, Any], stream_rows: dict[str, Any], chunk_rows: dict[str, Any], plan: Plan
) -> list[dict[str, Any]]:
    def get(conc: int, peer: str, key: str) -> float | None:
        value: float | None = wrk_rows.get(str(conc), {}).get(peer, {}).get(key)
        return value

    def added(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    mid = 32 if 32 in plan.concurrency else plan.concurrency[-1]
    best_stream = max(stream_rows, key=int) if stream_rows else None
    chunks = stream_rows.get(best_stream, {}).get("activator") if best_stream else None
    checks = [
        (
            "warm path added p50, c=1 (ms)",
            added(get(1, "activator", "p50_ms"), get(1, "direct", "p50_ms")),
            "<=",
            0.5,
        ),
        (
            f"req/s vs nginx, c={mid}",
            ratio(get(mid, "activator", "rps"), get(mid, "nginx", "rps")),
            ">=",
            0.3,
        ),
        (
            f"req/s vs LiteLLM, c={mid}",
            ratio(get(mid, "activator", "rps"), get(mid, "litellm", "rps")),
            ">=",
            10.0,
        ),
        (f"stream chunks/s relayed, c={best_stream}", chunks, ">=", 20_000.0),
        (
            "added per-chunk latency p50 (ms)",
            added(
                chunk_rows.get("activator", {}).get("p50_ms"),
                chunk_rows.get("direct", {}).get("p50_ms"),
            ),
            "<=",
            0.2,
        ),
    ]
    out = []
    for name, value, op, goal in checks:
        met = None if value is None else (value <= goal if op == "<=" else value >= goal)
        out.append({"target": name, "measured": value, "goal": f"{op} {goal:g}", "met": met})
    return out


def report(summary: dict[str, Any], *, smoke: bool = False) -> str:
    peers = ["direct", "nginx", "activator", "litellm"]
    rows = []
    for conc, by_peer in summary["wrk"].items():
        direct = by_peer.get("direct", {})
        nginx = by_peer.get("nginx", {})
        for peer in peers:
            if peer not in by_peer:
                continue
            r = by_peer[peer]
            rows.append(
                [
                    conc,
                    peer,
                    bl.fmt(r["rps"], 0),
                    bl.fmt(r["p50_ms"], 3),
                    bl.fmt(r["p99_ms"], 3),
                    _ratio(r["rps"], direct.get("rps")),
                    _ratio(r["rps"], nginx.get("rps")),
                    _delta(r["p50_ms"], direct.get("p50_ms")),
                    str(r["errors"]),
                ]
            )
    # Without wrk there is nothing to show but an empty table: say why, and how to fix it.
    out = [
        NO_WRK
        if not rows
        else bl.table(
            [
                "conc",
                "peer",
                "req/s",
                "p50 ms",
                "p99 ms",
                "vs direct",
                "vs nginx",
                "added p50 ms",
                "errors",
            ],
            rows,
        )
    ]
    srows = []
    for conc, by_peer in summary["stream_chunks_per_s"].items():
        for peer in peers:
            if peer in by_peer:
                srows.append(
                    [
                        conc,
                        peer,
                        bl.fmt(by_peer[peer], 0),
                        _ratio(by_peer[peer], by_peer.get("direct")),
                        _ratio(by_peer[peer], by_peer.get("nginx")),
                    ]
                )
    out.append(bl.table(["streams", "peer", "chunks/s", "vs direct", "vs nginx"], srows))
    lat = summary["chunk_latency"]
    direct_p50 = lat.get("direct", {}).get("p50_ms")
    lrows = [
        [
            peer,
            bl.fmt(lat[peer]["p50_ms"], 3),
            bl.fmt(lat[peer]["p99_ms"], 3),
            _delta(lat[peer]["p50_ms"], direct_p50),
        ]
        for peer in peers
        if peer in lat
    ]
    out.append(bl.table(["peer", "chunk delay p50 ms", "p99 ms", "added p50 ms"], lrows))
    out.append(targets_table(summary["targets"], smoke=smoke))
    return "\n\n".join(out)


def targets_table(checks: list[dict[str, Any]], *, smoke: bool = False) -> str:
    rows = [
        [
            c["target"],
            bl.fmt(c["measured"], 3),
            c["goal"],
            bl.verdict(c["met"], smoke=smoke),
        ]
        for c in checks
    ]
    return bl.table(["target", "measured", "goal", ""], rows)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a - b:+.3f}"


def plot(summary: dict[str, Any], path: Path) -> None:
    plt = bl.pyplot()
    peers = ["direct", "nginx", "activator", "litellm"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    concs = list(summary["wrk"])
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + i * width for j in range(len(concs))]
        rps = [summary["wrk"][c].get(peer, {}).get("rps") or 0 for c in concs]
        p50 = [summary["wrk"][c].get(peer, {}).get("p50_ms") or 0 for c in concs]
        axes[0].bar(xs, rps, width, label=peer)
        axes[1].bar(xs, p50, width, label=peer)
    for ax, title in ((axes[0], "requests/s (wrk)"), (axes[1], "p50 latency, ms")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    sconcs = list(summary["stream_chunks_per_s"])
    for i, peer in enumerate(peers):
        xs = [j + i * width for j in range(len(sconcs))]
        ys = [summary["stream_chunks_per_s"][c].get(peer) or 0 for c in sconcs]
        axes[2].bar(xs, ys, width, label=peer)
    axes[2].set_xticks(
        [j + 0.4 - width / 2 for j in range(len(sconcs))], [f"{c} streams" for c in sconcs]
    )
    axes[2].set_title("streamed chunks/s relayed")
    axes[2].legend()
    fig.suptitle("activator proxy overhead (same upstream, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--litellm", help="path to the litellm binary")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.duration or args.rounds:
        plan = Plan(
            **{
                **plan.__dict__,
                "duration": args.duration or plan.duration,
                "rounds": args.rounds or plan.rounds,
            }
        )
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(wanted) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    bl.raise_fd_limit(16384)
    started = time.time()
    raw = run(plan, wanted, litellm=args.litellm)
    summary = summarize(raw, plan)
    name = "overhead-smoke" if args.smoke else "overhead"
    data = {
        "benchmark": "overhead",
        "command": "python bench/overhead.py " + " ".join(sys.argv[1:]),
        "machine": bl.machine(),
        "plan": plan.__dict__,
        "upstream": "bench/upstream.py (raw asyncio on uvloop; the stand-in engine would be "
        "the bottleneck on this machine)",
        "seconds": round(time.time() - started, 1),
        "summary": summary,
        "raw": raw,
    }
    bl.publish(
        name,
        data,
        out_dir=args.out,
        draw=lambda png: plot(summary, png),
        report=report(summary, smoke=args.smoke),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
