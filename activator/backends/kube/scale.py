"""The API writes of one model's Kubernetes backend: its workload's scale subresource
(spec.replicas, and nothing else of the workload) and its pods' deletion costs.

What it owns: the fence (how long this replica's leadership is still guaranteed) and the
resourceVersion of its own last scale write, by which the backend tells its own writes
from other actors' (`own`). The backend (activator.backends.kubernetes) owns everything
observed: the watches, the pods, the wake, reverts and adoption.

Several replicas (activator.ha): the backend gets a fence (`attach_fence`, stored here
as `fence`). Then writes are made only while the fence holds, checked right before each
write, and every scale write is conditional: the PATCH carries the resourceVersion of
the scale it read, a 409 means another writer came first, and the scale is read and
decided again (never a lost update); a write that would change nothing is not made.

It may import activator.core.errors, activator.config.settings and the kube machinery below the
backend (calls, cluster); never activator.backends.kubernetes, which uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from activator.backends.kube.calls import ApiFunction, ConflictError, Obj, Op
from activator.backends.kube.cluster import KubeCluster
from activator.config.settings import KubernetesTarget
from activator.core.errors import BackendError

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# The ReplicaSet deletes pods of a lower cost first when it scales down (Kubernetes 1.22+).
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Conditional scale writes that meet a conflict are read and decided again this often
# before the write fails: each conflict is another writer's success, so a few suffice.
CONFLICT_ATTEMPTS = 5


class NotLeader(BackendError):
    """A write by a replica that does not lead (or no longer does): not made."""


class ScaleWriter:
    """Reads and writes of one workload's scale; one per KubernetesBackend. Called on the
    event loop by the backend, one call at a time (no locks)."""

    def __init__(self, *, cluster: KubeCluster, target: KubernetesTarget, model: str) -> None:
        self._cluster = cluster
        self._target = target
        self._model = model
        self.resource = "statefulsets" if target.kind == "StatefulSet" else "deployments"
        self.where = f"{target.kind} {target.namespace}/{target.name}"
        self._own_rv = 0
        # Several replicas: how long this replica's leadership is still guaranteed
        # (LeaderElector.valid_for; 0 when it does not lead). None: the only replica.
        self.fence: Callable[[], float] | None = None

    def acting(self) -> bool:
        """Whether this replica may write: the only one, or the leader right now."""
        return self.fence is None or self.fence() > 0

    def own(self, obj: Obj) -> bool:
        """Whether `obj` (the workload as watched) is at or before our own last write."""
        return rv(obj) <= self._own_rv

    async def read_workload(self) -> Obj:
        return await self._call("get", self.resource, self._read_fn())

    async def read_scale(self) -> Obj:
        return await self._call("get", f"{self.resource}/scale", self._scale_fn("read"))

    async def scale(self, replicas: int, *, read: Obj | None = None) -> bool:
        """PATCH the scale subresource (a JSON merge patch of spec.replicas only). With a
        fence, conditionally (`read`: the scale already read). Whether it wrote."""
        if self.fence is not None:
            return await self.scale_fenced(replicas, read=read)
        scale = await self._call(
            "patch",
            f"{self.resource}/scale",
            self._scale_fn("patch"),
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        version = rv(scale)
        self._own_rv = max(self._own_rv, version)
        log.info(
            "kubernetes: %s %s scaled to %d (resourceVersion %d)",
            self._model,
            self.where,
            replicas,
            version,
        )
        return True

    async def scale_fenced(self, replicas: int, *, read: Obj | None) -> bool:
        """Several replicas: read the scale, and if it is not `replicas` yet, PATCH it
        with the resourceVersion read, right after checking that this replica still
        leads. A 409: read and decide again. Raises NotLeader without leadership."""
        for _ in range(CONFLICT_ATTEMPTS):
            scale = read or await self.read_scale()
            read = None
            if int((scale.get("spec") or {}).get("replicas") or 0) == replicas:
                return False
            if not self.acting():
                raise NotLeader(
                    f"{self.where}: not scaled to {replicas}: this replica does not lead"
                )
            version = (scale.get("metadata") or {}).get("resourceVersion")
            try:
                written = await self._call(
                    "patch",
                    f"{self.resource}/scale",
                    self._scale_fn("patch"),
                    {"metadata": {"resourceVersion": version}, "spec": {"replicas": replicas}},
                    _content_type=MERGE_PATCH,
                    retry_conflict=False,
                )
            except ConflictError:
                log.info(
                    "kubernetes: %s %s changed since it was read; reading it again",
                    self._model,
                    self.where,
                )
                continue
            new = rv(written)
            self._own_rv = max(self._own_rv, new)
            log.info(
                "kubernetes: %s %s scaled to %d (resourceVersion %d, was %s)",
                self._model,
                self.where,
                replicas,
                new,
                version,
            )
            return True
        raise BackendError(
            f"{self.where}: not scaled to {replicas}: it kept changing under us "
            f"({CONFLICT_ATTEMPTS} conflicts in a row)"
        )

    async def prefer_deletion(self, costs: Mapping[str, int], *, pods: list[Obj]) -> None:
        """Annotate the Deployment's `pods` with their cost as DELETION_COST, best effort
        (KubernetesBackend.prefer_deletion says when and why)."""
        if self.resource != "deployments" or not self.acting():
            return
        namespace = self._target.namespace
        for pod in pods:
            meta = pod.get("metadata") or {}
            name = str(meta.get("name"))
            if name not in costs or meta.get("deletionTimestamp"):
                continue  # unknown to the router (not Ready: deleted first anyway), or going
            value = str(costs[name])
            if (meta.get("annotations") or {}).get(DELETION_COST) == value:
                continue
            try:
                await self._cluster.call(
                    Op(verb="patch", resource="pods", namespace=namespace, name=name),
                    self._cluster.core.patch_namespaced_pod,
                    name,
                    namespace,
                    {"metadata": {"annotations": {DELETION_COST: value}}},
                    _content_type=MERGE_PATCH,
                )
            except BackendError as exc:
                log.warning(
                    "kubernetes: %s %s: pod deletion cost not written (the ReplicaSet picks "
                    "the pods to delete by itself): %s",
                    self._model,
                    self.where,
                    exc,
                )
                return

    # -- API calls -----------------------------------------------------------------------

    def _read_fn(self) -> ApiFunction:
        apps = self._cluster.apps
        if self.resource == "statefulsets":
            return apps.read_namespaced_stateful_set
        return apps.read_namespaced_deployment

    def _scale_fn(self, verb: str) -> ApiFunction:
        kind = "stateful_set" if self.resource == "statefulsets" else "deployment"
        return getattr(self._cluster.apps, f"{verb}_namespaced_{kind}_scale")  # type: ignore[no-any-return]

    async def _call(
        self, verb: str, resource: str, fn: ApiFunction, *args: object, **kwargs: Any
    ) -> Obj:
        op = Op(
            verb=verb, resource=resource, namespace=self._target.namespace, name=self._target.name
        )
        return await self._cluster.call(
            op, fn, self._target.name, self._target.namespace, *args, **kwargs
        )


def rv(obj: Obj) -> int:
    """An object's resourceVersion as a number (0 when missing or not a number)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
