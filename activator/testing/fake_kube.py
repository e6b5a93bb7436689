"""A faithful fake Kubernetes API server for tests, on loopback.

`FakeKube` runs a real HTTP server (activator.testing.fakekube.api) in front of an
etcd-like store, with a simulated controller and kubelet (fakekube.kubelet) that turn
replica changes into pods running a stand-in engine process, and a fault-injection API
for everything a real cluster does to a scaler. It writes a kubeconfig so clients connect
to it exactly as to a cluster:

    async with FakeKube() as kube:
        coder = kube.add_workload("coder-chat", namespace="serving")
        settings = KubernetesSettings(kubeconfig=kube.kubeconfig)
        ...  # coder.url is where the engine listens once the pod runs
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import web

from activator.testing.fakekube.api import ApiState, RequestRecord, build_app, set_replicas
from activator.testing.fakekube.faults import Faults, Rule
from activator.testing.fakekube.kubelet import Autoscaler, Kubelet, PodPlan, Workload
from activator.testing.fakekube.store import ABORT, BOOKMARK, CLOSE, Obj, Store

__all__ = ["FakeKube", "PodPlan", "RequestRecord", "Workload"]

Kind = Literal["Deployment", "StatefulSet"]
RESOURCES: dict[str, str] = {"Deployment": "deployments", "StatefulSet": "statefulsets"}


def free_port() -> int:
    """A loopback port that was free a moment ago (the engine binds it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeKube:
    def __init__(
        self,
        *,
        gpus: int | None = None,
        bookmark_interval: float = 1.0,
        history_limit: int = 10_000,
    ) -> None:
        """gpus: GPU capacity of the simulated node pool (None = unlimited); pods of
        workloads added with gpu=True stay Pending (FailedScheduling) until one is free."""
        self.store = Store(history_limit=history_limit)
        self.faults = Faults()
        self.kubelet = Kubelet(self.store, gpus=gpus)
        self._state = ApiState(
            store=self.store,
            faults=self.faults,
            token=secrets.token_hex(16),
            on_workload_change=self.kubelet.reconcile,
            bookmark_interval=bookmark_interval,
        )
        self._runner: web.AppRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""
        self.kubeconfig = ""

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(build_app(self._state), shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-kube-")
        path = Path(self._tmp.name) / "kubeconfig"
        path.write_text(yaml.safe_dump(self._kubeconfig_dict()))
        self.kubeconfig = str(path)

    def _kubeconfig_dict(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "activator", "user": {"token": self._state.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "activator"}}],
            "current-context": "fake",
        }

    async def aclose(self) -> None:
        # Order: release hung requests and end watch streams so the server's shutdown does
        # not wait on them, then stop engines, then the server.
        self.faults.release.set()
        self.store.broadcast(CLOSE)
        await self.kubelet.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> FakeKube:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the cluster's contents ----------------------------------------------------------

    def add_workload(
        self,
        name: str,
        *,
        namespace: str = "serving",
        kind: Kind = "Deployment",
        served_model_name: str | None = None,
        replicas: int = 0,
        engine: bool = True,
        gpu: bool = False,
        port: int | None = None,
        plan: PodPlan | None = None,
    ) -> Workload:
        """Create a Deployment/StatefulSet (seed style: Recreate, selector app=name).
        engine=False: pods run no process (for tests of the API alone)."""
        resource = RESOURCES[kind]
        labels = {"app": name}
        spec: Obj = {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "containers": [
                        {
                            "name": "engine",
                            "image": "vllm/vllm-openai:v0.33.0",
                            "ports": [{"containerPort": 8000, "name": "http"}],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}} if gpu else {},
                        }
                    ]
                },
            },
        }
        if kind == "Deployment":
            spec["strategy"] = {"type": "Recreate"}
        else:
            spec["serviceName"] = name
        self.store.create(
            resource,
            {
                "apiVersion": "apps/v1",
                "kind": kind,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "generation": 1,
                    "labels": dict(labels),
                },
                "spec": spec,
                "status": {"observedGeneration": 1},
            },
        )
        workload = Workload(
            resource=resource,
            namespace=namespace,
            name=name,
            served_model_name=served_model_name or name,
            port=port or free_port(),
            engine=engine,
            gpu=gpu,
            plan=plan or PodPlan(),
        )
        self.kubelet.add(workload)
        if replicas:
            self.kubelet.reconcile(resource, namespace, name)
        return workload

    def workload(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> Workload:
        return self.kubelet.workloads[(RESOURCES[kind], namespace, name)]

    def get(self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment") -> Obj:
        obj = self.store.get(RESOURCES[kind], namespace, name)
        assert obj is not None, f"no {kind} {namespace}/{name}"
        return obj

    def replicas(self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment") -> int:
        return int(self.get(name, namespace=namespace, kind=kind)["spec"].get("replicas") or 0)

    def pods(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> list[Obj]:
        workload = self.workload(name, namespace=namespace, kind=kind)
        found = (self.store.get("pods", namespace, n) for n in list(workload.pods))
        return [p for p in found if p is not None]

    def events(self, *, namespace: str = "serving") -> list[Obj]:
        return self.store.list("events", namespace)

    @property
    def requests(self) -> list[RequestRecord]:
        return self._state.requests

    @property
    def max_gpus_in_use(self) -> int:
        return self.kubelet.max_gpus_in_use

    def ready_time(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> float | None:
        """time.monotonic() at which the workload's latest pod turned Ready."""
        prefix = f"{name}-"
        times = [t for pod, t in self.kubelet.ready_times if pod.startswith(prefix)]
        return times[-1] if times else None

    async def wait_until(self, predicate: Callable[[], bool], *, within: float = 30.0) -> None:
        """Wait until `predicate()` holds, re-checking after every write to the store."""
        async with asyncio.timeout(within):
            while not predicate():
                await self.store.next_change().wait()

    # -- other actors: people, GitOps controllers ------------------------------------

    def scale(
        self, name: str, replicas: int, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> Obj:
        """Someone else sets replicas (kubectl scale; Argo CD reverting to the manifest)."""
        resource = RESOURCES[kind]
        obj = set_replicas(self.store, resource, namespace, name, replicas)
        self.kubelet.reconcile(resource, namespace, name)
        return obj

    def delete_workload(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> None:
        self.store.delete(RESOURCES[kind], namespace, name)

    # -- pod behaviour -----------------------------------------------------------------

    def set_plan(
        self, name: str, plan: PodPlan, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> None:
        """How the workload's next pods behave (delays, failures)."""
        self.workload(name, namespace=namespace, kind=kind).plan = plan

    def update_plan(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment", **changes: Any
    ) -> None:
        workload = self.workload(name, namespace=namespace, kind=kind)
        workload.plan = replace(workload.plan, **changes)

    def fail_scheduling(
        self,
        name: str,
        *,
        autoscaler: Autoscaler = None,
        message: str = "0/3 nodes are available: 3 Insufficient "
        "nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No "
        "preemption victims found for incoming pod.",
        namespace: str = "serving",
        kind: Kind = "Deployment",
    ) -> None:
        """Next pods get FailedScheduling, then the autoscaler's verdict: "triggered"
        (a node arrives after plan.provision_delay and the pod schedules), "failed"
        (FailedScaleUp: GCE out of resources), "not_triggered" or None (no autoscaler)."""
        self.update_plan(
            name, namespace=namespace, kind=kind, unschedulable=message, autoscaler=autoscaler
        )

    def fail_image_pull(
        self,
        name: str,
        *,
        error: str = "rpc error: code = NotFound desc = manifest unknown",
        namespace: str = "serving",
        kind: Kind = "Deployment",
    ) -> None:
        self.update_plan(name, namespace=namespace, kind=kind, image_pull_error=error)

    def crash_loop(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> None:
        self.update_plan(name, namespace=namespace, kind=kind, crash="crash_loop")

    def oom_kill(self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment") -> None:
        """Next pods are OOMKilled right after their container starts."""
        self.update_plan(name, namespace=namespace, kind=kind, crash="oom")

    def evict(self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment") -> None:
        """The workload's pods are evicted (node drain); its controller replaces them."""
        self.kubelet.evict(self.workload(name, namespace=namespace, kind=kind))

    def set_pods_ready(
        self, name: str, ready: bool, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> None:
        """The pods' Ready condition (False: their node stopped reporting)."""
        self.kubelet.set_ready(self.workload(name, namespace=namespace, kind=kind), ready=ready)

    def kill_engine(
        self, name: str, *, oom: bool = False, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> None:
        """The running engine dies now (OOMKilled when oom=True)."""
        self.kubelet.kill_engine(self.workload(name, namespace=namespace, kind=kind), oom=oom)

    # -- API faults ------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        verb: str | None = None,
        resource: str | None = None,
    ) -> None:
        """The next `count` matching requests answer `status` (500, 503, 409, 429...)."""
        self.faults.add(Rule("status", verb, resource, count, status))

    def hang_next(
        self, count: int = 1, *, verb: str | None = None, resource: str | None = None
    ) -> None:
        """The next `count` matching requests never answer (the client must time out)."""
        self.faults.add(Rule("hang", verb, resource, count))

    def reset_next(
        self, count: int = 1, *, verb: str | None = None, resource: str | None = None
    ) -> None:
        """The next `count` matching requests have their connection reset. aiohttp
        clients repeat an idempotent request once after a disconnect: a GET needs 2."""
        self.faults.add(Rule("reset", verb, resource, count))

    def forbid(self, verb: str, resource: str) -> None:
        """RBAC denies `verb` on `resource` (e.g. "patch", "deployments/scale")."""
        self.faults.add(Rule("status", verb, resource, None, 403))

    def allow(self, verb: str, resource: str) -> None:
        self.faults.remove(kind="status", verb=verb, resource=resource)

    def break_api(self) -> None:
        """Every request answers 503 until heal_api() (the API server is down)."""
        self.faults.add(Rule("status", None, None, None, 503))

    def heal_api(self) -> None:
        self.faults.remove(kind="status", verb=None, resource=None)

    def gone_next_watches(self, count: int = 1, *, resource: str | None = None) -> None:
        """The next `count` watches get 410 Gone (as an ERROR event, like the apiserver)."""
        self.faults.add(Rule("gone", "watch", resource, count))

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch stream: cleanly (server timeout) or by resetting it."""
        return self.store.broadcast(ABORT if abrupt else CLOSE)

    def send_bookmarks(self) -> int:
        return self.store.broadcast(BOOKMARK)

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410."""
        self.store.compact()
