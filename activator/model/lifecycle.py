"""One model's lifecycle: the single owner of its state, its held requests and its engine.

The proxy asks for an outcome (`await model.acquire(...)` -> a Lease on a ready upstream)
and never looks at the state itself. Starting, stopping and sleeping are decided by the
model's `PoolScheduler` (activator.fleet.pool), which calls `begin_start` / `begin_stop`; the
model carries them out as named tasks it owns.

The moves are one table, `activator.model.transitions`: every event (a pool decision, a task
reporting how it ended, the backend reporting the engine died or was lost) goes through
`_fire`, which looks the move up, changes the state through `_set_state` (which logs it
and updates the metric) and runs the row's effect. Requests are forwarded only in
`ready`; in every other state they are held. A ready model whose engine is lost without
failing (a GitOps revert to 0 replicas, its pod evicted or not Ready) goes back to
starting: new requests are held until the engine is back and probed again.

Shutdown is not a move of the table but three steps (begin_shutdown, cut_in_flight,
shutdown: activator.model.shutdown).

Several replicas (activator.ha): `replicas` links the model to the others. Only the
leader's model takes decisions (begin_start / begin_stop / begin_adopt refuse elsewhere)
and its drain also waits for what other replicas have in flight; a follower's model is
moved by the events its pool feeds it from the leader's intent (`follow`, `reconcile`:
rows of the same table) and never touches the engine itself.

The class is split by subject, one mixin a file, none of which imports this one (each
declares the fields and methods of Model it uses): this file (state, held requests and
leases, the pool's and the leader's calls, the table's dispatcher `_fire`),
activator.model.effects (what each move of the table does), activator.model.tasks (the
transition tasks: what is done to the engine), activator.model.reports (the backend's
reports), activator.model.shutdown, activator.model.reload (what a config reload changes)
and activator.model.views (what others read: the pool's view, describe). Requests'
leases and the held queue's bookkeeping are activator.model.lease; what the model needs
from its pool and from the other replicas, activator.model.seams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from activator.backends.base import Backend
from activator.config.settings import ModelSettings
from activator.core.errors import (
    ActivatorError,
    HoldTimeout,
    ModelUnavailable,
    QueueFull,
    ShuttingDown,
    StartFailed,
)
from activator.core.tasks import TaskGroup
from activator.engine.http_client import HttpClient
from activator.model.effects import ERROR_TAIL_LINES as ERROR_TAIL_LINES
from activator.model.effects import ModelEffects
from activator.model.lease import HoldCounter, Lease, Waiters
from activator.model.reload import ModelReload, PendingEngine
from activator.model.reports import ModelReports
from activator.model.seams import Replicas, Scheduler
from activator.model.shutdown import ModelShutdown
from activator.model.tasks import ModelTasks
from activator.model.transitions import Event, cause_of, move
from activator.model.views import ModelViews
from activator.observability.metrics import Metrics
from activator.placement.routing import PodLease
from activator.placement.scaleout import ScaleOut, ScaleTarget

logger = logging.getLogger(__name__)

# Margin on top of a model's own budgets before a held request gives up by itself: the
# start has its own deadline, this only guarantees that no waiter can hang forever.
HOLD_MARGIN = 60.0


class Model(ModelEffects, ModelTasks, ModelReload, ModelReports, ModelShutdown, ModelViews):
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
        self._waiters = Waiters(holds)
        self._tasks = tasks
        self._clock = clock
        self.scheduler: Scheduler | None = None
        self.replicas: Replicas | None = None
        # replicas.max > 1 on a backend that can: its pods, routing and replica count
        # (activator.placement.scaleout), set up with the backend.
        self.scale: ScaleOut | None = None
        self._granting = False
        self.state = "stopped"
        self.unknown = False
        self.url: str | None = None
        self.last_error: str | None = None
        self.last_activity = clock()
        self.ready_since: float | None = None
        self.last_wake_seconds: float | None = None
        self.last_wake_from: str | None = None  # "zero" (a cold start) or "sleep"
        self.last_sleep_seconds: float | None = None
        # The last wake's duration by where it came from ("zero", "sleep"): what bringing
        # the model back costs, for the pool's choice of whom to evict.
        self.recent_wakes: dict[str, float] = {}
        # The GPUs of its pool its engine holds memory on (memory packing: decided by the
        # pool, kept while it runs or sleeps there, cleared once the engine is gone).
        self.placement: tuple[int, ...] = ()
        self.phases: dict[str, float] = {}
        # Host memory the engine holds for its sleeping weights: reserved when its first
        # sleep is decided, kept until the engine stops (vLLM keeps its pinned backup
        # after a wake, #16663). The pool's host-memory accounting.
        self.host_held = 0
        self.blocked = False  # starting, but the engine cannot be placed yet
        self._leases: set[Lease] = set()
        self._wake_requested_at: float | None = None
        self._transition: asyncio.Task[None] | None = None
        self._failure: asyncio.Future[str] | None = None
        self._nudge = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._wake_started = 0.0
        self._wake_from = "zero"
        # Shutdown: no new holds or starts from begin_shutdown on; no new leases once the
        # grace is over (cut_in_flight).
        self._closing = False
        self._leases_closed = False
        self._cancelling: asyncio.Task[None] | None = None  # a start cancelled at SIGTERM
        self._released = False
        # Reloads: settings waiting for the engine that runs to go; the reason the model
        # is being removed, and set once it is gone (activator.reload).
        self._pending: PendingEngine | None = None
        self.retiring: str | None = None
        self._gone = asyncio.Event()
        self._cause = "start-up"  # why the model is in its state (the log says it)
        self._effects = self._effect_table()
        metrics.set_state(self.name, self.state)
        metrics.queue_capacity.labels(model=self.name).set(settings.max_queued)
        metrics.in_flight.labels(model=self.name).set(0)
        metrics.add_model(self.name, backend=settings.backend_kind, settings=settings)
        self._update_held()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(f"model {self.name!r} has no backend before the app starts")
        return self._backend

    def attach_backend(self, backend: Backend) -> None:
        """Called once at app start, when backends (and their API clients) can exist."""
        self._backend = backend
        self._attach_scale(backend)

    def _attach_scale(self, backend: Backend) -> None:
        """Scale out when the settings ask for it and the backend can (Kubernetes); a
        new backend (a reload's) keeps the model's ScaleOut, or closes it."""
        if self.settings.replicas.max == 1 or not isinstance(backend, ScaleTarget):
            if self.scale is not None:
                old, self.scale = self.scale, None
                self._tasks.spawn(old.aclose(), name=f"scale-close:{self.name}")
        else:
            if self.scale is None:
                self.scale = ScaleOut(
                    self.settings,
                    http=self._http,
                    metrics=self._metrics,
                    tasks=self._tasks,
                    on_change=self._pods_changed,
                    kick=self._kick,
                    clock=self._clock,
                )
            self.scale.configure(self.settings)
            self.scale.attach(backend)

    # ----- what the proxy sees -------------------------------------------------------

    @property
    def hold_timeout(self) -> float:
        s = self.settings
        pooled = s.max_wait + s.drain_timeout if s.pool is not None else 0.0
        grace = s.process.stop_grace if s.process is not None else 0.0
        # A failed wake is followed by a stop and a cold start.
        sleep = 2 * s.sleep.timeout if s.sleep is not None else 0.0
        return s.startup_timeout + pooled + grace + sleep + HOLD_MARGIN

    async def acquire(self, *, exclude: Collection[str] = ()) -> Lease:
        """Return a lease on a ready upstream, holding the caller while the model wakes
        (or, scaled out, while every pod is full: `exclude` names pods not to use now).

        Raises QueueFull, StartFailed, HoldTimeout or ShuttingDown. Safe to cancel (a
        client that disconnects): the waiter leaves the queue at once and the start,
        which belongs to the model, goes on for the others.
        """
        if self._leases_closed or (self._closing and self.state != "ready"):
            raise ShuttingDown("activator is shutting down", retry_after=5)
        if self.retiring is not None and self.state not in ("ready", "starting", "waking"):
            raise self._removed()
        if self.state == "ready":
            if self.scale is None:
                return self._new_lease(cold=False, held=0.0)
            pod = self.scale.try_acquire(exclude=frozenset(exclude))
            if pod is not None:
                return self._new_lease(cold=False, held=0.0, pod=pod)
            if self._closing:
                raise ShuttingDown("activator is shutting down", retry_after=5)
            # Every pod is at its limit (or none takes requests): held below, as for a
            # start, until a pod has room.
        if self._waiters.full(self.settings.max_queued):
            raise QueueFull(
                f"too many requests are waiting for model {self.name!r} to start",
                retry_after=self._retry_after(),
            )
        arrived = self._clock()
        key, future = self._waiters.add(arrived)
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
            if self._waiters.leave(key):
                self._update_held()
            self._metrics.hold_duration.labels(model=self.name, outcome=outcome).observe(
                self._clock() - arrived
            )

    def _new_lease(self, *, cold: bool, held: float, pod: PodLease | None = None) -> Lease:
        url = pod.url if pod is not None else self.url
        assert url is not None
        lease = Lease(owner=self, url=url, cold=cold, held_seconds=held, pod_lease=pod)
        if pod is not None:
            pod.on_cut(lambda: lease.cut(pod.cut_reason or f"pod {pod.pod} is gone"))
        self._leases.add(lease)
        self._drained.clear()
        self.last_activity = self._clock()
        self._metrics.request_started(self.name)
        self._changed()
        return lease

    def lease_ended(self, lease: Lease) -> None:
        """Lease.release: the request is over."""
        self._leases.discard(lease)
        self.last_activity = self._clock()
        self._metrics.request_ended(self.name)
        self._changed()
        if not self._leases:
            self._drained.set()
            self._kick()

    def _pods_changed(self) -> None:
        """The router's on_change (a scaled-out model): room may have appeared on a pod,
        so held requests take it in arrival order; the pool looks again when the demand
        moved by a whole replica."""
        assert self.scale is not None
        if self.state == "ready" and len(self._waiters) and not self._granting:
            self._grant_from_pods()
        if self.scale.demand_moved(len(self._waiters)):
            self._kick()

    def _grant_from_pods(self) -> None:
        """Held requests get pods with room, oldest first; those held since before the
        model was ready were held for its wake (cold)."""
        assert self.scale is not None
        scale, ready_since = self.scale, self.ready_since or 0.0

        def lease_for(arrived: float) -> Lease | None:
            pod = scale.try_acquire()
            if pod is None:
                return None
            return self._new_lease(
                cold=arrived < ready_since, held=self._clock() - arrived, pod=pod
            )

        self._granting = True  # a grant tells the router, which tells us again
        try:
            granted = self._waiters.grant_while(lease_for)
        finally:
            self._granting = False
        if granted:
            self._update_held()

    def _retry_after(self) -> float:
        # A start is the likely wait; clients should come back when it may be over.
        return max(1.0, min(self.settings.startup_timeout, 30.0))

    # ----- what the pool scheduler sees and does -------------------------------------

    def request_wake(self) -> None:
        """Admin wake: demand without a request."""
        if self.retiring is not None:
            return
        if self.state not in ("ready", "starting", "waking") and self._wake_requested_at is None:
            self._wake_requested_at = self._clock()
            self._kick()

    def begin_start(self, *, reason: str, placement: tuple[int, ...] = ()) -> bool:
        """Make the model ready: a cold start, or a wake when it sleeps. `placement`: the
        GPUs of its pool the pool placed it on (memory packing; a sleeper wakes where it
        sleeps), given to the backend for the engine it starts."""
        if self._closing or self.retiring is not None or not self._decides():
            return False
        waking = self.state == "sleeping"
        previous = self.placement
        if placement:
            self.placement = placement
            self.backend.place(placement)
        if not self._fire("start", reason=reason):
            self.placement = previous
            return False
        self._wake_requested_at = None
        self._metrics.scale_events.labels(
            model=self.name, direction="up", reason="wake" if waking else reason
        ).inc()
        return True

    def begin_stop(
        self,
        *,
        reason: str,
        drain_timeout: float | None = None,
        sleep: bool = False,
        for_model: str | None = None,
    ) -> bool:
        """Stop admitting, drain in-flight requests (bounded), then stop the engine or put
        it to sleep. A sleeping model is stopped at once (nothing is in flight).
        `for_model`: the model this one makes room for (a swap), for the log."""
        if (sleep and self.settings.sleep is None) or not self._decides():
            return False
        drain = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        event: Event = "sleep" if sleep else "stop"
        if not self._fire(event, reason=reason, drain_timeout=drain, for_model=for_model):
            return False
        direction = "sleep" if sleep else "down"
        self._metrics.scale_events.labels(model=self.name, direction=direction, reason=reason).inc()
        return True

    def begin_adopt(self, url: str) -> bool:
        """Take over an engine that runs without us having started it."""
        if (
            self._closing
            or self.retiring is not None
            or not self._decides()
            or not self._fire("adopt", url=url)
        ):
            return False
        self._metrics.scale_events.labels(model=self.name, direction="up", reason="adopt").inc()
        return True

    async def adopt_if_running(self, *, found: str) -> None:
        """Adopt the engine if the backend finds one running (a Kubernetes workload
        someone scaled up); `found` says when, for the log line. An unreachable API is
        logged, never raised: it must not break the start-up or reload around it."""
        try:
            url = await self.backend.discover()
        except Exception as exc:
            logger.warning("model=%s discovery failed: %s", self.name, exc)
            return
        if url is not None:
            logger.info("model=%s found running %s: adopting it", self.name, found)
            self.begin_adopt(url)

    # ----- several replicas (activator.ha) --------------------------------------------

    def _decides(self) -> bool:
        return self.replicas is None or self.replicas.leading()

    def _changed(self) -> None:
        if self.replicas is not None:
            self.replicas.changed(self.name, state=self.state, error=self.last_error)

    @property
    def transition_running(self) -> bool:
        """Whether the model's transition task (a start, probe, drain, stop...) runs."""
        return self._transition is not None and not self._transition.done()

    def follow(self, event: Event, *, reason: str = "") -> bool:
        """A follower's move from the leader's intent (`probe`, `leader_*`) or a demotion
        (`demoted`); rows of the table, whose effects never write to the API."""
        if self._closing:
            return False
        return self._fire(event, reason=reason)

    def reconcile(self, url: str | None) -> bool:
        """The engine as the API shows it (a new leader, before it decides; a replica at
        start-up): `url` when it runs (adopted: probed, asleep or not), None when not
        (made sure stopped)."""
        if self._closing:
            return False
        if url is None:
            return self._fire("found_stopped")
        if not self._fire("found_running", url=url):
            return False
        if self._decides():  # a follower starting up adopts nothing: it probes
            self._metrics.scale_events.labels(model=self.name, direction="up", reason="adopt").inc()
        return True

    def fail_held(self, message: str) -> int:
        """The leader failed to start the model: requests held here fail with `message`
        instead of waiting for a start nobody makes. Returns how many."""
        if self.state == "ready":
            return 0
        return self._fail_waiters(StartFailed(message, retry_after=self._retry_after()))

    # ----- the state machine: one table, one dispatcher ------------------------------

    def _fire(self, event: Event, **context: Any) -> bool:
        """Apply `event` through the table (activator.model.transitions): change the state,
        then run the row's effect. An event with no row for the state is not a move."""
        step = move(self.state, event)  # type: ignore[arg-type]
        if step is None:
            logger.debug("model=%s %s ignored in state %s", self.name, event, self.state)
            return False
        why = cause_of(event, reason=context.get("reason", ""), for_model=context.get("for_model"))
        self._set_state(step.next, cause=why)
        effect = self._effects[step.effect]
        effect(**context)
        self._after_move()
        self._kick()
        return True

    def _fail_waiters(self, error: ModelUnavailable) -> int:
        failed = self._waiters.fail_all(error)
        self._update_held()
        return failed

    def _set_state(self, state: str, *, cause: str | None = None) -> None:
        """The one place a model's state changes: logged with its cause (the move that
        began this step, when `cause` is None: `stopping -> stopped` of an idle stop
        says idle), and counted."""
        if cause is not None:
            self._cause = cause
        if state != self.state:
            logger.info("model=%s state %s -> %s (%s)", self.name, self.state, state, self._cause)
        self.state = state
        if state in ("stopped", "failed"):
            self.placement = ()  # the engine is gone: it holds no GPU memory any more
        self._metrics.set_state(self.name, "unknown" if self.unknown else state)
        self._update_held()

    def _update_held(self) -> None:
        reasons: tuple[str, ...] = ("starting", "waiting_for_gpu", "draining")
        if self.scale is not None:
            reasons += ("saturated",)
        if self.state in ("draining", "falling_asleep", "stopping"):
            current = "draining"
        elif self.state == "ready":
            current = "saturated"  # scaled out: every pod is at its limit
        elif self.state in ("starting", "waking") or self.settings.pool is None:
            current = "starting"
        else:
            current = "waiting_for_gpu"
        for reason in reasons:
            value = len(self._waiters) if reason == current else 0
            self._metrics.held.labels(model=self.name, reason=reason).set(value)
        self._changed()

    def _kick(self) -> None:
        if self.scheduler is not None:
            self.scheduler.kick()
