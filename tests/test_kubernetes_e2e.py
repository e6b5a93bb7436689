"""The whole activator on the Kubernetes backend: the fake API server, its simulated
kubelet running stand-in engines, a real activator on loopback and the official client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.conftest import ActivatorFactory
from tests.fakekube.server import FakeKube
from tests.harness import Running, chat, header, post, wait_for

log = logging.getLogger(__name__)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    """Requested before `activator` in every test: the cluster outlives the activator
    (whose shutdown, with `on_shutdown: stop`, scales its models down through the API)."""
    async with FakeKube(gpus=1) as fake:
        yield fake


def kube_model(kube: FakeKube, name: str, **keys: Any) -> dict[str, Any]:
    """Adds the Deployment to the fake cluster and returns the model's config block."""
    workload = kube.add_workload(name, served_model_name=f"{name}-served", gpu=True)
    return {
        "kubernetes": {"namespace": "serving", "deployment": name, "url": workload.url},
        "served_model_name": f"{name}-served",
        "startup_timeout": "60s",
        **keys,
    }


async def start(
    activator: ActivatorFactory,
    kube: FakeKube,
    models: dict[str, dict[str, Any]],
    *,
    kubernetes: dict[str, Any] | None = None,
    **top: Any,
) -> Running:
    return await activator(
        {
            "kubernetes": {
                "kubeconfig": kube.kubeconfig,
                "request_timeout": "5s",
                **(kubernetes or {}),
            },
            "models": models,
            **top,
        }
    )


def client(running: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key="unused", max_retries=0)


async def test_cold_request_scales_the_deployment_and_is_answered(
    kube: FakeKube, activator: ActivatorFactory, record_property: Any
) -> None:
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    assert kube.replicas("coder") == 0
    async with client(running) as sdk:
        stream = await sdk.chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        first_byte: float | None = None
        async for _chunk in stream:
            first_byte = first_byte or time.monotonic()
    assert kube.replicas("coder") == 1
    ready_at = kube.ready_time("coder")
    assert first_byte is not None and ready_at is not None
    # Reported, not asserted: the wake overhead of this backend (pod Ready -> first byte).
    overhead = first_byte - ready_at
    record_property("wake_overhead_seconds", round(overhead, 4))
    log.info("wake overhead (pod Ready -> first byte): %.1f ms", overhead * 1000)
    writes = [(r.verb, r.resource) for r in kube.requests if r.method != "GET"]
    assert writes == [("patch", "deployments/scale")]


async def test_idle_model_is_scaled_to_zero_and_its_pod_deleted(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(
        activator, kube, {"coder": kube_model(kube, "coder", idle_timeout="0.5s")}
    )
    status, _, _ = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200
    await kube.wait_until(lambda: kube.replicas("coder") == 0 and not kube.pods("coder"))


async def test_pool_swap_waits_for_the_old_pod_to_be_deleted(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    """Two Deployments on a 1-GPU pool: B's pod is only created once A's is gone, so it
    never sits in FailedScheduling for want of the GPU."""
    models = {
        name: kube_model(kube, name, pool="gpu", min_residency="10ms", drain_timeout="30s")
        for name in ("a", "b")
    }
    running = await start(activator, kube, models, pools={"gpu": {"gpus": 1}})
    for name in ("a", "b", "a"):
        status, body, _ = await post(running, "/v1/chat/completions", chat(name))
        assert status == 200, body
    assert (kube.replicas("a"), kube.replicas("b")) == (1, 0)
    assert kube.max_gpus_in_use == 1
    assert not [e for e in kube.events() if e["reason"] == "FailedScheduling"]


async def test_start_failure_reason_reaches_the_held_request(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    kube.fail_image_pull("coder")
    status, body, _ = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 503
    assert "ImagePullBackOff" in body["error"]["message"]


async def test_gitops_revert_is_undone_and_counted(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    status, _, _ = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200
    (first,) = [p["metadata"]["name"] for p in kube.pods("coder")]
    kube.scale("coder", 0)  # Argo CD without RespectIgnoreDifferences
    await kube.wait_until(
        lambda: any(
            p["metadata"]["name"] != first
            and bool(p["status"].get("containerStatuses"))
            and p["status"]["containerStatuses"][0]["ready"]
            for p in kube.pods("coder")
        )
    )
    status, _, _ = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200
    assert (
        running.sample(
            "activator_scale_events_total", model="coder", direction="up", reason="revert"
        )
        == 1
    )


async def test_running_deployment_is_adopted_at_start(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    model = kube_model(kube, "coder")
    kube.scale("coder", 1)
    await kube.wait_until(lambda: bool(kube.get("coder")["status"].get("readyReplicas")))
    running = await start(activator, kube, {"coder": model})
    status, _, _ = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200
    assert [r for r in kube.requests if r.verb == "patch"] == []


def ready_pods(kube: FakeKube, name: str) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in kube.pods(name)
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
        and "deletionTimestamp" not in p["metadata"]
    ]


def scale_events(running: Running, reason: str) -> float:
    return running.sample(
        "activator_scale_events_total", model="coder", direction="up", reason=reason
    )


def wakes(running: Running) -> float:
    return running.sample(
        "activator_wake_duration_seconds_count",
        model="coder",
        backend="kubernetes",
        outcome="ready",
    )


async def test_revert_while_ready_holds_requests_until_the_new_pod_is_ready(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    """Argo CD without RespectIgnoreDifferences sets replicas back to 0 while the model
    serves: the model leaves ready at once, and a request arriving during the new cold
    start is held and answered, not sent to the pod that is going away."""
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    assert (await post(running, "/v1/chat/completions", chat("coder")))[0] == 200
    model = running.model("coder")
    (first,) = ready_pods(kube, "coder")
    kube.scale("coder", 0)
    await wait_for(lambda: model.state == "starting", what="the model left ready")
    await kube.wait_until(lambda: first not in [p["metadata"]["name"] for p in kube.pods("coder")])
    status, body, headers = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200, body
    assert header(headers, "X-Activator-Cold-Start") == "true"
    assert model.state == "ready"
    assert scale_events(running, "revert") == 1
    assert wakes(running) == 2  # the re-wake is observed like any wake
    assert running.sample("activator_upstream_errors_total", model="coder", kind="connect") == 0


async def test_evicted_pod_holds_requests_until_its_replacement_is_ready(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    assert (await post(running, "/v1/chat/completions", chat("coder")))[0] == 200
    model = running.model("coder")
    (first,) = ready_pods(kube, "coder")
    kube.evict("coder")
    await wait_for(lambda: model.state == "starting", what="the model left ready")
    status, body, headers = await post(running, "/v1/chat/completions", chat("coder"))
    assert status == 200, body
    assert header(headers, "X-Activator-Cold-Start") == "true"
    assert first not in ready_pods(kube, "coder")
    assert scale_events(running, "lost") == 1
    assert wakes(running) == 2
    assert [r for r in kube.requests if r.verb == "patch"][1:] == []  # the cluster replaced it


async def test_pod_not_ready_holds_requests_until_it_is_ready_again(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    """Node loss: the pod turns not Ready while its engine still answers on the URL (as a
    Service lagging behind would). Requests are held until a pod is Ready again."""
    running = await start(activator, kube, {"coder": kube_model(kube, "coder")})
    assert (await post(running, "/v1/chat/completions", chat("coder")))[0] == 200
    model = running.model("coder")
    kube.set_pods_ready("coder", False)
    await wait_for(lambda: model.state == "starting", what="the model left ready")
    held = asyncio.create_task(post(running, "/v1/chat/completions", chat("coder")))
    await wait_for(lambda: model.queued == 1, what="the request is held")
    assert model.state == "starting"  # the URL answers, but no pod is Ready
    kube.set_pods_ready("coder", True)
    status, body, headers = await held
    assert status == 200, body
    assert header(headers, "X-Activator-Cold-Start") == "true"
    assert scale_events(running, "lost") == 1


async def test_shutdown_leaves_models_running_for_the_next_activator_to_adopt(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    """A rolling restart: the old activator leaves the Deployment at 1 replica; the new
    one adopts it warm (no scale call) and restarts its idle timer."""
    model = kube_model(kube, "coder")
    first = await start(activator, kube, {"coder": model})
    assert (await post(first, "/v1/chat/completions", chat("coder")))[0] == 200
    (pod,) = ready_pods(kube, "coder")
    await first.close()
    assert kube.replicas("coder") == 1
    assert ready_pods(kube, "coder") == [pod]
    patches = len([r for r in kube.requests if r.verb == "patch"])

    second = await start(activator, kube, {"coder": {**model, "idle_timeout": "1s"}})
    await wait_for(lambda: second.model("coder").state == "ready", what="adopted")
    status, _, headers = await post(second, "/v1/chat/completions", chat("coder"))
    assert status == 200
    assert header(headers, "X-Activator-Cold-Start") == "false"
    assert len([r for r in kube.requests if r.verb == "patch"]) == patches
    assert (
        second.sample("activator_scale_events_total", model="coder", direction="up", reason="adopt")
        == 1
    )
    # Its idle timer runs in the new activator: it scales the model down once idle.
    await kube.wait_until(lambda: kube.replicas("coder") == 0 and not kube.pods("coder"))


async def test_on_shutdown_stop_scales_models_to_zero(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    running = await start(
        activator, kube, {"coder": kube_model(kube, "coder")}, kubernetes={"on_shutdown": "stop"}
    )
    assert (await post(running, "/v1/chat/completions", chat("coder")))[0] == 200
    await running.close()
    assert kube.replicas("coder") == 0
    assert kube.pods("coder") == []
