"""Kubernetes backend: a Deployment or StatefulSet scaled 0 <-> 1 through its scale
subresource, observed through shared watches; with replicas.max > 1 also 1 <-> N
(`scale_to`, decided by activator.placement.scaleout) and the pods behind its Service
(`watch_pods`).

What it does and does not own: it scales (never edits the whole workload), reports wake
phases and failure reasons from pods and events, notices other actors (a GitOps revert,
a manual scale-up) and whether the API can be observed at all. Readiness through the URL
is probed by the model lifecycle, and startup_timeout is the lifecycle's too.

Supported kinds: any workload with a `scale` subresource whose pods are selected by
`spec.selector.matchLabels`: Deployment and StatefulSet.

Concurrency: all state below is mutated on the event loop, by the lifecycle's calls (one
at a time) and by informer callbacks (synchronous, never across an await), so there are
no locks. "Our own writes" are told apart from other actors' by resourceVersion: every
PATCH returns the revision it created, and a change to spec.replicas seen at a higher
revision was made by someone else. (resourceVersions are documented as opaque; they are
etcd revisions in every apiserver, and a wrong comparison only costs a log line.)

Its writes (the scale subresource, the pods' deletion costs) are made by one
ScaleWriter (activator.backends.kube.scale), which also holds the fence of several
replicas (activator.ha: `attach_fence`) and says how those writes are fenced and
conditional. Without leadership the backend writes nothing at all: `stop()` (which a
follower's model does not call anyway) only stops following the engine, a revert or a
manual scale-up is left to the leader, and a running workload is one whose spec.replicas
is at least 1 (`discover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping

from activator.backends.base import BackendListener
from activator.backends.kube.calls import Obj
from activator.backends.kube.cluster import KubeCluster, KubeTuning
from activator.backends.kube.informer import Informer
from activator.backends.kube.pods import WorkloadPods
from activator.backends.kube.scale import DELETION_COST, NotLeader, ScaleWriter
from activator.backends.kube.status import event_line, owns_pod_name
from activator.backends.kube.wake import WakeTracker
from activator.config.settings import KubernetesTarget, ModelSettings
from activator.core.errors import BackendError
from activator.placement.routing import PodEndpoint

__all__ = ["DELETION_COST", "KubeCluster", "KubeTuning", "KubernetesBackend", "NotLeader"]

log = logging.getLogger(__name__)

ARGO_FIX = (
    "if Argo CD (or Flux) manages this workload, stop it from reverting the scale: add "
    "ignoreDifferences for group apps, kind {kind}, jsonPointers [/spec/replicas] and "
    "syncOptions [RespectIgnoreDifferences=true] to the Application"
)


class KubernetesBackend:
    kind = "kubernetes"

    def __init__(
        self, model: ModelSettings, *, cluster: KubeCluster, listener: BackendListener
    ) -> None:
        if model.kubernetes is None:
            raise ValueError(f"model {model.name} has no kubernetes target")
        self._model = model.name
        self._target: KubernetesTarget = model.kubernetes
        # Several pods (replicas.max > 1): one that cannot come up while others serve does
        # not fail the model (WakeTracker's `tolerated`).
        self._scaled = model.replicas.max > 1
        self._cluster = cluster
        self._tuning: KubeTuning = cluster.tuning
        self._listener = listener
        self._writer = ScaleWriter(cluster=cluster, target=self._target, model=self._model)
        self._resource = self._writer.resource
        self._where = self._writer.where
        self._wanted = False
        self._wake: WakeTracker | None = None
        self._replicas: int | None = None  # spec.replicas as last seen
        self._lines: deque[str] = deque(maxlen=self._tuning.log_lines)
        self._unreachable: set[str] = set()
        self._informers: dict[str, Informer] = {}
        self._podset = WorkloadPods(
            cluster=cluster, target=self._target, informer=lambda: self._informers.get("pods")
        )
        self._unsubscribe: list[Callable[[], None]] = []
        self._restore_task: asyncio.Task[None] | None = None

    def attach_fence(self, fence: Callable[[], float]) -> None:
        """Several replicas: `fence()` is how long this replica's leadership is still
        guaranteed (LeaderElector.valid_for; 0 when it does not lead). The backend writes
        only while it is above 0, and conditionally (activator.backends.kube.scale)."""
        self._writer.fence = fence

    def _acting(self) -> bool:
        """Whether this replica may write: the only one, or the leader right now."""
        return self._writer.acting()

    # -- the Backend interface ---------------------------------------------------------

    async def discover(self) -> str | None:
        await self._ensure_watching()
        workload = await self._writer.read_workload()
        self._observe_workload(workload)
        spec, status = workload.get("spec") or {}, workload.get("status") or {}
        replicas, ready = int(spec.get("replicas") or 0), int(status.get("readyReplicas") or 0)
        # With several replicas, spec.replicas >= 1 alone is running: a leader may have
        # died between its scale-up and the pod's creation, and the next one finishes it.
        if replicas >= 1 and (ready >= 1 or self._pods() or self._writer.fence is not None):
            log.info(
                "kubernetes: %s %s already running (replicas=%d ready=%d): adopting",
                self._model,
                self._where,
                replicas,
                ready,
            )
            self._begin_wake()
            self._refresh_pods()
            return self._target.url
        return None

    async def start(self) -> str:
        await self._ensure_watching()
        self._begin_wake()
        scale = await self._writer.read_scale()
        replicas = int((scale.get("spec") or {}).get("replicas") or 0)
        if replicas >= 1:
            log.info(
                "kubernetes: %s %s already at replicas=%d; waiting for it",
                self._model,
                self._where,
                replicas,
            )
        elif await self._scale_to(1, read=scale):
            self._listener.backend_phase("scale_requested")
            self._line(f"scaled {self._where} to 1")
        self._refresh_pods()
        return self._target.url

    async def stop(self) -> None:
        self._end_wake()
        await self._cancel_restore()
        if not self._acting():
            return  # another replica leads: it scales; this one only stops following it
        await self._ensure_watching()
        if await self._scale_to(0):
            self._line(f"scaled {self._where} to 0")
        try:
            async with asyncio.timeout(self._tuning.stop_timeout):
                await self._podset.wait_gone()
        except TimeoutError:
            names = ", ".join(sorted(p["metadata"]["name"] for p in self._pods()))
            raise BackendError(
                f"{self._where}: pods still present {self._tuning.stop_timeout:g}s after "
                f"scaling to 0: {names or '(per the API)'}"
            ) from None
        log.info("kubernetes: %s %s stopped: no pods left", self._model, self._where)

    def place(self, gpus: tuple[int, ...]) -> None:
        """The device plugin places the pod (a shared GPU: docs/pools.md); the pool's
        memory accounting is what keeps the footprints within the GPU."""

    def serving(self) -> bool:
        # While the API cannot be observed the cache may be stale: the URL probe decides.
        return bool(self._podset.ready) or bool(self._unreachable)

    @property
    def keep_on_shutdown(self) -> bool:
        return self._cluster.settings.on_shutdown == "keep"

    def log_tail(self) -> list[str]:
        return list(self._lines)

    async def aclose(self) -> None:
        if self._wake is not None:
            self._wake.close()
        await self._cancel_restore()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()

    # -- scale-out (replicas.max > 1; activator.placement.scaleout decides) -----------

    @property
    def replicas(self) -> int | None:
        """spec.replicas as last seen or written (None before the workload was read)."""
        return self._replicas

    async def scale_to(self, replicas: int) -> bool:
        """Scale the running workload to `replicas` (1 or more): a conditional write (the
        scale's resourceVersion as read; a conflict is read and decided again), made only
        while this replica may write, and not made when spec.replicas is already that.
        Whether it wrote. Raises NotLeader without leadership, BackendError when the API
        refuses."""
        if replicas < 1:
            raise ValueError("scale_to takes 1 or more replicas; stop() scales to 0")
        if not self._acting():
            raise NotLeader(f"{self._where}: not scaled to {replicas}: this replica does not lead")
        await self._ensure_watching()
        wrote = await self._writer.scale_fenced(replicas, read=None)
        self._replicas = replicas  # written, or read to be so already
        if wrote:
            self._line(f"scaled {self._where} to {replicas}")
        return wrote

    def watch_pods(
        self, on_change: Callable[[tuple[PodEndpoint, ...]], None]
    ) -> Callable[[], None]:
        """Call `on_change(pods)` with the pods behind the model's Service (its
        EndpointSlices, watched once per namespace for every model) now if known and
        whenever they change. Returns the unsubscribe function."""
        return self._podset.watch_service(on_change)

    async def pods_synced(self) -> None:
        """Until the pods behind the Service were listed once; RBAC errors (no list or
        watch on endpointslices in discovery.k8s.io) raise at once."""
        await self._podset.service_synced()

    async def prefer_deletion(self, costs: Mapping[str, int]) -> None:
        """Before a scale-down: annotate the Deployment's pods with their cost (requests
        in flight) as controller.kubernetes.io/pod-deletion-cost, so its ReplicaSet
        deletes the least loaded first. Best effort: a failed write is logged and the
        scale-down goes on. Nothing for a StatefulSet (it deletes its highest ordinal)
        or without leadership."""
        await self._writer.prefer_deletion(costs, pods=self._pods())

    async def _scale_to(self, replicas: int, *, read: Obj | None = None) -> bool:
        """Scale (fenced and conditional with several replicas); whether it wrote."""
        wrote = await self._writer.scale(replicas, read=read)
        if wrote:
            self._replicas = replicas
        return wrote

    # -- watches -------------------------------------------------------------------------

    async def _ensure_watching(self) -> None:
        """Subscribe to the shared informers once and wait for their first list, bounded
        by the request timeout; RBAC and other lasting errors fail at once."""
        if not self._informers:
            ns = self._target.namespace
            for resource in (self._resource, "pods", "events"):
                informer = self._cluster.informer(resource, ns)
                self._informers[resource] = informer
                self._unsubscribe.append(informer.subscribe(self))
                # Catch up with what the informer already holds (another model's backend
                # may have started it long ago).
                for obj in list(informer.objects.values()):
                    self.informer_event(resource, "ADDED", obj)
        try:
            async with asyncio.timeout(self._cluster.settings.request_timeout):
                for informer in self._informers.values():
                    await informer.wait_synced()
        except TimeoutError:
            failing = [i for i in self._informers.values() if not i.synced.is_set()]
            reason = failing[0].last_error if failing else None
            raise BackendError(
                f"{self._where}: cannot observe the workload: "
                f"{reason or 'the Kubernetes API did not answer'}"
            ) from None

    def informer_reachable(self, resource: str, reachable: bool) -> None:
        was_unknown = bool(self._unreachable)
        if reachable:
            self._unreachable.discard(resource)
        else:
            self._unreachable.add(resource)
        if was_unknown != bool(self._unreachable):
            unknown = bool(self._unreachable)
            log.warning(
                "kubernetes: %s %s: API %s",
                self._model,
                self._where,
                "unreachable: state unknown" if unknown else "reachable again",
            )
            self._line("Kubernetes API unreachable" if unknown else "Kubernetes API reachable")
            self._listener.backend_unknown(unknown)

    def informer_event(self, resource: str, event_type: str, obj: Obj) -> None:
        if resource == self._resource:
            if obj.get("metadata", {}).get("name") == self._target.name:
                self._workload_event(event_type, obj)
        elif resource == "pods":
            if self._podset.ours(obj):
                self._pod_event(event_type, obj)
        elif resource == "events":
            self._event_event(obj)

    # -- the workload: reverts and manual scale-ups ------------------------------------------

    def _observe_workload(self, obj: Obj) -> tuple[int | None, int]:
        previous = self._replicas
        self._replicas = int((obj.get("spec") or {}).get("replicas") or 0)
        labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if self._podset.select(labels):
            self._refresh_pods()
        return previous, self._replicas

    def _workload_event(self, event_type: str, obj: Obj) -> None:
        if event_type == "DELETED":
            self._line(f"{self._where} was deleted")
            if self._wanted:
                self._fail("deleted", f"{self._where} was deleted while the model is wanted")
            self._replicas = None
            return
        previous, replicas = self._observe_workload(obj)
        if previous is None or previous == replicas or self._writer.own(obj):
            return  # first sight, a status-only update, or our own write
        if not self._acting():
            return  # the leader's write, or one it deals with: not ours to fight or adopt
        self._line(f"{self._where}: replicas {previous} -> {replicas} (by another client)")
        if self._wanted and replicas == 0:
            self._reverted()
        elif not self._wanted and previous == 0 and replicas >= 1:
            log.info(
                "kubernetes: %s %s scaled to %d by someone else: adopting",
                self._model,
                self._where,
                replicas,
            )
            self._begin_wake()
            self._listener.backend_appeared()

    def _reverted(self) -> None:
        if self._podset.ready:
            # It was serving: what follows is a new wake (its phases are observed again).
            self._rewake()
        wake = self._wake or self._begin_wake()
        wake.reverts += 1
        log.warning(
            "kubernetes: %s %s: replicas set to 0 by another client while the model is "
            "wanted (revert %d); scaling up again. Fix: %s",
            self._model,
            self._where,
            wake.reverts,
            ARGO_FIX.format(kind=self._target.kind),
        )
        self._listener.backend_reverted()
        if wake.reverts > self._tuning.revert_limit:
            self._fail(
                "reverts",
                (
                    f"{self._where}: replicas reverted to 0 {wake.reverts} times by another "
                    f"controller; {ARGO_FIX.format(kind=self._target.kind)}"
                ),
            )
            return
        if self._restore_task is None or self._restore_task.done():
            self._restore_task = asyncio.create_task(
                self._restore(wake.reverts), name=f"kube-restore-{self._model}"
            )
            self._restore_task.add_done_callback(self._restore_done)

    async def _restore(self, attempt: int) -> None:
        # Backoff grows with each revert in this wake: a GitOps controller that syncs on a
        # loop is not fought at full speed. Bounded by retry.max_wait.
        retry = self._tuning.retry
        delay = min(retry.max_wait, retry.initial * 2 ** (attempt - 1))
        await asyncio.sleep(random.uniform(0, delay))
        if not self._wanted or not self._acting():
            return
        try:
            await self._scale_to(1)
        except BackendError as exc:
            self._fail(
                "restore", f"{self._where}: replicas reverted to 0 and could not be restored: {exc}"
            )
            return
        self._line(f"scaled {self._where} back to 1 after a revert")

    def _restore_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kubernetes: %s restore task died", self._model, exc_info=task.exception())

    async def _cancel_restore(self) -> None:
        task, self._restore_task = self._restore_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- pods: phases and failures -------------------------------------------------------

    def _pods(self) -> list[Obj]:
        return self._podset.all()

    def _pod_event(self, event_type: str, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        was_serving = bool(self._podset.ready)
        if event_type == "DELETED":
            self._podset.deleted(name)
            self._line(f"pod {name} deleted")
            if self._wake is not None:
                self._wake.pod_deleted(name)
            self._check_lost(was_serving, f"pod {name} was deleted")
            return
        view, new = self._podset.seen(pod)
        if new:
            self._line(view.summary)
        self._check_lost(
            was_serving,
            f"pod {name} is terminating" if view.terminating else f"pod {name} is not Ready",
        )
        if self._wake is not None:
            self._wake.assess_pod(pod)

    def _check_lost(self, was_serving: bool, reason: str) -> None:
        """After a pod change: if the last Ready pod just went while the model is wanted,
        report the loss (the ReplicaSet, the revert logic or the node coming back bring
        one again; a pod that cannot come back is then reported as a failure)."""
        if not (was_serving and not self._podset.ready and self._wanted):
            return
        log.warning(
            "kubernetes: %s %s: no Ready pod left (%s); requests are held until one is",
            self._model,
            self._where,
            reason,
        )
        self._line(f"no Ready pod left: {reason}")
        self._rewake()
        self._listener.backend_lost(reason)

    def _refresh_pods(self) -> None:
        if self._wake is not None:
            self._wake.refresh()

    def _fail(self, key: str, reason: str) -> None:
        log.warning("kubernetes: %s %s: %s", self._model, self._where, reason)
        if self._wake is not None:
            self._wake.fail(key, reason)
        else:
            self._line(f"failed: {reason}")
            self._listener.backend_failed(reason)

    def _event_event(self, event: Obj) -> None:
        """Events of the workload, its ReplicaSet and its pods: to the log tail, and pod
        events to the wake (scheduling verdicts, pulls)."""
        involved = event.get("involvedObject") or {}
        kind, name = involved.get("kind"), str(involved.get("name") or "")
        pod = self._podset.cached(name)
        if kind == "Pod":
            ours = (
                self._podset.ours(pod)
                if pod is not None
                else owns_pod_name(self._target.kind, self._target.name, name)
            )
        else:
            ours = name == self._target.name or (
                kind == "ReplicaSet" and name.startswith(f"{self._target.name}-")
            )
        if not ours:
            return
        self._line(event_line(event))
        if kind == "Pod" and self._wake is not None:
            self._wake.note_event(event, pod)

    # -- helpers -------------------------------------------------------------------------

    def _begin_wake(self) -> WakeTracker:
        self._wanted = True
        if self._wake is not None:
            self._wake.close()
        self._wake = WakeTracker(
            model=self._model,
            listener=self._listener,
            scheduling_grace=self._tuning.scheduling_grace,
            pods=self._pods,
            line=self._line,
            tolerated=self._other_pods_serve,
        )
        return self._wake

    def _other_pods_serve(self, pod: str) -> bool:
        """Whether a failure of `pod` leaves the model serving: it has several pods, and
        another one is Ready."""
        return self._scaled and bool(self._podset.ready - {pod})

    def _rewake(self) -> None:
        """A new wake after the engine was lost: phases are observed again; reverts keep
        counting (a controller that keeps reverting is fought only `revert_limit` times)."""
        reverts = self._wake.reverts if self._wake is not None else 0
        self._begin_wake().reverts = reverts

    def _end_wake(self) -> None:
        self._wanted = False
        if self._wake is not None:
            self._wake.close()
            self._wake = None

    def _line(self, text: str) -> None:
        self._lines.append(text)
