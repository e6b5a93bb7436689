"""The Kubernetes backend's part in scaling out (replicas.max > 1), against the fake API
server: fenced, conditional scale writes to N; the pods behind the model's Service from
the shared EndpointSlice watch; deletion costs before a scale-down, which the fake's
ReplicaSet honours; and a pod that cannot come up while others serve does not fail the
model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from activator.backends.kube.calls import RetryPolicy
from activator.backends.kubernetes import (
    DELETION_COST,
    KubeCluster,
    KubernetesBackend,
    KubeTuning,
    NotLeader,
)
from activator.config.settings import (
    KubernetesSettings,
    KubernetesTarget,
    ModelSettings,
    ReplicasSettings,
)
from activator.placement.routing import PodEndpoint
from tests.fakekube.server import FakeKube, PodPlan
from tests.harness import wait_for
from tests.test_kubernetes_backend import Recorder

FAST = KubeTuning(
    retry=RetryPolicy(attempts=4, initial=0.01, max_wait=0.05, total=10.0),
    watch_backoff_initial=0.01,
    watch_backoff_max=0.05,
    scheduling_grace=0.3,
    stop_timeout=30.0,
)
Make = Callable[..., Awaitable[tuple[KubernetesBackend, Recorder]]]


class Pods:
    """A watch_pods subscriber: the pods last told, and an event to wait on."""

    def __init__(self) -> None:
        self.last: tuple[PodEndpoint, ...] = ()
        self._told = asyncio.Event()

    def __call__(self, pods: tuple[PodEndpoint, ...]) -> None:
        self.last = pods
        self._told.set()
        self._told = asyncio.Event()

    async def until(self, predicate: Callable[[tuple[PodEndpoint, ...]], bool]) -> None:
        async with asyncio.timeout(30):
            while not predicate(self.last):
                await self._told.wait()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5) as fake:
        yield fake


@pytest.fixture
async def make(kube: FakeKube) -> AsyncIterator[Make]:
    settings = KubernetesSettings(kubeconfig=kube.kubeconfig, request_timeout=5.0)
    cluster = await KubeCluster.connect(settings, tuning=FAST)
    made: list[KubernetesBackend] = []

    async def make_backend(
        name: str = "coder", *, max_replicas: int = 4, kind: str = "Deployment", **workload: Any
    ) -> tuple[KubernetesBackend, Recorder]:
        fake = kube.add_workload(name, kind=kind, **workload)  # type: ignore[arg-type]
        model = ModelSettings(
            name=name,
            served_model_name=name,
            replicas=ReplicasSettings(max=max_replicas),
            kubernetes=KubernetesTarget(
                namespace="serving",
                name=name,
                url=fake.url,
                kind=kind,  # type: ignore[arg-type]
                service=name,
            ),
        )
        recorder = Recorder()
        backend = KubernetesBackend(model, cluster=cluster, listener=recorder)
        made.append(backend)
        return backend, recorder

    yield make_backend
    for backend in made:
        await backend.aclose()
    await cluster.aclose()


async def test_scale_to_writes_the_scale_conditionally_and_only_when_it_changes(
    kube: FakeKube, make: Make
) -> None:
    backend, _ = await make(engine=False)
    await backend.start()
    assert backend.replicas == 1
    assert await backend.scale_to(3) is True
    assert kube.replicas("coder") == 3 and backend.replicas == 3
    assert await backend.scale_to(3) is False  # already so: no write
    patches = [r for r in kube.requests if r.verb == "patch"]
    assert [p.resource for p in patches] == ["deployments/scale"] * 2
    # The write to 3 carried the resourceVersion it read: never a lost update.
    assert patches[1].body["spec"] == {"replicas": 3}
    assert patches[1].body["metadata"]["resourceVersion"]
    with pytest.raises(ValueError, match="stop"):
        await backend.scale_to(0)


async def test_scale_to_writes_nothing_without_leadership(kube: FakeKube, make: Make) -> None:
    backend, _ = await make(engine=False)
    await backend.start()
    backend.attach_fence(lambda: 0.0)  # another replica leads
    with pytest.raises(NotLeader):
        await backend.scale_to(2)
    assert kube.replicas("coder") == 1


async def test_watch_pods_lists_the_pods_behind_the_service_as_they_come_and_go(
    kube: FakeKube, make: Make
) -> None:
    backend, _ = await make(engine=False)
    pods = Pods()
    backend.watch_pods(pods)
    await backend.pods_synced()
    await backend.start()
    await backend.scale_to(2)
    await pods.until(lambda last: sum(p.ready for p in last) == 2)
    assert {p.name: p.url for p in pods.last} == kube.pod_urls("coder")
    await backend.scale_to(1)
    await pods.until(lambda last: len([p for p in last if not p.terminating]) == 1)


async def test_deletion_costs_make_the_replicaset_delete_the_least_loaded_pods(
    kube: FakeKube, make: Make
) -> None:
    backend, _ = await make(engine=False)
    await backend.start()
    await backend.scale_to(3)
    await kube.wait_until(lambda: len(kube.pods("coder")) == 3)
    names = sorted(p["metadata"]["name"] for p in kube.pods("coder"))
    await wait_for(lambda: len(backend._pods()) == 3, what="3 pods in the backend's watch")
    # The newest pod would go first by the ReplicaSet's own order; the least loaded do.
    costs = {names[0]: 0, names[1]: 7, names[2]: 5}
    await backend.prefer_deletion(costs)
    annotations = {
        p["metadata"]["name"]: p["metadata"]["annotations"][DELETION_COST]
        for p in kube.pods("coder")
    }
    assert annotations == {name: str(cost) for name, cost in costs.items()}
    await backend.scale_to(1)
    await kube.wait_until(lambda: [p["metadata"]["name"] for p in kube.pods("coder")] == [names[1]])
    # The same costs again write nothing.
    before = len([r for r in kube.requests if r.resource == "pods" and r.verb == "patch"])
    await backend.prefer_deletion({names[1]: 7})
    after = len([r for r in kube.requests if r.resource == "pods" and r.verb == "patch"])
    assert after == before == 3


async def test_a_statefulset_gets_no_deletion_costs(kube: FakeKube, make: Make) -> None:
    backend, _ = await make(kind="StatefulSet", engine=False)
    await backend.start()
    await backend.scale_to(2)
    await kube.wait_until(lambda: len(kube.pods("coder", kind="StatefulSet")) == 2)
    await backend.prefer_deletion({"coder-0": 1, "coder-1": 0})
    assert not [r for r in kube.requests if r.resource == "pods" and r.verb == "patch"]


async def test_a_new_pod_that_cannot_come_up_leaves_the_serving_model_alone(
    kube: FakeKube, make: Make
) -> None:
    backend, recorder = await make(engine=False)
    await backend.start()
    await wait_for(backend.serving, what="a Ready pod")
    kube.fail_image_pull("coder")
    await backend.scale_to(2)
    await wait_for(
        lambda: any("pod failed (others serve)" in line for line in backend.log_tail()),
        what="the failed pod in the log tail",
    )
    assert recorder.of("failed") == []
    assert any("ImagePullBackOff" in line for line in backend.log_tail())


async def test_with_one_replica_a_pod_that_cannot_come_up_fails_the_model(
    kube: FakeKube, make: Make
) -> None:
    backend, recorder = await make(max_replicas=1, engine=False, plan=PodPlan())
    kube.fail_image_pull("coder")
    await backend.start()
    await recorder.wait_for(lambda: bool(recorder.of("failed")))
    assert "ImagePullBackOff" in recorder.of("failed")[0]
