"""Each metric moves as it should: real activator, stand-in engines, real clients.

Values are read from the app's own registry (`Running.sample`); the exposition is read
over HTTP where the test is about /metrics itself.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from activator import __version__
from activator.observability.exposition import Exposition, _Family
from activator.observability.metrics import MODEL_STATES, UNKNOWN_MODEL, Metrics
from tests.conftest import ActivatorFactory
from tests.harness import Running, chat, engine_pids, model_config, post, unique, wait_for

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
HELLO: Any = [{"role": "user", "content": "hello"}]
# A stream far longer than any test: it ends when the client closes it.
ENDLESS: dict[str, Any] = {"stream": True, "max_tokens": 1000}


def client(running: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)


def requests(running: Running, model: str, *, code: str = "200", cold: str) -> float:
    return running.sample(
        "activator_requests_total",
        model=model,
        endpoint="chat_completions",
        code=code,
        cold=cold,
    )


def wakes(running: Running, model: str, outcome: str) -> float:
    return running.sample(
        "activator_wake_duration_seconds_count", model=model, backend="process", outcome=outcome
    )


def holds(running: Running, model: str, outcome: str) -> float:
    return running.sample("activator_hold_duration_seconds_count", model=model, outcome=outcome)


def scales(running: Running, model: str, direction: str, reason: str) -> float:
    return running.sample(
        "activator_scale_events_total", model=model, direction=direction, reason=reason
    )


def held(running: Running, model: str, reason: str) -> float:
    return running.sample("activator_held_requests", model=model, reason=reason)


def gpus_in_use(running: Running) -> float:
    return running.sample("activator_pool_gpus_in_use", pool="gpu")


def state_of(running: Running, model: str) -> str:
    """The one state whose model_state sample is 1 (asserting there is exactly one)."""
    (state,) = [
        s
        for s in MODEL_STATES
        if running.sample("activator_model_state", model=model, state=s) == 1
    ]
    return state


async def exposition(running: Running) -> str:
    async with running.session.get(running.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


def series(text: str) -> set[str]:
    """Every sample's name and labels in an exposition (the value left off)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}


def series_of(text: str, model: str) -> set[str]:
    return {s for s in series(text) if f'model="{model}"' in s}


async def test_cold_then_warm_request_are_counted_with_their_cold_label(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    assert state_of(running, "m1") == "stopped"
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
        assert state_of(running, "m1") == "ready"
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)

    assert requests(running, "m1", cold="true") == 1
    assert requests(running, "m1", cold="false") == 1
    for cold in ("true", "false"):
        labels = {"model": "m1", "endpoint": "chat_completions", "cold": cold}
        assert running.sample("activator_request_duration_seconds_count", **labels) == 1
        assert running.sample("activator_time_to_first_byte_seconds_count", **labels) == 1
    # The hold lasted at least the wake it waited for; a warm request is never held.
    wake = running.sample(
        "activator_wake_duration_seconds_sum", model="m1", backend="process", outcome="ready"
    )
    cold_duration = running.sample(
        "activator_request_duration_seconds_sum",
        model="m1",
        endpoint="chat_completions",
        cold="true",
    )
    assert 0 < wake <= cold_duration
    assert holds(running, "m1", "released") == 1
    assert running.sample("activator_in_flight_requests", model="m1") == 0
    assert scales(running, "m1", "up", "request") == 1


async def test_a_wake_is_observed_once_with_its_phases_in_order(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"), startup_delay=0.5)}})
    async with client(running) as c:
        await asyncio.gather(
            *(c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2) for _ in range(5))
        )
    wake = {"model": "m1", "backend": "process", "outcome": "ready"}
    assert running.sample("activator_wake_duration_seconds_count", **wake) == 1
    took = running.sample("activator_wake_duration_seconds_sum", **wake)
    phases = ("spawned", "launched", "ready")
    at = [
        running.sample("activator_wake_phase_duration_seconds_sum", model="m1", phase=p)
        for p in phases
    ]
    for phase in phases:
        count = running.sample(
            "activator_wake_phase_duration_seconds_count", model="m1", phase=phase
        )
        assert count == 1, phase
    # Phases are times since the wake began: they only grow, and the last ends the wake.
    assert at == sorted(at)
    assert at[-1] <= took
    assert (await running.admin("m1"))["wake_phases"].keys() == set(phases)
    assert requests(running, "m1", cold="true") == 5
    assert holds(running, "m1", "released") == 5


async def test_a_failed_start_counts_the_wake_and_the_holds_as_failed(
    activator: ActivatorFactory,
) -> None:
    engine = model_config(unique("m1"), "--crash-during-startup", startup_delay=0.1)
    running = await activator({"models": {"m1": engine}})
    status, body, headers = await post(running, "/v1/chat/completions", chat("m1"))
    assert status == 503, body
    assert body["error"]["code"] == "model_start_failed"
    # It was held for a wake that failed: cold, and the headers say for how long.
    assert dict(headers)["X-Activator-Cold-Start"] == "true"
    assert int(dict(headers)["X-Activator-Held-Ms"]) > 0
    assert requests(running, "m1", code="503", cold="true") == 1
    assert wakes(running, "m1", "failed") == 1
    assert wakes(running, "m1", "ready") == 0
    assert holds(running, "m1", "failed") == 1
    await wait_for(lambda: state_of(running, "m1") == "failed", what="model_state failed")
    assert scales(running, "m1", "down", "failure") == 1
    for reason in ("starting", "waiting_for_gpu", "draining"):
        assert held(running, "m1", reason) == 0


async def test_a_start_that_never_gets_ready_is_a_timeout(activator: ActivatorFactory) -> None:
    engine = model_config(unique("m1"), "--never-ready", startup_timeout="0.5s")
    running = await activator({"models": {"m1": engine}})
    status, body, _ = await post(running, "/v1/chat/completions", chat("m1"))
    assert status == 503, body
    assert wakes(running, "m1", "timeout") == 1
    await wait_for(lambda: state_of(running, "m1") == "failed", what="model_state failed")


async def test_queue_overflow_is_a_counted_429_and_the_held_gauge_shows_the_queue(
    activator: ActivatorFactory,
) -> None:
    # The wake lasts long enough for the second request to arrive while the first is held.
    engine = model_config(unique("m1"), startup_delay=2.0, max_queued=1)
    running = await activator({"models": {"m1": engine}})
    assert running.sample("activator_queue_capacity", model="m1") == 1
    async with client(running) as c:
        first = asyncio.create_task(
            c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
        )
        await wait_for(
            lambda: held(running, "m1", "starting") == 1,
            what="one request held",
        )
        status, body, _ = await post(running, "/v1/chat/completions", chat("m1"))
        assert status == 429, body
        assert not first.done()
        await first
    assert requests(running, "m1", code="429", cold="false") == 1
    assert requests(running, "m1", cold="true") == 1
    assert held(running, "m1", "starting") == 0
    assert holds(running, "m1", "released") == 1


async def test_an_idle_model_is_stopped_and_the_stop_is_counted(
    activator: ActivatorFactory,
) -> None:
    served = unique("m1")
    running = await activator({"models": {"m1": model_config(served, idle_timeout="0.3s")}})
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
    await wait_for(lambda: state_of(running, "m1") == "stopped", what="idle stop")
    assert scales(running, "m1", "down", "idle") == 1
    assert scales(running, "m1", "up", "request") == 1
    assert (
        running.sample("activator_drain_duration_seconds_count", model="m1", outcome="drained") == 1
    )
    assert running.sample("activator_in_flight_requests", model="m1") == 0
    await wait_for(lambda: not engine_pids(served), what="engine process gone")


async def test_a_swap_in_a_one_gpu_pool_moves_the_pool_metrics(
    activator: ActivatorFactory,
) -> None:
    # Model a streams slowly, so it is still answering when b asks for the GPU: b's
    # request then waits for a to drain, and is counted as waiting for the GPU.
    slow = ("--stream-delay", "0.05")
    models = {
        name: model_config(unique(name), *slow, pool="gpu", min_residency="0.1s")
        for name in ("a", "b")
    }
    running = await activator({"pools": {"gpu": {"gpus": 1}}, "models": models})
    assert running.sample("activator_pool_gpus", pool="gpu") == 1
    async with client(running) as c:

        async def ask_b() -> Any:
            return await c.chat.completions.with_raw_response.create(
                model="b", messages=HELLO, max_tokens=2
            )

        await c.chat.completions.create(model="a", messages=HELLO, max_tokens=2)
        await wait_for(lambda: gpus_in_use(running) == 1, what="a holds the GPU")
        async with running.session.post(
            running.v1 + "/chat/completions", json=chat("a", **ENDLESS)
        ) as stream:
            assert stream.status == 200
            await stream.content.readline()
            assert running.sample("activator_in_flight_requests", model="a") == 1
            b = asyncio.create_task(ask_b())
            await wait_for(
                lambda: held(running, "b", "waiting_for_gpu") == 1,
                what="b held for the GPU",
            )
            await wait_for(lambda: state_of(running, "a") == "draining", what="a draining")
            assert gpus_in_use(running) == 1
        # The client closed a's stream: a drains, stops, and b starts.
        reply = await b
    assert reply.headers["X-Activator-Cold-Start"] == "true"
    assert running.sample("activator_swaps_total", pool="gpu", from_model="a", to_model="b") == 1
    assert scales(running, "a", "down", "swap") == 1
    assert scales(running, "b", "up", "request") == 1
    assert holds(running, "b", "released") == 1
    assert held(running, "b", "waiting_for_gpu") == 0
    assert running.sample("activator_in_flight_requests", model="a") == 0
    assert state_of(running, "a") == "stopped"
    assert state_of(running, "b") == "ready"
    await wait_for(lambda: gpus_in_use(running) == 1, what="b holds the GPU")


async def test_an_upstream_timeout_is_counted_by_kind(activator: ActivatorFactory) -> None:
    engine = model_config(unique("m1"), "--response-delay", "30", upstream_read_timeout="0.3s")
    running = await activator({"models": {"m1": engine}})
    status, body, _ = await post(running, "/v1/chat/completions", chat("m1"))
    assert status == 504, body
    assert running.sample("activator_upstream_errors_total", model="m1", kind="timeout") == 1
    assert requests(running, "m1", code="504", cold="true") == 1
    assert running.sample("activator_in_flight_requests", model="m1") == 0


async def test_an_engine_that_dies_is_counted(activator: ActivatorFactory) -> None:
    engine = model_config(unique("m1"), "--exit-after", "0.3")
    running = await activator({"models": {"m1": engine}})
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
    await wait_for(lambda: state_of(running, "m1") == "failed", what="engine death noticed")
    assert running.sample("activator_upstream_errors_total", model="m1", kind="engine_died") == 1
    assert scales(running, "m1", "down", "failure") == 1


async def test_unknown_models_are_counted_under_one_fixed_label(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    names = [f"client-chosen-{i}" for i in range(5)]
    for name in names:
        status, body, _ = await post(running, "/v1/chat/completions", chat(name))
        assert status == 404, body
    assert requests(running, UNKNOWN_MODEL, code="404", cold="false") == 5
    text = await exposition(running)
    assert not any(name in text for name in names)
    # Nothing was started for them.
    assert state_of(running, "m1") == "stopped"


async def test_build_info_names_the_version(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    assert running.sample("activator_build_info", version=__version__) == 1
    assert f'activator_build_info{{version="{__version__}"}} 1.0' in await exposition(running)


def test_every_metric_has_help_text() -> None:
    families = list(Metrics().registry.collect())
    assert len(families) >= 17
    for family in families:
        assert family.name.startswith("activator_"), family.name
        assert len(family.documentation) > 20, family.name


def documented_metrics() -> dict[str, set[str]]:
    """The metric table of the docs: exposed name -> the label names in its row."""
    text = DOCS.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(activator_\w+)` \| [^|]+ \| ([^|]*) \|", text, re.M)
    return {name: set(re.findall(r"`(\w+)`", labels)) for name, labels in rows}


def exported_metrics() -> dict[str, set[str]]:
    """Every metric an app exports: exposed name -> label names. Labelled metrics have
    no samples until used, so label names come from the collectors themselves."""
    exported = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        for family in collector.collect():
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            labels = set(collector._labelnames)
            labels.update(label for sample in family.samples for label in sample.labels)
            labels.discard("le")
            exported[family.name + suffix] = labels
    return exported


def test_every_metric_is_documented_with_its_labels() -> None:
    documented = documented_metrics()
    for name, labels in exported_metrics().items():
        assert name in documented, f"{name} is missing from the metric table of {DOCS.name}"
        assert documented[name] == labels, name
    assert documented.keys() == exported_metrics().keys()


async def test_the_exposition_does_not_grow_with_the_number_of_requests(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with client(running) as c:

        async def traffic(n: int) -> None:
            for i in range(n):
                await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=1)
                status, _, _ = await post(running, "/v1/chat/completions", chat(f"nope-{i}"))
                assert status == 404

        await traffic(2)
        before = await exposition(running)
        await traffic(40)
        after = await exposition(running)
    assert series(after) == series(before)
    assert requests(running, "m1", cold="false") == 41


async def test_metrics_answers_while_requests_are_held(activator: ActivatorFactory) -> None:
    """/metrics never waits on a model: scraping during a wake shows the hold."""
    running = await activator({"models": {"m1": model_config(unique("m1"), startup_delay=1.0)}})
    async with client(running) as c:
        waiting = asyncio.create_task(
            c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
        )

        async def shows_hold() -> bool:
            text = await exposition(running)
            return 'activator_held_requests{model="m1",reason="starting"} 1.0' in text

        await wait_for(shows_hold, what="the hold in /metrics")
        assert 'activator_model_state{model="m1",state="starting"} 1.0' in await exposition(running)
        await waiting


async def test_metrics_content_type_is_prometheus_text(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with aiohttp.ClientSession() as session, session.get(running.url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")


# The series of a configured model that has not woken: its state, its queue capacity, its
# in-flight and held gauges, its GPUs (docs/observability.md says why each one is kept).
def idle_series(model: str, state: str = "stopped") -> set[str]:
    return {
        f'activator_model_state{{model="{model}",state="{state}"}}',
        f'activator_queue_capacity{{model="{model}"}}',
        f'activator_in_flight_requests{{model="{model}"}}',
        f'activator_model_gpus{{model="{model}",pool=""}}',
        *(
            f'activator_held_requests{{model="{model}",reason="{reason}"}}'
            for reason in ("starting", "waiting_for_gpu", "draining")
        ),
    }


async def test_a_model_that_never_woke_has_only_its_idle_series(
    activator: ActivatorFactory,
) -> None:
    models = {name: model_config(unique(name)) for name in ("m1", "m2")}
    running = await activator({"models": models})
    text = await exposition(running)
    assert series_of(text, "m1") == idle_series("m1")
    assert series_of(text, "m2") == idle_series("m2")
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
    text = await exposition(running)
    assert series_of(text, "m2") == idle_series("m2")
    # m1 now has a state series for ready only, and its wake and request series.
    assert {s for s in series_of(text, "m1") if s.startswith("activator_model_state")} == {
        'activator_model_state{model="m1",state="ready"}'
    }
    assert (
        'activator_wake_duration_seconds_count{backend="process",from="zero",model="m1",outcome="ready"}'
        in (series_of(text, "m1"))
    )


async def test_no_created_series_are_exposed(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m1": model_config(unique("m1"))}})
    async with client(running) as c:
        await c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
    # The registry has them (prometheus_client's counters and histograms always do) ...
    created = running.sample(
        "activator_requests_created", model="m1", endpoint="chat_completions", code="200",
        cold="true",
    )  # fmt: skip
    assert created > 0
    # ... and /metrics leaves them out: one fewer series per counter and histogram child.
    text = await exposition(running)
    assert "activator_requests_total" in text
    assert "_created" not in text


async def test_a_first_wake_shows_its_ready_series_at_zero_while_it_runs(
    activator: ActivatorFactory,
) -> None:
    """rate() and increase() count an observation only after a sample of the series, so
    a Prometheus scrape during the wake is what lets them count a model's first wake."""
    running = await activator({"models": {"m1": model_config(unique("m1"), startup_delay=1.0)}})
    count = (
        "activator_wake_duration_seconds_count"
        '{backend="process",from="zero",model="m1",outcome="ready"}'
    )
    assert count not in await exposition(running)
    async with client(running) as c:
        waking = asyncio.create_task(
            c.chat.completions.create(model="m1", messages=HELLO, max_tokens=2)
        )

        async def zero_during_the_wake() -> bool:
            return f"{count} 0.0" in await exposition(running)

        await wait_for(zero_during_the_wake, what="the ready series at zero")
        await waking
    assert f"{count} 1.0" in await exposition(running)
    # Failed and timed-out wakes get series when one happens, not before.
    assert 'outcome="failed"' not in await exposition(running)


def populated() -> Metrics:
    """A Metrics with series of every kind, odd label values and odd numbers in them."""
    metrics = Metrics()
    for model in ("m1", 'quote"back\\slash\nnewline'):
        metrics.add_model(model, backend="process")
        metrics.set_state(model, "starting")
        metrics.set_state(model, "ready")
        metrics.queue_capacity.labels(model=model).set(1e6)
        metrics.in_flight.labels(model=model).set(-0.5)
        labels = {"model": model, "endpoint": "chat_completions", "cold": "false"}
        metrics.requests.labels(code="200", **labels).inc(3)
        for seconds in (0.0004, 0.3, 7e9):
            metrics.request_duration.labels(**labels).observe(seconds)
        metrics.observe_wake(
            model=model, backend="process", outcome="ready", source="zero", seconds=2
        )
    metrics.pool_gpus.labels(pool="gpu").set(8)
    return metrics


def without_created(text: str) -> str:
    """generate_latest's text less its `_created` series (a gauge family after each)."""
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("# HELP "):
            skipping = line.split()[2].endswith("_created")
        if not skipping:
            kept.append(line)
    return "".join(kept)


async def test_the_exposition_is_prometheus_clients_less_the_created_series() -> None:
    metrics = populated()
    text = (await metrics.render()).decode()
    assert text == without_created(generate_latest(metrics.registry).decode())
    assert 'model="quote\\"back\\\\slash\\nnewline"' in text
    assert "_created" not in text


async def test_a_render_lets_the_event_loop_run_between_series() -> None:
    metrics = populated()
    for i in range(50):
        metrics.set_state(f"idle-{i}", "stopped")
    # No time slice: it yields after every series, whatever the machine's speed.
    exposition = Exposition([metrics.model_state], slice_s=0, pause_s=0)
    passes = 0

    async def count_loop_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_loop_passes())
    text = (await exposition.render()).decode()
    counter.cancel()
    assert text.count("activator_model_state{") == 52
    assert passes >= 52


async def test_concurrent_scrapes_share_one_render() -> None:
    metrics = populated()
    exposition = Exposition([metrics.model_state, metrics.requests], slice_s=0, pause_s=0)
    first, second = await asyncio.gather(exposition.render(), exposition.render())
    assert first == second
    assert exposition.renders == 1
    await exposition.render()  # a later scrape renders afresh
    assert exposition.renders == 2


async def test_a_render_goes_on_while_a_scrape_waits_and_stops_when_none_does() -> None:
    metrics = populated()
    for i in range(50):
        metrics.set_state(f"idle-{i}", "stopped")
    # Yields after each of its 52 series.
    exposition = Exposition([metrics.model_state], slice_s=0, pause_s=0)
    leaving, staying = (asyncio.create_task(exposition.render()) for _ in range(2))
    await asyncio.sleep(0)  # one pass of the loop: both have joined the render
    leaving.cancel()
    assert b'state="stopped"' in await staying
    assert leaving.cancelled()

    both = [asyncio.create_task(exposition.render()) for _ in range(2)]
    await asyncio.sleep(0)
    render = exposition._task
    assert render is not None
    for scrape in both:
        scrape.cancel()
    await asyncio.wait([render, *both])
    assert render.cancelled()
    assert exposition.renders == 2


def test_a_state_left_during_a_render_is_not_shown_beside_the_new_one() -> None:
    metrics = Metrics()
    for name in ("a", "b"):
        metrics.set_state(name, "stopped")
    series = _Family(metrics.model_state).series()
    text = next(series)  # the render has taken its snapshot of the family, and shown a
    metrics.set_state("b", "starting")
    text += "".join(series)
    assert text == 'activator_model_state{model="a",state="stopped"} 1.0\n'
    # b is in no state for this one scrape, and in its new state from the next.
    assert 'activator_model_state{model="b",state="starting"} 1.0\n' in "".join(
        _Family(metrics.model_state).series()
    )
