"""GPU pools end to end: stand-in engines on the local backend, real clients, and an
observer that watches the engine processes from outside activator.

The observer runs in a thread of its own and reads /proc: it shares neither activator's
state nor its event loop, so "two models of a 1-GPU pool were never alive at once" is a
fact about processes, not about what activator believes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import ActivatorFactory
from tests.harness import FAKE_ENGINE, Running, Sampler, chat, model_config, unique, wait_for

# Engines that stream slowly enough for swaps to land while requests are in flight.
STREAMING = ("--stream-delay", "0.02", "--response-delay", "0.01")
# A stream far longer than any test: it ends when the client closes it, or is cut.
ENDLESS = {"stream": True, "max_tokens": 1500}
HELLO: Any = [{"role": "user", "content": "hello"}]


# ----- the independent observer --------------------------------------------------------


def alive_engines(markers: set[str]) -> set[str]:
    """The markers (served model names) of stand-in engines alive right now.

    One listing of /proc, then each process is read once: a process seen alive here was
    alive (not a zombie) from the listing until it was read, so engines reported together
    were alive together at the moment of the listing.
    """
    alive: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            if FAKE_ENGINE not in argv:
                continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue  # it exited between the listing and the read
        if state != b"Z":
            alive.update(markers.intersection(argv))
    return alive


class EngineObserver(Sampler):
    """Samples which engines are alive together until closed; see the module docstring."""

    def __init__(self, gpus: dict[str, int]) -> None:
        super().__init__(name="engine-observer")
        self._gpus = gpus  # marker -> GPUs its engine holds
        self._markers = set(gpus)
        self.together: set[frozenset[str]] = {frozenset()}  # each set seen alive at once

    def sample(self) -> None:
        self.together.add(frozenset(alive_engines(self._markers)))

    def peak_gpus(self) -> int:
        return max(sum(self._gpus[m] for m in alive) for alive in self.together)


# ----- set-up helpers -------------------------------------------------------------------


@dataclass
class Pool:
    running: Running
    served: dict[str, str]  # model -> served name, unique to this test (the /proc marker)
    gpus: dict[str, int]  # model -> gpus

    def observer(self) -> EngineObserver:
        return EngineObserver({self.served[m]: g for m, g in self.gpus.items()})

    def marker_set(self, *models: str) -> frozenset[str]:
        return frozenset(self.served[m] for m in models)

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.running.v1, api_key="unused", max_retries=0)


async def start_pool(
    activator: ActivatorFactory,
    *,
    capacity: int,
    gpus: dict[str, int],
    flags: tuple[str, ...] = STREAMING,
    startup_delay: float = 0.05,
    **keys: Any,
) -> Pool:
    """One pool named `gpu` holding `gpus` (model -> GPUs), every model on a stand-in
    engine whose served name is unique: tests elsewhere on the machine run engines too."""
    served = {m: unique(m) for m in gpus}
    models = {
        m: model_config(served[m], *flags, startup_delay=startup_delay, pool="gpu", gpus=g, **keys)
        for m, g in gpus.items()
    }
    running = await activator({"pools": {"gpu": {"gpus": capacity}}, "models": models})
    return Pool(running=running, served=served, gpus=gpus)


def total(running: Running, sample: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(
        s.value
        for metric in running.metrics.registry.collect()
        for s in metric.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def pools_view(running: Running) -> dict[str, Any]:
    async with running.session.get(running.url + "/admin/pools") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        (pool,) = body["pools"]
        return pool  # type: ignore[no-any-return]


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every `data:` event of a stream until the server ends it ([DONE] kept as a str)."""
    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def first_event(resp: aiohttp.ClientResponse) -> None:
    """Wait for the stream's first event: the engine is serving this request."""
    async for raw in resp.content:
        if raw.startswith(b"data: "):
            return
    raise AssertionError("stream ended before its first event")


# ----- randomized interleavings ---------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    model: str
    stream: bool
    max_tokens: int
    # None: at once; else (an earlier request, "first_byte" or "done"): sent when that
    # one reaches this point. Events, not sleeps, shape the interleaving.
    after: tuple[int, str] | None


def random_plan(rng: random.Random, *, models: list[str], size: int) -> list[Planned]:
    plan = []
    for i in range(size):
        after = None
        if i and rng.random() < 0.7:
            after = (rng.randrange(i), rng.choice(["first_byte", "done"]))
        plan.append(
            Planned(
                model=rng.choice(models),
                stream=rng.random() < 0.6,
                max_tokens=rng.randint(1, 25),
                after=after,
            )
        )
    return plan


async def run_plan(client: openai.AsyncOpenAI, plan: list[Planned]) -> None:
    """Send every planned request; each must be answered in full."""
    first = [asyncio.Event() for _ in plan]
    done = [asyncio.Event() for _ in plan]

    async def one(i: int, p: Planned) -> None:
        if p.after is not None:
            j, point = p.after
            await (first if point == "first_byte" else done)[j].wait()
        messages: Any = [{"role": "user", "content": f"request {i}"}]
        try:
            if p.stream:
                stream = await client.chat.completions.create(
                    model=p.model, messages=messages, max_tokens=p.max_tokens, stream=True
                )
                tokens, finish = 0, None
                async for chunk in stream:
                    first[i].set()
                    if chunk.choices:
                        tokens += bool(chunk.choices[0].delta.content)
                        finish = chunk.choices[0].finish_reason or finish
            else:
                reply = await client.chat.completions.create(
                    model=p.model, messages=messages, max_tokens=p.max_tokens
                )
                assert reply.usage is not None
                tokens, finish = reply.usage.completion_tokens, reply.choices[0].finish_reason
            assert (tokens, finish) == (p.max_tokens, "length"), f"request {i}: {p}"
        finally:
            first[i].set()
            done[i].set()

    await asyncio.gather(*(one(i, p) for i, p in enumerate(plan)))


@pytest.mark.parametrize("seed", range(4))
async def test_one_gpu_pool_never_runs_two_engines_across_random_interleavings(
    activator: ActivatorFactory, seed: int
) -> None:
    pool = await start_pool(
        activator,
        capacity=1,
        gpus={"a": 1, "b": 1, "c": 1},
        min_residency="50ms",
        max_wait="200ms",
        drain_timeout="60s",
    )
    plan = random_plan(random.Random(seed), models=["a", "b", "c"], size=18)
    with pool.observer() as observer:
        async with pool.client() as client:
            await run_plan(client, plan)

    assert observer.peak_gpus() == 1, observer.together
    assert sum(1 for alive in observer.together if len(alive) == 1) >= 2  # it did swap
    running = pool.running
    assert total(running, "activator_swaps_total", pool="gpu") >= 1
    assert total(running, "activator_upstream_errors_total") == 0  # no stream was cut
    assert total(running, "activator_drain_duration_seconds_count", outcome="cut") == 0


# ----- drains ---------------------------------------------------------------------------


async def test_swap_lets_the_in_flight_stream_finish_before_the_engine_stops(
    activator: ActivatorFactory,
) -> None:
    pool = await start_pool(
        activator, capacity=1, gpus={"a": 1, "b": 1}, min_residency="10ms", drain_timeout="60s"
    )
    running = pool.running
    with pool.observer() as observer:
        async with running.session.post(
            running.v1 + "/chat/completions", json=chat("a", stream=True, max_tokens=40)
        ) as resp:
            await first_event(resp)
            async with pool.client() as client:
                b = asyncio.create_task(
                    client.chat.completions.create(model="b", messages=HELLO, max_tokens=2)
                )
                events = await sse_events(resp)
                reply = await b

    assert events[-1] == "[DONE]"
    # The first event (the role) was read before the swap began; 40 tokens followed it.
    assert sum(bool(e["choices"][0]["delta"].get("content")) for e in events[:-1]) == 40
    assert reply.choices[0].finish_reason == "length"
    assert observer.peak_gpus() == 1
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="a", to_model="b", mode="stop"
        )
        == 1
    )
    assert (
        running.sample("activator_drain_duration_seconds_count", model="a", outcome="drained") == 1
    )
    assert total(running, "activator_upstream_errors_total") == 0


async def test_stream_still_running_when_drain_timeout_passes_is_cut_with_an_error_event(
    activator: ActivatorFactory,
) -> None:
    pool = await start_pool(
        activator, capacity=1, gpus={"a": 1, "b": 1}, min_residency="10ms", drain_timeout="300ms"
    )
    running = pool.running
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("a", **ENDLESS)
    ) as resp:
        await first_event(resp)
        async with pool.client() as client:
            b = asyncio.create_task(
                client.chat.completions.create(model="b", messages=HELLO, max_tokens=2)
            )
            events = await sse_events(resp)
            reply = await b

    error = events[-1]["error"]
    assert "drain_timeout passed" in error["message"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_connection_error")
    assert "[DONE]" not in events
    assert reply.choices[0].finish_reason == "length"
    assert running.sample("activator_upstream_errors_total", model="a", kind="cut") == 1
    assert running.sample("activator_drain_duration_seconds_count", model="a", outcome="cut") == 1


# ----- observability --------------------------------------------------------------------


async def test_admin_pools_and_metrics_follow_a_swap(activator: ActivatorFactory) -> None:
    """A protected model keeps the GPU while its stream runs: the other waits for the GPU
    (visible in /admin/pools and held_requests), then starts once the stream ends."""
    pool = await start_pool(
        activator,
        capacity=1,
        gpus={"a": 1, "b": 1},
        min_residency="10m",
        max_wait="10m",
        startup_delay=1.0,  # long enough to observe b "starting"
    )
    running = pool.running
    assert running.sample("activator_pool_gpus", pool="gpu") == 1
    async with pool.client() as client:
        async with running.session.post(
            running.v1 + "/chat/completions", json=chat("a", **ENDLESS)
        ) as resp:
            await first_event(resp)
            b = asyncio.create_task(
                client.chat.completions.create(model="b", messages=HELLO, max_tokens=2)
            )
            waiting = await wait_for(
                lambda: _waiting_models(running), what="b listed as waiting for the GPU"
            )
            assert waiting["name"] == "gpu" and waiting["gpus"] == 1
            assert waiting["gpus_in_use"] == 1
            assert waiting["models"] == [{"name": "a", "state": "ready", "gpus": 1}]
            (entry,) = waiting["waiting"]
            assert (entry["name"], entry["queued"]) == ("b", 1)
            assert entry["oldest_wait_seconds"] >= 0
            assert (
                running.sample("activator_held_requests", model="b", reason="waiting_for_gpu") == 1
            )
            assert running.sample("activator_pool_gpus_in_use", pool="gpu") == 1
            resp.close()  # a's only request ends: a is idle, so it may go

        await wait_for(
            lambda: running.sample("activator_held_requests", model="b", reason="starting") == 1,
            what="b held while it starts",
        )
        assert running.sample("activator_held_requests", model="b", reason="waiting_for_gpu") == 0
        assert running.sample("activator_pool_gpus_in_use", pool="gpu") == 1
        reply = await b

    assert reply.choices[0].finish_reason == "length"
    view = await pools_view(running)
    assert view["models"] == [{"name": "b", "state": "ready", "gpus": 1}]
    assert view["waiting"] == []
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="a", to_model="b", mode="stop"
        )
        == 1
    )
    assert (
        running.sample("activator_drain_duration_seconds_count", model="a", outcome="drained") == 1
    )
    assert running.sample("activator_held_requests", model="b", reason="starting") == 0


async def _waiting_models(running: Running) -> dict[str, Any] | None:
    view = await pools_view(running)
    return view if view["waiting"] else None


# ----- fairness -------------------------------------------------------------------------


async def test_steady_traffic_to_a_does_not_starve_b_and_a_is_served_again(
    activator: ActivatorFactory,
) -> None:
    """min_residency (10 min) would hold a busy A far longer than the test; B's max_wait
    (1 s) is what brings it in. A is then served again and swapped exactly twice."""
    pool = await start_pool(
        activator,
        capacity=1,
        gpus={"a": 1, "b": 1},
        flags=("--response-delay", "0.05"),
        min_residency="10m",
        max_wait="1s",
        drain_timeout="60s",
    )
    running = pool.running
    b_answered = asyncio.Event()
    a_serving = asyncio.Event()
    served_after_b = [0, 0, 0]
    stop = asyncio.Event()

    async def steady_a(client: openai.AsyncOpenAI, worker: int) -> None:
        while not stop.is_set():
            reply = await client.chat.completions.create(model="a", messages=HELLO, max_tokens=1)
            assert reply.choices[0].finish_reason == "length"
            a_serving.set()
            if b_answered.is_set():
                served_after_b[worker] += 1
                if min(served_after_b) >= 2:
                    stop.set()

    async with pool.client() as client:
        workers = [asyncio.create_task(steady_a(client, w)) for w in range(3)]
        await a_serving.wait()
        raw = await client.chat.completions.with_raw_response.create(
            model="b", messages=HELLO, max_tokens=1
        )
        b_answered.set()
        await asyncio.gather(*workers)

    held_ms = float(raw.headers["X-Activator-Held-Ms"])
    assert raw.parse().choices[0].finish_reason == "length"
    assert held_ms < 600_000  # released by max_wait, not by the end of A's min_residency
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="a", to_model="b", mode="stop"
        )
        == 1
    )
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="b", to_model="a", mode="stop"
        )
        == 1
    )
    assert (
        running.sample("activator_scale_events_total", model="a", direction="up", reason="request")
        == 2
    )


# ----- multi-GPU models -----------------------------------------------------------------


async def test_eight_gpu_model_never_runs_beside_four_gpu_models_which_share(
    activator: ActivatorFactory,
) -> None:
    pool = await start_pool(
        activator,
        capacity=8,
        gpus={"a4": 4, "b4": 4, "x8": 8},
        min_residency="10ms",
        max_wait="200ms",
        drain_timeout="60s",
    )
    running = pool.running
    with pool.observer() as observer:
        async with pool.client() as client:
            # Both 4-GPU models serve at the same moment: each holds a stream open.
            async with (
                running.session.post(
                    running.v1 + "/chat/completions", json=chat("a4", **ENDLESS)
                ) as a4,
                running.session.post(
                    running.v1 + "/chat/completions", json=chat("b4", **ENDLESS)
                ) as b4,
            ):
                await asyncio.gather(first_event(a4), first_event(b4))
                assert running.sample("activator_pool_gpus_in_use", pool="gpu") == 8
                await wait_for(
                    lambda: pool.marker_set("a4", "b4") in observer.together,
                    what="the observer to see both 4-GPU engines",
                )
                x8 = asyncio.create_task(
                    client.chat.completions.create(model="x8", messages=HELLO, max_tokens=2)
                )
                a4.close()
                b4.close()
                assert (await x8).choices[0].finish_reason == "length"

            plan = random_plan(random.Random(7), models=["a4", "b4", "x8"], size=14)
            await run_plan(client, plan)

    assert observer.peak_gpus() == 8, observer.together
    assert pool.marker_set("x8") in observer.together
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="a4", to_model="x8", mode="stop"
        )
        >= 1
    )
    assert (
        running.sample(
            "activator_swaps_total", pool="gpu", from_model="b4", to_model="x8", mode="stop"
        )
        >= 1
    )
