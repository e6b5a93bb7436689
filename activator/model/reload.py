"""What a config reload does to a model (activator.reload decides; the model applies).

Settings that can change live are in force at once; those that need a new engine wait
(`restart_pending`) until the engine that runs is gone, then a new backend takes over. A
removed model retires: it takes no new work, serves or fails (503, never 404) what it
holds, and is gone once stopped. A part of activator.model.lifecycle.Model (a mixin), split out
so each file keeps one subject; every state change still goes through Model's table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from activator.config.settings import ModelSettings
from activator.core.errors import ModelRemoved, ModelUnavailable
from activator.core.tasks import TaskGroup
from activator.observability.metrics import Metrics

if TYPE_CHECKING:
    from activator.backends.base import Backend
    from activator.placement.scaleout import ScaleOut

logger = logging.getLogger("activator.model.lifecycle")


@dataclass(frozen=True)
class PendingEngine:
    """A reload's settings for the model's next engine (`Model.update_settings`)."""

    settings: ModelSettings
    keys: tuple[str, ...]  # what changed, for /admin/models and the log
    backend: Callable[[ModelSettings], Backend]  # makes the new engine's backend
    # Told once the settings are in force (the reloader then moves the model to its pool).
    applied: Callable[[], None]


class ModelReload:
    """The reload side of activator.model.lifecycle.Model (which sets every field below)."""

    name: str
    settings: ModelSettings
    state: str
    retiring: str | None
    _pending: PendingEngine | None
    _gone: asyncio.Event
    _drained: asyncio.Event
    _metrics: Metrics
    _tasks: TaskGroup
    _closing: bool
    _backend: Backend | None
    _wake_requested_at: float | None
    scale: ScaleOut | None

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def backend(self) -> Backend: ...

        def begin_stop(
            self, *, reason: str, drain_timeout: float | None = None, sleep: bool = False
        ) -> bool: ...

        async def adopt_if_running(self, *, found: str) -> None: ...

        def _kick(self) -> None: ...

        def _update_held(self) -> None: ...

        def _fail_waiters(self, error: ModelUnavailable) -> int: ...

        def _attach_scale(self, backend: Backend) -> None: ...

    @property
    def restart_pending(self) -> tuple[str, ...]:
        """Keys of a reload that wait for the engine that runs to go (empty: none)."""
        return self._pending.keys if self._pending is not None else ()

    @property
    def configured(self) -> ModelSettings:
        """The settings the config gives now: the pending ones, or those in force."""
        return self._pending.settings if self._pending is not None else self.settings

    def update_settings(
        self, settings: ModelSettings, *, pending: PendingEngine | None = None
    ) -> None:
        """A reload changed the model: `settings` are in force from now on (timeouts,
        aliases, queue limits: the next request, hold, start or idle check sees them);
        their engine keys are those the running engine was started with. `pending` takes
        over once no engine runs: at once if none runs now, else when it has stopped (an
        idle stop, a swap, an admin stop, a failure). A later call replaces `pending`;
        None drops it (the config went back). Synchronous: nothing is awaited."""
        self.settings = settings
        self._pending = pending
        if self.scale is not None:
            self.scale.configure(settings)  # target_concurrency, burst_factor, probe...
        self._metrics.queue_capacity.labels(model=self.name).set(settings.max_queued)
        self._update_held()
        self._after_move()
        self._kick()

    def retire(self, reason: str) -> None:
        """A reload removed the model. It takes no new work; held requests are served if
        its engine is already coming up (they were accepted under the old config), else
        they get a 503 with `reason` (never a 404); requests in flight may finish (bounded
        by drain_timeout), then the engine is stopped. `retired()` says when it is over."""
        self.retiring = reason
        self._gone.clear()
        self._wake_requested_at = None
        if self.state not in ("starting", "waking"):
            self._fail_waiters(self._removed())
        self._after_move()
        self._kick()

    def revive(self) -> None:
        """A later reload has the model again before it was gone: it takes work as before
        (a stop under way completes; held requests start it again)."""
        self.retiring = None
        self._gone.clear()
        self._kick()

    async def retired(self) -> None:
        """Until a retiring model runs no engine and has nothing in flight."""
        await self._gone.wait()
        await self._drained.wait()

    def _removed(self) -> ModelRemoved:
        return ModelRemoved(
            f"model {self.name!r} was removed from activator's config while this request "
            f"waited for it ({self.retiring})"
        )

    def _after_move(self) -> None:
        """A reload's part in each move: pending engine settings take over once no engine
        runs; a retiring model is stopped once its engine is up (held requests released
        first), and is gone once stopped."""
        if self.state in ("stopped", "failed"):
            if self._pending is not None and not self._closing and self.retiring is None:
                self._apply_pending()
            if self.retiring is not None:
                self._fail_waiters(self._removed())  # a failed wake left some waiting
                self._gone.set()
        elif self.retiring is not None and self.state in ("ready", "sleeping"):
            self.begin_stop(reason="removed")

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        self.settings = pending.settings
        self._metrics.add_model(self.name, backend=self.settings.backend_kind)
        self._metrics.queue_capacity.labels(model=self.name).set(self.settings.max_queued)
        old = self._backend
        if old is not None:
            self._backend = pending.backend(self.settings)
            self._attach_scale(self._backend)
            self._tasks.spawn(self._replace_backend(old), name=f"new-backend:{self.name}")
        logger.info(
            "model=%s new engine settings in force (%s)", self.name, ", ".join(pending.keys)
        )
        pending.applied()
        self._update_held()

    async def _replace_backend(self, old: Backend) -> None:
        """Release the old backend's watches; adopt the new target if it already runs
        (as at start-up: a Kubernetes workload someone scaled up)."""
        await old.aclose()
        await self.adopt_if_running(found="at its new target")
