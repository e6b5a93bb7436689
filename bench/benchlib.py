"""Shared pieces of the benchmark scripts: the machine record, percentiles, results files,
a timed streaming request, and a real activator subprocess started from a generated config.

The scripts run as `python bench/NAME.py`, so this module is imported as `benchlib`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BENCH_DIR = Path(__file__).resolve().parent
# The benches that run a fake Kubernetes API server import it from the tests' package
# (tests/fakekube: a test double, kept out of the wheel), so the checkout's root goes on
# the path of a script run as `python bench/NAME.py`.
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.append(str(BENCH_DIR.parent))
RESULTS_DIR = BENCH_DIR / "results"
PACKAGES = ("activator", "aiohttp", "uvloop", "yarl", "multidict", "openai", "matplotlib")


# ---- the machine --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "tools": {name: tool_version(name) for name in ("wrk", "nginx")},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def tool_version(name: str) -> str | None:
    """The first line a tool prints about its version, or None if it is not installed."""
    path = which(name)
    if path is None:
        return None
    flag = "-v" if name == "nginx" else "--version"
    try:
        done = subprocess.run([path, flag], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (done.stdout + done.stderr).strip().splitlines()
    return out[0] if out else path


def which(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin folders (nginx lives in /usr/sbin)."""
    import shutil

    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards `wanted` (capped by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---- numbers ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table (also valid Markdown), for the terminal and the README."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# A smoke run (seconds, for CI, on a shared machine) shows that a script works; its
# figures are too noisy to hold against a target, so its report never says MISSED.
NOT_JUDGED = "smoke: not judged"


def verdict(met: bool | None, *, smoke: bool) -> str:
    """A target's verdict in a report: met, MISSED, n/a (nothing measured), or for a
    smoke run `smoke: not judged`."""
    if smoke:
        return NOT_JUDGED
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def write_results(name: str, data: dict[str, Any], *, out_dir: Path | None = None) -> Path:
    """Write `<name>.json` into the results folder; returns its path."""
    folder = out_dir or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def plot_path(name: str, *, out_dir: Path | None = None) -> Path:
    folder = out_dir or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"


def publish(
    name: str,
    data: dict[str, Any],
    *,
    out_dir: Path | None,
    draw: Callable[[Path], None],
    report: str = "",
) -> bool:
    """Write `<name>.json`, print the report, draw `<name>.png`, say where they went.

    Without matplotlib (or with one that does not import) the plot is skipped with a
    message, never a crash: the figures are in the JSON and the report already printed.
    Returns whether the PNG was drawn."""
    json_path = write_results(name, data, out_dir=out_dir)
    if report:
        print()
        print(report)
    png = plot_path(name, out_dir=out_dir)
    try:
        draw(png)
    except PlotUnavailable as exc:
        print(f"\n{exc} - {png.name} skipped (pip install matplotlib)")
        print(f"wrote {json_path}")
        return False
    print(f"\nwrote {json_path} and {png}")
    return True


class PlotUnavailable(Exception):
    """matplotlib cannot be imported; raised by pyplot(), handled by publish()."""


def pyplot() -> Any:
    """matplotlib's pyplot with a file-only backend (no display on a server)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # not installed, or a broken install (numpy, a backend)
        raise PlotUnavailable(f"matplotlib: not importable ({exc})") from exc
    return plt


# ---- loopback servers ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
    """A small blocking JSON call (admin API); raises urllib errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def http_text(url: str, *, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text: str = resp.read().decode()
        return text


def wait_until(condition: Any, *, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll a condition with a deadline (another process's state: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, urllib.error.URLError, ConnectionError):
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


async def first_byte(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    *,
    prompt: str = "def fib(n):",
    headers: Mapping[str, str] | None = None,
) -> tuple[float, float]:
    """One streaming chat request for 4 tokens, read to its end: the seconds from sending
    it to its first body byte, and the wall-clock time of that byte (to set against the
    stamps of engine logs). Raises on an error status or an empty stream."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": prompt}],
    }
    sent = time.perf_counter()
    ttfb = wall = None
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status}: {(await resp.read())[:4000]!r}")
        async for _ in resp.content.iter_any():
            if ttfb is None:
                ttfb, wall = time.perf_counter() - sent, time.time()
    if ttfb is None or wall is None:
        raise RuntimeError(f"{model}: an empty stream")
    return ttfb, wall


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class ActivatorProcess:
    """`activator serve` as a real subprocess, with uvloop, as an operator runs it."""

    proc: subprocess.Popen[bytes]
    url: str
    config_path: Path
    log_path: Path
    startup_s: float = 0.0  # process spawned -> /readyz answered 200

    @property
    def pid(self) -> int:
        return self.proc.pid

    def model(self, name: str) -> dict[str, Any]:
        described: dict[str, Any] = http_json(f"{self.url}/admin/models/{name}")
        return described

    def metrics(self) -> str:
        return http_text(f"{self.url}/metrics")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def engine_command(served: str, *flags: str, startup_delay: float) -> list[str]:
    """A process.command running the stand-in engine (activator.testing.fake_engine)."""
    return [
        sys.executable,
        "-m",
        "activator.testing.fake_engine",
        "--port",
        "{port}",
        "--served-model-name",
        served,
        "--startup-delay",
        str(startup_delay),
        "--disable-access-log",
        *flags,
    ]


@contextlib.contextmanager
def activator_process(
    models: dict[str, Any],
    *,
    server: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[ActivatorProcess]:
    """Run activator on a free loopback port with these model blocks (and `top`'s other
    sections: pools, defaults); stop it after.

    Shutdown is SIGTERM (activator stops the engines it started), then SIGKILL if it
    does not exit within its grace.
    """
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "access_log": "off", **(server or {})},
        "models": models,
        **(top or {}),
    }
    with tempfile.TemporaryDirectory(prefix="activator-bench-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = Path(tmp) / "activator.log"
        spawned = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "activator",
                    "serve",
                    "--config",
                    str(config_path),
                    "--log-level",
                    "WARNING",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        running = ActivatorProcess(
            proc=proc, url=f"http://127.0.0.1:{port}", config_path=config_path, log_path=log_path
        )
        try:
            wait_until(
                lambda: proc.poll() is not None or http_json(running.url + "/readyz"),
                timeout=ready_timeout,
                what="activator /readyz",
            )
            if proc.poll() is not None:
                raise RuntimeError(f"activator exited at start-up:\n{running.log_tail()}")
            running.startup_s = time.monotonic() - spawned
            yield running
        finally:
            stop_process(proc, grace=30.0)


def stop_process(proc: subprocess.Popen[bytes], *, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


def engine_ready_wallclock(log_lines: Sequence[str], served: str) -> float | None:
    """When the stand-in engine began serving, from its `serving <name> on ...` log line
    (wall clock, millisecond resolution); None if the line is not there."""
    marker = f"[fake-engine] serving {served} on "
    for line in reversed(log_lines):
        if marker in line:
            # "INFO 2026-11-20 10:11:12,345 [fake-engine] serving ..."
            parts = line.split()
            stamp = dt.datetime.strptime(f"{parts[1]} {parts[2]}", "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None
