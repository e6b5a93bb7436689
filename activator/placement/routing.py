"""Routing one model's requests over its pods: least in-flight first, only to pods that
are ready, not terminating and have passed activator's own probe.

`PodRouter` is the one owner of a model's per-pod state: each pod's conditions (from
its EndpointSlices, through `update`), whether it passed activator's probe of the
model's health path (probed by the router itself, as a wake is: a new pod takes traffic
the moment it passes, not a watch round-trip later), and the requests in flight on it
(`PodLease`s). All calls come from the event loop; nothing here blocks.

How a caller forwards a request (the proxy, through the model):

    lease = router.try_acquire() or await router.acquire()    # bounded by the caller
    try:
        response = await post(lease.url + path)
    except aiohttp.ClientError as exc:
        if sent_nothing(exc):                 # connect refused / timed out: no byte out
            lease.connect_failed()            # the pod leaves rotation until re-probed
            ... retry with router.acquire(exclude={lease.pod})
    finally:
        lease.release()                       # after the last byte

A pod at `limit` requests (target_concurrency x burst_factor) takes no more: the request
waits in activator (`acquire`, or the model's own hold queue when it uses
`try_acquire` and `on_change`) instead of queueing on a busy engine, so a pod that comes
up takes the queue at once. A pod that turns unready or terminating takes no new request
and keeps the ones it has (they drain); a pod that disappears (deleted: its engine has
exited) loses its own in-flight requests (their `on_cut` callbacks run: on a real
network their connections could hang until the read timeout) and no other.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from activator.core.tasks import TaskGroup

logger = logging.getLogger(__name__)

# Probe of one pod: return once `url` serves the model (activator.engine.readiness.wait_ready
# with the model's session, health path, served name and key); raise if it never will.
# `nudge` is set when the pod's conditions change, so a poll runs at once.
Probe = Callable[[str, asyncio.Event], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    target_concurrency: float = 16.0
    # How far past the target a pod may be loaded before requests wait in activator.
    # Above 1 so a pod always has its next request queued on the engine (no idle gap
    # between one request's end and the next one's arrival); small enough that a burst
    # waits for a new pod instead of piling onto the busy ones.
    burst_factor: float = 2.0
    # Bound on one probe of a pod (it may load for minutes: a cold GPU node took 18).
    # A pod that has not passed by then gets no traffic until its conditions change.
    probe_timeout: float = 1200.0
    # A pod no longer listed is cut (its requests aborted) only after this long unlisted:
    # the EndpointSlice controller moves an endpoint between slices in two writes, and
    # between them the pod is briefly in neither. It takes no new request meanwhile.
    gone_grace: float = 1.0

    def __post_init__(self) -> None:
        if not self.target_concurrency > 0 or not self.burst_factor > 0:
            raise ValueError("target_concurrency and burst_factor must be > 0")

    @property
    def limit(self) -> int:
        """Requests one pod may carry at once."""
        return max(1, math.floor(self.target_concurrency * self.burst_factor))


@dataclass(frozen=True, kw_only=True)
class PodEndpoint:
    """One pod as the EndpointSlices describe it."""

    name: str  # the pod's name (targetRef), else its address
    url: str  # scheme://address:port
    ready: bool = True
    serving: bool = True
    terminating: bool = False


class RouterClosed(RuntimeError):
    """The router was closed while a request waited for a pod."""


@dataclass(eq=False)
class PodLease:
    """One request's claim on one pod. Release exactly once (more calls are no-ops)."""

    pod: str
    url: str
    _router: PodRouter = field(repr=False)
    _generation: int = field(repr=False)
    cut_reason: str | None = None
    _on_cut: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _released: bool = False

    def on_cut(self, callback: Callable[[], None]) -> None:
        """How to abort this request if its pod disappears before it ends."""
        self._on_cut.append(callback)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._router._release(self)

    def connect_failed(self) -> None:
        """The connection to the pod failed before a byte was sent: the pod takes no new
        request until it passes the probe again. Releases the lease."""
        self._router._connect_failed(self)
        self.release()

    def _cut(self, reason: str) -> None:
        self.cut_reason = reason
        for callback in self._on_cut:
            callback()


@dataclass(eq=False)
class _Pod:
    endpoint: PodEndpoint
    generation: int
    probed: bool = False
    # Why the probe gave up (wrong served model, timed out); cleared when the pod's
    # conditions change. A broken pod gets no traffic and no new probe until then.
    broken: str | None = None
    leases: set[PodLease] = field(default_factory=set)
    probing: asyncio.Task[None] | None = None
    nudge: asyncio.Event = field(default_factory=asyncio.Event)
    picked: int = 0  # sequence number of its last pick: ties go to the least recent
    gone: asyncio.TimerHandle | None = None  # unlisted: removed when this fires

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def routable(self) -> bool:
        e = self.endpoint
        return e.ready and not e.terminating and self.probed and self.gone is None


def sent_nothing(exc: BaseException) -> bool:
    """The request cannot have reached the engine: the connection was never made (refused,
    unreachable, connect timed out). Safe to send again to another pod."""
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


class PodRouter:
    def __init__(
        self,
        model: str,
        *,
        settings: RouterSettings,
        probe: Probe,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`on_change` is called (synchronously, must not block: set an event, kick a
        loop) whenever room may have appeared, the set of routable pods changed or the
        demand did: a release, a pod passing its probe, new endpoints, a request that
        starts or stops waiting. A model that holds its own queue grants from it then,
        and its scaling loop looks at the demand again."""
        self.model = model
        self.settings = settings
        self._probe = probe
        self._on_change = on_change
        self._pods: dict[str, _Pod] = {}
        self._waiters: dict[int, tuple[asyncio.Future[PodLease], frozenset[str]]] = {}
        self._seq = itertools.count(1)
        self._tasks = TaskGroup()
        self._closed = False

    # ----- what the request path sees ------------------------------------------------

    @property
    def limit(self) -> int:
        return self.settings.limit

    @property
    def routable(self) -> int:
        """Pods that take new requests now."""
        return sum(1 for p in self._pods.values() if p.routable)

    @property
    def in_flight(self) -> int:
        return sum(len(p.leases) for p in self._pods.values())

    @property
    def waiting(self) -> int:
        """Requests waiting in `acquire` for room on a pod (part of the model's demand)."""
        return len(self._waiters)

    @property
    def saturated(self) -> bool:
        """No routable pod has room: a request now would wait."""
        return self._pick(frozenset()) is None

    def try_acquire(self, *, exclude: Collection[str] = ()) -> PodLease | None:
        """A lease on the routable pod with the fewest requests in flight (not one of
        `exclude`, and below `limit`), or None when every such pod is full or there is
        none. (Requests waiting in `acquire` are never passed over: every event that
        makes room grants them first, so whatever room is left is not theirs to take.)"""
        if self._closed:
            return None
        pod = self._pick(frozenset(exclude))
        if pod is None:
            return None
        lease = self._lease(pod)
        self._notify()  # one more in flight: demand changed
        return lease

    async def acquire(self, *, exclude: Collection[str] = ()) -> PodLease:
        """Wait for room on a routable pod (not one of `exclude`), first come first
        served. Unbounded: the caller bounds it (its hold timeout). Safe to cancel: the
        waiter leaves at once, and a lease granted in that instant is released."""
        lease = self.try_acquire(exclude=exclude)
        if lease is not None:
            return lease
        if self._closed:
            raise RouterClosed(f"model {self.model!r}: router closed")
        future: asyncio.Future[PodLease] = asyncio.get_running_loop().create_future()
        key = next(self._seq)
        self._waiters[key] = (future, frozenset(exclude))
        self._notify()  # held requests are demand (the scaling policy counts them)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()
            raise
        finally:
            self._waiters.pop(key, None)
            self._notify()

    # ----- what the endpoint watch feeds -----------------------------------------------

    def update(self, endpoints: Sequence[PodEndpoint]) -> None:
        """The model's pods as its EndpointSlices list them now (all of them: a pod not
        listed takes no new request, and is removed after `gone_grace` unless listed
        again). Starts a probe of each new pod."""
        seen: set[str] = set()
        for endpoint in endpoints:
            seen.add(endpoint.name)
            pod = self._pods.get(endpoint.name)
            if pod is not None and pod.endpoint.url != endpoint.url:
                self._remove(pod, f"pod {pod.name} moved to {endpoint.url}")
                pod = None
            if pod is not None and pod.gone is not None:
                pod.gone.cancel()
                pod.gone = None
            if pod is None:
                pod = _Pod(endpoint=endpoint, generation=next(self._seq))
                self._pods[endpoint.name] = pod
                logger.info(
                    "model=%s pod %s at %s appeared (ready=%s)",
                    self.model,
                    pod.name,
                    endpoint.url,
                    endpoint.ready,
                )
            elif pod.endpoint != endpoint:
                was = pod.endpoint
                pod.endpoint = endpoint
                pod.broken = None
                pod.nudge.set()
                if was.ready != endpoint.ready or was.terminating != endpoint.terminating:
                    logger.info(
                        "model=%s pod %s: ready=%s terminating=%s (in flight %d)",
                        self.model,
                        pod.name,
                        endpoint.ready,
                        endpoint.terminating,
                        len(pod.leases),
                    )
            self._ensure_probe(pod)
        for pod in [p for p in self._pods.values() if p.name not in seen and p.gone is None]:
            if self.settings.gone_grace <= 0:
                self._remove(pod, f"pod {pod.name} is gone")
            else:
                pod.gone = asyncio.get_running_loop().call_later(
                    self.settings.gone_grace, self._expire, pod
                )
        self._changed()

    # ----- scale-down help and the admin view ------------------------------------------

    def deletion_costs(self) -> dict[str, int]:
        """Pod name -> requests in flight: written as the pods'
        controller.kubernetes.io/pod-deletion-cost before a scale-down, the ReplicaSet
        removes the least loaded pods first."""
        return {name: len(pod.leases) for name, pod in self._pods.items()}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": pod.name,
                "url": pod.endpoint.url,
                "ready": pod.endpoint.ready,
                "terminating": pod.endpoint.terminating,
                "probed": pod.probed,
                "routable": pod.routable,
                "in_flight": len(pod.leases),
                **({"broken": pod.broken} if pod.broken else {}),
            }
            for pod in sorted(self._pods.values(), key=lambda p: p.name)
        ]

    async def aclose(self) -> None:
        """Stop probing; waiters get RouterClosed. Leases stay valid (release is a no-op
        on what is gone)."""
        self._closed = True
        for pod in self._pods.values():
            if pod.gone is not None:
                pod.gone.cancel()
        for future, _ in list(self._waiters.values()):
            if not future.done():
                future.set_exception(RouterClosed(f"model {self.model!r}: router closed"))
        await self._tasks.aclose()

    # ----- internals ----------------------------------------------------------------

    def _pick(self, exclude: frozenset[str]) -> _Pod | None:
        best: _Pod | None = None
        for pod in self._pods.values():
            if not pod.routable or pod.name in exclude or len(pod.leases) >= self.limit:
                continue
            if best is None or (len(pod.leases), pod.picked) < (len(best.leases), best.picked):
                best = pod
        return best

    def _lease(self, pod: _Pod) -> PodLease:
        pod.picked = next(self._seq)
        lease = PodLease(
            pod=pod.name, url=pod.endpoint.url, _router=self, _generation=pod.generation
        )
        pod.leases.add(lease)
        logger.debug(
            "model=%s request routed to pod %s (in flight %d)",
            self.model,
            pod.name,
            len(pod.leases),
        )
        return lease

    def _release(self, lease: PodLease) -> None:
        pod = self._pods.get(lease.pod)
        if pod is None or pod.generation != lease._generation:
            return  # its pod is gone: nothing to give back
        pod.leases.discard(lease)
        self._changed()

    def _connect_failed(self, lease: PodLease) -> None:
        pod = self._pods.get(lease.pod)
        if pod is None or pod.generation != lease._generation or not pod.probed:
            return
        logger.warning(
            "model=%s pod %s refused a connection: out of rotation until it passes its probe again",
            self.model,
            pod.name,
        )
        pod.probed = False
        self._ensure_probe(pod)

    def _expire(self, pod: _Pod) -> None:
        if self._pods.get(pod.name) is pod and pod.gone is not None:
            self._remove(pod, f"pod {pod.name} is gone")
            self._changed()

    def _remove(self, pod: _Pod, reason: str) -> None:
        del self._pods[pod.name]
        if pod.probing is not None:
            pod.probing.cancel()
        if pod.gone is not None:
            pod.gone.cancel()
            pod.gone = None
        if pod.leases:
            logger.warning(
                "model=%s %s with %d requests in flight: they are cut",
                self.model,
                reason,
                len(pod.leases),
            )
        else:
            logger.info("model=%s %s", self.model, reason)
        for lease in list(pod.leases):
            lease._cut(reason)
        pod.leases.clear()

    def _ensure_probe(self, pod: _Pod) -> None:
        if (
            self._closed
            or pod.probed
            or pod.broken is not None
            or pod.probing is not None
            or pod.endpoint.terminating
        ):
            return
        pod.probing = self._tasks.spawn(self._run_probe(pod), name=f"probe-{self.model}-{pod.name}")

    async def _run_probe(self, pod: _Pod) -> None:
        try:
            async with asyncio.timeout(self.settings.probe_timeout):
                await self._probe(pod.endpoint.url, pod.nudge)
        except TimeoutError:
            pod.broken = f"not healthy within {self.settings.probe_timeout:g}s"
        except Exception as exc:  # e.g. StartFailed: it serves another model
            pod.broken = str(exc) or type(exc).__name__
        else:
            pod.probed = True
        finally:
            pod.probing = None
        if pod.broken is not None:
            logger.warning("model=%s pod %s failed its probe: %s", self.model, pod.name, pod.broken)
            return
        if self._pods.get(pod.name) is pod:
            logger.info(
                "model=%s pod %s passed its probe (ready=%s)",
                self.model,
                pod.name,
                pod.endpoint.ready,
            )
            self._changed()

    def _changed(self) -> None:
        """Room may have appeared: grant waiters oldest first (each to the least loaded
        pod it accepts), then tell the owner."""
        for future, exclude in list(self._waiters.values()):
            if self._pick(frozenset()) is None:
                break  # no room anywhere: the rest of the queue stays as it is
            if future.done():
                continue
            pod = self._pick(exclude)
            if pod is None:
                continue
            future.set_result(self._lease(pod))
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change()
