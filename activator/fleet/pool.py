"""The one owner of start/stop decisions for a group of models sharing GPUs.

Every model belongs to exactly one scheduler: a configured pool, or a pool of its own
with no capacity limit (an unconstrained model). The scheduler runs one loop: gather the
models' views, ask the pure policy (`activator.placement.policy.decide`), carry out the decision,
then sleep until kicked (a request was held, a start or stop finished, a stream ended)
or until the policy's next deadline (idle timeout, end of a min_residency). Decisions
within a pool are therefore made by one task, in order.

Scaled-out models (replicas.max > 1, activator.placement.scaleout) are sized in the same
step, before the policy's starts and swaps: each ready one gets the replicas its demand
asks for, within the GPUs its pool can give without evicting anything
(activator.placement.scaling.pool_room), and a pool whose waiting model lacks GPUs takes
them back from extra replicas first. A model's
view counts every replica it asked for.

With several activator replicas (activator.ha) only the leader's loops decide, from views
holding every replica's demand; a follower's loop feeds its models the leader's intent
instead (`Coordinator.follow`), and never scales. Either way, one task per pool moves its
models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from activator.model.lifecycle import Model
from activator.observability.metrics import GpuUse, Metrics
from activator.placement.memory import HOLDING_STATES, Ledger, held, ledger
from activator.placement.policy import (
    TRANSIT_STATES,
    Decision,
    ModelView,
    decide,
    gpus_in_use,
    host_in_use,
    plan_sleeps,
)
from activator.placement.scaling import pool_room

logger = logging.getLogger(__name__)

# A GPU's memory in the policy's units when its pool declares no size (`gpu_memory`): the
# models' shares are then counted in ten-thousandths of a GPU.
UNITS_PER_GPU = 10_000
# What bringing a model back is assumed to cost until its own wakes have been measured
# (seconds): a level-1 sleeper copies its weights back, a level-2 one reloads them from
# disk, a stopped one starts a new engine (vLLM: tens of seconds to minutes).
ASSUMED_BRING_BACK = {1: 1.0, 2: 10.0, None: 60.0}


class Coordinator(Protocol):
    """This activator as one of several replicas (activator.ha.wiring)."""

    def deciding(self) -> bool:
        """Whether this replica decides now (it leads, and has reconciled its models)."""

    def merged(self, views: Sequence[ModelView]) -> list[ModelView]:
        """`views` with every replica's demand in them."""

    def follow(self, models: Sequence[Model]) -> float | None:
        """While not deciding: move the models after the leader's intent. Returns when
        to look again (clock time) if nothing kicks the pool before, or None."""


class PoolScheduler:
    def __init__(
        self,
        name: str,
        *,
        capacity: int | None,
        host_memory: int | None = None,
        gpu_memory: int | None = None,
        models: Sequence[Model],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.host_memory = host_memory
        self.gpu_memory = gpu_memory  # bytes per GPU, as declared (None: not declared)
        self.models = list(models)
        self._by_name = {m.name: m for m in self.models}
        self._metrics = metrics
        self._clock = clock
        self._kicked = asyncio.Event()
        self._closed = False
        self.last_decision = Decision()
        self.coordinator: Coordinator | None = None  # several replicas: set at start
        for m in self.models:
            m.scheduler = self
        if capacity is not None:
            metrics.pool_gpus.labels(pool=name).set(capacity)
        if host_memory is not None:
            metrics.pool_host_memory.labels(pool=name).set(host_memory)
        if gpu_memory is not None:
            metrics.pool_gpu_memory.labels(pool=name).set(gpu_memory)

    def kick(self) -> None:
        self._kicked.set()

    async def run(self) -> None:
        """Decide until cancelled. Never returns; a failing decision is logged and retried
        on the next kick so one bad step cannot wedge the pool. Returns after `close()`."""
        while not self._closed:
            self._kicked.clear()
            wake_at: float | None = None
            try:
                wake_at = self.step()
            except Exception:
                logger.exception("pool=%s decision failed", self.name)
                wake_at = self._clock() + 1.0
            timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races the kick, and shutdown cancels this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kicked.wait()

    # ----- reloads (activator.reload calls these; each is one synchronous change) -----

    def add(self, model: Model) -> None:
        """The model is decided for by this pool from now on (and by no other)."""
        self.models.append(model)
        self._by_name[model.name] = model
        model.scheduler = self
        self.kick()

    def remove(self, model: Model) -> None:
        """The model leaves: its engine runs no longer (or its next pool takes it over)."""
        self.models.remove(model)
        del self._by_name[model.name]
        self.kick()

    def resize(
        self, *, capacity: int, host_memory: int | None, gpu_memory: int | None = None
    ) -> None:
        """New limits, in force for the next decision. GPUs over a smaller capacity are
        freed by the policy's over-capacity eviction (nothing starts meanwhile); sleeping
        engines over a smaller host memory are stopped now, least recently used first."""
        self.capacity, self.host_memory = capacity, host_memory
        self.gpu_memory = gpu_memory
        self._metrics.pool_gpus.labels(pool=self.name).set(capacity)
        if gpu_memory is not None:
            self._metrics.pool_gpu_memory.labels(pool=self.name).set(gpu_memory)
        if host_memory is not None:
            self._metrics.pool_host_memory.labels(pool=self.name).set(host_memory)
        for name in over_host_memory([m.view() for m in self.models], host_memory):
            self._by_name[name].begin_stop(reason="host_memory")
        self.kick()

    def close(self) -> None:
        """End `run()`: the pool has no models left (a reload removed it)."""
        self._closed = True
        self.kick()

    def step(self) -> float | None:
        if self.coordinator is not None and not self.coordinator.deciding():
            for m in self.models:
                if m.scale is not None:
                    m.scale.rest()  # the leader sizes it; spec.replicas is what counts here
            return self.coordinator.follow(self.models)
        now = self._clock()
        views = self._views()
        resized, scaled_wake = self._size_replicas(views)
        if resized:
            views = self._views()  # the policy sees the footprints as they are now
        units = self._units()
        decision = decide(
            self.capacity, views, now=now, host_memory=self.host_memory, gpu_memory=units
        )
        self.last_decision = decision
        by_view = {v.name: v for v in views}
        for stop in decision.stop:
            model = self._by_name[stop.model]
            began = model.begin_stop(reason=stop.reason, sleep=stop.sleep, for_model=stop.for_model)
            if began and model.scale is not None:
                model.scale.rest()  # no write of this step's size may follow the stop
            if began and stop.reason != "idle":
                self._evicted(stop.model, stop.reason, stop.sleep, stop.for_model, by_view, units)
        for name in decision.start:
            self._by_name[name].begin_start(
                reason="request", placement=decision.placements.get(name, ())
            )
        if self.capacity is not None:
            after = self._views(merge=False)
            self._metrics.pool_gpus_in_use.labels(pool=self.name).set(gpus_in_use(after))
            self._metrics.pool_host_memory_in_use.labels(pool=self.name).set(host_in_use(after))
            if units is not None:
                self._show_memory(self._ledger(after, units), after, units)
        wakes = [t for t in (decision.wake_at, scaled_wake) if t is not None]
        return min(wakes) if wakes else None

    # ----- memory packing (activator.placement.memory) ----------------------------------

    def _units(self) -> int | None:
        """The units of one GPU's memory when the pool packs by memory (it declares
        gpu_memory, or one of its models declares a share), else None: whole GPUs, as
        before memory packing."""
        if self.capacity is None:
            return None
        if self.gpu_memory is None and all(m.settings.memory_fraction is None for m in self.models):
            return None
        return self.gpu_memory or UNITS_PER_GPU

    def _views(self, *, merge: bool = True) -> list[ModelView]:
        units = self._units()
        views = [self._with_memory(m, units) for m in self.models]
        if merge and self.coordinator is not None:
            views = self.coordinator.merged(views)
        return views

    def _with_memory(self, model: Model, units: int | None) -> ModelView:
        view = model.view()
        if units is None:
            return view
        s = model.settings
        return dataclasses.replace(
            view,
            memory=_share_units(s.memory_fraction, units),
            residue=_share_units(s.residue_fraction, units) or 0 if s.sleep is not None else 0,
            placement=model.placement,
            bring_back=bring_back(model),
        )

    def _ledger(self, views: Sequence[ModelView], units: int) -> Ledger:
        """Where each model's memory sits. A model holding memory with no placement of its
        own (an engine adopted at start-up) is given the one the ledger found for it."""
        book = ledger(views, gpu_count=self.capacity or 0, capacity=units)
        for name, spot in book.where.items():
            model = self._by_name.get(name)
            if model is not None and not model.placement:
                model.placement = spot
        return book

    def _show_memory(self, book: Ledger, views: Sequence[ModelView], units: int) -> None:
        uses = []
        for gpu, used in enumerate(book.used):
            kinds: dict[str, int] = {}
            for v in views:
                if gpu in book.where.get(v.name, ()):
                    kind = _kind(v.state)
                    kinds[kind] = kinds.get(kind, 0) + 1
            uses.append(GpuUse(gpu=gpu, committed=used / units, models=kinds))
        self._metrics.show_gpu_memory(self.name, uses)

    def _evicted(
        self,
        name: str,
        reason: str,
        sleep: bool,
        for_model: str | None,
        views: dict[str, ModelView],
        units: int | None,
    ) -> None:
        """Count an eviction and log what it frees, and for whom (one line)."""
        mode = "sleep" if sleep else "stop"
        self._metrics.evictions.labels(pool=self.name, reason=reason, mode=mode).inc()
        if for_model is not None:
            self._metrics.swaps.labels(
                pool=self.name, from_model=name, to_model=for_model, mode=mode
            ).inc()
        view = views.get(name)
        frees = ""
        if units is not None and view is not None:
            after = dataclasses.replace(view, state="sleeping" if sleep else "stopped")
            share = (held(view, capacity=units) - held(after, capacity=units)) / units
            gpus = ",".join(str(g) for g in self._by_name[name].placement) or "?"
            frees = f", frees {share:.3g} of GPU {gpus}"
        logger.info(
            "pool=%s evict %s (%s, %s%s) for %s",
            self.name,
            name,
            mode,
            reason,
            frees,
            for_model or "the pool's capacity",
        )

    def _size_replicas(self, views: Sequence[ModelView]) -> tuple[bool, float | None]:
        """Each ready scaled-out model to the replicas its demand asks for (the views hold
        every activator replica's demand), growing only into GPUs nobody holds or waits
        for; the GPUs a waiting model lacks come back from the model with the most extra
        replicas. Returns whether a footprint changed, and when to look again."""
        scaled = [(m, v) for m, v in zip(self.models, views, strict=True) if m.scale is not None]
        if not scaled:
            return False, None
        room = pool_room(self.capacity, views)
        extra = [
            (m.scale.replicas, m.name, m)
            for m, _ in scaled
            if m.scale is not None and m.state == "ready" and m.scale.replicas > 1
        ]
        giver = max(extra)[2] if room.reclaim > 0 and extra else None
        free = room.free
        resized = False
        wakes: list[float] = []
        for model, view in scaled:
            scale = model.scale
            assert scale is not None
            if model.state != "ready":
                scale.rest()
                continue
            before = scale.replicas
            wake = scale.decide(
                in_flight=view.in_flight,
                held=view.queued,
                gpus_free=free,
                gpus_reclaim=room.reclaim if model is giver else 0,
                unknown=view.unknown,
            )
            if wake is not None:
                wakes.append(wake)
            resized |= scale.replicas != before
            if free is not None:  # what this model took is not free for the next one
                free = max(0, free - (scale.replicas - before) * model.settings.gpus)
        return resized, min(wakes) if wakes else None

    def sleep_by_hand(self, model: Model) -> str | None:
        """Admin sleep: put `model` to sleep now if its weights fit in the pool's free
        host memory; else say why not (the pool never goes over its host memory, and an
        admin call does not evict other sleepers)."""
        if model.settings.sleep is None:
            return f"model {model.name!r} has no sleep mode (set sleep: {{level, host_memory}})"
        if model.state != "ready":
            return f"model {model.name!r} is {model.state}, not ready: only a ready model can sleep"
        views = [m.view() for m in self.models]
        evict, sleep = plan_sleeps([model.view()], views, host_memory=self.host_memory, keep="")
        if evict or model.name not in sleep:
            return (
                f"no room in pool {self.name}'s host memory for {model.name!r} "
                f"({host_in_use(views)} of {self.host_memory} bytes held by sleeping models)"
            )
        model.begin_stop(reason="admin", sleep=True)
        return None

    def _describe_memory(self, units: int) -> list[dict[str, Any]]:
        """Per GPU: its committed and free shares and the models on it (/admin/pools)."""
        views = self._views(merge=False)
        book = self._ledger(views, units)
        gpus = []
        for gpu, used in enumerate(book.used):
            models = [
                {
                    "name": v.name,
                    "state": v.state,
                    "kind": _kind(v.state),
                    "share": round(held(v, capacity=units) / units, 4),
                }
                for v in views
                if gpu in book.where.get(v.name, ())
            ]
            gpus.append(
                {
                    "gpu": gpu,
                    "committed": round(used / units, 4),
                    "free": round(max(0, units - used) / units, 4),
                    "models": models,
                }
            )
        return gpus

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        views = [m.view() for m in self.models]
        by_name = {v.name: v for v in views}
        units = self._units()
        return {
            "name": self.name,
            "gpus": self.capacity,
            "gpus_in_use": gpus_in_use(views),
            "gpu_memory": self.gpu_memory,
            "memory": None if units is None else self._describe_memory(units),
            "host_memory": self.host_memory,
            "host_memory_in_use": host_in_use(views),
            "models": [
                {"name": v.name, "state": v.state, "gpus": v.gpus} for v in views if v.holds_gpus
            ],
            "sleeping": [
                {"name": v.name, "level": v.sleep_level, "host_memory": v.host_held}
                for v in views
                if v.state == "sleeping"
            ],
            "waiting": [
                {
                    "name": n,
                    "queued": by_name[n].queued,
                    "oldest_wait_seconds": round(now - (by_name[n].oldest_wait or now), 3),
                }
                for n in self.last_decision.waiting
                if n in by_name
            ],
        }


def bring_back(model: Model) -> float:
    """Seconds to bring the model back from how the pool would make it leave: its last
    wake from sleep when it has sleep mode, else its last cold start (the assumption in
    ASSUMED_BRING_BACK until one has been measured)."""
    sleep = model.settings.sleep
    level = sleep.level if sleep is not None else None
    measured = model.recent_wakes.get("sleep" if level is not None else "zero")
    return measured if measured is not None else ASSUMED_BRING_BACK.get(level, 60.0)


def _share_units(share: float | None, units: int) -> int | None:
    """A share of a GPU in the policy's units, rounded up (never under-counted), after
    rounding away float noise (0.2 * 10_000 is 2000.0000000000002)."""
    return None if share is None else math.ceil(round(share * units, 3))


def _kind(state: str) -> str:
    if state == "sleeping":
        return "asleep"
    if state in TRANSIT_STATES:
        return "leaving"
    return "awake" if state in HOLDING_STATES else "none"


def over_host_memory(views: Sequence[ModelView], host_memory: int | None) -> list[str]:
    """The sleeping models to stop, least recently used first, so that those left hold no
    more host memory than `host_memory` (a pool's limit made smaller)."""
    if host_memory is None:
        return []
    held = host_in_use(views)
    stop: list[str] = []
    sleepers = sorted(
        (v for v in views if v.state == "sleeping"), key=lambda v: (v.last_activity, v.name)
    )
    for v in sleepers:
        if held <= host_memory:
            break
        stop.append(v.name)
        held -= v.host_held
    return stop
