"""A real Prometheus scrapes a real activator; its view of wake latency agrees with what
the client saw.

Prometheus (Debian package `prometheus`) runs on 127.0.0.1 with a temporary storage dir,
scraping activator every second. Cold requests (the stand-in engine takes a while to
start) and warm ones go through; between cold ones the model is stopped through the
admin API. Prometheus' HTTP API is then asked for the median wake time and the mean, and
both must lie in the histogram bucket holding the client's own measurement (the held-ms
header): Prometheus can't be finer than the bucket. Without the binary the test skips,
and fails when CI=true (`.ci/tools.sh` installs it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import re
import statistics
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from activator.observability.metrics import WAKE_BUCKETS
from tests.conftest import ActivatorFactory
from tests.harness import Running, model_config, wait_for
from tests.tools import on_path

pytestmark = pytest.mark.prometheus

SCRAPE_INTERVAL = "1s"
# Long enough to hold every sample of the test: rate() then covers all of its wakes.
WINDOW = "10m"
STARTUP_DEADLINE = 60.0
# The stand-in engine's start. With its interpreter's own start-up a wake takes about
# 4 s: the middle of the wide (3, 5] bucket of WAKE_BUCKETS, so that scheduling noise on
# a loaded machine keeps every wake in one bucket.
STARTUP_DELAY = 3.4
COLD_REQUESTS = 3
HELLO: Any = [{"role": "user", "content": "hello"}]


def prometheus_binary() -> str:
    return on_path("prometheus", hint="Debian package prometheus; .ci/tools.sh installs it")


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession
    log: list[str] = field(default_factory=list)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails the test on an API error."""
        async with self.session.get(
            self.url + "/api/v1/query",
            params={"query": expr},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            body: dict[str, Any] = await resp.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The single value of a query, or None while it has no result."""
        result = await self.query(expr)
        if not result:
            return None
        (sample,) = result
        return float(sample["value"][1])


@contextlib.asynccontextmanager
async def prometheus_scraping(target: str, directory: Path) -> AsyncIterator[Prometheus]:
    """A Prometheus server on 127.0.0.1 (a free port) scraping `target` (host:port)."""
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1m"},
                "scrape_configs": [
                    {"job_name": "activator", "static_configs": [{"targets": [target]}]}
                ],
            }
        ),
        encoding="utf-8",
    )
    process = await asyncio.create_subprocess_exec(
        prometheus_binary(),
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        # Port 0: the kernel picks a free port; the server logs the address it got.
        "--web.listen-address=127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    address: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    ready = asyncio.Event()

    async def read_log() -> None:
        # Reads until the process exits, so its stderr pipe never fills up.
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            listening = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', line)
            if listening and not address.done():
                address.set_result(listening.group(1))
            if "Server is ready to receive web requests" in line:
                ready.set()

    reader = asyncio.create_task(read_log(), name="prometheus-log")
    try:
        # Prometheus logs "Listening on" from the listener's own goroutine, so that
        # line may come after "Server is ready": up means both lines were seen.
        async def up_and_listening() -> None:
            await ready.wait()
            await asyncio.shield(address)

        exited = asyncio.create_task(process.wait())
        up = asyncio.create_task(up_and_listening())
        done, _ = await asyncio.wait(
            {exited, up}, timeout=STARTUP_DEADLINE, return_when="FIRST_COMPLETED"
        )
        for task in (exited, up):
            task.cancel()
        assert up in done, "prometheus did not become ready and log its address:\n" + "".join(log)
        async with aiohttp.ClientSession() as session:
            yield Prometheus(url=f"http://{address.result()}", session=session, log=log)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=30)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.wait({reader}, timeout=30)


def bucket_of(seconds: float) -> tuple[float, float]:
    """The (lower, upper] bounds of the wake histogram bucket holding `seconds`."""
    i = bisect.bisect_left(WAKE_BUCKETS, seconds)
    lower = WAKE_BUCKETS[i - 1] if i > 0 else 0.0
    upper = WAKE_BUCKETS[i] if i < len(WAKE_BUCKETS) else float("inf")
    return lower, upper


async def stop_model(running: Running, name: str) -> None:
    async with running.session.post(f"{running.url}/admin/models/{name}/stop") as resp:
        assert resp.status == 202
    await wait_for(
        lambda: running.model(name).state == "stopped", what=f"{name} stopped by the admin API"
    )


async def test_prometheus_sees_the_wake_latency_the_client_saw(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    served = f"m1-{uuid.uuid4().hex[:10]}"
    running = await activator({"models": {"m1": model_config(served, startup_delay=STARTUP_DELAY)}})
    target = running.url.removeprefix("http://")
    ready_wakes = 'activator_wake_duration_seconds_count{model="m1",outcome="ready"}'
    async with prometheus_scraping(target, tmp_path) as prom:
        await wait_for(
            lambda: _equals(prom.value('up{job="activator"}'), 1.0),
            what="first scrape",
            timeout=60,
        )
        # A model's wake series do not exist before its first wake.
        assert await prom.value(ready_wakes) is None

        held: list[float] = []
        client = openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)
        async with client:
            for i in range(COLD_REQUESTS):
                if i:
                    await stop_model(running, "m1")
                request = asyncio.create_task(
                    client.chat.completions.with_raw_response.create(
                        model="m1", messages=HELLO, max_tokens=2
                    )
                )
                if not i:
                    # The first wake creates them at zero, and a scrape during the wake
                    # (it lasts seconds) gives rate() the sample before the first one.
                    await wait_for(
                        lambda: _equals(prom.value(ready_wakes), 0.0),
                        what="the ready series at zero during the first wake",
                        timeout=60,
                    )
                cold = await request
                assert cold.headers["X-Activator-Cold-Start"] == "true"
                held.append(int(cold.headers["X-Activator-Held-Ms"]) / 1000)
                for _ in range(2):
                    warm = await client.chat.completions.with_raw_response.create(
                        model="m1", messages=HELLO, max_tokens=2
                    )
                    assert warm.headers["X-Activator-Cold-Start"] == "false"

        # Wait for a scrape that saw the last wake (and the warm requests after it).
        await wait_for(
            lambda: _equals(prom.value(ready_wakes), COLD_REQUESTS),
            what="the last wake scraped",
            timeout=60,
        )
        await wait_for(
            lambda: _equals(
                prom.value('sum(activator_requests_total{model="m1",cold="false"})'),
                2 * COLD_REQUESTS,
            ),
            what="the last request scraped",
            timeout=60,
        )

        selector = '{model="m1",outcome="ready"}'
        median = await prom.value(
            "histogram_quantile(0.5, sum by (le) "
            f"(rate(activator_wake_duration_seconds_bucket{selector}[{WINDOW}])))"
        )
        mean = await prom.value(
            f"sum(rate(activator_wake_duration_seconds_sum{selector}[{WINDOW}])) / "
            f"sum(rate(activator_wake_duration_seconds_count{selector}[{WINDOW}]))"
        )
        by_cold = {
            sample["metric"]["cold"]: float(sample["value"][1])
            for sample in await prom.query(
                "histogram_quantile(0.5, sum by (cold, le) (rate("
                f'activator_time_to_first_byte_seconds_bucket{{model="m1"}}[{WINDOW}])))'
            )
        }

    # Activator's own record of each wake, and the client's: a request is held for at
    # least the wake, from before it began until after it ended (the header rounds to
    # whole milliseconds, hence the half millisecond each).
    assert median is not None and mean is not None
    wakes = running.sample(
        "activator_wake_duration_seconds_sum", model="m1", backend="process", outcome="ready"
    )
    seen = f"held {held}, wakes {wakes:.4f}s in all, Prometheus median {median} mean {mean}"
    assert wakes <= sum(held) + 0.0005 * COLD_REQUESTS, seen
    lower, upper = bucket_of(statistics.median(held))
    assert lower <= median <= upper, seen
    lower, upper = bucket_of(statistics.mean(held))
    assert lower <= mean <= upper, seen
    # The _sum/_count mean is exact: it is the mean wake activator measured.
    assert mean == pytest.approx(wakes / COLD_REQUESTS), seen
    # Cold requests waited for a wake; warm ones did not.
    assert by_cold["true"] > by_cold["false"], by_cold


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)
