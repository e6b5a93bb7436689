"""GPU time and cost per model (activator.observability.cost), against a scripted timeline
and a fake clock: what each state counts, what is billed, that scrapes in between change nothing
but the time they see, and which series exist when. Fed as the app feeds it, through
Metrics (set_state, request_started / request_ended, count_tokens, render).

The same accounting with a real activator, engine and clients: tests/test_cost_e2e.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activator.config.load import ConfigError, parse_config
from activator.config.settings import ModelSettings
from activator.observability.cost import HOLDING, IDLE, figure, gpu_label
from activator.observability.metrics import Metrics
from activator.observability.usage import Usage
from tests.harness import model_config

# 2 GPUs at $3.60 an hour: a tenth of a cent per GPU-second, so dollars read as
# GPU-seconds / 1000.
PRICES = {"gpu_hour": 3.6, "input_per_million": 1.0, "output_per_million": 4.0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def model_settings(name: str = "coder", **keys: Any) -> ModelSettings:
    config = {"pools": {"l4": {"gpus": 2}}, "models": {name: model_config(**keys)}}
    return parse_config(config, environ={}).models[name]


class Timeline:
    """One model fed as activator.model.lifecycle feeds Metrics, at times the test sets."""

    def __init__(self, **keys: Any) -> None:
        self.clock = Clock()
        self.metrics = Metrics(clock=self.clock)
        settings = model_settings(**{"gpus": 2, "pool": "l4", **keys})
        self.metrics.set_state("coder", "stopped")  # in Model.__init__'s order
        self.metrics.add_model("coder", backend="process", settings=settings)

    def at(self, t: float) -> Timeline:
        assert t >= self.clock.now
        self.clock.now = t
        return self

    def state(self, state: str) -> None:
        self.metrics.set_state("coder", state)

    def start(self) -> None:
        self.metrics.request_started("coder")

    def end(self) -> None:
        self.metrics.request_ended("coder")

    async def scrape(self) -> str:
        return (await self.metrics.render()).decode()

    def gpu_seconds(self) -> dict[str, float]:
        """What the registry holds now, by state label (without settling)."""
        return {
            s.labels["state"]: s.value
            for family in self.metrics.gpu_seconds.collect()
            for s in family.samples
            if s.name.endswith("_total") and s.labels["model"] == "coder"
        }

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": "coder", **labels})


async def test_a_day_of_start_traffic_idle_and_stop_is_counted_exactly() -> None:
    t = Timeline(cost=PRICES)
    t.at(100).state("starting")
    t.at(130).state("ready")  # nothing in flight: idle from now
    t.at(140).start()
    await t.at(150).scrape()  # mid-request: the running interval up to now
    assert t.gpu_seconds() == {"starting": 60, "idle": 20, "ready": 20}
    t.at(160).end()
    t.at(190).start()  # two requests overlap: busy from the first start to the last end
    t.at(200).start()
    t.at(210).end()
    t.at(250).end()
    t.metrics.count_tokens("coder", Usage(input=1000, output=500, cached=200))
    t.at(300).state("draining")
    t.at(310).state("stopping")
    t.at(330).state("stopped")
    await t.at(10_000).scrape()  # stopped holds nothing: the scrape adds nothing

    # GPU-seconds are 2 GPUs x the seconds in each state; ready splits by in-flight.
    assert t.gpu_seconds() == {
        "starting": 2 * 30,
        "idle": 2 * (10 + 30 + 50),  # 130-140, 160-190, 250-300
        "ready": 2 * (20 + 60),  # 140-160, 190-250
        "draining": 2 * 10,
        "stopping": 2 * 20,
    }
    assert t.sample("activator_gpu_seconds_total", pool="l4", state="idle") == 180
    # 460 GPU-seconds at $0.001, 1000 input tokens at $1/M, 500 output at $4/M.
    assert t.sample("activator_cost_dollars_total") == pytest.approx(0.46 + 0.001 + 0.002)
    tokens = {
        kind: t.sample("activator_tokens_total", kind=kind)
        for kind in ("input", "output", "cached")
    }
    assert tokens == {"input": 1000, "output": 500, "cached": 200}
    assert t.sample("activator_model_gpus", pool="l4") == 2


async def test_sleep_is_counted_under_sleeping_and_not_billed() -> None:
    t = Timeline(cost={"gpu_hour": 3.6})
    t.at(0).state("starting")
    t.at(10).state("ready")
    t.at(20).state("draining")
    t.at(25).state("falling_asleep")
    t.at(30).state("sleeping")
    await t.at(500).scrape()
    t.at(1030).state("waking")
    t.at(1040).state("ready")
    t.at(1050).state("draining")
    t.at(1060).state("stopping")
    t.at(1070).state("stopped")
    await t.scrape()
    assert t.gpu_seconds() == {
        "starting": 20,
        "idle": 40,
        "draining": 30,
        "falling_asleep": 10,
        "sleeping": 2000,
        "waking": 20,
        "stopping": 20,
    }
    awake = 20 + 40 + 30 + 10 + 20 + 20
    assert t.sample("activator_cost_dollars_total") == pytest.approx(awake / 1000)
    report = t.metrics.cost.report("coder")
    assert report["gpu_hours"] == 0.039  # 140 GPU-seconds: two significant digits
    assert report["sleeping_gpu_hours"] == 0.56
    assert report["dollars"] == 0.14


async def test_an_engine_out_of_sight_is_counted_as_last_seen() -> None:
    """`unknown` (the backend cannot see the engine): the time goes on under the last
    state known, through the `unknown` reports of moves made meanwhile, until a real
    state is reported again."""
    t = Timeline()
    t.at(0).state("starting")
    t.at(10).state("ready")
    t.at(20).state("unknown")
    t.at(30).state("unknown")
    t.at(50).state("ready")
    t.at(60).state("stopped")
    await t.at(99).scrape()
    assert t.gpu_seconds() == {"starting": 20, "idle": 100}


async def test_a_scrape_shows_the_running_interval_and_the_admin_report_now() -> None:
    t = Timeline(cost=PRICES)
    t.at(0).state("starting")
    t.at(1800).state("ready")
    t.at(3600)
    # The admin report counts up to now without changing the counters.
    report = t.metrics.cost.report("coder")
    assert report == {
        "gpus": 2,
        "gpu_hours": 2.0,
        "idle_gpu_hours": 1.0,
        "sleeping_gpu_hours": 0.0,
        "dollars": 7.2,
        "tokens": {"input": 0, "output": 0},
    }
    assert t.gpu_seconds() == {"starting": 3600, "idle": 0}
    text = await t.scrape()
    assert 'activator_gpu_seconds_total{model="coder",pool="l4",state="idle"} 3600.0' in text
    assert 'activator_cost_dollars_total{model="coder"} 7.2' in text


async def test_a_short_run_costs_more_than_zero_in_the_admin_report() -> None:
    # 2 GPUs for 1.67 s at $1 a GPU-hour: /metrics has 0.00093 dollars; to the cent,
    # the admin report said 0.0 GPU-hours and 0.0 dollars.
    t = Timeline(cost={"gpu_hour": 1.0})
    t.at(0).state("starting")
    t.at(1.67).state("stopped")
    report = t.metrics.cost.report("coder")
    assert report["gpu_hours"] == 0.00093
    assert report["dollars"] == 0.00093
    assert t.sample("activator_cost_dollars_total") == pytest.approx(0.000928, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0, 0.0),
        (0.000928, 0.00093),
        (0.03889, 0.039),
        (0.0999, 0.1),
        (0.1, 0.1),
        (0.123456, 0.12),
        (3.4567, 3.46),
        (1234.5678, 1234.57),
    ],
)
def test_figures_keep_two_decimals_and_two_significant_digits(value: float, shown: float) -> None:
    assert figure(value) == shown


async def test_series_appear_at_zero_when_the_model_first_holds_a_gpu() -> None:
    """A model that never started has one series of its own here, its GPUs. Series
    that will rise exist at zero from the start of their first interval, so rate() and
    increase() count it (they need a sample before the rise)."""
    t = Timeline(cost=PRICES)
    text = await t.scrape()
    ours = [line for line in text.splitlines() if 'model="coder"' in line]
    cost_lines = [line for line in ours if "gpu" in line or "cost" in line or "tokens" in line]
    assert cost_lines == ['activator_model_gpus{model="coder",pool="l4"} 2.0']
    t.at(5).state("starting")
    text = await t.at(5).scrape()
    for series in (
        'activator_gpu_seconds_total{model="coder",pool="l4",state="starting"} 0.0',
        'activator_tokens_total{kind="input",model="coder"} 0.0',
        'activator_tokens_total{kind="output",model="coder"} 0.0',
        'activator_cost_dollars_total{model="coder"} 0.0',
    ):
        assert series in text
    assert 'state="idle"' not in text
    t.at(6).state("ready")
    assert 'state="idle"} 0.0' in await t.scrape()


async def test_an_unpriced_model_has_gpu_time_and_tokens_but_no_dollars() -> None:
    t = Timeline()
    t.at(0).state("starting")
    t.metrics.count_tokens("coder", Usage(input=3))
    text = await t.at(10).scrape()
    assert "activator_cost_dollars_total" in text  # its HELP and TYPE
    assert 'activator_cost_dollars_total{model="coder"}' not in text
    assert t.sample("activator_tokens_total", kind="input") == 3
    assert t.metrics.cost.report("coder")["dollars"] is None


async def test_a_reload_counts_the_time_so_far_at_the_old_gpus() -> None:
    t = Timeline()
    t.at(0).state("starting")
    t.at(10).state("ready")
    t.at(20)
    t.metrics.add_model("coder", backend="process", settings=model_settings(gpus=1, pool=None))
    await t.at(50).scrape()
    samples = {
        (s.labels["pool"], s.labels["state"]): s.value
        for family in t.metrics.gpu_seconds.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {("l4", "starting"): 20, ("l4", "idle"): 20, ("", "idle"): 30}
    assert t.sample("activator_model_gpus", pool="") == 1
    assert t.sample("activator_model_gpus", pool="l4") is None


@pytest.mark.parametrize(
    ("state", "busy", "label"),
    [
        ("stopped", False, None),
        ("failed", False, None),
        ("starting", False, "starting"),
        ("starting", True, "starting"),  # leases left on a lost engine
        ("ready", True, "ready"),
        ("ready", False, IDLE),
        ("draining", True, "draining"),
        ("draining", False, "draining"),
        ("falling_asleep", False, "falling_asleep"),
        ("sleeping", False, "sleeping"),
        ("waking", False, "waking"),
        ("stopping", False, "stopping"),
    ],
)
def test_gpu_label_of_each_state(state: str, busy: bool, label: str | None) -> None:
    assert gpu_label(state, busy=busy) == label


# ----- any timeline: the totals do not depend on when scrapes happen -------------------

STATES = (
    "stopped",
    "starting",
    "ready",
    "draining",
    "falling_asleep",
    "sleeping",
    "waking",
    "stopping",
    "failed",
    "unknown",
)
EVENTS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=100),
        st.sampled_from([*STATES, "request", "end", "scrape"]),
    ),
    max_size=60,
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(EVENTS)
def test_scrapes_never_change_the_totals_and_the_totals_add_up(
    events: list[tuple[int, str]],
) -> None:
    """However events and scrapes interleave: the totals are the same as with no scrape
    between them, every label adds up to gpus x the time in GPU-holding states, and
    ready + idle to gpus x the time ready."""
    scraped, unscraped = Timeline(), Timeline()
    held = ready = 0
    state, in_flight, now = "stopped", 0, 0
    for step, event in events:
        if state in HOLDING:
            held += step
        if state == "ready":
            ready += step
        now += step
        for t in (scraped, unscraped):
            t.at(now)
            if event == "request":
                t.start()
            elif event == "end":
                if in_flight:
                    t.end()
            elif event == "scrape":
                if t is scraped:
                    t.metrics.cost.settle()
            else:
                t.state(event)
        if event == "request":
            in_flight += 1
        elif event == "end":
            in_flight = max(0, in_flight - 1)
        elif event in STATES and event != "unknown":
            state = event
    for t in (scraped, unscraped):
        t.metrics.cost.settle()
    totals = scraped.gpu_seconds()
    assert {k: v for k, v in totals.items() if v} == {
        k: v for k, v in unscraped.gpu_seconds().items() if v
    }
    assert sum(totals.values()) == 2 * held
    assert totals.get("ready", 0) + totals.get(IDLE, 0) == 2 * ready


# ----- config ------------------------------------------------------------------------


def test_cost_defaults_apply_key_by_key_and_a_model_overrides() -> None:
    settings = parse_config(
        {
            "defaults": {"cost": {"gpu_hour": 2.48, "input_per_million": 0.1}},
            "models": {
                "chat": model_config(cost={"input_per_million": 0.2, "output_per_million": 0.4}),
                "plain": model_config(),
            },
        },
        environ={},
    )
    chat, plain = settings.models["chat"].cost, settings.models["plain"].cost
    assert chat is not None and plain is not None
    assert (chat.gpu_hour, chat.input_per_million, chat.output_per_million) == (2.48, 0.2, 0.4)
    assert (plain.gpu_hour, plain.input_per_million, plain.output_per_million) == (2.48, 0.1, None)
    none = parse_config({"models": {"m": model_config()}}, environ={}).models["m"]
    assert none.cost is None


@pytest.mark.parametrize(
    ("cost", "problem"),
    [
        ({"gpu_hour": -1}, "models.m.cost.gpu_hour: must be a finite number, 0 or more (got -1)"),
        ({"gpu_hour": "2.48"}, "models.m.cost.gpu_hour: expected a number (got '2.48')"),
        ({"input_per_million": True}, "models.m.cost.input_per_million: expected a number"),
        ({"gpu_hours": 2}, "models.m.cost.gpu_hours: unknown key (did you mean gpu_hour?)"),
        ("cheap", "models.m.cost: expected a mapping"),
    ],
)
def test_a_bad_price_is_reported_by_key(cost: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"m": model_config(cost=cost)}}, environ={})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_a_price_may_come_from_the_environment() -> None:
    config = {"models": {"m": model_config(cost={"gpu_hour": "${GPU_HOUR}"})}}
    settings = parse_config(config, environ={"GPU_HOUR": "2.48"})
    cost = settings.models["m"].cost
    assert cost is not None and cost.gpu_hour == 2.48
