"""Test harness: a real activator on a loopback port, stand-in engines as real processes.

Only the clock is ever faked; everything else is a real server or a real client.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.app import METRICS, REGISTRY, build_app
from activator.config.load import parse_config
from activator.model.lifecycle import Model
from activator.observability.metrics import Metrics
from activator.testing.polling import poll

FAKE_ENGINE = "activator.testing.fake_engine"


def engine_command(served: str, *flags: str, startup_delay: float = 0.2) -> list[str]:
    """A process.command running the stand-in engine."""
    return [
        sys.executable,
        "-m",
        FAKE_ENGINE,
        "--port",
        "{port}",
        "--served-model-name",
        served,
        "--startup-delay",
        str(startup_delay),
        "--disable-access-log",
        *flags,
    ]


def model_config(
    served: str | None = None,
    *flags: str,
    startup_delay: float = 0.2,
    **keys: Any,
) -> dict[str, Any]:
    """One model's config block on the stand-in engine. Keys override (idle_timeout...)."""
    cfg: dict[str, Any] = {
        "process": {
            "command": engine_command(served or "served", *flags, startup_delay=startup_delay),
            "port": 0,
            "stop_grace": "5s",
        },
        "startup_timeout": "30s",
    }
    if served is not None:
        cfg["served_model_name"] = served
    cfg.update(keys)
    return cfg


@dataclass
class Running:
    app: web.Application
    server: TestServer
    url: str  # base URL, no trailing slash
    session: aiohttp.ClientSession
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def model(self, name: str) -> Model:
        return self.app[REGISTRY].models[name]

    def sample(self, metric: str, **labels: str) -> float:
        """Current value of a sample of the app's registry: the sum over the samples whose
        labels include `labels`, as a PromQL selector picks them (0 if none). A label a
        test does not name (a wake's `from`) is summed over."""
        return sum(
            s.value
            for family in self.metrics.registry.collect()
            for s in family.samples
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        )

    async def admin(self, name: str | None = None) -> Any:
        path = "/admin/models" + (f"/{name}" if name else "")
        async with self.session.get(self.url + path) as resp:
            return await resp.json()

    async def close(self) -> None:
        await self.server.close()
        for closer in self.closers:
            await closer()
        await self.session.close()


async def start_activator(config: dict[str, Any]) -> Running:
    settings = parse_config(config, environ=dict(os.environ))
    app = build_app(settings)
    server = TestServer(app, host="127.0.0.1", port=0)  # cancels handlers on disconnect
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    session = aiohttp.ClientSession()
    running = Running(app=app, server=server, url=url, session=session)
    await wait_for(lambda: _ready(running), what="activator /readyz")
    return running


async def _ready(running: Running) -> bool:
    async with running.session.get(running.url + "/readyz") as resp:
        return resp.status == 200


async def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for polling, not for one await
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll a condition (sync or async) until truthy, with a deadline (a failed test's
    AssertionError). For conditions no event reports (another process's state); never a
    substitute for an event we own."""
    try:
        return await poll(condition, timeout=timeout, what=what, interval=interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def engine_pids(marker: str) -> list[int]:
    """PIDs of live stand-in engine processes whose command line contains `marker`,
    read from /proc: an observer independent of activator."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if FAKE_ENGINE.encode() in argv and marker.encode() in argv:
            pids.append(int(entry))
    return pids


class Sampler:
    """Calls sample() from a thread of its own, from entering a `with` block until leaving
    it: an observer that shares neither activator's state nor its event loop, so what it
    records is a fact about the engines, not about what activator believes."""

    # A sampling interval, not synchronisation: what an observer looks for (two engines
    # alive at once, a peak of host memory) lasts at least an engine's start, stop, sleep
    # or wake, far longer than this.
    INTERVAL_S = 0.002

    def __init__(self, *, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.INTERVAL_S)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def chat(model: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def post(
    running: Running, path: str, body: Any, *, headers: dict[str, str] | None = None
) -> tuple[int, Any, Sequence[tuple[str, str]]]:
    async with running.session.post(running.url + path, json=body, headers=headers) as resp:
        data = await resp.read()
        try:
            import json

            parsed: Any = json.loads(data)
        except ValueError:
            parsed = data
        return resp.status, parsed, list(resp.headers.items())


def unique(prefix: str) -> str:
    """A served model name no other test uses, so engine_pids sees only this test's
    engines (it looks machine-wide)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def header(headers: Sequence[tuple[str, str]], name: str) -> str:
    """One response header, by case-insensitive name (as HTTP has it); "" if absent."""
    return next((v for k, v in headers if k.lower() == name.lower()), "")


def error_of(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and "error" in body, body
    error: dict[str, Any] = body["error"]
    return error


def starts(running: Running, model: str) -> float:
    """How many times requests started `model`."""
    return running.sample(
        "activator_scale_events_total", model=model, direction="up", reason="request"
    )
