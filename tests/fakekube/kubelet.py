"""Simulated workload controller, scheduler, cluster autoscaler and kubelet.

When a workload's replicas go up, one pod per missing replica is created and walks the
path a real GPU pod walks: Pending -> scheduled (or FailedScheduling, with the cluster
autoscaler's verdict; a GPU pod waits for a free GPU of fakekube.devices) -> image
pulled (or ErrImagePull/ImagePullBackOff) -> container running (a stand-in engine
process on the pod's own loopback IP from fakekube.ipam, at the containerPort) -> Ready
once the engine prints READY (or crash loops / OOMKilled). Scaling down picks pods the
way the workload's controller does (fakekube.replicaset), marks them terminating
(deletionTimestamp), stops the engine (SIGTERM, then SIGKILL after the grace), reports
the container terminated and deletes the pod only once the process exited. A deleted pod
(delete_pod) is replaced, as a ReplicaSet replaces it.

Delays here are the simulated world's clock, not test synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

from tests.fakekube.devices import GpuPool
from tests.fakekube.ipam import PodNetwork
from tests.fakekube.replicaset import (
    Candidate,
    replicaset_victims,
    statefulset_victims,
)
from tests.fakekube.store import Obj, Store, now_iso

log = logging.getLogger(__name__)

Autoscaler = Literal["triggered", "failed", "not_triggered"] | None
Crash = Literal["crash_loop", "oom"] | None

IMAGE = "vllm/vllm-openai:v0.33.0"
NODE = "fake-gpu-node-1"


@dataclass(frozen=True, kw_only=True)
class PodPlan:
    """How the next pods of a workload behave. Change it with FakeKube.set_plan()."""

    schedule_delay: float = 0.02
    pull_delay: float = 0.02
    # Extra time between the engine's READY and the pod's Ready condition (probe period).
    ready_delay: float = 0.0
    # A FailedScheduling message: the pod stays Pending until the autoscaler helps.
    unschedulable: str | None = None
    autoscaler: Autoscaler = None
    autoscaler_message: str = ""
    # With autoscaler="triggered": when the new node joins and the pod schedules.
    provision_delay: float = 0.2
    image_pull_error: str | None = None
    crash: Crash = None
    engine_startup_delay: float = 0.0
    engine_never_ready: bool = False
    termination_grace: float = 5.0
    # More of the container's args and env (e.g. vLLM's sleep mode: --enable-sleep-mode
    # and VLLM_SERVER_DEV_MODE=1).
    engine_args: tuple[str, ...] = ()
    engine_env: tuple[tuple[str, str], ...] = ()


@dataclass
class Workload:
    resource: str  # deployments | statefulsets
    namespace: str
    name: str
    served_model_name: str
    port: int
    engine: bool
    gpu: bool
    plan: PodPlan
    container_port: int = 8000
    pods: dict[str, PodSim] = field(default_factory=dict)
    ordinal: int = 0

    @property
    def url(self) -> str:
        """The workload's Service address (fakekube.proxy forwards it to ready pods)."""
        return f"http://127.0.0.1:{self.port}"

    def pod_url(self, pod: str) -> str | None:
        """Where the pod's engine listens, once the pod has an IP."""
        sim = self.pods.get(pod)
        if sim is None or sim.ip is None:
            return None
        return f"http://{sim.ip}:{self.container_port}"


@dataclass
class PodSim:
    name: str
    plan: PodPlan
    task: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    terminating: bool = False
    has_gpu: bool = False
    ready_at: float | None = None  # time.monotonic() when the Ready condition went True
    ip: str | None = None
    created: float = field(default_factory=time.monotonic)
    # The readiness probe's verdict while the engine runs (FakeKube.set_pod_ready).
    probe_ok: bool = True
    engine_ready: bool = False


class Kubelet:
    def __init__(self, store: Store, *, gpus: GpuPool, network: PodNetwork) -> None:
        self._store = store
        self.workloads: dict[tuple[str, str, str], Workload] = {}
        self.gpus = gpus
        self.network = network
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready_times: list[tuple[str, float]] = []  # (pod name, monotonic time of Ready)

    @property
    def gpus_in_use(self) -> int:
        return self.gpus.in_use

    @property
    def max_gpus_in_use(self) -> int:
        return self.gpus.max_in_use

    # -- API -------------------------------------------------------------------------

    def add(self, workload: Workload) -> None:
        self.workloads[(workload.resource, workload.namespace, workload.name)] = workload

    def reconcile(self, resource: str, namespace: str, name: str) -> None:
        """React to a spec change: create or terminate pods to match spec.replicas."""
        workload = self.workloads.get((resource, namespace, name))
        obj = self._store.get(resource, namespace, name)
        if workload is None or obj is None:
            return
        desired = int(obj["spec"].get("replicas") or 0)
        live = [p for p in workload.pods.values() if not p.terminating]
        if desired > len(live):
            self._event(
                workload.namespace,
                workload.name,
                kind=obj["kind"],
                reason="ScalingReplicaSet",
                message=f"Scaled up replica set {workload.name}-7d9f8c6b5 to {desired} "
                f"from {len(live)}",
                component="deployment-controller",
            )
        for _ in range(desired - len(live)):
            self._create_pod(workload, obj)
        for name in self._victims(workload, live, len(live) - desired):
            pod = workload.pods[name]
            pod.terminating = True  # now, so the next reconcile does not count it
            self._spawn(self._terminate(workload, pod), f"fake-kube-terminate-{pod.name}")
        self.sync_status(workload)

    def _victims(self, workload: Workload, live: list[PodSim], count: int) -> list[str]:
        if count <= 0:
            return []
        if workload.resource == "statefulsets":
            return statefulset_victims([p.name for p in live], count)
        candidates = []
        for pod in live:
            obj = self._store.get("pods", workload.namespace, pod.name)
            if obj is not None:
                candidates.append(Candidate(obj, pod.created, pod.ready_at))
        return replicaset_victims(candidates, count)

    def delete_pod(self, workload: Workload, name: str, *, grace: float | None = None) -> None:
        """Someone deletes the pod (kubectl delete pod, an eviction): it terminates with
        its grace (or `grace`), and the workload's controller creates a replacement."""
        pod = workload.pods[name]
        if pod.terminating:
            return
        pod.terminating = True
        self._spawn(self._terminate(workload, pod, grace=grace), f"fake-kube-terminate-{name}")
        self.reconcile(workload.resource, workload.namespace, workload.name)

    def set_probe(self, workload: Workload, name: str, *, ok: bool) -> None:
        """The pod's readiness probe starts failing (ok=False) or passing again: Ready
        follows while the engine runs; the container keeps running either way."""
        pod = workload.pods[name]
        pod.probe_ok = ok
        if pod.engine_ready and not pod.terminating:
            self._set_ready(workload, pod, ok)

    def kill_engine(self, workload: Workload, *, oom: bool, pod: str | None = None) -> None:
        for sim in workload.pods.values():
            if not sim.terminating and pod in (None, sim.name):
                sim.plan = replace(sim.plan, crash="oom" if oom else "crash_loop")
                if sim.process is not None and sim.process.returncode is None:
                    sim.process.kill()

    def evict(self, workload: Workload) -> None:
        """Evict the workload's live pods (node drain, preemption): each is terminated
        and deleted, and the workload's controller replaces it at once."""
        for pod in [p for p in workload.pods.values() if not p.terminating]:
            pod.terminating = True  # so the replacement below is not counted out
            self._pod_event(workload, pod, "Evicted", "The node was drained.", warning=True)
            self._spawn(self._terminate(workload, pod), f"fake-kube-evict-{pod.name}")
        self.reconcile(workload.resource, workload.namespace, workload.name)

    def set_ready(self, workload: Workload, *, ready: bool) -> None:
        """The Ready condition of the workload's live pods, as the node controller sets
        it (False on node loss); the engines keep running."""
        for pod in workload.pods.values():
            if not pod.terminating:
                self._set_ready(workload, pod, ready)

    async def aclose(self) -> None:
        for workload in self.workloads.values():
            for pod in list(workload.pods.values()):
                if pod.task is not None:
                    pod.task.cancel()
        readers = {t for t in self._tasks if t.get_name().startswith(OUTPUT_TASK)}
        for task in self._tasks - readers:
            task.cancel()
        await asyncio.gather(*(self._tasks - readers), return_exceptions=True)
        for workload in self.workloads.values():
            for pod in workload.pods.values():
                await _stop_process(pod, grace=1.0)
        # The engines are gone: their output pipes reach EOF, and the readers end there.
        # Process.wait() returns at the exit, before the pipe is read to its end (Python
        # 3.11): a reader cancelled now could leave the pipe's transport open.
        if readers:
            await asyncio.wait(readers, timeout=1.0)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    # -- internals ---------------------------------------------------------------------

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("fake kube: %s died", t.get_name(), exc_info=t.exception())

        task.add_done_callback(done)

    def _create_pod(self, workload: Workload, obj: Obj) -> None:
        template = obj["spec"]["template"]
        labels = dict(template["metadata"].get("labels", {}))
        if workload.resource == "deployments":
            labels["pod-template-hash"] = "7d9f8c6b5"
            name = f"{workload.name}-7d9f8c6b5-{secrets.token_hex(3)[:5]}"
            owner = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"{workload.name}-7d9f8c6b5",
                "uid": obj["metadata"]["uid"],
            }
        else:
            name = f"{workload.name}-{workload.ordinal}"
            workload.ordinal += 1
            owner = {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "name": workload.name,
                "uid": obj["metadata"]["uid"],
            }
        container = template["spec"]["containers"][0]
        self._store.create(
            "pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": workload.namespace,
                    "labels": labels,
                    "ownerReferences": [{**owner, "controller": True}],
                },
                "spec": {
                    "containers": [container],
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": int(workload.plan.termination_grace),
                },
                "status": {"phase": "Pending", "qosClass": "Burstable"},
            },
        )
        pod = PodSim(name=name, plan=workload.plan)
        workload.pods[name] = pod
        pod.task = asyncio.create_task(self._run_pod(workload, pod), name=f"fake-kube-pod-{name}")

    def _pod_update(self, workload: Workload, pod: PodSim, mutate: object) -> None:
        if self._store.get("pods", workload.namespace, pod.name) is not None:
            self._store.update("pods", workload.namespace, pod.name, mutate)  # type: ignore[arg-type]
        self.sync_status(workload)

    def _event(
        self,
        namespace: str,
        name: str,
        *,
        kind: str,
        reason: str,
        message: str,
        component: str,
        warning: bool = False,
    ) -> None:
        stamp = now_iso()
        self._store.create(
            "events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": namespace},
                "involvedObject": {
                    "kind": kind,
                    "name": name,
                    "namespace": namespace,
                    "apiVersion": "v1" if kind == "Pod" else "apps/v1",
                },
                "reason": reason,
                "message": message,
                "type": "Warning" if warning else "Normal",
                "source": {"component": component},
                "reportingComponent": component,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            },
        )

    def _pod_event(
        self,
        workload: Workload,
        pod: PodSim,
        reason: str,
        message: str,
        *,
        component: str = "kubelet",
        warning: bool = False,
    ) -> None:
        self._event(
            workload.namespace,
            pod.name,
            kind="Pod",
            reason=reason,
            message=message,
            component=component,
            warning=warning,
        )

    async def _run_pod(self, workload: Workload, pod: PodSim) -> None:
        await self._schedule(workload, pod)
        self._sandbox(workload, pod)
        if not await self._pull(workload, pod):
            return
        await self._run_container(workload, pod)

    async def _schedule(self, workload: Workload, pod: PodSim) -> None:
        plan = pod.plan
        message = plan.unschedulable
        if message is None and workload.gpu and not self.gpus.free():
            message = (
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: "
                "0/1 nodes are available: 1 No preemption victims found for incoming pod."
            )
        if message is not None:
            self._unschedulable(workload, pod, message)
            if plan.autoscaler == "triggered":
                self._pod_event(
                    workload,
                    pod,
                    "TriggeredScaleUp",
                    plan.autoscaler_message or "pod triggered scale-up: [{gpu-pool 0->1 (max: 1)}]",
                    component="cluster-autoscaler",
                )
                await asyncio.sleep(plan.provision_delay)
            elif plan.autoscaler is not None:
                reason = "FailedScaleUp" if plan.autoscaler == "failed" else "NotTriggerScaleUp"
                default = (
                    "Node scale up in zones us-central1-a associated with this pod failed: "
                    "GCE out of resources. Pod is at risk of not being scheduled."
                    if plan.autoscaler == "failed"
                    else "pod didn't trigger scale-up: 1 max node group size reached"
                )
                self._pod_event(
                    workload,
                    pod,
                    reason,
                    plan.autoscaler_message or default,
                    component="cluster-autoscaler",
                    warning=True,
                )
                await asyncio.Event().wait()  # stays Pending until deleted
            elif plan.unschedulable is not None:
                await asyncio.Event().wait()
        if workload.gpu:
            # The scheduler retries when capacity frees up (a GPU pod was deleted).
            await self.gpus.acquire(pod.name)
            pod.has_gpu = True
        await asyncio.sleep(plan.schedule_delay)

        def scheduled(obj: Obj) -> None:
            obj["spec"]["nodeName"] = NODE
            obj["status"]["conditions"] = [_cond("PodScheduled", True)]
            obj["status"]["hostIP"] = "127.0.0.1"

        self._pod_update(workload, pod, scheduled)
        self._pod_event(
            workload,
            pod,
            "Scheduled",
            f"Successfully assigned {workload.namespace}/{pod.name} to {NODE}",
            component="default-scheduler",
        )

    def _sandbox(self, workload: Workload, pod: PodSim) -> None:
        """The pod sandbox is up: the network plugin gave it its IP (before any image
        is pulled, so a pod stuck in ImagePullBackOff has one too)."""
        ip = pod.ip = self.network.allocate(port=workload.container_port)

        def addressed(obj: Obj) -> None:
            obj["status"]["podIP"] = ip
            obj["status"]["podIPs"] = [{"ip": ip}]
            obj["status"].setdefault("startTime", now_iso())

        self._pod_update(workload, pod, addressed)

    def _unschedulable(self, workload: Workload, pod: PodSim, message: str) -> None:
        def pending(obj: Obj) -> None:
            obj["status"]["conditions"] = [
                {**_cond("PodScheduled", False), "reason": "Unschedulable", "message": message}
            ]

        self._pod_update(workload, pod, pending)
        self._pod_event(
            workload, pod, "FailedScheduling", message, component="default-scheduler", warning=True
        )

    async def _pull(self, workload: Workload, pod: PodSim) -> bool:
        plan = pod.plan
        self._set_container(workload, pod, {"waiting": {"reason": "ContainerCreating"}})
        self._pod_event(workload, pod, "Pulling", f'Pulling image "{IMAGE}"')
        await asyncio.sleep(plan.pull_delay)
        if plan.image_pull_error is not None:
            detail = f'Failed to pull image "{IMAGE}": {plan.image_pull_error}'
            self._set_container(
                workload, pod, {"waiting": {"reason": "ErrImagePull", "message": detail}}
            )
            self._pod_event(workload, pod, "Failed", detail, warning=True)
            await asyncio.sleep(plan.pull_delay)
            self._set_container(
                workload,
                pod,
                {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{IMAGE}"',
                    }
                },
            )
            self._pod_event(
                workload, pod, "BackOff", f'Back-off pulling image "{IMAGE}"', warning=True
            )
            return False
        self._pod_event(
            workload,
            pod,
            "Pulled",
            f'Successfully pulled image "{IMAGE}" in 1.2s (1.2s including waiting)',
        )
        return True

    async def _run_container(self, workload: Workload, pod: PodSim) -> None:
        plan = pod.plan
        self._pod_event(workload, pod, "Created", "Created container engine")
        if workload.engine:
            pod.process = await self._start_engine(workload, pod)
        self._pod_event(workload, pod, "Started", "Started container engine")

        def running(obj: Obj) -> None:
            obj["status"]["phase"] = "Running"
            obj["status"]["conditions"] = [
                _cond("PodScheduled", True),
                _cond("Initialized", True),
                _cond("ContainersReady", False),
                _cond("Ready", False),
            ]

        self._pod_update(workload, pod, running)
        self._set_container(workload, pod, {"running": {"startedAt": now_iso()}}, started=True)
        if plan.crash == "oom":
            await asyncio.sleep(plan.schedule_delay)
            if pod.process is not None:
                pod.process.kill()
            await self._crashed(workload, pod, reason="OOMKilled", exit_code=137)
            return
        if pod.process is None:
            if plan.crash == "crash_loop":
                await self._crashed(workload, pod, reason="Error", exit_code=1)
                return
            await asyncio.sleep(plan.engine_startup_delay)
            if plan.engine_never_ready:
                await asyncio.Event().wait()
        else:
            exited = asyncio.ensure_future(pod.process.wait())
            ready = asyncio.ensure_future(pod.ready_event.wait())
            try:
                await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                exited.cancel()
            if not pod.ready_event.is_set():
                await self._crashed(
                    workload, pod, reason="Error", exit_code=pod.process.returncode or 1
                )
                return
        await asyncio.sleep(plan.ready_delay)
        pod.engine_ready = True
        self._set_ready(workload, pod, pod.probe_ok)
        if pod.process is not None:
            await pod.process.wait()
            if not pod.terminating:
                # Died while serving (kill_engine): the kubelet reports why.
                reason = "OOMKilled" if pod.plan.crash == "oom" else "Error"
                await self._crashed(
                    workload, pod, reason=reason, exit_code=137 if reason == "OOMKilled" else 1
                )

    async def _start_engine(self, workload: Workload, pod: PodSim) -> asyncio.subprocess.Process:
        plan = pod.plan
        args = [
            sys.executable,
            "-m",
            "activator.testing.fake_engine",
            "--port",
            str(workload.container_port),
            "--host",
            str(pod.ip),
            "--served-model-name",
            workload.served_model_name,
            "--startup-delay",
            str(plan.engine_startup_delay),
        ]
        if plan.crash == "crash_loop":
            args.append("--crash-during-startup")
        if plan.engine_never_ready:
            args.append("--never-ready")
        args.extend(plan.engine_args)
        process = await asyncio.create_subprocess_exec(
            *args,
            env={**os.environ, **dict(plan.engine_env)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._spawn(_read_output(process, pod), f"{OUTPUT_TASK}{pod.name}")
        return process

    async def _crashed(
        self, workload: Workload, pod: PodSim, *, reason: str, exit_code: int
    ) -> None:
        pod.engine_ready = False
        self._set_ready(workload, pod, False)
        self._set_container(
            workload,
            pod,
            {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off 10s restarting failed container=engine pod={pod.name}",
                }
            },
            last_state={
                "terminated": {"reason": reason, "exitCode": exit_code, "finishedAt": now_iso()}
            },
            restarts=1,
        )
        self._pod_event(
            workload,
            pod,
            "BackOff",
            f"Back-off restarting failed container engine in pod {pod.name}",
            warning=True,
        )

    def _set_container(
        self,
        workload: Workload,
        pod: PodSim,
        state: Obj,
        *,
        started: bool = False,
        last_state: Obj | None = None,
        restarts: int = 0,
    ) -> None:
        def mutate(obj: Obj) -> None:
            previous = (obj["status"].get("containerStatuses") or [{}])[0]
            obj["status"]["containerStatuses"] = [
                {
                    "name": "engine",
                    "image": IMAGE,
                    "imageID": "",
                    "ready": False,
                    "restartCount": previous.get("restartCount", 0) + restarts,
                    "started": started,
                    "state": state,
                    "lastState": last_state or previous.get("lastState", {}),
                }
            ]

        self._pod_update(workload, pod, mutate)

    def _set_ready(self, workload: Workload, pod: PodSim, ready: bool) -> None:
        def mutate(obj: Obj) -> None:
            for cond in obj["status"].get("conditions", []):
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond.update(_cond(cond["type"], ready))
            for status in obj["status"].get("containerStatuses", []):
                status["ready"] = ready

        if ready:
            pod.ready_at = time.monotonic()
            self.ready_times.append((pod.name, pod.ready_at))
        self._pod_update(workload, pod, mutate)

    async def _terminate(
        self, workload: Workload, pod: PodSim, *, grace: float | None = None
    ) -> None:
        pod.terminating = True
        grace = pod.plan.termination_grace if grace is None else grace

        def deleting(obj: Obj) -> None:
            obj["metadata"]["deletionTimestamp"] = now_iso()
            obj["metadata"]["deletionGracePeriodSeconds"] = int(grace)

        self._pod_update(workload, pod, deleting)
        self._pod_event(workload, pod, "Killing", "Stopping container engine")
        if pod.task is not None:
            pod.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pod.task
        await _stop_process(pod, grace=grace)
        self._terminated(workload, pod)
        self._store.delete("pods", workload.namespace, pod.name)
        workload.pods.pop(pod.name, None)
        if pod.has_gpu:
            pod.has_gpu = False
            await self.gpus.release(pod.name)
        self.sync_status(workload)

    def _terminated(self, workload: Workload, pod: PodSim) -> None:
        """The kubelet's last status before the pod object goes: container terminated,
        not Ready, and a terminal phase (kubelets since 1.27 report one before deletion)."""
        current = self._store.get("pods", workload.namespace, pod.name)
        if current is None or current["status"].get("phase") != "Running":
            return  # nothing ran: the pod just goes
        code = pod.process.returncode if pod.process is not None else 0
        code = 0 if code is None else (128 - code if code < 0 else code)

        def terminated(obj: Obj) -> None:
            obj["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            for cond in obj["status"].get("conditions", []):
                if cond["type"] in ("Ready", "ContainersReady") and cond["status"] == "True":
                    cond.update(_cond(cond["type"], False))
            for status in obj["status"].get("containerStatuses", []):
                status["ready"] = False
                status["started"] = False
                status["state"] = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                        "finishedAt": now_iso(),
                    }
                }

        self._pod_update(workload, pod, terminated)

    def sync_status(self, workload: Workload) -> None:
        """The workload controller's status: counts of live and ready pods."""
        obj = self._store.get(workload.resource, workload.namespace, workload.name)
        if obj is None:
            return
        pods = [self._store.get("pods", workload.namespace, n) for n in workload.pods]
        live = [p for p in pods if p is not None and "deletionTimestamp" not in p["metadata"]]
        ready = sum(1 for p in live if _is_ready(p))
        status: Obj = {"observedGeneration": obj["metadata"].get("generation", 1)}
        if live:
            status.update(replicas=len(live), updatedReplicas=len(live))
        if ready:
            status.update(readyReplicas=ready, availableReplicas=ready)
        if workload.resource == "statefulsets":
            status.setdefault("replicas", 0)
            status["availableReplicas"] = ready
        if obj.get("status") != status:

            def mutate(o: Obj) -> None:
                o["status"] = status

            self._store.update(workload.resource, workload.namespace, workload.name, mutate)


OUTPUT_TASK = "fake-kube-engine-output-"


def _cond(kind: str, value: bool) -> Obj:
    return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": now_iso()}


def _is_ready(pod: Obj) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


async def _read_output(process: asyncio.subprocess.Process, pod: PodSim) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        pod.output.append(line)
        if line.startswith("READY "):
            pod.ready_event.set()


async def _stop_process(pod: PodSim, *, grace: float) -> None:
    process = pod.process
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
