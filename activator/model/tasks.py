"""The transition tasks of a model: what is done to its engine, each ending by firing
the event that says how it ended (activator.model.transitions).

A start probes the engine until it is ready (and warms it up once when it has sleep
mode), a drain waits for in-flight requests (bounded), a sleep and a wake drive vLLM's
sleep API, a stop stops the backend. Every step is bounded and raced against the backend
reporting the engine's failure. These run as the model's one transition task
(Model._spawn); the state itself, and what each outcome means, stay in Model: this is a
part of the same class (a mixin), split out so each file keeps one subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from activator.config.settings import ModelSettings
from activator.core.errors import ActivatorError, StartFailed
from activator.engine import sleep as engine_sleep
from activator.engine.http_client import HttpClient
from activator.engine.readiness import wait_ready
from activator.model.lease import Lease
from activator.model.transitions import Event
from activator.observability.metrics import Metrics

if TYPE_CHECKING:
    from activator.backends.base import Backend
    from activator.model.seams import Replicas
    from activator.placement.scaleout import ScaleOut

logger = logging.getLogger("activator.model.lifecycle")


class ModelTasks:
    """The engine side of activator.model.lifecycle.Model (which sets every field below)."""

    name: str
    settings: ModelSettings
    url: str | None
    last_error: str | None
    ready_since: float | None
    host_held: int
    last_wake_seconds: float | None
    last_wake_from: str | None
    recent_wakes: dict[str, float]
    last_sleep_seconds: float | None
    replicas: Replicas | None
    scale: ScaleOut | None
    _http: HttpClient
    _clock: Callable[[], float]
    _metrics: Metrics
    _failure: asyncio.Future[str] | None
    _wake_from: str
    _wake_started: float
    _nudge: asyncio.Event
    _drained: asyncio.Event
    _leases: set[Lease]

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def backend(self) -> Backend: ...

        def backend_phase(self, phase: str) -> None: ...

        def _fire(self, event: Event, **context: Any) -> bool: ...

        def _decides(self) -> bool: ...

    async def _run_start(self, *, adopt_url: str | None = None, lost: str | None = None) -> None:
        """A wake from zero: start the engine (or take over `adopt_url`), then wait until
        ready. `lost`: the reason the engine of a ready model was lost (a re-wake)."""
        outcome, reason = "ready", ""
        asleep = False
        try:
            async with asyncio.timeout(self.settings.startup_timeout):
                url = adopt_url or await self._race(self.backend.start())
                self.backend_phase("launched")
                await self._race(self._until_ready(url))
                if self.settings.sleep is not None:
                    if adopt_url is None:
                        await self._warm_up(url)
                    else:  # an engine left asleep (by an activator before this one)
                        asleep = await self._adopted_asleep(url)
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
            self._observe_wake(outcome)
            if not self._decides():  # a follower's probe: the leader decides what is next
                logger.warning("model=%s probe failed (%s): %s", self.name, outcome, reason)
                self.last_error = reason
                self._fire("probe_failed")
                return
            self._fire("start_failed", reason=reason, outcome=outcome)
            return
        if lost is not None and self.scale is None:
            # Requests still on the lost engine would stay on it; pooled connections to it
            # (behind a Service: to a pod that is gone) must not take new requests. (A
            # scaled-out model's requests are on pods: a pod that goes cuts its own.)
            for lease in list(self._leases):
                lease.cut(f"model {self.name!r} lost its engine ({lost}) and has a new one")
            await self._http.reset(self.name)
        self.url = url
        if asleep:
            assert self.settings.sleep is not None
            self.host_held = self.settings.sleep.host_bytes
            self._fire("found_asleep")
            return
        self.backend_phase("ready")
        self._observe_wake(outcome)
        self._fire("ready")

    async def _run_probe(self) -> None:
        """A follower: find the engine the leader made ready (Backend.discover, which
        reads and writes nothing), then probe it here like an adopted one."""
        try:
            url = await self.backend.discover()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API, unreachable or failing: not found, for now
            logger.warning("model=%s cannot find its engine: %s", self.name, exc)
            url = None
        if url is None:
            self._fire("found_stopped")
            return
        await self._run_start(adopt_url=url)

    async def _until_ready(self, url: str) -> None:
        """Until the backend sees the engine it runs up (`Backend.serving`) and `url`
        answers as a ready engine. `serving` is checked again after the probe: a server we
        did not start may answer on the URL (another process on a fixed port, a
        terminating pod behind a lagging Service), and our engine may have exited
        meanwhile; the backend reports that exit as a failure, which ends the race. A
        scaled-out model is ready once one of its pods passed activator's own probe
        (Ready, not terminating: the router probes each pod itself)."""
        while True:
            await self._until_serving()
            if self.scale is not None:
                await self.scale.until_routable()
                return
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

    async def _adopted_asleep(self, url: str) -> bool:
        """Whether an engine found running is asleep (/health answers 200 either way)."""
        try:
            return await engine_sleep.is_sleeping(
                self._http.session(self.name), url, headers=self._engine_headers()
            )
        except engine_sleep.SleepError as exc:
            logger.warning("model=%s cannot tell whether it sleeps (%s): awake", self.name, exc)
            return False

    async def _warm_up(self, url: str) -> None:
        """One max_tokens=1 request before clients are released, so later wakes do not
        pay the first call's JIT. A warm-up that fails is logged, not fatal: the engine
        passed readiness and clients may still be served."""
        try:
            await engine_sleep.warm_up(
                self._http.session(self.name),
                url,
                served_model_name=self.settings.served_model_name,
                headers=self._engine_headers(),
            )
        except engine_sleep.SleepError as exc:
            logger.warning("model=%s warm-up request failed: %s", self.name, exc)

    async def _run_drain(self, *, reason: str, limit: float, then: Event) -> None:
        started = self._clock()
        drained = "drained"
        try:
            async with asyncio.timeout(limit):
                await self._drained.wait()
                if self.replicas is not None:
                    await self.replicas.drained_elsewhere(self.name)
        except TimeoutError:
            drained = "cut"
            for lease in list(self._leases):
                lease.cut(f"model {self.name!r} is being stopped ({reason}); drain_timeout passed")
        self._metrics.drain_duration.labels(model=self.name, outcome=drained).observe(
            self._clock() - started
        )
        self._fire(then)

    async def _run_sleep(self) -> None:
        """POST /sleep and confirm it; any failure falls back to a stop (the table)."""
        sleep = self.settings.sleep
        assert sleep is not None and self.url is not None
        started = self._clock()
        self._failure = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(sleep.timeout):
                await self._race(
                    engine_sleep.sleep(
                        self._http.session(self.name),
                        self.url,
                        level=sleep.level,
                        headers=self._engine_headers(),
                    )
                )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, engine_sleep.SleepError, StartFailed) as exc:
            reason = _describe(exc, what="sleep", timeout=sleep.timeout)
            self._observe_sleep("sleep", "failed", started)
            logger.warning(
                "model=%s could not be put to sleep (%s): stopping it", self.name, reason
            )
            self.last_error = f"sleep failed: {reason}"
            self._fire("sleep_failed")
            return
        self._observe_sleep("sleep", "ok", started)
        self.ready_since = None
        self._fire("asleep")

    async def _run_wake(self) -> None:
        """POST /wake_up (level 2: the full reload sequence) and confirm it; a failure
        stops the engine, and the held requests wait for the cold start that follows."""
        sleep = self.settings.sleep
        assert sleep is not None and self.url is not None
        try:
            async with asyncio.timeout(sleep.timeout):
                await self._race(
                    engine_sleep.wake(
                        self._http.session(self.name),
                        self.url,
                        level=sleep.level,
                        headers=self._engine_headers(),
                    )
                )
        except asyncio.CancelledError:
            self._observe_wake("cancelled")
            raise
        except (TimeoutError, engine_sleep.SleepError, StartFailed) as exc:
            reason = _describe(exc, what="wake", timeout=sleep.timeout)
            self._observe_wake("failed")
            logger.warning(
                "model=%s wake failed (%s): stopping it for a cold start", self.name, reason
            )
            self.last_error = f"wake failed: {reason}"
            self._fire("wake_failed")
            return
        self.backend_phase("ready")
        self._observe_wake("ready")
        self._fire("ready")

    async def _run_stop(self, *, failed: bool) -> None:
        await self._stop_backend()
        if failed:
            self._metrics.scale_events.labels(
                model=self.name, direction="down", reason="failure"
            ).inc()
        self._fire("stopped_after_failure" if failed else "stopped")

    async def _stop_backend(self) -> None:
        self.url = None
        self.ready_since = None
        try:
            if self._decides():  # a follower only lets go: the engine is the leader's
                await self.backend.stop()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The state stays honest: we log, and the next start will try again.
            logger.exception("model=%s backend stop failed", self.name)
        finally:
            self.host_held = 0
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

    def _engine_headers(self) -> dict[str, str]:
        key = self.settings.upstream_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _observe_wake(self, outcome: str) -> None:
        if not self._decides():
            return  # a follower's probe is no wake: wakes are counted once, by the leader
        took = self._clock() - self._wake_started
        if outcome == "ready":
            self.last_wake_seconds = took
            self.last_wake_from = self._wake_from
            self.recent_wakes[self._wake_from] = took
        self._metrics.observe_wake(
            model=self.name,
            backend=self.settings.backend_kind,
            outcome=outcome,
            source=self._wake_from,
            seconds=took,
        )
        logger.info(
            "model=%s wake outcome=%s after %.3fs (from %s)",
            self.name,
            outcome,
            took,
            self._wake_from,
        )

    def _observe_sleep(self, op: str, outcome: str, started: float) -> None:
        took = self._clock() - started
        if op == "sleep" and outcome == "ok":
            self.last_sleep_seconds = took
        self._metrics.observe_sleep(model=self.name, outcome=outcome, seconds=took)
        logger.info("model=%s sleep outcome=%s after %.3fs", self.name, outcome, took)


def _describe(exc: BaseException, *, what: str, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within sleep.timeout ({timeout:g}s)"
    if isinstance(exc, ActivatorError):
        return exc.message
    return str(exc) or repr(exc)
