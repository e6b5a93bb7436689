"""One model's lifecycle: the single owner of its state, its held requests and its engine.

The proxy asks for an outcome (`await model.acquire(...)` -> a Lease on a ready upstream)
and never looks at the state itself. Starting and stopping are decided by the model's
`PoolScheduler` (activator.pool), which calls `begin_start` / `begin_stop`; the model
carries them out as named tasks it owns. Every state change goes through `_set_state`,
which logs it and updates the metric.

States: stopped -> starting -> ready -> draining -> stopping -> stopped; a start that
fails, or an engine that dies, ends in failed (which behaves like stopped, with a reason).
A ready model whose engine is lost without failing (a GitOps revert to 0 replicas, its
pod evicted or not Ready) goes back to starting: new requests are held until the backend
has brought the engine back and readiness is probed again.

Shutdown is three events, in order: `begin_shutdown` (SIGTERM: held requests get a 503,
a start under way is cancelled), `cut_in_flight` (shutdown_grace passed: what is still in
flight ends with a shutting_down error) and `shutdown` (the engine is stopped, or left
running for the next activator to adopt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from activator.backends.base import Backend
from activator.errors import (
    ActivatorError,
    HoldTimeout,
    ModelUnavailable,
    QueueFull,
    ShuttingDown,
    StartFailed,
)
from activator.http_client import HttpClient
from activator.metrics import Metrics
from activator.policy import ModelView
from activator.readiness import wait_ready
from activator.settings import ModelSettings
from activator.tasks import TaskGroup

logger = logging.getLogger(__name__)

# Margin on top of a model's own budgets before a held request gives up by itself: the
# start has its own deadline, this only guarantees that no waiter can hang forever.
HOLD_MARGIN = 60.0
# Lines of engine output attached to a start failure.
ERROR_TAIL_LINES = 20


class Scheduler(Protocol):
    """What a model needs from its pool: a nudge to decide again."""

    def kick(self) -> None: ...


class HoldCounter:
    """Held requests over all models, for `server.max_queued_total`. Owned by the app."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


@dataclass(eq=False)
class Lease:
    """A request's claim on a ready upstream. Release exactly once (the proxy does)."""

    model: Model
    url: str
    cold: bool
    held_seconds: float
    cut_reason: str | None = None
    # What the client should get for a cut request (a status line not sent yet: this
    # error's response; a stream under way: this error as its last event). None: an
    # upstream error carrying `cut_reason`.
    cut_error: ActivatorError | None = None
    _on_cut: list[Callable[[], None]] = field(default_factory=list)
    _released: bool = False

    def on_cut(self, callback: Callable[[], None]) -> None:
        """Register how to abort this request if the model must stop before it ends."""
        self._on_cut.append(callback)

    def cut(self, reason: str, *, error: ActivatorError | None = None) -> None:
        self.cut_reason = reason
        self.cut_error = error
        for callback in self._on_cut:
            callback()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.model._release(self)


class Model:
    """Owns one model's state. Not thread-safe: all calls come from the event loop."""

    def __init__(
        self,
        settings: ModelSettings,
        *,
        http: HttpClient,
        metrics: Metrics,
        holds: HoldCounter,
        tasks: TaskGroup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._http = http
        self._backend: Backend | None = None
        self._metrics = metrics
        self._holds = holds
        self._tasks = tasks
        self._clock = clock
        self.scheduler: Scheduler | None = None
        self.state = "stopped"
        self.unknown = False
        self.url: str | None = None
        self.last_error: str | None = None
        self.last_activity = clock()
        self.ready_since: float | None = None
        self.last_wake_seconds: float | None = None
        self.phases: dict[str, float] = {}
        self._leases: set[Lease] = set()
        self._waiters: dict[int, tuple[asyncio.Future[Lease], float]] = {}
        self._waiter_seq = 0
        self._wake_requested_at: float | None = None
        self._transition: asyncio.Task[None] | None = None
        self._failure: asyncio.Future[str] | None = None
        self._nudge = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._wake_started = 0.0
        # Shutdown: no new holds or starts from begin_shutdown on; no new leases once the
        # grace is over (cut_in_flight).
        self._closing = False
        self._leases_closed = False
        self._cancelling: asyncio.Task[None] | None = None  # a start cancelled at SIGTERM
        self._released = False
        metrics.set_state(self.name, self.state)
        metrics.queue_capacity.labels(model=self.name).set(settings.max_queued)
        metrics.in_flight.labels(model=self.name).set(0)
        metrics.add_model(self.name, backend=settings.backend_kind)
        self._update_held()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"model {self.name!r} has no backend before the app starts")
        return self._backend

    def attach_backend(self, backend: Backend) -> None:
        """Called once at app start, when backends (and their API clients) can exist."""
        self._backend = backend

    # ----- what the proxy sees -------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._leases)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def hold_timeout(self) -> float:
        s = self.settings
        pooled = s.max_wait + s.drain_timeout if s.pool is not None else 0.0
        grace = s.process.stop_grace if s.process is not None else 0.0
        return s.startup_timeout + pooled + grace + HOLD_MARGIN

    async def acquire(self) -> Lease:
        """Return a lease on a ready upstream, holding the caller while the model wakes.

        Raises QueueFull, StartFailed, HoldTimeout or ShuttingDown. Safe to cancel (a
        client that disconnects): the waiter leaves the queue at once and the start,
        which belongs to the model, goes on for the others.
        """
        if self._leases_closed or (self._closing and self.state != "ready"):
            raise ShuttingDown("activator is shutting down", retry_after=5)
        if self.state == "ready":
            return self._new_lease(cold=False, held=0.0)
        if len(self._waiters) >= self.settings.max_queued or self._holds.count >= self._holds.limit:
            raise QueueFull(
                f"too many requests are waiting for model {self.name!r} to start",
                retry_after=self._retry_after(),
            )
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiter_seq += 1
        key = self._waiter_seq
        arrived = self._clock()
        self._waiters[key] = (future, arrived)
        self._holds.count += 1
        self._update_held()
        self._kick()
        outcome = "released"
        try:
            async with asyncio.timeout(self.hold_timeout):
                return await future
        except TimeoutError:
            outcome = "timeout"
            raise HoldTimeout(
                f"model {self.name!r} did not become ready within {self.hold_timeout:.0f}s",
                retry_after=self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            outcome = "disconnected"
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()
            raise
        except ShuttingDown:
            outcome = "shutdown"
            raise
        except ActivatorError:
            outcome = "failed"
            raise
        finally:
            if self._waiters.pop(key, None) is not None:
                self._holds.count -= 1
                self._update_held()
            self._metrics.hold_duration.labels(model=self.name, outcome=outcome).observe(
                self._clock() - arrived
            )

    def _new_lease(self, *, cold: bool, held: float) -> Lease:
        assert self.url is not None
        lease = Lease(model=self, url=self.url, cold=cold, held_seconds=held)
        self._leases.add(lease)
        self._drained.clear()
        self.last_activity = self._clock()
        self._metrics.in_flight.labels(model=self.name).inc()
        return lease

    def _release(self, lease: Lease) -> None:
        self._leases.discard(lease)
        self.last_activity = self._clock()
        self._metrics.in_flight.labels(model=self.name).dec()
        if not self._leases:
            self._drained.set()
            self._kick()

    def _retry_after(self) -> float:
        # A start is the likely wait; clients should come back when it may be over.
        return max(1.0, min(self.settings.startup_timeout, 30.0))

    # ----- what the pool scheduler sees and does -------------------------------------

    def view(self) -> ModelView:
        s = self.settings
        # Waiters are kept in arrival order: the first is the oldest (O(1) with 10k held).
        waits = [next(iter(self._waiters.values()))[1]] if self._waiters else []
        if self._wake_requested_at is not None:
            waits.append(self._wake_requested_at)
        return ModelView(
            name=self.name,
            state=self.state,
            gpus=s.gpus,
            in_flight=len(self._leases),
            queued=len(self._waiters) + (self._wake_requested_at is not None),
            oldest_wait=min(waits) if waits else None,
            last_activity=self.last_activity,
            ready_since=self.ready_since,
            unknown=self.unknown,
            idle_timeout=s.idle_timeout,
            min_residency=s.min_residency,
            max_wait=s.max_wait,
        )

    def request_wake(self) -> None:
        """Admin wake: demand without a request."""
        if self.state not in ("ready", "starting") and self._wake_requested_at is None:
            self._wake_requested_at = self._clock()
            self._kick()

    def begin_start(self, *, reason: str) -> bool:
        if self.state not in ("stopped", "failed") or self._closing:
            return False
        self._wake_requested_at = None
        self._metrics.scale_events.labels(model=self.name, direction="up", reason=reason).inc()
        self._begin_wake(self._run_start(), name=f"start:{self.name}")
        return True

    def begin_stop(self, *, reason: str, drain_timeout: float | None = None) -> bool:
        """Stop admitting, drain in-flight requests (bounded), then stop the engine."""
        if self.state != "ready":
            return False
        self._metrics.scale_events.labels(model=self.name, direction="down", reason=reason).inc()
        drain = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        # Draining from this moment: new requests are held from now on, and the pool sees
        # a swap under way before the task first runs.
        self._set_state("draining")
        self._transition = self._tasks.spawn(
            self._run_stop(reason=reason, drain_timeout=drain), name=f"stop:{self.name}"
        )
        return True

    def begin_adopt(self, url: str) -> bool:
        """Take over an engine that runs without us having started it."""
        if self.state not in ("stopped", "failed") or self._closing:
            return False
        self._metrics.scale_events.labels(model=self.name, direction="up", reason="adopt").inc()
        self._begin_wake(self._run_start(adopt_url=url), name=f"adopt:{self.name}")
        return True

    def _begin_wake(self, run: Coroutine[Any, Any, None], *, name: str) -> None:
        """Enter starting and run the wake as the model's transition task. All of it now,
        not when the task first runs: the pool's next decision and its GPU gauge must
        already count this model as holding its GPUs, and phases or a failure the backend
        reports meanwhile belong to this wake."""
        self._wake_started = self._clock()
        self.phases = {}
        self._failure = asyncio.get_running_loop().create_future()
        self._set_state("starting")
        self._transition = self._tasks.spawn(run, name=name)

    # ----- transitions (each runs as the model's one transition task) ----------------

    async def _run_start(self, *, adopt_url: str | None = None, lost: str | None = None) -> None:
        """A wake: start the engine (or take over `adopt_url`), then wait until ready.
        `lost`: the reason the engine of a ready model was lost (a re-wake)."""
        outcome, reason = "ready", ""
        try:
            async with asyncio.timeout(self.settings.startup_timeout):
                url = adopt_url or await self._race(self.backend.start())
                self.backend_phase("launched")
                await self._race(self._until_ready(url))
        except TimeoutError:
            outcome = "timeout"
            reason = f"not ready within startup_timeout ({self.settings.startup_timeout:.0f}s)"
        except asyncio.CancelledError:
            self._observe_wake("cancelled")
            raise
        except Exception as exc:  # a backend may raise anything; it fails this start only
            outcome = "failed"
            reason = exc.message if isinstance(exc, ActivatorError) else str(exc) or repr(exc)
        if outcome != "ready":
            await self._fail_start(outcome=outcome, reason=reason)
            return
        if lost is not None:
            # Requests still on the lost engine would stay on it; pooled connections to it
            # (behind a Service: to a pod that is gone) must not take new requests.
            for lease in list(self._leases):
                lease.cut(f"model {self.name!r} lost its engine ({lost}) and has a new one")
            await self._http.reset(self.name)
        self.url = url
        self.ready_since = self.last_activity = self._clock()
        self.last_error = None
        self.backend_phase("ready")
        self._observe_wake("ready")
        self._set_state("ready")
        waiters, self._waiters = self._waiters, {}
        for future, arrived in waiters.values():
            self._holds.count -= 1
            if not future.done():
                future.set_result(self._new_lease(cold=True, held=self._clock() - arrived))
        self._update_held()
        self._kick()

    async def _until_ready(self, url: str) -> None:
        """Until the backend sees the engine it runs up (`Backend.serving`) and `url`
        answers as a ready engine. `serving` is checked again after the probe: a server we
        did not start may answer on the URL (another process on a fixed port, a
        terminating pod behind a lagging Service), and our engine may have exited
        meanwhile; the backend reports that exit as a failure, which ends the race."""
        while True:
            await self._until_serving()
            await wait_ready(
                self._http.session(self.name),
                url=url,
                health_path=self.settings.health_path,
                served_model_name=self.settings.served_model_name,
                api_key=self.settings.upstream_api_key,
                nudge=self._nudge,
            )
            if self.backend.serving():
                return
            logger.warning(
                "model=%s %s answered, but the engine we run is not up: not routing to it",
                self.name,
                url,
            )

    async def _until_serving(self) -> None:
        # Woken by the backend's progress nudges; a backend failure ends it (via _race).
        while True:
            self._nudge.clear()
            if self.backend.serving():
                return
            await self._nudge.wait()

    async def _fail_start(self, *, outcome: str, reason: str) -> None:
        tail = self.backend.log_tail()[-ERROR_TAIL_LINES:]
        self.last_error = reason
        logger.warning("model=%s start failed (%s): %s", self.name, outcome, reason)
        self._observe_wake(outcome)
        # Waiters learn at once; cleaning up the engine may take its stop grace.
        self._fail_waiters(
            StartFailed(
                f"model {self.name!r} failed to start: {reason}",
                retry_after=self._retry_after(),
                extra={"engine_log_tail": tail},
            )
        )
        await self._stop_backend()
        self._metrics.scale_events.labels(model=self.name, direction="down", reason="failure").inc()
        self._set_state("failed")
        self._kick()

    async def _run_stop(self, *, reason: str, drain_timeout: float) -> None:
        self._set_state("draining")
        started = self._clock()
        drained = "drained"
        try:
            async with asyncio.timeout(drain_timeout):
                await self._drained.wait()
        except TimeoutError:
            drained = "cut"
            for lease in list(self._leases):
                lease.cut(f"model {self.name!r} is being stopped ({reason}); drain_timeout passed")
        self._metrics.drain_duration.labels(model=self.name, outcome=drained).observe(
            self._clock() - started
        )
        self._set_state("stopping")
        await self._stop_backend()
        self._set_state("stopped")
        self._kick()

    async def _stop_backend(self) -> None:
        self.url = None
        self.ready_since = None
        try:
            await self.backend.stop()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The state stays honest: we log, and the next start will try again.
            logger.exception("model=%s backend stop failed", self.name)
        finally:
            # Pooled connections to the old engine are dead: never reuse them.
            await self._http.reset(self.name)

    async def _race(self, coro: Any) -> Any:
        """Run `coro` unless the backend reports a failure first."""
        assert self._failure is not None
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait({task, self._failure}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.done() and not task.cancelled():
            return task.result()
        raise StartFailed(self._failure.result())

    def _observe_wake(self, outcome: str) -> None:
        took = self._clock() - self._wake_started
        if outcome == "ready":
            self.last_wake_seconds = took
        self._metrics.wake_duration.labels(
            model=self.name, backend=self.settings.backend_kind, outcome=outcome
        ).observe(took)
        logger.info("model=%s wake outcome=%s after %.3fs", self.name, outcome, took)

    def _fail_waiters(self, error: ModelUnavailable) -> None:
        waiters, self._waiters = self._waiters, {}
        for future, _ in waiters.values():
            self._holds.count -= 1
            if not future.done():
                future.set_exception(
                    type(error)(error.message, retry_after=error.retry_after, extra=error.extra)
                )
        self._update_held()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            logger.info("model=%s state %s -> %s", self.name, self.state, state)
        self.state = state
        self._metrics.set_state(self.name, "unknown" if self.unknown else state)
        self._update_held()

    def _update_held(self) -> None:
        reasons = ("starting", "waiting_for_gpu", "draining")
        if self.state in ("draining", "stopping"):
            current = "draining"
        elif self.state == "starting" or self.settings.pool is None:
            current = "starting"
        else:
            current = "waiting_for_gpu"
        for reason in reasons:
            value = len(self._waiters) if reason == current else 0
            self._metrics.held.labels(model=self.name, reason=reason).set(value)

    def _kick(self) -> None:
        if self.scheduler is not None:
            self.scheduler.kick()

    # ----- BackendListener -----------------------------------------------------------

    def backend_phase(self, phase: str) -> None:
        if self.state != "starting" or phase in self.phases:
            return
        took = self._clock() - self._wake_started
        self.phases[phase] = took
        self._metrics.wake_phase_duration.labels(model=self.name, phase=phase).observe(took)
        self._nudge.set()

    def backend_progress(self) -> None:
        self._nudge.set()

    def backend_failed(self, reason: str) -> None:
        logger.warning("model=%s engine failed: %s", self.name, reason)
        if self._failure is not None and not self._failure.done():
            self._failure.set_result(reason)
        if self.state == "ready":
            self.last_error = reason
            self._metrics.upstream_errors.labels(model=self.name, kind="engine_died").inc()
            self._transition = self._tasks.spawn(
                self._run_engine_died(reason), name=f"died:{self.name}"
            )

    async def _run_engine_died(self, reason: str) -> None:
        self._set_state("stopping")
        for lease in list(self._leases):
            lease.cut(f"engine of model {self.name!r} died: {reason}")
        await self._stop_backend()
        self._metrics.scale_events.labels(model=self.name, direction="down", reason="failure").inc()
        self._set_state("failed")
        self._kick()

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
        if self.state == "ready":
            self._lose("scaled to 0 replicas by another client")

    def backend_lost(self, reason: str) -> None:
        if self.state != "ready":
            return  # a wake, a stop or a failure under way deals with it
        self._metrics.scale_events.labels(model=self.name, direction="up", reason="lost").inc()
        self._lose(reason)

    def _lose(self, reason: str) -> None:
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
            self._run_start(adopt_url=self.url, lost=reason), name=f"rewake:{self.name}"
        )

    def backend_unknown(self, unknown: bool) -> None:
        if unknown != self.unknown:
            logger.warning(
                "model=%s engine state %s", self.name, "unknown" if unknown else "known again"
            )
            self.unknown = unknown
            self._metrics.set_state(self.name, "unknown" if unknown else self.state)
            self._nudge.set()  # Backend.serving() may have changed with it
            self._kick()

    # ----- shutdown ------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """SIGTERM: no new holds or starts, held requests get a 503 now, and a start under
        way is cancelled (its engine stopped at once, or left for the next activator to
        adopt), never completed and then stopped. In-flight requests go on."""
        if self._closing:
            return
        self._closing = True
        self._wake_requested_at = None
        self._fail_waiters(ShuttingDown("activator is shutting down", retry_after=5))
        if self.state == "starting" and self._backend is not None:
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
            # grace); a stop or an engine-death cleanup is cancelled, as the engine is
            # released below in any case.
            if transition is not self._cancelling:
                transition.cancel()
            await asyncio.wait({transition})
        await self.cut_in_flight("activator is shutting down")
        await self._release_engine()
        await self.backend.aclose()

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
        self._set_state("stopped")

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "aliases": list(s.aliases),
            "served_model_name": s.served_model_name,
            "state": "unknown" if self.unknown else self.state,
            "backend": self.settings.backend_kind,
            "pool": s.pool,
            "gpus": s.gpus,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "upstream_url": self.url,
            "last_wake_seconds": self.last_wake_seconds,
            "wake_phases": dict(self.phases),
            "last_error": self.last_error,
            "idle_timeout": s.idle_timeout,
        }
