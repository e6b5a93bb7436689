"""Services, EndpointSlices and kube-proxy on the fake cluster: the slices carry the
conditions the real EndpointSlice controller sets, lag pod readiness by endpoint_delay,
and the Service address balances new connections over usable endpoints only."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubernetes_asyncio import client

from tests.fakekube.proxy import usable_endpoints
from tests.fakekube.server import Address, FakeKube
from tests.fakekube.store import Change
from tests.fakekube_helpers import raw_request, ready, watch_from_list

SERVICE_NAME = "kubernetes.io/service-name"


def discovery(api: client.ApiClient) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(api)


async def models(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/v1/models") as response:
        return [m["id"] for m in (await response.json())["data"]]


async def test_slice_lists_ready_pods_as_the_controller_does(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False, replicas=2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    slices = await discovery(api).list_namespaced_endpoint_slice(
        "serving", label_selector=f"{SERVICE_NAME}=coder-chat"
    )
    (piece,) = slices.items
    assert piece.address_type == "IPv4"
    assert piece.metadata.labels["endpointslice.kubernetes.io/managed-by"] == (
        "endpointslice-controller.k8s.io"
    )
    assert piece.metadata.owner_references[0].kind == "Service"
    assert piece.metadata.generate_name == "coder-chat-"
    assert [(p.name, p.port, p.protocol) for p in piece.ports] == [("http", 8000, "TCP")]
    pods = {p["metadata"]["name"]: p for p in kube.pods("coder-chat")}
    assert len(piece.endpoints) == 2
    for endpoint in piece.endpoints:
        pod = pods[endpoint.target_ref.name]
        assert endpoint.addresses == [pod["status"]["podIP"]]
        assert endpoint.target_ref.uid == pod["metadata"]["uid"]
        assert endpoint.node_name == pod["spec"]["nodeName"]
        assert endpoint.zone
        conditions = endpoint.conditions
        assert (conditions.ready, conditions.serving, conditions.terminating) == (
            True,
            True,
            False,
        )


async def test_a_service_without_endpoints_has_a_placeholder_with_null_lists(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False)
    async with raw_request(
        kube, "GET", "/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices"
    ) as response:
        (raw,) = (await response.json())["items"]
    # As Kubernetes before 1.36 serves it (kubernetes#135968): clients must take null.
    assert raw["endpoints"] is None
    assert raw["ports"] is None
    (piece,) = (await discovery(api).list_namespaced_endpoint_slice("serving")).items
    assert piece.endpoints is None


async def test_terminating_pod_is_serving_but_not_ready_until_it_goes(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", replicas=1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    seen: list[tuple[bool, bool, bool] | None] = []
    async with watch_from_list(discovery(api).list_namespaced_endpoint_slice, "serving") as events:
        kube.scale("coder-chat", 0)
        async with asyncio.timeout(20):
            async for event in events:
                endpoints = event["object"].endpoints
                if not endpoints:
                    seen.append(None)
                    break
                c = endpoints[0].conditions
                seen.append((c.ready, c.serving, c.terminating))
    # Graceful termination: still serving while the engine drains, then gone.
    assert seen[0] == (False, True, True)
    assert seen[-1] is None


async def test_endpoints_lag_pod_readiness_by_the_delay() -> None:
    async with FakeKube(endpoint_delay=0.2) as kube:
        kube.add_workload("coder-chat", served_model_name="coder")
        routable_when_ready: list[list[tuple[str, int]]] = []

        def on_change(change: Change) -> None:
            if change.resource == "deployments" and change.obj["status"].get("readyReplicas"):
                routable_when_ready.append(kube.routable("coder-chat"))

        kube.store.observe(on_change)
        kube.scale("coder-chat", 1)
        await kube.wait_until(lambda: bool(kube.routable("coder-chat")))
        assert routable_when_ready[0] == []  # Ready, not yet routable
        async with aiohttp.ClientSession() as session:
            assert await models(session, kube.workload("coder-chat").url) == ["coder"]


async def test_service_refuses_connections_without_endpoints(kube: FakeKube) -> None:
    coder = kube.add_workload("coder-chat", served_model_name="coder", replicas=1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    async with aiohttp.ClientSession() as session:
        assert await models(session, coder.url) == ["coder"]
        kube.scale("coder-chat", 0)
        await kube.wait_until(lambda: not kube.routable("coder-chat"))
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.get(f"{coder.url}/health"):
                pass


async def test_service_balances_new_connections_over_ready_pods(kube: FakeKube) -> None:
    coder = kube.add_workload("coder-chat", served_model_name="coder", replicas=3)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 3))
    proxy = kube.proxy.services[("serving", "coder-chat")]
    connector = aiohttp.TCPConnector(force_close=True)  # one connection per request
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(60):
            assert await models(session, coder.url) == ["coder"]
        endpoints = {(ip, 8000) for ip in (p["status"]["podIP"] for p in kube.pods("coder-chat"))}
        assert set(proxy.dialed) == endpoints  # random: each gets some (1e-10 to miss one)

        unready = kube.pods("coder-chat")[0]
        kube.set_pod_ready(unready["metadata"]["name"], False)
        await kube.wait_until(lambda: len(kube.routable("coder-chat")) == 2)
        proxy.dialed.clear()
        for _ in range(20):
            assert await models(session, coder.url) == ["coder"]
    assert (unready["status"]["podIP"], 8000) not in proxy.dialed


@pytest.mark.parametrize(
    ("conditions", "usable"),
    [
        ([(True, True, False), (False, False, False)], ["10.0.0.0"]),
        ([(False, True, True), (False, False, False)], ["10.0.0.0"]),  # serving terminating
        ([(False, False, True), (False, False, False)], []),
        ([(True, True, False), (False, True, True)], ["10.0.0.0"]),  # ready ones first
        ([(None, None, None)], ["10.0.0.0"]),  # nil ready means ready
    ],
)
def test_kube_proxy_picks_ready_endpoints_else_serving_terminating_ones(
    conditions: list[tuple[bool | None, bool | None, bool | None]], usable: list[str]
) -> None:
    endpoints: list[dict[str, Any]] = [
        {
            "addresses": [f"10.0.0.{i}"],
            "conditions": {
                k: v
                for k, v in zip(("ready", "serving", "terminating"), c, strict=True)
                if v is not None
            },
        }
        for i, c in enumerate(conditions)
    ]
    slices = [{"ports": [{"name": "http", "port": 8000}], "endpoints": endpoints}]
    assert usable_endpoints(slices, "http") == [(ip, 8000) for ip in usable]


async def test_legacy_endpoints_split_ready_and_not_ready(
    kube: FakeKube, api: client.ApiClient
) -> None:
    kube.add_workload("coder-chat", engine=False, replicas=2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    unready = kube.pods("coder-chat")[0]["metadata"]["name"]
    kube.set_pod_ready(unready, False)
    await kube.wait_until(lambda: len(kube.routable("coder-chat")) == 1)
    endpoints = await client.CoreV1Api(api).read_namespaced_endpoints("coder-chat", "serving")
    (subset,) = endpoints.subsets
    assert [a.target_ref.name for a in subset.not_ready_addresses] == [unready]
    assert len(subset.addresses) == 1
    assert subset.ports[0].port == 8000
    assert endpoints.metadata.labels["endpointslice.kubernetes.io/skip-mirror"] == "true"


async def _replica(name: str) -> TestServer:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"replica": name})

    app = web.Application()
    app.router.add_get("/whoami", hello)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_endpoints_a_test_sets_are_mirrored_and_routed(
    kube: FakeKube, api: client.ApiClient
) -> None:
    first, second = await _replica("activator-0"), await _replica("activator-1")
    try:
        url = kube.add_service("activator", namespace="activator")
        kube.set_endpoints(
            "activator",
            [
                Address("127.0.0.1", first.port, pod="activator-0"),
                Address("127.0.0.1", second.port, ready=False, pod="activator-1"),
            ],
            namespace="activator",
        )
        slices = (await discovery(api).list_namespaced_endpoint_slice("activator")).items
        assert {s.metadata.labels["endpointslice.kubernetes.io/managed-by"] for s in slices} == {
            "endpointslicemirroring-controller.k8s.io"
        }
        by_port = {s.ports[0].port: s.endpoints[0] for s in slices}
        assert by_port[first.port].conditions.ready is True
        assert by_port[second.port].conditions.ready is False
        assert by_port[second.port].target_ref.name == "activator-1"
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.get(f"{url}/whoami") as response:
                    assert (await response.json())["replica"] == "activator-0"
            kube.set_endpoints("activator", [("127.0.0.1", second.port)], namespace="activator")
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as fresh,
                fresh.get(f"{url}/whoami") as response,
            ):
                assert (await response.json())["replica"] == "activator-1"
        (single,) = (await discovery(api).list_namespaced_endpoint_slice("activator")).items
        assert single.ports[0].port == second.port
    finally:
        await first.close()
        await second.close()


async def test_slices_are_watched_through_scale_up(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_workload("coder-chat", engine=False)
    async with watch_from_list(discovery(api).list_namespaced_endpoint_slice, "serving") as events:
        kube.scale("coder-chat", 2)
        async with asyncio.timeout(20):
            async for event in events:
                endpoints = event["object"].endpoints or []
                if sum(1 for e in endpoints if e.conditions.ready) == 2:
                    break
    assert event["type"] == "MODIFIED"
    assert event["raw_object"]["metadata"]["generation"] >= 2


async def test_a_pod_stuck_pulling_its_image_has_an_ip_and_a_not_ready_endpoint(
    kube: FakeKube,
) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.fail_image_pull("coder-chat")
    kube.scale("coder-chat", 1)

    def endpoints() -> list[dict[str, Any]]:
        return [e for s in kube.endpoint_slices("coder-chat") for e in s["endpoints"] or []]

    await kube.wait_until(lambda: bool(endpoints()))
    (endpoint,) = endpoints()
    assert endpoint["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert kube.routable("coder-chat") == []
