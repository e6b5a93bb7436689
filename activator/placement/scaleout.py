"""One scaled-out model's replicas (replicas.max > 1): the pods it routes to, how many it
asks for, and the writes that get them.

`ScaleOut` belongs to its model (activator.model.lifecycle.Model) and is the one owner of:

- the model's `PodRouter` (activator.placement.routing), fed by the backend's watch of the pods
  behind the model's Service and probing each pod itself with the model's readiness
  probe: a ready model forwards each request to the least loaded routable pod;
- the replicas decided: the pool scheduler (activator.fleet.pool) calls `decide` on every step
  for a ready model, with the demand (in flight + held; with several activator replicas,
  summed over all of them by the leader) and the room its pool has; `activator.placement.scaling`
  is the pure rule, this object keeps its window between calls;
- the scale writes: one at a time, the latest decision wins; a scale-down first writes the
  pods' deletion costs (their requests in flight) so the least loaded pods go. A write
  that fails is tried again after a backoff, not on every step.

What the pool counts for the model (`replicas`) is what it asked for: the replicas decided
(while their write is under way) or else spec.replicas as the backend last saw it, and
never less than one replica's worth. All calls come from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from activator.config.settings import ModelSettings
from activator.core.errors import BackendError
from activator.core.tasks import TaskGroup
from activator.engine.http_client import HttpClient
from activator.engine.readiness import wait_ready
from activator.observability.metrics import Metrics
from activator.placement.routing import PodEndpoint, PodLease, PodRouter, RouterSettings
from activator.placement.scaling import ReplicaPolicy, Sample, ScaleDecision, ScaleView, decide

logger = logging.getLogger(__name__)

# A failed scale write is tried again after this long, doubling up to the ceiling: an
# API that refuses (RBAC, a webhook) is not hammered on every pool step.
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
# Per-pod in-flight series named after pods: at most this many per model and replica of
# `max` (terminating pods overlap their replacements); the rest are summed as pod="other".
POD_SERIES_PER_REPLICA = 2
OTHER_PODS = "other"


@runtime_checkable
class ScaleTarget(Protocol):
    """What a backend that runs several replicas offers (KubernetesBackend)."""

    @property
    def replicas(self) -> int | None:
        """spec.replicas as last seen or written; None before it was read."""

    async def scale_to(self, replicas: int) -> bool:
        """Fenced, conditional write of spec.replicas (>= 1); BackendError if refused."""

    def watch_pods(
        self, on_change: Callable[[tuple[PodEndpoint, ...]], None]
    ) -> Callable[[], None]:
        """Subscribe to the pods behind the model's Service; returns the unsubscribe."""

    async def prefer_deletion(self, costs: Mapping[str, int]) -> None:
        """Before a scale-down: mark which pods should go first (best effort)."""


def policy_of(settings: ModelSettings) -> ReplicaPolicy:
    r = settings.replicas
    return ReplicaPolicy(
        max=r.max,
        target_concurrency=r.target_concurrency,
        scale_down_delay=r.scale_down_delay,
        gpus=settings.gpus,
    )


def router_settings_of(settings: ModelSettings) -> RouterSettings:
    r = settings.replicas
    return RouterSettings(target_concurrency=r.target_concurrency, burst_factor=r.burst_factor)


class ScaleOut:
    def __init__(
        self,
        settings: ModelSettings,
        *,
        http: HttpClient,
        metrics: Metrics,
        tasks: TaskGroup,
        on_change: Callable[[], None],
        kick: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_change` is the model's (synchronous, must not block): room may have
        appeared on a pod, the routable pods changed, or a request started or ended.
        `kick` asks the model's pool to decide again (a write failed)."""
        self.name = settings.name
        self._settings = settings
        self._http = http
        self._metrics = metrics
        self._tasks = tasks
        self._on_change = on_change
        self._kick = kick
        self._clock = clock
        self.router = PodRouter(
            self.name,
            settings=router_settings_of(settings),
            probe=self._probe,
            on_change=self._router_changed,
        )
        self._target: ScaleTarget | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._window: tuple[Sample, ...] = ()
        self._desired: int | None = None  # decided; None: follow spec.replicas
        self.last_decision: ScaleDecision | None = None
        # The last decision that changed the replicas, for the status page: most steps
        # decide to stay, so last_decision alone rarely says why the count moved.
        self.last_change: dict[str, Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._routable_changed = asyncio.Event()
        self._demand = 0  # replicas the local demand asked for at the last change
        self._shown: dict[str, int] = {}  # pod series -> value shown
        self._counted_gpus: int | None = None
        self._routable_shown: int | None = None
        self._show_replicas()

    # ----- set up by the model ------------------------------------------------------

    def attach(self, target: ScaleTarget) -> None:
        """Start following the backend's pods (its engine's watch)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._target = target
        self._unsubscribe = target.watch_pods(self.router.update)

    def configure(self, settings: ModelSettings) -> None:
        """A reload's settings (target_concurrency, scale_down_delay, burst_factor, the
        probe's health path...): in force for the next request and decision."""
        self._settings = settings
        self.router.settings = router_settings_of(settings)

    async def aclose(self) -> None:
        """Stop following the pods and probing them; a write under way is cancelled."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._cancel_writer()
        await self.router.aclose()
        self._forget_series()

    # ----- what the model's request path uses -------------------------------------------

    def try_acquire(self, *, exclude: frozenset[str] = frozenset()) -> PodLease | None:
        """A lease on the least loaded routable pod with room, or None (hold the
        request: every pod is at target_concurrency x burst_factor, or none is up)."""
        return self.router.try_acquire(exclude=exclude)

    async def until_routable(self) -> None:
        """Until some pod takes requests (Ready, not terminating, past our probe). Safe
        to cancel; unbounded (the caller's startup_timeout bounds it)."""
        while self.router.routable < 1:
            changed = self._routable_changed
            await changed.wait()

    def demand_moved(self, held: int) -> bool:
        """Whether the replicas the local demand asks for changed since the last call:
        the pool decides again then (not on every request)."""
        load = self.router.in_flight + max(0, held)
        demand = math.ceil(load / self._settings.replicas.target_concurrency) if load else 0
        moved, self._demand = demand != self._demand, demand
        return moved

    # ----- what the pool sees ------------------------------------------------------------

    @property
    def replicas(self) -> int:
        """Replicas the model asked for, as its pool counts them (at least one)."""
        if self._desired is not None:
            return max(1, self._desired)
        spec = self._target.replicas if self._target is not None else None
        return max(1, spec or 0)

    def decide(
        self, *, in_flight: int, held: int, gpus_free: int | None, gpus_reclaim: int, unknown: bool
    ) -> float | None:
        """The pool's step for a ready model: the replicas it should have now, written if
        they differ from what it has. Returns when to decide again (clock time), or None."""
        now = self._clock()
        spec = self._target.replicas if self._target is not None else None
        if not self._window and spec is not None and spec > 1:
            # The first decision here (a model adopted at start-up, or a replica that has
            # just taken the lead): the replicas the workload has were wanted until now,
            # by whoever decided before, so they stay for scale_down_delay like any peak.
            # Without this a failover shed them at once, on one replica's demand alone.
            self._window = (Sample(now, min(spec, self._settings.replicas.max)),)
        view = ScaleView(
            in_flight=in_flight,
            held=held,
            current=self.replicas,
            gpus_free=gpus_free,
            gpus_reclaim=gpus_reclaim,
            unknown=unknown or spec is None,
        )
        decision = decide(policy_of(self._settings), view, now=now, window=self._window)
        self._window = decision.window
        self.last_decision = decision
        wake_at = decision.wake_at
        if decision.desired != self.replicas:
            self._note(decision, view)
        self._desired = decision.desired
        if decision.desired != spec and not view.unknown:
            if self._retry_at is not None and now < self._retry_at:
                wake_at = self._retry_at if wake_at is None else min(wake_at, self._retry_at)
            else:
                self._write()
        self._show_replicas()
        return wake_at

    def rest(self) -> None:
        """The model is not ready (stopping, stopped, starting again): no decision holds;
        its window starts over at the next ready step."""
        if self._desired is None and not self._window:
            return
        self._cancel_writer()
        self._window = ()
        self._desired = None
        self._show_replicas()

    def describe(self) -> dict[str, Any]:
        decision = self.last_decision
        return {
            "max": self._settings.replicas.max,
            "target_concurrency": self._settings.replicas.target_concurrency,
            "limit_per_pod": self.router.limit,
            "desired": self._desired,
            "spec": self._target.replicas if self._target is not None else None,
            "routable": self.router.routable,
            "last_decision": None
            if decision is None
            else {
                "desired": decision.desired,
                "reason": decision.reason,
                "demand": decision.demand,
            },
            "last_change": self.last_change,
            "pods": self.router.describe(),
        }

    # ----- internals ----------------------------------------------------------------------

    def _note(self, decision: ScaleDecision, view: ScaleView) -> None:
        direction = "up" if decision.desired > view.current else "down"
        self.last_change = {
            "direction": direction,
            "from": view.current,
            "to": decision.desired,
            "reason": decision.reason,
            "demand": decision.demand,
            "at": round(time.time(), 1),  # wall clock: shown as a time of day
        }
        self._metrics.scale_decisions.labels(
            model=self.name, direction=direction, reason=decision.reason
        ).inc()
        logger.info(
            "model=%s scale %s %d -> %d (%s): demand %d replicas from %d in flight + %d held "
            "at target_concurrency %g (max %d, pool room %s)",
            self.name,
            direction,
            view.current,
            decision.desired,
            decision.reason,
            decision.demand,
            view.in_flight,
            view.held,
            self._settings.replicas.target_concurrency,
            self._settings.replicas.max,
            "unbounded" if view.gpus_free is None else f"{view.gpus_free} GPUs",
        )

    def _write(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = self._tasks.spawn(self._run_writes(), name=f"scale:{self.name}")

    async def _run_writes(self) -> None:
        """Write the latest decision until spec.replicas is it (a newer decision made
        during a write is written next). Cancelled when the model stops being ready."""
        target = self._target
        assert target is not None
        while (wanted := self._desired) is not None and wanted != target.replicas:
            current = target.replicas
            try:
                if current is not None and wanted < current:
                    await target.prefer_deletion(self.router.deletion_costs())
                await target.scale_to(wanted)
            except BackendError as exc:
                self._failures += 1
                delay = min(RETRY_MAX, RETRY_INITIAL * 2 ** (self._failures - 1))
                self._retry_at = self._clock() + delay
                logger.warning(
                    "model=%s not scaled to %d replicas (trying again in %.0fs): %s",
                    self.name,
                    wanted,
                    delay,
                    exc,
                )
                self._desired = None  # the pool counts what the workload asks for
                self._show_replicas()
                self._kick()  # the pool decides again, and writes at the retry time
                return
            self._failures, self._retry_at = 0, None

    def _cancel_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._writer = None

    async def _probe(self, url: str, nudge: asyncio.Event) -> None:
        s = self._settings
        await wait_ready(
            self._http.session(self.name),
            url=url,
            health_path=s.health_path,
            served_model_name=s.served_model_name,
            api_key=s.upstream_api_key,
            nudge=nudge,
        )

    def _router_changed(self) -> None:
        routable = self.router.routable
        if routable != self._routable_shown:
            self._routable_shown = routable
            self._routable_changed.set()
            self._routable_changed = asyncio.Event()
            self._show_replicas()
        self._show_pods()
        self._on_change()

    # ----- metrics -------------------------------------------------------------------------

    def _show_replicas(self) -> None:
        m = self._metrics.model_replicas
        spec = self._target.replicas if self._target is not None else None
        desired = self._desired if self._desired is not None else (spec or 0)
        m.labels(model=self.name, kind="desired").set(desired)
        m.labels(model=self.name, kind="actual").set(self.router.routable)
        gpus = self._settings.gpus * self.replicas
        if gpus != self._counted_gpus:
            # GPU time and cost count every replica asked for (activator.observability.cost).
            self._counted_gpus = gpus
            s = self._settings
            self._metrics.cost.add_model(self.name, pool=s.pool, gpus=gpus, prices=s.cost)

    def _show_pods(self) -> None:
        """activator_pod_in_flight_requests: one series per pod, at most
        POD_SERIES_PER_REPLICA x max of them named, the rest summed as pod="other"."""
        cap = POD_SERIES_PER_REPLICA * self._settings.replicas.max
        values: dict[str, int] = {}
        for index, (pod, in_flight) in enumerate(sorted(self.router.deletion_costs().items())):
            key = pod if index < cap else OTHER_PODS
            values[key] = values.get(key, 0) + in_flight
        if values == self._shown:
            return
        gauge = self._metrics.pod_in_flight
        for gone in set(self._shown) - set(values):
            gauge.remove(self.name, gone)
        for pod, value in values.items():
            if self._shown.get(pod) != value:
                gauge.labels(model=self.name, pod=pod).set(value)
        self._shown = values

    def _forget_series(self) -> None:
        for pod in self._shown:
            self._metrics.pod_in_flight.remove(self.name, pod)
        self._shown = {}
