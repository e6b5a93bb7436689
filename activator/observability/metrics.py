"""Prometheus metrics, owned by one app (no global registry).

Label values are bounded: model and pool names come from config; a request for an
unknown model is counted under UNKNOWN_MODEL, never under the name the client sent.

Series are created when they first carry information, not for every configured model up
front: a model that never wakes costs a handful of series (docs/observability.md lists
which, and why each is kept). /metrics never stalls the event loop (`Metrics.render`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

from activator import __version__
from activator.config.settings import ModelSettings
from activator.core.states import STATES
from activator.observability.cost import CostMeter
from activator.observability.exposition import Exposition
from activator.observability.usage import Usage

UNKNOWN_MODEL = "__unknown__"

# Cold starts are not outliers: buckets run from 50 ms (a warm local engine) to 30 min
# (a GPU node provisioned from zero plus an image pull).
WAKE_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240,
    300, 420, 600, 900, 1200, 1800,
)  # fmt: skip
# Request latency spans sub-millisecond warm answers to held requests of many minutes.
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 600, 1200, 1800,
)  # fmt: skip
HELD_REASONS = ("starting", "waiting_for_gpu", "draining", "saturated")
REPLICA_KINDS = ("desired", "actual")
# What a model resident on a GPU is doing there (activator_pool_gpu_models).
GPU_MODEL_KINDS = ("awake", "asleep", "leaving")


@dataclass(frozen=True)
class GpuUse:
    """One GPU of a pool in memory mode, as the metrics show it (activator.fleet.pool)."""

    gpu: int
    committed: float  # share of its memory held, 0..1 (over 1 only if over-committed)
    models: Mapping[str, int] = field(default_factory=dict)  # kind -> models resident


RELOAD_OUTCOMES = ("ok", "invalid", "refused")
# The lifecycle's states (named in activator.core.states, moved between by the one table in
# activator.model.transitions), plus "unknown": shown while the backend cannot observe the
# engine.
MODEL_STATES = (*STATES, "unknown")


class Metrics:
    """Every metric activator exports. One instance per app, with its own registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "activator_requests",
            "Proxied requests by model, endpoint, HTTP status and whether they were held "
            "for a wake (cold).",
            ["model", "endpoint", "code", "cold"],
            registry=r,
        )
        self.request_duration = Histogram(
            "activator_request_duration_seconds",
            "Time from request arrival to the last byte of the response, hold included.",
            ["model", "endpoint", "cold"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "activator_time_to_first_byte_seconds",
            "Time from request arrival to the first byte of the upstream's response body.",
            ["model", "endpoint", "cold"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.held = Gauge(
            "activator_held_requests",
            "Requests held right now, by why they wait: starting (the model is waking), "
            "waiting_for_gpu (its pool is full), draining (the model is being swapped out), "
            "saturated (every pod of a scaled-out model carries target_concurrency x "
            "burst_factor requests).",
            ["model", "reason"],
            registry=r,
        )
        self.hold_duration = Histogram(
            "activator_hold_duration_seconds",
            "How long requests were held, by outcome: released, failed, timeout, "
            "disconnected, shutdown.",
            ["model", "outcome"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.queue_capacity = Gauge(
            "activator_queue_capacity",
            "The most requests that may be held for a model (max_queued).",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "activator_in_flight_requests",
            "Requests being answered by the model's engine right now (open streams count).",
            ["model"],
            registry=r,
        )
        self.wake_duration = Histogram(
            "activator_wake_duration_seconds",
            "Time from the decision to make a model ready to it passing readiness, by "
            "outcome (ready, failed, timeout, cancelled) and where it woke from: zero (a "
            "cold start) or sleep (vLLM sleep mode).",
            ["model", "backend", "outcome", "from"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.wake_phase_duration = Histogram(
            "activator_wake_phase_duration_seconds",
            "Time from the start of a wake to each phase it reached (process: spawned, "
            "launched, ready; kubernetes: scale_requested, launched, scheduled, "
            "image_pulled, started, ready).",
            ["model", "phase"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.model_state = Gauge(
            "activator_model_state",
            "1 for the model's current lifecycle state, 0 for the others.",
            ["model", "state"],
            registry=r,
        )
        self.scale_events = Counter(
            "activator_scale_events",
            "Starts (up) and stops (down) by reason: request, idle, swap, admin, revert, "
            "adopt, shutdown, failure.",
            ["model", "direction", "reason"],
            registry=r,
        )
        # Scale-out (replicas.max > 1): series only for such models.
        self.model_replicas = Gauge(
            "activator_model_replicas",
            "Replicas of a scaled-out model: desired (what activator asks of the workload; "
            "0 when stopped) and actual (pods taking requests: Ready, not terminating, past "
            "activator's own probe).",
            ["model", "kind"],
            registry=r,
        )
        self.pod_in_flight = Gauge(
            "activator_pod_in_flight_requests",
            "Requests in flight on each pod of a scaled-out model. Pod names come from the "
            "API: at most 2 x replicas.max pods per model are named (by name order), the "
            'rest are summed as pod="other"; a pod\'s series goes with the pod.',
            ["model", "pod"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "activator_upstream_retries",
            "Requests sent to an engine again, by reason: closed_connection (a pooled "
            "connection the engine had closed, retried once on a new one), another_pod (a "
            "scaled-out model's pod did not take the connection; sent to another pod). No "
            "other request is ever sent twice.",
            ["model", "reason"],
            registry=r,
        )
        self.scale_decisions = Counter(
            "activator_scale_decisions",
            "Replica count changes a scaled-out model's pool decided, by direction (up, "
            "down) and reason: demand (sized to in flight + held), max (demand beyond "
            "max), pool (growth bounded by the pool's free GPUs), delay (a scale-down "
            "after scale_down_delay), reclaim (GPUs given back to a waiting model). The log "
            "line of each gives the demand.",
            ["model", "direction", "reason"],
            registry=r,
        )
        self.swaps = Counter(
            "activator_swaps",
            "Model swaps in a GPU pool: from_model was stopped (mode stop) or put to sleep "
            "(mode sleep) to make room for to_model.",
            ["pool", "from_model", "to_model", "mode"],
            registry=r,
        )
        self.drain_duration = Histogram(
            "activator_drain_duration_seconds",
            "Time spent letting in-flight requests finish before a model was stopped.",
            ["model", "outcome"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.pool_gpus_in_use = Gauge(
            "activator_pool_gpus_in_use",
            "GPUs of the pool held by models that are starting, running or stopping.",
            ["pool"],
            registry=r,
        )
        self.pool_host_memory_in_use = Gauge(
            "activator_pool_host_memory_bytes",
            "Host memory held by the pool's sleeping models (level 1 weights), reserved "
            "from the moment a sleep is decided.",
            ["pool"],
            registry=r,
        )
        self.pool_host_memory = Gauge(
            "activator_pool_host_memory_capacity_bytes",
            "host_memory of the pool: what its sleeping models may hold together.",
            ["pool"],
            registry=r,
        )
        self.sleep_duration = Histogram(
            "activator_sleep_duration_seconds",
            "Time to put a model to sleep (POST /sleep until /is_sleeping confirms), by "
            "outcome: ok, failed (the model is stopped instead).",
            ["model", "outcome"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.pool_gpus = Gauge(
            "activator_pool_gpus", "GPU capacity of the pool.", ["pool"], registry=r
        )
        # Memory packing (pools whose models declare a GPU memory share): per GPU.
        self.pool_gpu_memory = Gauge(
            "activator_pool_gpu_memory_bytes",
            "gpu_memory of the pool: the memory of each of its GPUs (declared pools only).",
            ["pool"],
            registry=r,
        )
        self.pool_gpu_committed = Gauge(
            "activator_pool_gpu_memory_committed_ratio",
            "Share of the GPU's memory that the policy counts as held: awake, starting or "
            "leaving models' footprints and sleeping models' residues.",
            ["pool", "gpu"],
            registry=r,
        )
        self.pool_gpu_free = Gauge(
            "activator_pool_gpu_memory_free_ratio",
            "Share of the GPU's memory that the policy counts as free.",
            ["pool", "gpu"],
            registry=r,
        )
        self.pool_gpu_models = Gauge(
            "activator_pool_gpu_models",
            "Models resident on the GPU, by kind: awake (starting, waking, ready), asleep, "
            "leaving (draining, falling asleep, stopping).",
            ["pool", "gpu", "kind"],
            registry=r,
        )
        self.evictions = Counter(
            "activator_evictions",
            "Models a pool made leave for another reason than idleness, by reason (swap, "
            "capacity, host_memory, unschedulable) and mode (sleep or stop).",
            ["pool", "reason", "mode"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "activator_upstream_errors",
            "Failures talking to an engine: connect, timeout, disconnect (mid-response), "
            "cut (stream cut by a drain timeout or shutdown), engine_died (while ready).",
            ["model", "kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "activator_config_reloads",
            "Config reloads by outcome: ok (applied; maybe nothing had changed), invalid (the "
            "file did not validate) or refused (it needs a restart); nothing changes unless ok.",
            ["outcome"],
            registry=r,
        )
        for outcome in RELOAD_OUTCOMES:  # at zero: an alert on the first failure needs them
            self.config_reloads.labels(outcome=outcome)
        self.ui_logins_throttled = Counter(
            "activator_ui_logins_throttled",
            "Status-page logins refused with a 429 because their address sent too many "
            "wrong admin keys within a minute (the key was not compared).",
            registry=r,
        )
        self.config_info = Gauge(
            "activator_config_info",
            "1, for the config in force: the sha256 of its file (the first 16 hex digits, "
            "as `sha256sum` prints them).",
            ["hash"],
            registry=r,
        )
        self._config_hash: str | None = None
        # Several replicas (activator.ha): series only where leader election is enabled.
        self.leader = Gauge(
            "activator_leader",
            "1 while this replica is the elected leader (it alone decides starts, stops, "
            "swaps and sleeps), 0 while it follows.",
            ["replica"],
            registry=r,
        )
        self.leader_changes = Counter(
            "activator_leader_changes",
            "Times this replica saw the leader Lease pass to another holder.",
            ["replica"],
            registry=r,
        )
        self.build_info = Info("activator_build", "activator build information.", registry=r)
        self.build_info.info({"version": __version__})

        # Cost (activator.observability.cost owns these: GPU time, tokens, dollars).
        self.gpu_seconds = Counter(
            "activator_gpu_seconds",
            "GPU-seconds held by the model's engine (its gpus x seconds), by state: "
            "starting, ready (requests in flight), idle (ready, nothing in flight), "
            "draining, falling_asleep, sleeping, waking, stopping.",
            ["model", "pool", "state"],
            registry=r,
        )
        self.cost_dollars = Counter(
            "activator_cost_dollars",
            "What the model cost, from its cost: prices: GPU-seconds in every state but "
            "sleeping at gpu_hour, plus its tokens at their price per million.",
            ["model"],
            registry=r,
        )
        self.tokens = Counter(
            "activator_tokens",
            "Tokens in the engines' usage fields, by kind: input, output, cached (the "
            "part of input served from the prefix cache).",
            ["model", "kind"],
            registry=r,
        )
        self.model_gpus = Gauge(
            "activator_model_gpus",
            "GPUs the model's engine takes when it runs (its gpus setting).",
            ["model", "pool"],
            registry=r,
        )
        self.start_time = Gauge(
            "activator_start_time_seconds",
            "When this activator started, in seconds since the epoch: its counters count "
            "from then.",
            registry=r,
        )
        self.start_time.set(time.time())
        self.cost = CostMeter(
            gpu_seconds=self.gpu_seconds,
            dollars=self.cost_dollars,
            tokens=self.tokens,
            model_gpus=self.model_gpus,
            clock=clock,
        )

        self._backends: dict[str, str] = {}  # model -> backend label, from add_model
        self._states: dict[str, str] = {}  # model -> the state its one series shows
        self._gpu_series: dict[str, set[str]] = {}  # pool -> the GPUs it shows series for
        # Labelled children of the per-request metrics, looked up once per label set, not
        # on every request (`labels()` costs a lock and a dict lookup of its own). Bounded:
        # models come from config, endpoints and codes are few. A gauge's entry goes when
        # its series is removed (forget_model); counters and histograms are never removed.
        self._in_flight: dict[str, Any] = {}
        self._finished: dict[tuple[str, str, int, bool], tuple[Any, Any]] = {}
        self._ttfb: dict[tuple[str, str, bool], Any] = {}
        self._exposition = Exposition(
            [m for m in vars(self).values() if isinstance(m, MetricWrapperBase)]
        )

    def add_model(
        self,
        model: str,
        *,
        backend: str,
        settings: ModelSettings | None = None,
    ) -> None:
        """Note a configured model. It gets no wake series yet: see `set_state`. Its
        `settings` (GPUs, pool, prices) are what activator.observability.cost counts with."""
        self._backends[model] = backend
        if settings is not None:
            self.cost.add_model(model, pool=settings.pool, gpus=settings.gpus, prices=settings.cost)

    def request_started(self, model: str) -> None:
        """A request got a lease on the model's engine (it is in flight)."""
        self._in_flight_of(model).inc()
        self.cost.request_started(model)

    def request_ended(self, model: str) -> None:
        self._in_flight_of(model).dec()
        self.cost.request_ended(model)

    def _in_flight_of(self, model: str) -> Any:
        child = self._in_flight.get(model)
        if child is None:
            child = self._in_flight[model] = self.in_flight.labels(model=model)
        return child

    def request_finished(
        self,
        model: str,
        *,
        endpoint: str,
        code: int,
        cold: bool,
        seconds: float,
        ttfb: float | None,
    ) -> None:
        """A proxied request was answered (or ended): its count, duration and time to
        first byte (None: no byte of a body came from the engine)."""
        key = (model, endpoint, code, cold)
        children = self._finished.get(key)
        if children is None:
            labels = {"model": model, "endpoint": endpoint, "cold": "true" if cold else "false"}
            children = self._finished[key] = (
                self.requests.labels(**labels, code=str(code)),
                self.request_duration.labels(**labels),
            )
        count, duration = children
        count.inc()
        duration.observe(seconds)
        if ttfb is not None:
            short = (model, endpoint, cold)
            child = self._ttfb.get(short)
            if child is None:
                cold_label = "true" if cold else "false"
                child = self._ttfb[short] = self.ttfb.labels(
                    model=model, endpoint=endpoint, cold=cold_label
                )
            child.observe(ttfb)

    def count_tokens(self, model: str, usage: Usage) -> None:
        """An engine's answer reported its usage."""
        self.cost.count_tokens(model, usage)

    def observe_wake(
        self, *, model: str, backend: str, outcome: str, source: str, seconds: float
    ) -> None:
        """A wake ended: from zero (a cold start) or from sleep (vLLM sleep mode)."""
        labels = {"model": model, "backend": backend, "outcome": outcome, "from": source}
        self.wake_duration.labels(**labels).observe(seconds)

    def observe_sleep(self, *, model: str, outcome: str, seconds: float) -> None:
        self.sleep_duration.labels(model=model, outcome=outcome).observe(seconds)

    def set_state(self, model: str, state: str) -> None:
        """Show `state` as the model's one state series (value 1); the series of the
        state it left is removed, and Prometheus marks it stale.

        Entering `starting` also creates the model's wake series for the `ready` outcome
        at zero, before the wake can end: rate() and increase() count an observation only
        if the series had a sample before it, so a wake that outlasts one scrape interval
        (any real engine's) is counted even when it is the model's first. Models that
        never wake never carry the 28 series of a histogram."""
        previous = self._states.get(model)
        if previous is not None and previous != state:
            # A render in progress skips it too (activator.observability.exposition): one
            # scrape never shows a model in two states.
            self.model_state.remove(model, previous)
        self.model_state.labels(model=model, state=state).set(1)
        self._states[model] = state
        self.cost.set_state(model, state)
        backend = self._backends.get(model)
        if state in ("starting", "waking") and backend is not None:
            source = "sleep" if state == "waking" else "zero"
            self.wake_duration.labels(
                model=model, backend=backend, outcome="ready", **{"from": source}
            )

    def show_config(self, digest: str) -> None:
        """The config in force is now the one of `digest` (its one series)."""
        if self._config_hash is not None and self._config_hash != digest:
            self.config_info.remove(self._config_hash)
        self.config_info.labels(hash=digest).set(1)
        self._config_hash = digest

    def forget_model(self, model: str) -> None:
        """A reload removed the model: its gauges go (they would show it forever).
        Counters and histograms stay: they are its history, and rate() needs them."""
        state = self._states.pop(model, None)
        self._backends.pop(model, None)
        self._in_flight.pop(model, None)
        gone = [(self.model_state, (model, state)), (self.queue_capacity, (model,))]
        gone += [(self.in_flight, (model,))]
        gone += [(self.held, (model, reason)) for reason in HELD_REASONS]
        gone += [(self.model_replicas, (model, kind)) for kind in REPLICA_KINDS]
        for gauge, labels in gone:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def forget_pool(self, pool: str) -> None:
        """A reload removed the pool: its gauges go."""
        for gauge in (
            self.pool_gpus,
            self.pool_gpus_in_use,
            self.pool_host_memory,
            self.pool_host_memory_in_use,
            self.pool_gpu_memory,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(pool)
        self.show_gpu_memory(pool, [])

    def show_gpu_memory(self, pool: str, gpus: Sequence[GpuUse]) -> None:
        """The pool's per-GPU memory now (memory packing): one series per GPU shown, and
        the series of GPUs no longer shown (a pool made smaller, or removed) go."""
        shown = self._gpu_series.pop(pool, set())
        now: set[str] = set()
        for use in gpus:
            gpu = str(use.gpu)
            now.add(gpu)
            self.pool_gpu_committed.labels(pool=pool, gpu=gpu).set(use.committed)
            self.pool_gpu_free.labels(pool=pool, gpu=gpu).set(max(0.0, 1.0 - use.committed))
            for kind in GPU_MODEL_KINDS:
                self.pool_gpu_models.labels(pool=pool, gpu=gpu, kind=kind).set(
                    use.models.get(kind, 0)
                )
        for gpu in shown - now:
            gone: list[tuple[Gauge, tuple[str, ...]]] = [
                (self.pool_gpu_committed, (pool, gpu)),
                (self.pool_gpu_free, (pool, gpu)),
            ]
            gone += [(self.pool_gpu_models, (pool, gpu, kind)) for kind in GPU_MODEL_KINDS]
            for gauge, labels in gone:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        if now:
            self._gpu_series[pool] = now

    async def render(self) -> bytes:
        """The /metrics body: every metric above, in the Prometheus text format, without
        `_created` series (prometheus_client adds one to every counter and histogram
        series; nothing reads them). Rendered in slices between which the event loop
        serves requests (activator.observability.exposition). Concurrent calls share one render.
        GPU time is counted up to now first (activator.observability.cost)."""
        self.cost.settle()
        return await self._exposition.render()
