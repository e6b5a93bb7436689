"""A faithful fake Kubernetes API server for tests, on loopback.

`FakeKube` runs a real HTTP server (tests.fakekube.api) in front of an
etcd-like store, with simulated cluster components around it:

- workload controllers and a kubelet (fakekube.kubelet): spec.replicas N -> N pods, each
  running a stand-in engine process on its own loopback pod IP (fakekube.ipam), scaled
  down in the ReplicaSet's order (fakekube.replicaset); GPU pods wait for a GPU, shared
  only with device-plugin time-slicing (fakekube.devices);
- Services, the EndpointSlice controller (fakekube.endpoints) and kube-proxy
  (fakekube.proxy): a workload's `url` is its Service address, balanced over ready pods;
- Leases (fakekube.leases, fakekube.writes) with the real API's optimistic concurrency,
  and a log of every write to measure failover;
- per-client identities and faults (fakekube.faults): fail, hang or reset requests, 410
  watches, partition one client from the API.

It writes a kubeconfig so clients connect to it exactly as to a cluster:

    async with FakeKube(gpus=1) as kube:
        coder = kube.add_workload("coder-chat", namespace="serving", gpu=True)
        settings = KubernetesSettings(kubeconfig=kube.kubeconfig)
        ...  # coder.url: the Service address, routable once a pod is Ready
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import web

from tests.fakekube.api import (
    DEFAULT_CLIENT,
    ApiState,
    RequestRecord,
    build_app,
    reset_streams,
    set_replicas,
)
from tests.fakekube.devices import GpuPool, node_object
from tests.fakekube.endpoints import (
    SERVICE_NAME,
    Address,
    EndpointsController,
    service_object,
)
from tests.fakekube.faults import Faults, PartitionMode, Rule
from tests.fakekube.ipam import PodNetwork
from tests.fakekube.kubelet import NODE, Autoscaler, Kubelet, PodPlan, Workload
from tests.fakekube.leases import LeaseLog, LeaseRecord, Takeover, format_micro_time
from tests.fakekube.proxy import KubeProxy, usable_endpoints
from tests.fakekube.store import ABORT, BOOKMARK, CLOSE, Obj, Store

__all__ = [
    "Address",
    "FakeKube",
    "LeaseRecord",
    "PodPlan",
    "RequestRecord",
    "Takeover",
    "Workload",
]

Kind = Literal["Deployment", "StatefulSet"]
RESOURCES: dict[str, str] = {"Deployment": "deployments", "StatefulSet": "statefulsets"}


def free_port() -> int:
    """A loopback port that was free a moment ago (the engine binds it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


ZONE = "fake-zone-a"


class FakeKube:
    def __init__(
        self,
        *,
        gpus: int | None = None,
        gpu_sharing: int = 1,
        endpoint_delay: float = 0.0,
        pod_cidr: str | None = None,
        bookmark_interval: float = 1.0,
        history_limit: int = 10_000,
    ) -> None:
        """gpus: GPUs of the simulated node (None = unlimited); pods of workloads added
        with gpu=True stay Pending (FailedScheduling) until one is free, and hold it
        until deleted (asleep or not). gpu_sharing: device-plugin time-slicing replicas
        per GPU (2: two GPU pods share each GPU). endpoint_delay: seconds from a pod
        change to its EndpointSlice update (and so to kube-proxy routing it).
        pod_cidr: the node's pod network in 127.0.0.0/8 (default: a random /24)."""
        self.store = Store(history_limit=history_limit)
        self.faults = Faults()
        self.gpus = GpuPool(gpus, sharing=gpu_sharing)
        self.network = PodNetwork(cidr=pod_cidr)
        self.kubelet = Kubelet(self.store, gpus=self.gpus, network=self.network)
        self.leases = LeaseLog(self.store)
        self.endpoints = EndpointsController(self.store, delay=endpoint_delay, zone=ZONE)
        self.proxy = KubeProxy(self.store)
        self._kubeconfigs: dict[str, str] = {}
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
        self.kubeconfig = self._write_kubeconfig(DEFAULT_CLIENT, self._state.token)
        self.store.create("nodes", node_object(NODE, gpus=self.gpus, zone=ZONE))

    def _write_kubeconfig(self, client: str, token: str) -> str:
        assert self._tmp is not None, "start() first"
        path = Path(self._tmp.name) / f"kubeconfig-{client}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": client, "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": client}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        self._kubeconfigs[client] = str(path)
        return str(path)

    def kubeconfig_for(self, client: str) -> str:
        """A kubeconfig with a token of its own: requests made with it are recorded
        under `client`, and faults can single it out (partition, fail_next(client=)).
        The default `kubeconfig` is the client "activator"."""
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", client) is None:
            raise ValueError(f"client name {client!r}: letters, digits, '.', '_', '-' only")
        if client not in self._kubeconfigs:
            token = secrets.token_hex(16)
            self._state.clients[token] = client
            self._write_kubeconfig(client, token)
        return self._kubeconfigs[client]

    async def aclose(self) -> None:
        # Order: release hung requests and end watch streams so the server's shutdown does
        # not wait on them, then the Service proxies, then engines, then the server.
        self.faults.release.set()
        self.store.broadcast(CLOSE)
        self.endpoints.close()
        await self.proxy.aclose()
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
        """Create a Deployment/StatefulSet (as the reference platform writes them:
        Recreate, selector app=name) and its Service (`port`, default a free one: the
        returned Workload's url). engine=False: pods run no process (for tests of the API alone)."""
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
            spec["podManagementPolicy"] = "Parallel"  # pods start together, not in order
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
        if self.store.get("services", namespace, name) is None:
            self.store.create(
                "services",
                service_object(name, namespace=namespace, port=workload.port, selector=labels),
            )
            self.proxy.add(namespace=namespace, name=name, port=workload.port)
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
        self,
        name: str,
        *,
        oom: bool = False,
        pod: str | None = None,
        namespace: str = "serving",
        kind: Kind = "Deployment",
    ) -> None:
        """The running engines die now (OOMKilled when oom=True): every pod's, or only
        `pod`'s. The pod then stays in CrashLoopBackOff (the fake does not restart)."""
        workload = self.workload(name, namespace=namespace, kind=kind)
        self.kubelet.kill_engine(workload, oom=oom, pod=pod)

    # -- API faults ------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        verb: str | None = None,
        resource: str | None = None,
        client: str | None = None,
    ) -> None:
        """The next `count` matching requests answer `status` (500, 503, 409, 429...)."""
        self.faults.add(Rule("status", verb, resource, count, status, client=client))

    def hang_next(
        self,
        count: int = 1,
        *,
        verb: str | None = None,
        resource: str | None = None,
        client: str | None = None,
    ) -> None:
        """The next `count` matching requests never answer (the client must time out)."""
        self.faults.add(Rule("hang", verb, resource, count, client=client))

    def reset_next(
        self,
        count: int = 1,
        *,
        verb: str | None = None,
        resource: str | None = None,
        client: str | None = None,
    ) -> None:
        """The next `count` matching requests have their connection reset. aiohttp
        clients repeat an idempotent request once after a disconnect: a GET needs 2."""
        self.faults.add(Rule("reset", verb, resource, count, client=client))

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

    def partition(self, client: str, *, mode: PartitionMode = "hang") -> None:
        """Cut `client` (see kubeconfig_for) off the API until heal(client); others are
        untouched. "hang": its requests never answer and are never applied (reset at the
        heal), its watch streams stall and resume after the heal. "refuse": its
        connections are reset at once, open watch streams included."""
        self.faults.partition(client, mode)
        if mode == "refuse":
            reset_streams(self._state, client)

    def heal(self, client: str) -> None:
        self.faults.heal(client)

    # -- pods, Services and routing --------------------------------------------------

    def _pod_owner(self, pod: str, namespace: str) -> Workload:
        for workload in self.kubelet.workloads.values():
            if workload.namespace == namespace and pod in workload.pods:
                return workload
        raise KeyError(f"no pod {namespace}/{pod}")

    def delete_pod(
        self, pod: str, *, namespace: str = "serving", grace: float | None = None
    ) -> None:
        """kubectl delete pod: it terminates (deletionTimestamp, its grace or `grace`
        seconds) and its controller creates a replacement."""
        self.kubelet.delete_pod(self._pod_owner(pod, namespace), pod, grace=grace)

    def set_pod_ready(self, pod: str, ready: bool, *, namespace: str = "serving") -> None:
        """The pod's readiness probe fails (False) or passes again (True); the engine
        keeps running. Its endpoint follows after endpoint_delay."""
        self.kubelet.set_probe(self._pod_owner(pod, namespace), pod, ok=ready)

    def pod_urls(
        self, name: str, *, namespace: str = "serving", kind: Kind = "Deployment"
    ) -> dict[str, str]:
        """Pod name -> http://<pod IP>:<containerPort>, for pods that have an IP."""
        workload = self.workload(name, namespace=namespace, kind=kind)
        urls = {pod: workload.pod_url(pod) for pod in workload.pods}
        return {pod: url for pod, url in urls.items() if url is not None}

    def add_service(
        self,
        name: str,
        *,
        namespace: str = "serving",
        port: int | None = None,
        selector: dict[str, str] | None = None,
        port_name: str = "http",
        target_port: int | str = "http",
    ) -> str:
        """A Service; without `selector` its endpoints are the test's (set_endpoints),
        e.g. the activator replicas' own Service. Returns its address, which kube-proxy
        balances over its usable endpoints."""
        port = port or free_port()
        self.store.create(
            "services",
            service_object(
                name,
                namespace=namespace,
                port=port,
                selector=selector,
                port_name=port_name,
                target_port=target_port,
            ),
        )
        self.proxy.add(namespace=namespace, name=name, port=port)
        return f"http://127.0.0.1:{port}"

    def set_endpoints(
        self,
        service: str,
        addresses: Sequence[Address | tuple[str, int]],
        *,
        namespace: str = "serving",
    ) -> None:
        """The endpoints of a Service without selector: v1 Endpoints plus their mirrored
        EndpointSlices, e.g. [("127.0.0.1", 8081), Address("127.0.0.1", 8082, ready=False)]."""
        listed = [a if isinstance(a, Address) else Address(*a) for a in addresses]
        self.endpoints.set_endpoints(namespace, service, listed)

    def endpoint_slices(self, service: str, *, namespace: str = "serving") -> list[Obj]:
        return self.store.list(
            "endpointslices",
            namespace,
            lambda s: s["metadata"].get("labels", {}).get(SERVICE_NAME) == service,
        )

    def routable(self, service: str, *, namespace: str = "serving") -> list[tuple[str, int]]:
        """(ip, port) kube-proxy sends new connections of the Service to, right now."""
        svc = self.store.get("services", namespace, service)
        port_name = (svc["spec"].get("ports") or [{}])[0].get("name", "") if svc else ""
        return usable_endpoints(self.endpoint_slices(service, namespace=namespace), port_name)

    def gpu_assignments(self) -> dict[str, int]:
        """Pod name -> index of the physical GPU it holds (a replica of, when shared)."""
        return dict(self.gpus.assignments)

    # -- Leases ----------------------------------------------------------------------

    def lease(self, name: str, *, namespace: str = "serving") -> Obj | None:
        return self.store.get("leases", namespace, name)

    def lease_history(self, name: str, *, namespace: str = "serving") -> list[LeaseRecord]:
        """Every write of the Lease, with its commit time (time.monotonic())."""
        return self.leases.history(name, namespace=namespace)

    def lease_holders(self, name: str, *, namespace: str = "serving") -> list[str | None]:
        return self.leases.holders(name, namespace=namespace)

    def lease_takeovers(self, name: str, *, namespace: str = "serving") -> list[Takeover]:
        return self.leases.takeovers(name, namespace=namespace)

    def put_lease(
        self,
        name: str,
        *,
        holder: str | None,
        namespace: str = "serving",
        duration: int = 15,
        renew_time: datetime | None = None,
        acquire_time: datetime | None = None,
        transitions: int = 0,
    ) -> Obj:
        """Another actor writes the Lease (e.g. one held by a replica that is gone)."""
        now = datetime.now(UTC)
        spec: Obj = {
            "leaseDurationSeconds": duration,
            "acquireTime": format_micro_time(acquire_time or renew_time or now),
            "renewTime": format_micro_time(renew_time or now),
            "leaseTransitions": transitions,
        }
        if holder is not None:
            spec["holderIdentity"] = holder
        if self.store.get("leases", namespace, name) is None:
            return self.store.create(
                "leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": spec,
                },
            )

        def write(obj: Obj) -> None:
            obj["spec"] = spec

        return self.store.update("leases", namespace, name, write)
