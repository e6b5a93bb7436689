"""The effects of the table's moves (activator.model.transitions' Effect): what a model
does once `_fire` has changed its state. Most start the model's one transition task
(`_spawn`: a start, drain, sleep, wake, stop or probe, activator.model.tasks); the others
release or fail the held requests, cut the leases in flight, or drop a task. A part of
activator.model.lifecycle.Model (a mixin), split out so each file keeps one subject; the
table says which effect follows which move, Model's `_fire` runs it.

May import the model's own lower modules (transitions, lease, seams), core, config,
observability, placement and the backends' interface; never activator.model.lifecycle
(it would be a cycle): Model's methods used here are declared below, for the type
checker only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from activator.config.settings import ModelSettings
from activator.core.errors import ModelUnavailable, StartFailed
from activator.core.tasks import TaskGroup
from activator.model.lease import Lease, Waiters
from activator.model.transitions import Effect, Event
from activator.observability.metrics import Metrics

if TYPE_CHECKING:
    from activator.backends.base import Backend
    from activator.placement.routing import PodLease
    from activator.placement.scaleout import ScaleOut

logger = logging.getLogger("activator.model.lifecycle")

# Lines of engine output attached to a start failure.
ERROR_TAIL_LINES = 20


class ModelEffects:
    """The effects of activator.model.lifecycle.Model's moves (Model sets every field below)."""

    name: str
    settings: ModelSettings
    url: str | None
    last_error: str | None
    ready_since: float | None
    last_activity: float
    host_held: int
    phases: dict[str, float]
    scale: ScaleOut | None
    _clock: Callable[[], float]
    _metrics: Metrics
    _tasks: TaskGroup
    _waiters: Waiters
    _leases: set[Lease]
    _transition: asyncio.Task[None] | None
    _failure: asyncio.Future[str] | None
    _wake_started: float
    _wake_from: str
    _wake_requested_at: float | None

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def backend(self) -> Backend: ...

        def _new_lease(self, *, cold: bool, held: float, pod: PodLease | None = None) -> Lease: ...

        def _grant_from_pods(self) -> None: ...

        def _update_held(self) -> None: ...

        def _fail_waiters(self, error: ModelUnavailable) -> int: ...

        def _retry_after(self) -> float: ...

        async def _run_start(
            self, *, adopt_url: str | None = None, lost: str | None = None
        ) -> None: ...

        async def _run_probe(self) -> None: ...

        async def _run_drain(self, *, reason: str, limit: float, then: Event) -> None: ...

        async def _run_sleep(self) -> None: ...

        async def _run_wake(self) -> None: ...

        async def _run_stop(self, *, failed: bool) -> None: ...

        async def _stop_backend(self) -> None: ...

    def _effect_table(self) -> dict[Effect, Callable[..., None]]:
        """Each Effect of the table, by name, as the method that carries it out (`_fire`
        calls it with the event's context as keywords)."""
        return {
            "none": self._effect_none,
            "start": self._effect_start,
            "adopt": self._effect_adopt,
            "restart": self._effect_restart,
            "release": self._effect_release,
            "fail_start": self._effect_fail_start,
            "drain_then_stop": self._effect_drain_then_stop,
            "drain_then_sleep": self._effect_drain_then_sleep,
            "sleep": self._effect_sleep,
            "wake": self._effect_wake,
            "stop": self._effect_stop,
            "stop_after_failure": self._effect_stop_after_failure,
            "probe": self._effect_probe,
            "hold": self._effect_hold,
            "let_go": self._effect_let_go,
        }

    def _spawn(self, coro: Coroutine[Any, Any, None], *, what: str) -> None:
        """Run the model's one transition task. A task still running (a drain, when the
        engine dies under it) is cancelled: the table has already moved on."""
        current = asyncio.current_task()
        previous = self._transition
        if previous is not None and not previous.done() and previous is not current:
            previous.cancel()
        self._transition = self._tasks.spawn(coro, name=f"{what}:{self.name}")

    def _effect_none(self, **_: Any) -> None:
        pass

    def _begin_wake(self, run: Coroutine[Any, Any, None], *, what: str, source: str) -> None:
        """Run a wake (a cold start, an adoption, a re-wake or a wake from sleep) as the
        model's transition task, set up now, not when the task first runs: phases or a
        failure the backend reports meanwhile belong to this wake."""
        self._wake_started = self._clock()
        self._wake_from = source
        self.phases = {}
        self._failure = asyncio.get_running_loop().create_future()
        self._spawn(run, what=what)

    def _effect_start(self, **_: Any) -> None:
        self._begin_wake(self._run_start(), what="start", source="zero")

    def _effect_adopt(self, *, url: str, **_: Any) -> None:
        self._begin_wake(self._run_start(adopt_url=url), what="adopt", source="zero")

    def _effect_restart(self, *, reason: str, **_: Any) -> None:
        """ready -> starting: the engine went without failing and the backend brings it
        back. New requests are held from now on; leases in flight are left to end as
        they will (a terminating pod may still finish them); the re-wake is observed
        like any wake and bounded by startup_timeout."""
        assert self.url is not None
        logger.warning(
            "model=%s lost its engine while ready (%s): holding requests until it is back",
            self.name,
            reason,
        )
        self.last_error = f"engine lost: {reason}"
        self.ready_since = None
        self._begin_wake(
            self._run_start(adopt_url=self.url, lost=reason), what="rewake", source="zero"
        )

    def _effect_release(self, **_: Any) -> None:
        self.ready_since = self.last_activity = self._clock()
        self.last_error = None
        self._wake_requested_at = None  # a follower's admin wake is served now
        if self.scale is not None:
            self._grant_from_pods()  # as many as its pods have room for; the rest wait
        else:
            self._waiters.grant_all(
                lambda arrived: self._new_lease(cold=True, held=self._clock() - arrived)
            )
        self._update_held()

    def _effect_fail_start(self, *, reason: str, outcome: str, **_: Any) -> None:
        tail = self.backend.log_tail()[-ERROR_TAIL_LINES:]
        self.last_error = reason
        logger.warning("model=%s start failed (%s): %s", self.name, outcome, reason)
        # Waiters learn at once; cleaning up the engine may take its stop grace.
        self._fail_waiters(
            StartFailed(
                f"model {self.name!r} failed to start: {reason}",
                retry_after=self._retry_after(),
                extra={"engine_log_tail": tail},
            )
        )
        self._spawn(self._run_stop(failed=True), what="stop")

    def _effect_drain_then_stop(self, *, reason: str, drain_timeout: float, **_: Any) -> None:
        self._spawn(
            self._run_drain(reason=reason, limit=drain_timeout, then="drained_for_stop"),
            what="drain",
        )

    def _effect_drain_then_sleep(self, *, reason: str, drain_timeout: float, **_: Any) -> None:
        # The host memory the weights will take is reserved now: the pool decided this
        # sleep against its free host memory, and must count it from this moment.
        assert self.settings.sleep is not None
        self.host_held = self.settings.sleep.host_bytes
        self._spawn(
            self._run_drain(reason=reason, limit=drain_timeout, then="drained_for_sleep"),
            what="drain",
        )

    def _effect_sleep(self, **_: Any) -> None:
        self._spawn(self._run_sleep(), what="sleep")

    def _effect_wake(self, **_: Any) -> None:
        self._begin_wake(self._run_wake(), what="wake", source="sleep")

    def _effect_stop(self, **_: Any) -> None:
        self._spawn(self._run_stop(failed=False), what="stop")

    def _effect_probe(self, **_: Any) -> None:
        self._begin_wake(self._run_probe(), what="probe", source="zero")

    def _effect_hold(self, **_: Any) -> None:
        """Drop this replica's own task on the model (a probe; a leader's start, drain,
        sleep, wake or stop when it stops leading): requests in flight go on, new ones
        are held until the leader's intent moves the model."""
        transition = self._transition
        if transition is not None and not transition.done():
            if transition is not asyncio.current_task():
                transition.cancel()

    def _effect_let_go(self, *, reason: str = "", **_: Any) -> None:
        """The leader stopped the engine or put it to sleep: what is still in flight here
        is cut, and the engine forgotten (a follower never calls Backend.stop)."""
        why = f"model {self.name!r} was stopped by the leader" + (f" ({reason})" if reason else "")
        for lease in list(self._leases):
            lease.cut(why)
        self._spawn(self._stop_backend(), what="let-go")

    def _effect_stop_after_failure(self, *, reason: str, **_: Any) -> None:
        self.last_error = reason
        self._metrics.upstream_errors.labels(model=self.name, kind="engine_died").inc()
        for lease in list(self._leases):
            lease.cut(f"engine of model {self.name!r} died: {reason}")
        self._spawn(self._run_stop(failed=True), what="stop")
