"""What the backend reports about a model's engine (activator.backends.base.BackendListener):
a wake phase reached, progress, the engine blocked, failed, lost, appeared, reverted or
unknown. Each report is turned into a nudge, a metric or an event of the model's table
(activator.model.transitions); the state itself stays with activator.model.lifecycle.Model,
of which this is a part (a mixin), split out so each file keeps one subject.

May import the model's own lower modules (transitions, seams, lease), core, config,
observability and the backends' interface; never activator.model.lifecycle (it would be a
cycle): Model's methods used here are declared below, for the type checker only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from activator.core.tasks import TaskGroup
from activator.model.transitions import Event
from activator.observability.metrics import Metrics

if TYPE_CHECKING:
    from activator.backends.base import Backend

logger = logging.getLogger("activator.model.lifecycle")


class ModelReports:
    """The backend's side of activator.model.lifecycle.Model (which sets every field below)."""

    name: str
    state: str
    unknown: bool
    blocked: bool
    phases: dict[str, float]
    _clock: Callable[[], float]
    _metrics: Metrics
    _tasks: TaskGroup
    _nudge: asyncio.Event
    _wake_started: float
    _transition: asyncio.Task[None] | None
    _failure: asyncio.Future[str] | None

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def backend(self) -> Backend: ...

        def begin_adopt(self, url: str) -> bool: ...

        def _fire(self, event: Event, **context: Any) -> bool: ...

        def _decides(self) -> bool: ...

        def _kick(self) -> None: ...

    def backend_phase(self, phase: str) -> None:
        if self.state not in ("starting", "waking") or phase in self.phases:
            return
        took = self._clock() - self._wake_started
        self.phases[phase] = took
        if self._decides():  # a follower's probe is no wake: counted once, by the leader
            self._metrics.wake_phase_duration.labels(model=self.name, phase=phase).observe(took)
        self._nudge.set()

    def backend_progress(self) -> None:
        self._nudge.set()

    def backend_blocked(self, blocked: bool) -> None:
        """The engine being started cannot be placed (a sleeping pod holds the GPU)."""
        if blocked != self.blocked:
            self.blocked = blocked
            self._kick()

    def backend_failed(self, reason: str) -> None:
        logger.warning("model=%s engine failed: %s", self.name, reason)
        running = self._transition is not None and not self._transition.done()
        if running and self._failure is not None and not self._failure.done():
            # A start, wake or sleep in progress sees it and ends with its own failure.
            self._failure.set_result(reason)
            return
        self._fire("died", reason=reason)

    def backend_lost(self, reason: str) -> None:
        """The engine was taken away (the ready pod gone): new requests are held until
        it is ready again. Not a move outside ready: a wake, a stop or a failure under
        way deals with it."""
        if self.state == "ready" and self._decides():
            self._metrics.scale_events.labels(model=self.name, direction="up", reason="lost").inc()
        self._fire("lost", reason=reason)

    def backend_appeared(self) -> None:
        logger.info("model=%s engine appeared without a request: adopting it", self.name)
        self._tasks.spawn(self._adopt_discovered(), name=f"discover:{self.name}")

    async def _adopt_discovered(self) -> None:
        url = await self.backend.discover()
        if url is not None:
            self.begin_adopt(url)

    def backend_reverted(self) -> None:
        logger.warning(
            "model=%s was scaled to zero by someone else while in use; scaling it up again. "
            "If Argo CD did this, add syncOptions RespectIgnoreDifferences=true with "
            "ignoreDifferences on /spec/replicas to the Application",
            self.name,
        )
        self._metrics.scale_events.labels(model=self.name, direction="up", reason="revert").inc()
        self._fire("lost", reason="scaled to 0 replicas by another client")

    def backend_unknown(self, unknown: bool) -> None:
        if unknown != self.unknown:
            logger.warning(
                "model=%s engine state %s", self.name, "unknown" if unknown else "known again"
            )
            self.unknown = unknown
            self._metrics.set_state(self.name, "unknown" if unknown else self.state)
            self._nudge.set()  # Backend.serving() may have changed with it
            self._kick()
