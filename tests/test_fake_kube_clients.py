"""Per-client identities on the fake API server and the faults that single one client out:
a partition that hangs or refuses one replica's requests and watch streams while the
others carry on, healed on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakekube.server import FakeKube
from tests.fakekube_helpers import leases, next_event, watch_from_list

NS = "activator"


@pytest.fixture
async def replicas(kube: FakeKube) -> AsyncIterator[dict[str, client.ApiClient]]:
    clients = {
        name: await config.new_client_from_config(config_file=kube.kubeconfig_for(name))
        for name in ("replica-a", "replica-b")
    }
    try:
        yield clients
    finally:
        for api_client in clients.values():
            await api_client.close()


async def test_requests_are_recorded_under_their_client(
    kube: FakeKube, replicas: dict[str, client.ApiClient]
) -> None:
    for name, api_client in replicas.items():
        await leases(api_client).list_namespaced_lease(NS)
        assert kube.requests[-1].client == name
    assert kube.kubeconfig_for("replica-a") == kube.kubeconfig_for("replica-a")
    api_client = await config.new_client_from_config(config_file=kube.kubeconfig)
    async with api_client:
        await leases(api_client).list_namespaced_lease(NS)
    assert kube.requests[-1].client == "activator"


async def test_a_hung_partition_times_one_client_out_and_applies_nothing(
    kube: FakeKube, replicas: dict[str, client.ApiClient]
) -> None:
    kube.partition("replica-a", mode="hang")
    body = {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "replica-a"}}
    with pytest.raises(asyncio.TimeoutError):
        await leases(replicas["replica-a"]).create_namespaced_lease(NS, body, _request_timeout=0.5)
    await leases(replicas["replica-b"]).list_namespaced_lease(NS)  # the other one is fine
    kube.heal("replica-a")
    assert kube.lease("leader", namespace=NS) is None  # the hung write never landed
    await leases(replicas["replica-a"]).create_namespaced_lease(NS, body)
    assert kube.lease_holders("leader", namespace=NS) == ["replica-a"]


async def test_a_refusing_partition_resets_the_client_and_its_watches(
    kube: FakeKube, replicas: dict[str, client.ApiClient]
) -> None:
    list_a = leases(replicas["replica-a"]).list_namespaced_lease
    list_b = leases(replicas["replica-b"]).list_namespaced_lease
    async with (
        watch_from_list(list_a, NS, timeout_seconds=60) as events_a,
        watch_from_list(list_b, NS, timeout_seconds=60) as events_b,
    ):
        streams = {"replica-a": events_a, "replica-b": events_b}
        kube.put_lease("leader", holder="replica-b", namespace=NS)
        for name in streams:
            assert (await next_event(streams[name]))["type"] == "ADDED"
        kube.partition("replica-a", mode="refuse")
        with pytest.raises((aiohttp.ClientError, StopAsyncIteration)):
            await next_event(streams["replica-a"])
        with pytest.raises(aiohttp.ClientError):
            await leases(replicas["replica-a"]).list_namespaced_lease(NS)
        kube.put_lease("leader", holder="replica-b", namespace=NS, duration=20)
        assert (await next_event(streams["replica-b"]))["type"] == "MODIFIED"
    kube.heal("replica-a")
    await leases(replicas["replica-a"]).list_namespaced_lease(NS)


async def test_a_hung_partition_stalls_watches_until_healed(
    kube: FakeKube, replicas: dict[str, client.ApiClient]
) -> None:
    list_call = leases(replicas["replica-a"]).list_namespaced_lease
    async with watch_from_list(list_call, NS, timeout_seconds=60) as events:
        kube.partition("replica-a", mode="hang")
        kube.put_lease("leader", holder="replica-b", namespace=NS)
        pending = asyncio.ensure_future(next_event(events))
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        assert not done  # stalled: nothing crosses a partition
        kube.heal("replica-a")
        event = await pending
    assert (event["type"], event["object"].spec.holder_identity) == ("ADDED", "replica-b")


async def test_faults_can_target_one_client(
    kube: FakeKube, replicas: dict[str, client.ApiClient]
) -> None:
    kube.fail_next(1, status=500, verb="list", client="replica-b")
    await leases(replicas["replica-a"]).list_namespaced_lease(NS)
    with pytest.raises(ApiException) as caught:
        await leases(replicas["replica-b"]).list_namespaced_lease(NS)
    assert caught.value.status == 500
    assert kube.faults.pending() == 0


async def test_a_client_name_that_cannot_name_a_file_is_refused(kube: FakeKube) -> None:
    with pytest.raises(ValueError, match="client name"):
        kube.kubeconfig_for("../replica")
