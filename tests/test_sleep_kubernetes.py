"""Sleep mode on the Kubernetes backend: activator puts a pod's engine to sleep through
the model's url, and a sleeping pod keeps its GPU.

With device-plugin sharing (time-slicing, GKE GPU time-sharing) two pods share the GPU:
the sleeper stays and wakes in place. Without it, the next model's pod stays Pending
(FailedScheduling): activator sees the start blocked and stops the sleeper to make room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import ActivatorFactory
from tests.fakekube.server import FakeKube, PodPlan
from tests.harness import Running, chat, post, wait_for

SLEEPY = PodPlan(
    engine_args=("--enable-sleep-mode", "--weights-gib", "2"),
    engine_env=(("VLLM_SERVER_DEV_MODE", "1"),),
)


def sleep_model(kube: FakeKube, name: str) -> dict[str, Any]:
    workload = kube.add_workload(name, served_model_name=f"{name}-served", gpu=True, plan=SLEEPY)
    return {
        "kubernetes": {"namespace": "serving", "deployment": name, "url": workload.url},
        "served_model_name": f"{name}-served",
        "startup_timeout": "60s",
        "pool": "gpu",
        "min_residency": "0s",
        "sleep": {"level": 1, "host_memory": "2GiB", "timeout": "20s"},
    }


async def start(activator: ActivatorFactory, kube: FakeKube) -> Running:
    return await activator(
        {
            "kubernetes": {"kubeconfig": kube.kubeconfig, "request_timeout": "5s"},
            "pools": {"gpu": {"gpus": 1, "host_memory": "8GiB"}},
            "models": {name: sleep_model(kube, name) for name in ("a", "b")},
        }
    )


async def ask(running: Running, model: str) -> None:
    status, body, _ = await post(running, "/v1/chat/completions", chat(model))
    assert status == 200, body


@pytest.fixture
async def shared() -> AsyncIterator[FakeKube]:
    async with FakeKube(gpus=1, gpu_sharing=2) as fake:
        yield fake


@pytest.fixture
async def exclusive() -> AsyncIterator[FakeKube]:
    async with FakeKube(gpus=1) as fake:
        yield fake


async def test_with_gpu_sharing_a_sleeping_pod_is_woken_in_place(
    shared: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(activator, shared)
    await ask(running, "a")
    (pod_a,) = [p["metadata"]["name"] for p in shared.pods("a")]
    await ask(running, "b")  # a sleeps; b's pod shares the GPU
    assert running.model("a").state == "sleeping"
    assert shared.replicas("a") == 1  # the sleeping pod stays
    await ask(running, "a")  # b sleeps, a wakes in its own pod
    assert [p["metadata"]["name"] for p in shared.pods("a")] == [pod_a]
    assert (
        running.sample(
            "activator_wake_duration_seconds_count", model="a", outcome="ready", **{"from": "sleep"}
        )
        == 1
    )
    assert running.sample("activator_swaps_total", pool="gpu", mode="sleep") == 2


async def test_without_gpu_sharing_a_blocked_start_stops_the_sleeper(
    exclusive: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(activator, exclusive)
    await ask(running, "a")
    await ask(running, "b")  # a sleeps, b's pod is Pending until a's pod is gone
    assert running.model("b").state == "ready"
    await wait_for(lambda: running.model("a").state == "stopped", what="a stopped")
    assert exclusive.replicas("a") == 0
    assert exclusive.max_gpus_in_use == 1
    assert any(e["reason"] == "FailedScheduling" for e in exclusive.events())
    assert (
        running.sample(
            "activator_scale_events_total", model="a", direction="down", reason="unschedulable"
        )
        == 1
    )
