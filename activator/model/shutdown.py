"""A model's shutdown: not a move of the table but three steps, in order.
`begin_shutdown` (SIGTERM: held requests get a 503, a start or wake under way is
cancelled), `cut_in_flight` (shutdown_grace passed: what is still in flight ends with a
shutting_down error) and `shutdown` (the engine is stopped, or left running for the next
activator to adopt). A part of activator.model.lifecycle.Model (a mixin), split out so each
file keeps one subject; the state still changes only through Model's `_set_state`.

May import the model's own lower modules (lease, seams, transitions), core, config,
engine, observability, placement and the backends' interface; never
activator.model.lifecycle (it would be a cycle): Model's methods used here are declared
below, for the type checker only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from activator.core.errors import ModelUnavailable, ShuttingDown
from activator.core.tasks import TaskGroup
from activator.engine.http_client import HttpClient
from activator.model.lease import Lease
from activator.observability.metrics import Metrics

if TYPE_CHECKING:
    from activator.backends.base import Backend
    from activator.placement.scaleout import ScaleOut

logger = logging.getLogger("activator.model.lifecycle")


class ModelShutdown:
    """The shutdown side of activator.model.lifecycle.Model (which sets every field below)."""

    name: str
    state: str
    scale: ScaleOut | None
    _http: HttpClient
    _metrics: Metrics
    _tasks: TaskGroup
    _backend: Backend | None
    _leases: set[Lease]
    _drained: asyncio.Event
    _transition: asyncio.Task[None] | None
    _wake_requested_at: float | None
    _closing: bool
    _leases_closed: bool
    _cancelling: asyncio.Task[None] | None
    _released: bool

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def backend(self) -> Backend: ...

        def _fail_waiters(self, error: ModelUnavailable) -> int: ...

        def _set_state(self, state: str, *, cause: str | None = None) -> None: ...

        async def _stop_backend(self) -> None: ...

    def begin_shutdown(self) -> None:
        """SIGTERM: no new holds or starts, held requests get a 503 now, and a start or
        wake under way is cancelled (its engine stopped at once, or left for the next
        activator to adopt), never completed and then stopped. In-flight requests go on."""
        if self._closing:
            return
        self._closing = True
        self._wake_requested_at = None
        self._fail_waiters(ShuttingDown("activator is shutting down", retry_after=5))
        if self.state in ("starting", "waking") and self._backend is not None:
            self._transition = self._cancelling = self._tasks.spawn(
                self._run_cancel_start(self._transition), name=f"cancel-start:{self.name}"
            )

    async def _run_cancel_start(self, start: asyncio.Task[None] | None) -> None:
        if start is not None and not start.done():
            start.cancel()
            await asyncio.wait({start})  # its own outcome ("cancelled") is observed there
        await self._release_engine()

    async def drained(self) -> None:
        """Until nothing is in flight."""
        await self._drained.wait()

    async def cut_in_flight(self, reason: str) -> int:
        """shutdown_grace is over: no new leases, and every request still in flight ends
        now with a shutting_down error (a stream: as its last event). Returns how many."""
        self._leases_closed = True
        leases = list(self._leases)
        for lease in leases:
            lease.cut(reason, error=ShuttingDown(reason, retry_after=5))
        if leases:
            # A request still waiting for the engine's status line has no cut callback
            # yet: closing the model's connections ends it too.
            await self._http.reset(self.name)
        return len(leases)

    async def shutdown(self) -> None:
        """Shutdown, last step: stop the engine we run (bounded by its stop grace), or
        leave it running for the next activator (Backend.keep_on_shutdown)."""
        self.begin_shutdown()
        if self._backend is None:
            return
        transition = self._transition
        if transition is not None and not transition.done():
            # A start being cancelled is left to finish (bounded by the backend's stop
            # grace); a stop, a sleep or an engine-death cleanup is cancelled, as the
            # engine is released below in any case.
            if transition is not self._cancelling:
                transition.cancel()
            await asyncio.wait({transition})
        await self.cut_in_flight("activator is shutting down")
        await self._release_engine()
        await self.backend.aclose()
        if self.scale is not None:
            await self.scale.aclose()

    async def _release_engine(self) -> None:
        if self._released:
            return
        self._released = True
        if self.backend.keep_on_shutdown:
            if self.state not in ("stopped", "failed"):
                logger.info(
                    "model=%s left %s for the next activator to adopt (on_shutdown: keep)",
                    self.name,
                    self.state,
                )
            return
        if self.state != "stopped":
            self._metrics.scale_events.labels(
                model=self.name, direction="down", reason="shutdown"
            ).inc()
        await self._stop_backend()
        self._set_state("stopped", cause="shutdown")
