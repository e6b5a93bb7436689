"""GPU time, tokens and money per model: the one owner of that accounting.

What a model's engine holds: its `gpus`, from the moment a start begins until it is
stopped. `activator_gpu_seconds_total{model,pool,state}` counts gpus x seconds under the
label of the state it was in (`gpu_label`): starting, ready, draining, falling_asleep,
sleeping, waking, stopping; `ready` with nothing in flight is counted as `idle`, the GPU
time nobody used. Stopped and failed hold nothing. While the backend cannot see the
engine (state `unknown`), its time goes on under the last state known.

What is billed (`activator_cost_dollars_total{model}`, for a model with `cost:`): every
GPU-second at `gpu_hour` / 3600, except `sleeping` ones; plus each token of the engines'
`usage` at its price per million. A sleeping engine leaves its GPU to the pool: the
model awake on it pays for it (billing both would count one GPU twice). On Kubernetes a
sleeping pod keeps its `nvidia.com/gpu` allocation, shared with the model awake through
time-slicing (unshared, the other model's pod cannot be scheduled and the sleeper is
stopped); `state="sleeping"` is counted so that it can be priced in PromQL where it
should be (docs/observability.md, "Cost").

Exact without a timer: each model's meter knows the label it is counted under now and
since when. Whatever changes that label (a state change, `Metrics.set_state`; the
in-flight count going 0 -> 1 or 1 -> 0, `Metrics.request_started` / `request_ended`)
first adds the interval that ends now to the old label's counter. A scrape
(`Metrics.render`) does the same for every running interval (`settle`), so the counters
are exact at each scrape and nothing runs between events. Called from the event loop
only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from activator.config.settings import CostSettings
from activator.observability.usage import Usage

# The states in which an engine holds its GPUs; each is its own label but ready, which
# splits into ready (requests in flight) and idle (none).
HOLDING = frozenset(
    {"starting", "ready", "draining", "falling_asleep", "sleeping", "waking", "stopping"}
)
IDLE = "idle"
# GPU time not priced at gpu_hour: the pool's GPU is paid by the model awake on it.
UNBILLED = frozenset({"sleeping"})
# Lifecycle states that say nothing about the engine (the backend cannot see it).
UNSEEN = frozenset({"unknown"})
TOKEN_KINDS = ("input", "output")  # and "cached", once an engine reports it
SECONDS_PER_HOUR = 3600.0
PER_MILLION = 1e-6


def gpu_label(state: str, *, busy: bool) -> str | None:
    """The label a model's GPU time is counted under in `state`, None if it holds none."""
    if state == "ready" and not busy:
        return IDLE
    return state if state in HOLDING else None


def gpu_dollars(prices: CostSettings | None, *, label: str, gpu_seconds: float) -> float:
    if prices is None or prices.gpu_hour is None or label in UNBILLED:
        return 0.0
    return gpu_seconds / SECONDS_PER_HOUR * prices.gpu_hour


def token_dollars(prices: CostSettings | None, usage: Usage) -> float:
    if prices is None:
        return 0.0
    dollars = 0.0
    if prices.input_per_million is not None:
        dollars += usage.input * prices.input_per_million * PER_MILLION
    if prices.output_per_million is not None:
        dollars += usage.output * prices.output_per_million * PER_MILLION
    return dollars


@dataclass
class _Meter:
    """One model's accounting. `label` accrues from `since` on, at `gpus` per second."""

    pool: str = ""
    gpus: int = 0  # 0 until add_model: set_state may come first
    prices: CostSettings | None = None
    state: str = "stopped"
    in_flight: int = 0
    label: str | None = None
    since: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)  # GPU-seconds by label
    dollars: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    series: bool = False  # its tokens (and dollars) series exist
    counters: dict[str, Any] = field(default_factory=dict)  # label -> its gpu_seconds child
    token_counters: dict[str, Any] = field(default_factory=dict)  # kind -> its tokens child


class CostMeter:
    """Owns every model's GPU time, tokens and cost, and the metrics that show them."""

    def __init__(
        self,
        *,
        gpu_seconds: Counter,
        dollars: Counter,
        tokens: Counter,
        model_gpus: Gauge,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpu_seconds = gpu_seconds
        self._dollars = dollars
        self._tokens = tokens
        self._model_gpus = model_gpus
        self._clock = clock
        self._meters: dict[str, _Meter] = {}

    def _meter(self, model: str) -> _Meter:
        meter = self._meters.get(model)
        if meter is None:
            meter = self._meters[model] = _Meter()
        return meter

    # ----- what Metrics feeds in --------------------------------------------------------

    def add_model(
        self, model: str, *, pool: str | None, gpus: int, prices: CostSettings | None
    ) -> None:
        """A configured model (again, on a reload): the interval so far is counted as
        it was configured, the rest as it is now."""
        meter = self._meter(model)
        self._advance(model, meter, self._clock())
        pool = pool or ""
        if meter.pool != pool:
            if meter.gpus:
                self._model_gpus.remove(model, meter.pool)
            meter.counters.clear()
        meter.pool, meter.gpus = pool, gpus
        meter.prices = prices if prices is not None and prices.priced else None
        self._model_gpus.labels(model=model, pool=pool).set(gpus)
        if meter.prices is not None and meter.series:
            self._dollars.labels(model=model)  # priced by a reload: its series at zero
        if meter.label is not None:
            self._open(model, meter)

    def set_state(self, model: str, state: str) -> None:
        if state in UNSEEN:
            return  # counted on as the last state known
        meter = self._meter(model)
        if state != meter.state:
            meter.state = state
            self._relabel(model, meter)

    def request_started(self, model: str) -> None:
        meter = self._meter(model)
        meter.in_flight += 1
        if meter.in_flight == 1 and meter.state == "ready":
            self._relabel(model, meter)

    def request_ended(self, model: str) -> None:
        meter = self._meter(model)
        meter.in_flight = max(0, meter.in_flight - 1)
        if meter.in_flight == 0 and meter.state == "ready":
            self._relabel(model, meter)

    def count_tokens(self, model: str, usage: Usage) -> None:
        meter = self._meter(model)
        counts = (("input", usage.input), ("output", usage.output), ("cached", usage.cached))
        for kind, count in counts:
            if count:
                counter = meter.token_counters.get(kind)
                if counter is None:  # looked up once: this runs on every answer
                    counter = meter.token_counters[kind] = self._tokens.labels(
                        model=model, kind=kind
                    )
                counter.inc(count)
                meter.tokens[kind] = meter.tokens.get(kind, 0) + count
        dollars = token_dollars(meter.prices, usage)
        if dollars:
            self._dollars.labels(model=model).inc(dollars)
            meter.dollars += dollars

    def settle(self) -> None:
        """Count every running interval up to now (before a scrape is rendered)."""
        now = self._clock()
        for model, meter in self._meters.items():
            if meter.label is not None:
                self._advance(model, meter, now)

    # ----- what the admin API shows -----------------------------------------------------

    def report(self, model: str) -> dict[str, Any]:
        """Since activator started, up to now: GPU-hours awake (every holding state but
        sleeping) and of them idle, GPU-hours asleep, dollars (None when not priced) and
        tokens. Each figure rounded by `figure`."""
        meter = self._meter(model)
        seconds = dict(meter.seconds)
        dollars = meter.dollars
        if meter.label is not None:
            running = meter.gpus * max(0.0, self._clock() - meter.since)
            seconds[meter.label] = seconds.get(meter.label, 0.0) + running
            dollars += gpu_dollars(meter.prices, label=meter.label, gpu_seconds=running)
        awake = sum(s for label, s in seconds.items() if label not in UNBILLED)
        asleep = sum(s for label, s in seconds.items() if label in UNBILLED)
        return {
            "gpus": meter.gpus,
            "gpu_hours": _hours(awake),
            "idle_gpu_hours": _hours(seconds.get(IDLE, 0.0)),
            "sleeping_gpu_hours": _hours(asleep),
            "dollars": None if meter.prices is None else figure(dollars),
            "tokens": {kind: meter.tokens.get(kind, 0) for kind in TOKEN_KINDS}
            | {k: n for k, n in meter.tokens.items() if k not in TOKEN_KINDS},
        }

    # ----- the arithmetic ---------------------------------------------------------------

    def _relabel(self, model: str, meter: _Meter) -> None:
        label = gpu_label(meter.state, busy=meter.in_flight > 0)
        if label == meter.label:
            return
        self._advance(model, meter, self._clock())
        meter.label = label
        if label is not None:
            self._open(model, meter)

    def _advance(self, model: str, meter: _Meter, now: float) -> None:
        """Count the running interval up to `now` under its label; it goes on from now."""
        label = meter.label
        if label is not None and now > meter.since and meter.gpus:
            gpu_seconds = meter.gpus * (now - meter.since)
            self._counter(model, meter, label).inc(gpu_seconds)
            meter.seconds[label] = meter.seconds.get(label, 0.0) + gpu_seconds
            dollars = gpu_dollars(meter.prices, label=label, gpu_seconds=gpu_seconds)
            if dollars:
                self._dollars.labels(model=model).inc(dollars)
                meter.dollars += dollars
        meter.since = now

    def _open(self, model: str, meter: _Meter) -> None:
        """A label starts to accrue: its series exists from now, at zero, so that rate()
        and increase() count its first interval (they need a sample before the rise).
        The model's token and dollar series are created with its first GPU time."""
        if not meter.gpus or meter.label is None:
            return
        self._counter(model, meter, meter.label)
        if not meter.series:
            meter.series = True
            for kind in TOKEN_KINDS:
                self._tokens.labels(model=model, kind=kind)
            if meter.prices is not None:
                self._dollars.labels(model=model)

    def _counter(self, model: str, meter: _Meter, label: str) -> Any:
        """The gpu_seconds child of `label` (cached: a request on a model with nothing
        else in flight changes its label twice)."""
        counter = meter.counters.get(label)
        if counter is None:
            counter = self._gpu_seconds.labels(model=model, pool=meter.pool, state=label)
            meter.counters[label] = counter
        return counter


def _hours(gpu_seconds: float) -> float:
    return figure(gpu_seconds / SECONDS_PER_HOUR)


def figure(value: float) -> float:
    """`value` to 0.01 (36 GPU-seconds, a cent), and below 0.1 to two significant
    digits. Rounded at all so that the status page, which is sent a snapshot whenever one
    changes, is not sent one every tick (from 0.1 on, one per 36 GPU-seconds or cent at
    most); two significant digits below it so that a short run's 0.00093 GPU-hours is not
    shown as 0.0 (a change every 1-10 % of the figure, the first GPU-minutes only)."""
    if value == 0 or not math.isfinite(value) or abs(value) >= 0.1:
        return round(value, 2)
    return round(value, 1 - math.floor(math.log10(abs(value))))
