"""The pods of one model's workload, as the Kubernetes backend sees them.

What it owns: the workload's pod selector (spec.selector.matchLabels, as last seen), the
set of its pods that are Ready and not terminating, the last summary logged per pod, and
a pulse on every pod change (to wait for the pods to be gone without polling). It reads
the shared pod informer and, scaled out (replicas.max > 1), the Service's EndpointSlices
(activator.backends.kube.endpoints, through the cluster). What the changes mean (a wake's
phases, a lost engine, a failure) stays with the backend (activator.backends.kubernetes).

It may import activator.core.errors, activator.placement.routing, activator.config.settings
and the kube machinery below the backend (calls, cluster, informer, status); never
activator.backends.kubernetes, which uses it. Called on the event loop, no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from activator.backends.kube.calls import Obj, Op
from activator.backends.kube.cluster import KubeCluster
from activator.backends.kube.informer import Informer
from activator.backends.kube.status import PodView, labels_match, view_pod
from activator.config.settings import KubernetesTarget
from activator.core.errors import BackendError
from activator.placement.routing import PodEndpoint


class WorkloadPods:
    """One workload's pods: from the pod informer the backend subscribed to (`informer`
    returns it, None before), selected by the workload's labels."""

    def __init__(
        self,
        *,
        cluster: KubeCluster,
        target: KubernetesTarget,
        informer: Callable[[], Informer | None],
    ) -> None:
        self._cluster = cluster
        self._target = target
        self._where = f"{target.kind} {target.namespace}/{target.name}"
        self._informer = informer
        self.selector: dict[str, str] = {}
        # Pods of the workload that are Ready and not terminating: the engine can serve.
        self.ready: set[str] = set()
        self._summaries: dict[str, str] = {}
        self._changed = asyncio.Event()

    def ours(self, obj: Obj) -> bool:
        return labels_match(self.selector, obj)

    def all(self) -> list[Obj]:
        """The workload's pods in the informer's cache (terminating ones included)."""
        informer = self._informer()
        if informer is None:
            return []
        return [p for p in informer.objects.values() if self.ours(p)]

    def cached(self, name: str) -> Obj | None:
        """The pod `name` in the informer's cache, ours or not."""
        informer = self._informer()
        return informer.objects.get(name) if informer is not None else None

    def select(self, labels: Mapping[str, str]) -> bool:
        """Take the workload's selector; whether it changed. Pods seen before the
        workload (separate watches) were not known to be ours: Ready ones count now."""
        if labels == self.selector:
            return False
        self.selector = dict(labels)
        views = [view_pod(p) for p in self.all()]
        self.ready = {v.name for v in views if v.ready and not v.terminating}
        return True

    def deleted(self, name: str) -> None:
        self._pulse()
        self._summaries.pop(name, None)
        self.ready.discard(name)

    def seen(self, pod: Obj) -> tuple[PodView, bool]:
        """A pod added or changed: its view, and whether its summary is new (to log)."""
        self._pulse()
        view = view_pod(pod)
        new = self._summaries.get(view.name) != view.summary
        if new:
            self._summaries[view.name] = view.summary
        if view.ready and not view.terminating:
            self.ready.add(view.name)
        else:
            self.ready.discard(view.name)
        return view, new

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_gone(self) -> None:
        """Until no pod of the workload exists (terminating ones included: the GPU is
        only free once the pod is deleted). The cache is confirmed with one list, since
        a lagging watch could show no pods before it shows the new one."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))
        while True:
            changed = self._changed
            if not self.all():
                listing = await self._cluster.call(
                    Op(verb="list", resource="pods", namespace=self._target.namespace),
                    self._cluster.core.list_namespaced_pod,
                    self._target.namespace,
                    label_selector=selector,
                )
                if not listing.get("items"):
                    return
            # Woken by the next pod event; the timeout only re-confirms if the watch lags.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await changed.wait()

    # -- scaled out: the pods behind the Service -----------------------------------------

    def watch_service(
        self, on_change: Callable[[tuple[PodEndpoint, ...]], None]
    ) -> Callable[[], None]:
        """KubernetesBackend.watch_pods."""
        service = self._target.service_name
        if service is None:
            raise BackendError(
                f"{self._where}: no Service to find its pods by (kubernetes.service)"
            )
        return self._cluster.endpoints.subscribe(
            self._target.namespace,
            service,
            on_change,
            port=self._target.service_port,
            scheme=self._target.url.split("://", 1)[0],
        )

    async def service_synced(self) -> None:
        """KubernetesBackend.pods_synced."""
        await self._cluster.endpoints.synced(
            self._target.namespace, timeout=self._cluster.settings.request_timeout
        )
