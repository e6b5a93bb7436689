"""The fake Kubernetes API server, exercised with kubernetes_asyncio exactly as a client in a
cluster would use it: the wire behaviour the backend relies on must be the real one.

Workloads, watches, the scale subresource and pod failures here; several pods per workload
and GPUs in test_fake_kube_pods.py, Services/EndpointSlices/kube-proxy in
test_fake_kube_endpoints.py, Leases and leader election in test_fake_kube_leases.py,
per-client identities and partitions in test_fake_kube_clients.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakekube.server import FakeKube
from tests.fakekube_helpers import next_event, raw_request, ready, watch_from_list


def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


async def test_list_carries_a_collection_resource_version_and_the_items(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.add_workload("embedder", engine=False)
    listing = await apps(api).list_namespaced_deployment("serving")
    assert [d.metadata.name for d in listing.items] == ["coder-chat", "embedder"]
    assert int(listing.metadata.resource_version) >= 2
    assert listing.items[0].spec.strategy.type == "Recreate"
    assert listing.items[0].spec.selector.match_labels == {"app": "coder-chat"}


async def test_resource_versions_increase_with_every_write(
    kube: FakeKube, api: client.ApiClient
) -> None:
    first = kube.add_workload("coder-chat", engine=False)
    before = int(kube.get(first.name)["metadata"]["resourceVersion"])
    scale = await apps(api).patch_namespaced_deployment_scale(
        "coder-chat",
        "serving",
        {"spec": {"replicas": 1}},
        _content_type="application/merge-patch+json",
    )
    assert int(scale.metadata.resource_version) > before
    await kube.wait_until(lambda: bool(kube.pods("coder-chat")))
    pod_rv = int(kube.pods("coder-chat")[0]["metadata"]["resourceVersion"])
    assert pod_rv > int(scale.metadata.resource_version)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/merge-patch+json", {"spec": {"replicas": 1}}),
        ("application/strategic-merge-patch+json", {"spec": {"replicas": 1}}),
        ("application/json-patch+json", [{"op": "replace", "path": "/spec/replicas", "value": 1}]),
    ],
)
async def test_scale_subresource_accepts_each_patch_type(
    kube: FakeKube, api: client.ApiClient, content_type: str, body: Any
) -> None:
    kube.add_workload("coder-chat", engine=False)
    scale = await apps(api).patch_namespaced_deployment_scale(
        "coder-chat", "serving", body, _content_type=content_type
    )
    assert scale.spec.replicas == 1
    assert kube.replicas("coder-chat") == 1
    assert kube.requests[-1].content_type == content_type
    assert kube.requests[-1].resource == "deployments/scale"


async def test_scale_patch_default_content_type_for_a_dict_is_strategic_merge(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    await apps(api).patch_namespaced_deployment_scale(
        "coder-chat", "serving", {"spec": {"replicas": 1}}
    )
    assert kube.requests[-1].content_type == "application/strategic-merge-patch+json"


async def test_scale_patch_with_a_stale_resource_version_conflicts(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    with pytest.raises(ApiException) as caught:
        await apps(api).patch_namespaced_deployment_scale(
            "coder-chat",
            "serving",
            {"metadata": {"resourceVersion": "0"}, "spec": {"replicas": 1}},
            _content_type="application/merge-patch+json",
        )
    assert caught.value.status == 409


async def test_unknown_patch_content_type_is_unsupported_media_type(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", engine=False)
    async with raw_request(
        kube,
        "PATCH",
        "/apis/apps/v1/namespaces/serving/deployments/coder-chat/scale",
        body={"spec": {"replicas": 1}},
        content_type="text/plain",
    ) as response:
        assert response.status == 415
        assert (await response.json())["reason"] == "UnsupportedMediaType"


async def test_requests_without_the_token_are_unauthorized(kube: FakeKube) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{kube.url}/apis/apps/v1/namespaces/serving/deployments") as response,
    ):
        assert response.status == 401


async def test_scale_of_a_statefulset(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("ranker", kind="StatefulSet", engine=False)
    scale = await apps(api).read_namespaced_stateful_set_scale("ranker", "serving")
    assert scale.spec.replicas == 0
    assert scale.status.selector == "app=ranker"
    await apps(api).patch_namespaced_stateful_set_scale(
        "ranker",
        "serving",
        {"spec": {"replicas": 1}},
        _content_type="application/merge-patch+json",
    )
    await kube.wait_until(
        lambda: (
            [p["metadata"]["name"] for p in kube.pods("ranker", kind="StatefulSet")] == ["ranker-0"]
        )
    )


async def test_watch_from_a_resource_version_streams_later_changes(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    listing = await apps(api).list_namespaced_deployment("serving")
    async with watch.Watch() as stream:
        events = stream.stream(
            apps(api).list_namespaced_deployment,
            "serving",
            resource_version=listing.metadata.resource_version,
            timeout_seconds=30,
        )
        kube.scale("coder-chat", 1)
        event = await next_event(events)
    assert event["type"] == "MODIFIED"
    assert event["raw_object"]["spec"]["replicas"] == 1
    assert kube.requests[-1].verb == "watch"


async def test_watch_without_resource_version_starts_with_current_state(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    async with watch.Watch() as stream:
        events = stream.stream(apps(api).list_namespaced_deployment, "serving", timeout_seconds=30)
        event = await next_event(events)
    assert (event["type"], event["raw_object"]["metadata"]["name"]) == ("ADDED", "coder-chat")


async def test_watch_from_a_compacted_resource_version_is_410_gone(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    listing = await apps(api).list_namespaced_deployment("serving")
    kube.scale("coder-chat", 1)
    kube.compact()
    async with watch.Watch() as stream:
        events = stream.stream(
            apps(api).list_namespaced_deployment,
            "serving",
            resource_version=listing.metadata.resource_version,
            timeout_seconds=30,
        )
        with pytest.raises(ApiException) as caught:
            await next_event(events)
    assert caught.value.status == 410


async def test_forced_gone_applies_to_the_next_watch_only(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.gone_next_watches(1, resource="deployments")
    async with watch.Watch() as stream:
        with pytest.raises(ApiException) as caught:
            await next_event(
                stream.stream(apps(api).list_namespaced_deployment, "serving", timeout_seconds=30)
            )
    assert caught.value.status == 410
    async with watch.Watch() as stream:
        event = await next_event(
            stream.stream(apps(api).list_namespaced_deployment, "serving", timeout_seconds=30)
        )
    assert event["type"] == "ADDED"


async def test_bookmarks_only_when_allowed(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    listing = await core(api).list_namespaced_pod("serving")
    async with watch.Watch() as stream:
        events = stream.stream(
            core(api).list_namespaced_pod,
            "serving",
            allow_watch_bookmarks=True,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=30,
        )
        kube.scale("coder-chat", 1)  # moves the revision on, then a bookmark carries it
        while (event := await next_event(events))["type"] != "BOOKMARK":
            pass
    assert int(event["raw_object"]["metadata"]["resourceVersion"]) > int(
        listing.metadata.resource_version
    )
    assert stream.resource_version == event["raw_object"]["metadata"]["resourceVersion"]


async def test_watch_ends_at_the_server_timeout(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    listing = await apps(api).list_namespaced_deployment("serving")
    seen = []
    async with asyncio.timeout(10), watch.Watch() as stream:
        async for event in stream.stream(
            apps(api).list_namespaced_deployment,
            "serving",
            resource_version=listing.metadata.resource_version,
            timeout_seconds=1,
        ):
            seen.append(event)
    assert seen == []


async def test_dropped_watch_ends_the_stream(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    async with watch_from_list(
        apps(api).list_namespaced_deployment, "serving", timeout_seconds=60
    ) as events:
        kube.scale("coder-chat", 1)
        await next_event(events)
        assert kube.drop_watches() == 1
        with pytest.raises(StopAsyncIteration):
            while True:  # events queued before the drop still arrive, then the end
                await next_event(events)


async def test_label_selector_filters_pods(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False, replicas=1)
    kube.add_workload("embedder", engine=False, replicas=1)
    await kube.wait_until(lambda: bool(kube.pods("coder-chat") and kube.pods("embedder")))
    pods = await core(api).list_namespaced_pod("serving", label_selector="app=embedder")
    assert [p.metadata.labels["app"] for p in pods.items] == ["embedder"]


async def test_injected_status_errors_then_recovery(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.fail_next(2, status=500, verb="get", resource="deployments/scale")
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            await apps(api).read_namespaced_deployment_scale("coder-chat", "serving")
        assert caught.value.status == 500
    scale = await apps(api).read_namespaced_deployment_scale("coder-chat", "serving")
    assert scale.spec.replicas == 0


async def test_forbidden_verb_reads_like_rbac(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.forbid("patch", "deployments/scale")
    with pytest.raises(ApiException) as caught:
        await apps(api).patch_namespaced_deployment_scale(
            "coder-chat",
            "serving",
            {"spec": {"replicas": 1}},
            _content_type="application/merge-patch+json",
        )
    assert caught.value.status == 403
    assert 'cannot patch resource "deployments/scale"' in json.loads(caught.value.body)["message"]
    await apps(api).read_namespaced_deployment_scale("coder-chat", "serving")  # get allowed
    kube.allow("patch", "deployments/scale")
    await apps(api).patch_namespaced_deployment_scale(
        "coder-chat",
        "serving",
        {"spec": {"replicas": 1}},
        _content_type="application/merge-patch+json",
    )


async def test_hung_request_times_out_at_the_client(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.hang_next(1, verb="get")
    with pytest.raises(asyncio.TimeoutError):
        await apps(api).read_namespaced_deployment("coder-chat", "serving", _request_timeout=0.3)


async def test_reset_connection_survives_one_client_retry(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.reset_next(1, verb="get")
    # aiohttp itself repeats an idempotent request once after a disconnect.
    await apps(api).read_namespaced_deployment("coder-chat", "serving")
    kube.reset_next(2, verb="get")
    with pytest.raises(aiohttp.ClientError):
        await apps(api).read_namespaced_deployment("coder-chat", "serving")


async def test_scale_up_runs_an_engine_pod_to_ready_and_scale_down_deletes_it(
    kube: FakeKube,
) -> None:
    coder = kube.add_workload("coder-chat", served_model_name="coder")
    kube.scale("coder-chat", 1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{coder.url}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["coder"]
        reasons = [e["reason"] for e in kube.events() if e["involvedObject"]["kind"] == "Pod"]
        assert {"Scheduled", "Pulling", "Pulled", "Created", "Started"} <= set(reasons)
        assert kube.ready_time("coder-chat") is not None
        kube.scale("coder-chat", 0)
        await kube.wait_until(lambda: not kube.pods("coder-chat"))
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{coder.url}/health"):
                pass
    assert "readyReplicas" not in kube.get("coder-chat")["status"]


async def test_pod_stays_pending_while_the_only_gpu_is_taken() -> None:
    async with FakeKube(gpus=1) as kube:
        kube.add_workload("a", engine=False, gpu=True, replicas=1)
        await kube.wait_until(lambda: ready(kube, "a", 1))
        kube.add_workload("b", engine=False, gpu=True, replicas=1)
        await kube.wait_until(lambda: any(e["reason"] == "FailedScheduling" for e in kube.events()))
        kube.scale("a", 0)
        await kube.wait_until(lambda: ready(kube, "b", 1))
        assert kube.max_gpus_in_use == 1


async def test_failed_scheduling_then_autoscaler_scale_up_schedules_the_pod(
    kube: FakeKube,
) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.fail_scheduling("coder-chat", autoscaler="triggered")
    kube.scale("coder-chat", 1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    reasons = [
        e["reason"]
        for e in sorted(kube.events(), key=lambda e: int(e["metadata"]["resourceVersion"]))
    ]
    assert (
        reasons.index("FailedScheduling")
        < reasons.index("TriggeredScaleUp")
        < reasons.index("Scheduled")
    )


@pytest.mark.parametrize(
    ("fault", "waiting", "last_reason"),
    [
        ("image", "ImagePullBackOff", None),
        ("crash", "CrashLoopBackOff", "Error"),
        ("oom", "CrashLoopBackOff", "OOMKilled"),
    ],
)
async def test_pod_failures_show_in_container_status(
    kube: FakeKube, fault: str, waiting: str, last_reason: str | None
) -> None:
    kube.add_workload("coder-chat", engine=False)
    {"image": kube.fail_image_pull, "crash": kube.crash_loop, "oom": kube.oom_kill}[fault](
        "coder-chat"
    )
    kube.scale("coder-chat", 1)

    def status() -> dict[str, Any]:
        pods = kube.pods("coder-chat")
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return statuses[0] if statuses else {}

    await kube.wait_until(
        lambda: status().get("state", {}).get("waiting", {}).get("reason") == waiting
    )
    assert status().get("lastState", {}).get("terminated", {}).get("reason") == last_reason


async def test_crash_during_engine_startup_is_a_crash_loop(kube: FakeKube) -> None:
    kube.add_workload("coder-chat")
    kube.crash_loop("coder-chat")
    kube.scale("coder-chat", 1)

    def waiting() -> str | None:
        pods = kube.pods("coder-chat")
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    await kube.wait_until(lambda: waiting() == "CrashLoopBackOff")
