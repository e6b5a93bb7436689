"""Demand sharing through the platform: every replica publishes its per-model demand on a
Lease of its own; the leader watches them all and merges.

A replica's Lease, `activator-replica-<identity>` in activator's namespace:

    metadata:
      labels: {activator.dev/role: replica}
      annotations: {activator.dev/demand: '{"chat":{"in_flight":2,"queued":1,
                    "oldest_wait_age_s":3.2,"last_activity_age_s":0.1}}',
                    activator.dev/admin-url: 'http://10.0.3.7:8080'}  # if known
      ownerReferences: [the replica's Pod]   # garbage-collected with the pod
    spec: {holderIdentity: <identity>, leaseDurationSeconds, renewTime: <heartbeat>}

It is written when the demand changes (at most every write_interval) and on a heartbeat
every retry_period, and deleted on a graceful stop. The leader's ClusterDemand watches
the Leases labelled activator.dev/role=replica and times everything on its own clock: a
replica it has not seen renew for lease_duration is stale, one it has not seen renew
since it started watching is unconfirmed; either makes every model's demand `unknown`
(never idle evidence) while their last reported requests still count. A Lease that is
deleted (graceful stop, pod deleted) drops the replica at once.

Failure modes: a replica cut off from the API cannot publish new demand (its requests
held since then are unknown to the leader until it reconnects; its old ones still
count) and keeps every model from being stopped as idle; a dead pod's Lease goes with
the pod (ownerReference), but a pod that stays Terminating on a lost node keeps its
replica stale, and so every model busy, until the pod object is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from activator.backends.kube.calls import Obj
from activator.backends.kube.cluster import KubeCluster
from activator.backends.kube.informer import Informer
from activator.config.ha import (
    REPLICA_LEASE_PREFIX,
    HaSettings,
    PodOwner,
    default_identity,
    replica_lease_name,
)
from activator.ha import demand as wire
from activator.ha.changes import Changes
from activator.ha.demand import ClusterView, Demand, Freshness, ReplicaReport, Reported
from activator.ha.forward import ADMIN_URL_ANNOTATION, parse_admin_url
from activator.ha.leases import (
    Conflict,
    LeaseClient,
    LeaseError,
    NotFound,
    annotations_of,
    lease_informer,
    micro_time,
    spec_of,
)

log = logging.getLogger(__name__)

ROLE_LABEL = "activator.dev/role"
REPLICA_SELECTOR = f"{ROLE_LABEL}=replica"
DELETE_TIMEOUT = 5.0

DemandSource = Callable[[], Mapping[str, Demand]]


class DemandPublisher:
    """Publishes this replica's demand (`demand()`, read when `changed` is set and on
    every heartbeat) on its own Lease. The only writer of that Lease.

    `changed` is set by the lifecycle whenever a count or an activity time changes; the
    publisher clears it when it reads the demand. Start with `start()`, stop with
    `aclose()` (which deletes the Lease)."""

    def __init__(
        self,
        cluster: KubeCluster,
        *,
        settings: HaSettings,
        demand: DemandSource,
        changed: asyncio.Event,
        identity: str | None = None,
        owner: PodOwner | None = None,
        admin_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.identity = identity or default_identity()
        self.lease_name = replica_lease_name(self.identity)
        self.admin_url = admin_url  # where the others forward admin decisions to us
        self._leases = LeaseClient(cluster.api_client, namespace=settings.namespace)
        self._timeout = min(cluster.settings.request_timeout, settings.renew_deadline)
        self._demand = demand
        self._changed = changed
        self._owner = owner
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._published: dict[str, Demand] | None = None
        self._last_attempt = -float("inf")
        self._failures = 0
        self.writes = 0  # successful writes
        self.written = Changes()  # notified after each successful write
        self.last_error: str | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"demand-publisher-{self.lease_name}")
            self._task.add_done_callback(self._died)
        return self._task

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("demand publisher: the loop died", exc_info=task.exception())

    async def aclose(self, *, delete: bool = True) -> None:
        """Stop publishing; delete the Lease (bounded; the leader then drops this
        replica at once instead of after lease_duration). Safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if delete:
            try:
                await self._leases.delete(
                    self.lease_name, within=min(self._timeout, DELETE_TIMEOUT)
                )
            except NotFound:
                pass
            except LeaseError as exc:
                log.info("demand publisher: could not delete %s: %s", self.lease_name, exc)

    async def run(self) -> None:
        """Publish until cancelled; an API failure costs one attempt (retried at the next
        heartbeat), never the loop."""
        while True:
            self._changed.clear()  # what is read now covers every change so far
            current = dict(self._demand())
            now = self._clock()
            heartbeat = time.monotonic() >= self._last_attempt + self.settings.retry_period
            if heartbeat or current != self._published:
                self._last_attempt = time.monotonic()
                try:
                    await self._write(current, now=now)
                except LeaseError as exc:
                    self._failed(exc)
                except Exception:  # a bad demand value must not end the heartbeat
                    log.exception("demand publisher: unexpected error")
            await self._pause()

    async def _pause(self) -> None:
        """Until the next heartbeat, or until the demand changes, but no sooner than
        write_interval after the last write (retry_period after a failed one)."""
        s = self.settings
        heartbeat_at = self._last_attempt + s.retry_period
        earliest = self._last_attempt + (s.retry_period if self._failures else s.write_interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, heartbeat_at - time.monotonic())):
                await self._changed.wait()
        delay = min(earliest, heartbeat_at) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _write(self, current: dict[str, Demand], *, now: float) -> None:
        text = wire.encode(current, now=now)
        annotations = {wire.ANNOTATION: text}
        if self.admin_url is not None:
            annotations[ADMIN_URL_ANNOTATION] = self.admin_url
        metadata: Obj = {"labels": {ROLE_LABEL: "replica"}, "annotations": annotations}
        if self._owner is not None:
            metadata["ownerReferences"] = [self._owner.reference()]
        spec: Obj = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.settings.lease_duration_seconds,
            "renewTime": micro_time(),
        }
        try:
            await self._leases.patch(
                self.lease_name, {"metadata": metadata, "spec": spec}, within=self._timeout
            )
        except NotFound:
            body: Obj = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.lease_name, **metadata},
                "spec": {**spec, "acquireTime": spec["renewTime"]},
            }
            try:
                await self._leases.create(body, within=self._timeout)
            except Conflict:
                return  # created meanwhile (a retry of ours): the next heartbeat patches it
        self._published = current
        self.writes += 1
        if self._failures:
            log.info("demand publisher: %s reaches the API again", self.identity)
        self._failures = 0
        self.last_error = None
        self.written.notify()

    def _failed(self, exc: LeaseError) -> None:
        self._failures += 1
        self.last_error = str(exc)
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "demand publisher: %s: %s", self.identity, exc)


class ClusterDemand:
    """The leader's view of every replica's demand (list+watch of the replica Leases).

    With `local` (this replica's own demand, read at view() time) the replica's own
    Lease is skipped in favour of the live numbers. `changes` is notified when a
    replica's counts change, a replica appears, goes or changes freshness: the pool
    re-decides at once when a follower holds a new request. Start with `start()`; stop
    with `aclose()`."""

    def __init__(
        self,
        cluster: KubeCluster,
        *,
        settings: HaSettings,
        identity: str | None = None,
        local: DemandSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.identity = identity or default_identity()
        self._local = local
        self._clock = clock
        leases = LeaseClient(cluster.api_client, namespace=settings.namespace)
        self.informer: Informer = lease_informer(
            cluster, leases, settings=settings, label_selector=REPLICA_SELECTOR
        )
        self.changes = Changes()
        self._reports: dict[str, ReplicaReport] = {}  # by Lease name
        self._renew_keys: dict[str, object] = {}
        self._states: dict[str, Freshness] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def synced(self) -> asyncio.Event:
        """Set once the first list has been read."""
        return self.informer.synced

    def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.informer.subscribe(self)
            self.informer.start()

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.informer.aclose()

    def reports(self) -> list[ReplicaReport]:
        return list(self._reports.values())

    def admin_url(self, identity: str) -> str | None:
        """The admin address replica `identity` published, if its Lease is here and
        has one (never this replica's own: its Lease is skipped)."""
        for report in self._reports.values():
            if report.identity == identity:
                return report.admin_url
        return None

    def view(self) -> ClusterView:
        """Every replica's demand merged with the local one, on our clock. Cheap."""
        return wire.merge(
            self._reports.values(),
            now=self._clock(),
            lease_duration=self.settings.lease_duration,
            local=self._local() if self._local is not None else None,
            local_identity=self.identity,
        )

    # -- informer subscriber (synchronous, must not raise) ------------------------------

    def informer_event(self, resource: str, event_type: str, obj: Obj) -> None:
        name = str(obj.get("metadata", {}).get("name", ""))
        spec = spec_of(obj)
        holder = spec.get("holderIdentity")
        identity = (
            holder
            if isinstance(holder, str) and holder
            else name.removeprefix(REPLICA_LEASE_PREFIX)
        )
        if self._local is not None and identity == self.identity:
            return  # our own demand comes live from `local`
        old = self._reports.get(name)
        if event_type == "DELETED":
            if self._reports.pop(name, None) is not None:
                self._renew_keys.pop(name, None)
                log.info("cluster demand: replica %s left", identity)
                self._recheck(force=True)
            return
        now = self._clock()
        renew_key = spec.get("renewTime")
        renewed_at = old.renewed_at if old is not None else None
        if old is not None and renew_key != self._renew_keys.get(name):
            renewed_at = now
        self._renew_keys[name] = renew_key
        models: dict[str, Reported] = {}
        annotations = annotations_of(obj)
        text = annotations.get(wire.ANNOTATION)
        if text is not None:
            try:
                models = wire.decode(text)
            except ValueError as exc:
                # Unreadable (another version?): its demand is unknown, never zero.
                log.warning("cluster demand: replica %s: unreadable demand: %s", identity, exc)
                renewed_at = None
        report = ReplicaReport(
            identity=identity,
            models=models,
            received_at=now,
            renewed_at=renewed_at,
            admin_url=parse_admin_url(annotations.get(ADMIN_URL_ANNOTATION)),
        )
        self._reports[name] = report
        if old is None:
            log.info("cluster demand: replica %s seen", identity)
        changed = old is None or _counts(old.models) != _counts(models)
        self._recheck(force=changed)

    def informer_reachable(self, resource: str, reachable: bool) -> None:
        log.info("cluster demand: replica leases %s", "reachable" if reachable else "unreachable")

    # -- freshness ----------------------------------------------------------------------

    def _recheck(self, *, force: bool = False) -> None:
        """Recompute every replica's freshness; notify if anything changed; arm a timer
        for the next replica that would go stale."""
        now = self._clock()
        lease_duration = self.settings.lease_duration
        states = {
            name: wire.freshness(r, now=now, lease_duration=lease_duration)
            for name, r in self._reports.items()
        }
        changed = states != self._states
        self._states = states
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = [
            r.renewed_at + lease_duration
            for name, r in self._reports.items()
            if states[name] == "fresh" and r.renewed_at is not None
        ]
        if due:
            delay = max(0.0, min(due) - now) + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay, self._recheck)
        if changed or force:
            self.changes.notify()


def _counts(models: Mapping[str, Reported]) -> dict[str, tuple[int, int, bool, int | None]]:
    """What a change notification is about: counts, whether someone waits, and the
    intent applied (a drain waits for it). Ages move on every heartbeat and do not wake
    the leader."""
    return {
        m: (r.in_flight, r.queued, r.oldest_wait_age is not None, r.seen) for m, r in models.items()
    }
