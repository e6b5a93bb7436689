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
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from activator.model.lifecycle import Model
from activator.observability.metrics import Metrics
from activator.placement.policy import (
    Decision,
    ModelView,
    decide,
    gpus_in_use,
    host_in_use,
    plan_sleeps,
)
from activator.placement.scaling import pool_room

logger = logging.getLogger(__name__)


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
        models: Sequence[Model],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.host_memory = host_memory
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

    def resize(self, *, capacity: int, host_memory: int | None) -> None:
        """New limits, in force for the next decision. GPUs over a smaller capacity are
        freed by the policy's over-capacity eviction (nothing starts meanwhile); sleeping
        engines over a smaller host memory are stopped now, least recently used first."""
        self.capacity, self.host_memory = capacity, host_memory
        self._metrics.pool_gpus.labels(pool=self.name).set(capacity)
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
        decision = decide(self.capacity, views, now=now, host_memory=self.host_memory)
        self.last_decision = decision
        for stop in decision.stop:
            model = self._by_name[stop.model]
            began = model.begin_stop(reason=stop.reason, sleep=stop.sleep, for_model=stop.for_model)
            if began and model.scale is not None:
                model.scale.rest()  # no write of this step's size may follow the stop
            if began and stop.for_model is not None:
                mode = "sleep" if stop.sleep else "stop"
                logger.info(
                    "pool=%s swap %s -> %s (%s)", self.name, stop.model, stop.for_model, mode
                )
                self._metrics.swaps.labels(
                    pool=self.name, from_model=stop.model, to_model=stop.for_model, mode=mode
                ).inc()
        for name in decision.start:
            self._by_name[name].begin_start(reason="request")
        if self.capacity is not None:
            after = [m.view() for m in self.models]
            self._metrics.pool_gpus_in_use.labels(pool=self.name).set(gpus_in_use(after))
            self._metrics.pool_host_memory_in_use.labels(pool=self.name).set(host_in_use(after))
        wakes = [t for t in (decision.wake_at, scaled_wake) if t is not None]
        return min(wakes) if wakes else None

    def _views(self) -> list[ModelView]:
        views = [m.view() for m in self.models]
        if self.coordinator is not None:
            views = self.coordinator.merged(views)
        return views

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

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        views = [m.view() for m in self.models]
        by_name = {v.name: v for v in views}
        return {
            "name": self.name,
            "gpus": self.capacity,
            "gpus_in_use": gpus_in_use(views),
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
