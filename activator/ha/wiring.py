"""This activator as one of several replicas: the HA blocks wired into the models and
their pools (docs/kubernetes.md, "Several replicas (HA)").

Every replica runs the whole proxy: it accepts and holds requests, probes engines itself
and forwards to the ready ones. Around it, one `Replica` owns:

- a LeaderElector campaigning for the leader Lease; its `valid_for` fences every scale
  write of the backends (KubernetesBackend.attach_fence);
- a DemandPublisher: this replica's per-model demand on a Lease of its own;
- a ClusterDemand: everyone else's, merged into the leader's views (`merged`) and
  waited on by the leader's drains (`drained_elsewhere`);
- an IntentPublisher (the leader's model states, written by the elector's fenced writes)
  and an IntentWatcher (followers read them in `follow`);
- the HTTP session a follower forwards admin decisions to the leader with
  (activator.ha.forward), at the address the leader publishes on its replica Lease.

Roles, with the same Models and pool loops everywhere:

- the leader's pools decide (activator.placement.policy), and only once the leader has reconciled
  every model from the API after taking the Lease (running -> adopted, asleep ->
  sleeping, not running -> made sure stopped), so a swap or wake an old leader left
  half-done is finished or redone and nothing runs on unnoticed;
- a follower's pools feed their models the leader's intent (activator.ha.follow): rows
  of the one transition table, whose effects never write to the API;
- losing the Lease (the elector's local deadline, a conflict, shutdown) drops the
  leader's own work on each engine at once (`demoted`); the models keep serving.

A replica starting up reconciles like a new leader, read-only: it serves the warm models
it can probe before it has heard from any leader, and holds the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from activator.backends.kube.cluster import KubeCluster
from activator.backends.kubernetes import KubernetesBackend
from activator.config.ha import HaSettings, default_identity, pod_owner_from_env
from activator.config.settings import LeaderElectionSettings
from activator.core.errors import Conflict
from activator.core.tasks import TaskGroup
from activator.edge.admin import ReadyFlag
from activator.fleet.registry import ModelRegistry
from activator.ha import forward, status
from activator.ha.blocks import Blocks
from activator.ha.changes import Changes
from activator.ha.demand import Demand
from activator.ha.election import LeaderElector, Leadership
from activator.ha.follow import (
    drained_everywhere,
    evidence_unknown,
    follow_event,
    merge_views,
    probe_backoff,
)
from activator.ha.intent import IntentPublisher, IntentWatcher, ModelIntent
from activator.ha.replicas import ClusterDemand, DemandPublisher
from activator.model.lifecycle import Model
from activator.observability.metrics import Metrics
from activator.placement.policy import ModelView

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# A starting replica turns ready once the engines it found running are probed (so it
# routes to them without holding anyone), or after this long whatever they do.
READY_WAIT = 10.0


def ha_settings(config: LeaderElectionSettings, env: Mapping[str, str] = os.environ) -> HaSettings:
    """The blocks' settings; the namespace from the config, else $POD_NAMESPACE, else the
    service account's. ValueError (one line) when none tells it."""
    namespace = config.namespace or env.get("POD_NAMESPACE") or _service_account_namespace()
    if not namespace:
        raise ValueError(
            "kubernetes.leader_election.namespace is not set, and neither $POD_NAMESPACE nor "
            "a service account tells activator's namespace"
        )
    return HaSettings(
        namespace=namespace,
        lease_name=config.lease_name,
        lease_duration=config.lease_duration,
        renew_deadline=config.renew_deadline,
        retry_period=config.retry_period,
        write_interval=config.write_interval,
    )


def _service_account_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or None
    return None


@dataclass
class _Probes:
    """A follower's probes of one model for one intent (its writer and epoch)."""

    key: tuple[str | None, int]
    attempts: int = 0
    next_at: float = 0.0


class Replica:
    """Built with the app (no I/O), started in its lifetime with the API client."""

    def __init__(
        self,
        config: LeaderElectionSettings,
        *,
        registry: ModelRegistry,
        metrics: Metrics,
        admin_port: int | None = None,
        admin_key: Callable[[], str | None] = lambda: None,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.settings = ha_settings(config, env)
        self.identity = config.identity or default_identity(env)
        self._owner = pod_owner_from_env(self.settings.namespace, env)
        # Published for the others to forward admin decisions to; None: they answer 409.
        self.admin_url = (
            forward.own_admin_url(env, port=admin_port) if admin_port is not None else None
        )
        self._http: aiohttp.ClientSession | None = None
        # The admin key in force (a reload may change it): a decision that a status page
        # session authorised travels to the leader with it (activator.ha.forward).
        self._admin_key = admin_key
        self._registry = registry
        self._metrics = metrics
        self._tasks = TaskGroup()
        self._blocks: Blocks | None = None
        self._demand_changed = asyncio.Event()
        self._models_changed = Changes()
        self._started = asyncio.Event()  # the start-up reconcile is done
        self._leading = False
        self._reconciled_term = 0  # the elector's term whose reconcile is done
        self._promotion: asyncio.Task[None] | None = None
        self._probes: dict[str, _Probes] = {}
        self._failures: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # intent epoch applied, per model (published)
        self._holder: str | None = None

    @property
    def _b(self) -> Blocks:
        if self._blocks is None:
            raise RuntimeError("the replica is not started")
        return self._blocks

    # -- lifetime -----------------------------------------------------------------------

    async def start(self, cluster: KubeCluster, *, ready: ReadyFlag) -> None:
        """Link the models and pools, start campaigning and publishing, and reconcile
        the models (read-only) in the background; `ready` is set once that is done."""
        s = self.settings
        elector = LeaderElector(cluster, settings=s, identity=self.identity)
        self._blocks = Blocks(
            elector=elector,
            publisher=IntentPublisher(elector),  # subscribed first: seeded before we act
            watcher=IntentWatcher(cluster, settings=s),
            demand=DemandPublisher(
                cluster,
                settings=s,
                demand=self._demand,
                changed=self._demand_changed,
                identity=self.identity,
                owner=self._owner,
                admin_url=self.admin_url,
            ),
            cluster=ClusterDemand(cluster, settings=s, identity=self.identity, local=dict),
        )
        for model in self._registry:
            backend = model.backend
            if isinstance(backend, KubernetesBackend):
                backend.attach_fence(elector.valid_for)
            model.replicas = self
        for scheduler in self._registry.schedulers:
            scheduler.coordinator = self
        # No cookie jar: a forwarded request carries its caller's credentials, nothing else.
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        elector.subscribe(self._leadership)
        self._metrics.leader.labels(replica=self.identity).set(0)
        self._metrics.leader_changes.labels(replica=self.identity)
        self._b.watcher.start()
        self._b.cluster.start()
        self._b.demand.start()
        elector.start()
        self._tasks.spawn(self._relay(self._b.watcher), name="ha-intent")
        self._tasks.spawn(self._relay(self._b.cluster), name="ha-demand")
        self._tasks.spawn(self._start_up(ready), name="ha-start-up")
        log.info(
            "replicas: %s joins in namespace %s (lease %s)",
            self.identity,
            s.namespace,
            s.lease_name,
        )

    async def step_down(self) -> None:
        """Stop campaigning: stop leading at once and release the Lease, so another
        replica takes over at its next poll (a rolling restart). Idempotent."""
        if self._blocks is not None:
            await self._blocks.elector.aclose()

    async def on_shutdown(self, _: object) -> None:
        await self.step_down()

    async def aclose(self) -> None:
        """After the models are shut down: stop publishing (the demand Lease is deleted,
        so the leader drops this replica at once) and watching. Idempotent."""
        await self.step_down()
        await self._tasks.aclose()
        if self._blocks is not None:
            await self._blocks.demand.aclose()
            await self._blocks.watcher.aclose()
            await self._blocks.cluster.aclose()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- what the models see (activator.model.seams.Replicas) ------------------------------------

    def leading(self) -> bool:
        return self._blocks is not None and self._blocks.elector.is_leader

    def changed(self, name: str, *, state: str, error: str | None) -> None:
        self._demand_changed.set()
        self._models_changed.notify()
        if self.leading():
            self._b.publisher.publish(name, state, error=error)

    async def drained_elsewhere(self, name: str) -> None:
        published = self._b.publisher.models.get(name)
        epoch = published.epoch if published is not None else 0
        changes = self._b.cluster.changes
        while True:
            seen = changes.count
            if drained_everywhere(
                self._b.cluster.reports(),
                name,
                epoch=epoch,
                now=time.monotonic(),
                lease_duration=self.settings.lease_duration,
            ):
                return
            await changes.wait(seen)

    # -- what the pools see (activator.fleet.pool.Coordinator) ---------------------------------

    def deciding(self) -> bool:
        return self.leading() and self._reconciled_term == self._b.elector.term

    def merged(self, views: Sequence[ModelView]) -> list[ModelView]:
        return merge_views(
            views,
            self._b.cluster.view().models,
            unknown=self.demand_unknown(),
            now=time.monotonic(),
        )

    @property
    def _evidence_age(self) -> float:
        # Two heartbeats, and a second for the watch to deliver them.
        return 2 * self.settings.retry_period + 1.0

    def follow(self, models: Sequence[Model]) -> float | None:
        """Each model toward the leader's intent. Nothing while this replica leads (and
        reconciles) or before its own start-up reconcile is done."""
        if self.leading() or not self._started.is_set():
            return None
        wake_at: float | None = None
        now = time.monotonic()
        for model in models:
            intent = self._b.watcher.models.get(model.name)
            if intent is None:
                continue  # no word from a leader yet: keep what we found
            if self._seen.get(model.name) != intent.epoch:
                # Applied below, synchronously: from now on it holds what the intent says.
                self._seen[model.name] = intent.epoch
                self._demand_changed.set()
            self._note_failures(model, intent)
            event = follow_event(model.state, intent.state, probing=model.transition_running)
            if model.state == "ready":
                self._probes.pop(model.name, None)
            if event is None:
                continue
            if event == "probe":
                probes = self._probes.get(model.name)
                key = (intent.by, intent.epoch)
                if probes is None or probes.key != key:
                    probes = self._probes[model.name] = _Probes(key)
                if now < probes.next_at:
                    wake_at = probes.next_at if wake_at is None else min(wake_at, probes.next_at)
                    continue
                probes.attempts += 1
                probes.next_at = now + probe_backoff(
                    probes.attempts, base=self.settings.retry_period
                )
            model.follow(event, reason=f"{intent.state}, decided by {intent.by or 'the leader'}")
        return wake_at

    def _note_failures(self, model: Model, intent: ModelIntent) -> None:
        """A failed start on the leader fails what this replica holds for the model."""
        seen = self._failures.get(model.name)
        self._failures[model.name] = intent.failures
        if seen is None or intent.failures <= seen:
            return
        failed = model.fail_held(
            f"model {model.name!r} failed to start: {intent.error or 'no reason given'} "
            f"(decided by {intent.by or 'the leader'})"
        )
        if failed:
            log.warning(
                "model=%s the leader failed to start it: %d held requests failed",
                model.name,
                failed,
            )

    # -- roles ----------------------------------------------------------------------------

    def _leadership(self, event: Leadership) -> None:
        """The elector's subscriber (synchronous): promotion and demotion."""
        if event.leader is not None and event.leader != self._holder:
            if self._holder is not None:
                self._metrics.leader_changes.labels(replica=self.identity).inc()
            self._holder = event.leader
        if event.is_leader and not self._leading:
            self._leading = True
            self._metrics.leader.labels(replica=self.identity).set(1)
            self._promotion = self._tasks.spawn(self._promote(event.term), name="ha-promote")
        elif not event.is_leader and self._leading:
            self._leading = False
            self._metrics.leader.labels(replica=self.identity).set(0)
            if self._promotion is not None:
                self._promotion.cancel()
            log.warning("replicas: %s no longer leads (%s): following", self.identity, event.reason)
            for model in self._registry:
                model.follow("demoted")
        self._kick()

    async def _promote(self, term: int) -> None:
        """Reconcile every model from the API, then decide."""
        await self._started.wait()
        found = await self._discover_all()
        if not (self.leading() and self._b.elector.term == term):
            return
        for model, (known, url) in zip(self._registry, found, strict=True):
            if known:
                model.reconcile(url)
        for model in self._registry:  # the intent of this term: every model, as it is now
            self._b.publisher.publish(model.name, model.state, error=model.last_error)
        self._reconciled_term = term
        log.info(
            "replicas: %s leads (term %d): %d models reconciled from the API; deciding",
            self.identity,
            term,
            sum(known for known, _ in found),
        )
        self._kick()

    async def _start_up(self, ready: ReadyFlag) -> None:
        """Like a new leader, read-only: adopt (probe) what runs, hold the rest; ready
        once those probes are done (or READY_WAIT passed)."""
        try:
            adopted = []
            for model, (known, url) in zip(self._registry, await self._discover_all(), strict=True):
                if known and url is not None and model.reconcile(url):
                    adopted.append(model)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_WAIT):
                    while True:
                        seen = self._models_changed.count
                        if not any(m.state == "starting" for m in adopted):
                            break
                        await self._models_changed.wait(seen)
        finally:
            self._started.set()
            ready.value = True
            self._kick()

    async def _discover_all(self) -> list[tuple[bool, str | None]]:
        async def one(model: Model) -> tuple[bool, str | None]:
            try:
                async with asyncio.timeout(self.settings.renew_deadline):
                    return True, await model.backend.discover()
            except Exception as exc:  # the API failing: the model keeps its state
                log.warning("model=%s cannot be reconciled from the API: %s", model.name, exc)
                return False, None

        return list(await asyncio.gather(*(one(m) for m in self._registry)))

    # -- helpers --------------------------------------------------------------------------

    def _kick(self) -> None:
        for scheduler in self._registry.schedulers:
            scheduler.kick()

    async def _relay(self, source: IntentWatcher | ClusterDemand) -> None:
        """Kick every pool when the leader's intent or someone's demand changes."""
        seen = source.changes.count
        while True:
            seen = await source.changes.wait(seen)
            self._kick()

    def _demand(self) -> dict[str, Demand]:
        """What this replica publishes. Activity is rounded up to the second: written at
        most once a second per model under load, never older than it is."""
        out: dict[str, Demand] = {}
        for model in self._registry:
            view = model.view()
            out[model.name] = Demand(
                in_flight=view.in_flight,
                queued=view.queued,
                oldest_wait=view.oldest_wait,
                last_activity=float(math.ceil(view.last_activity)),
                seen=self._seen.get(model.name),
            )
        return out

    # -- admin ------------------------------------------------------------------------------

    def leader(self) -> str | None:
        """The leader as this replica knows it: itself, else the holder of the leader
        Lease as last watched (or polled)."""
        if self._blocks is None:
            return None
        if self.leading():
            return self.identity
        return self._blocks.watcher.leader or self._blocks.elector.leader

    async def decide_or_forward(
        self, request: web.Request, *, what: str
    ) -> web.StreamResponse | None:
        """An admin action only the leader takes: None when this replica decides (take
        it here), else the leader's answer to it, forwarded (activator.ha.forward).

        Never forwarded: a request that already was (503: the leader changed; retry), one
        that reaches the leader before it has reconciled, or when the leader or its
        address is unknown (409 naming the leader, as without forwarding)."""
        if self.deciding():
            return None
        leader = self.leader()
        hop = request.headers.get(forward.FORWARDED_BY)
        if hop is not None:
            raise forward.NotDecidingHere(
                f"{what} forwarded by {forward.shown(hop)} reached this replica "
                f"({self.identity}), which does not decide (the leader is "
                f"{leader or 'not elected yet'}); not forwarded again: retry",
                param="name",
                retry_after=self.settings.retry_period,
            )
        if leader == self.identity:
            raise Conflict(
                f"this replica ({self.identity}) leads but does not decide yet (it is "
                f"reconciling the models from the API): retry {what} in a moment",
                param="name",
            )
        url = None if leader is None else self._b.cluster.admin_url(leader)
        if leader is None or url is None or self._http is None:
            known = "none elected yet" if leader is None else f"{leader}; its address is unknown"
            raise Conflict(
                f"this replica ({self.identity}) does not decide: {what} is taken by the "
                f"leader ({known}); send it to the leader's pod",
                param="name",
            )
        return await forward.relay(
            self._http,
            request,
            url=url,
            identity=self.identity,
            leader=leader,
            what=what,
            admin_key=self._admin_key(),
        )

    def describe_model(self, model: Model) -> dict[str, Any]:
        """The cluster-wide view of one model, for /admin/models."""
        if self._blocks is None:
            return {}
        return status.describe_model(self, self._blocks, model)

    def describe(self) -> dict[str, Any]:
        """/admin/ha: the election, the replicas heard from, the intent followed."""
        if self._blocks is None:
            return {"identity": self.identity, "started": False}
        return status.describe(self, self._blocks)

    def demand_unknown(self) -> bool:
        """Whether some replica's demand cannot be vouched for now (nothing is idle)."""
        return evidence_unknown(
            self._b.cluster.reports(),
            now=time.monotonic(),
            lease_duration=self.settings.lease_duration,
            evidence_age=self._evidence_age,
        )
