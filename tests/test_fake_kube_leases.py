"""coordination.k8s.io/v1 Leases on the fake API server, driven by kubernetes_asyncio's
CoordinationV1Api and its leaderelection package exactly as replicas in a cluster drive
them: create/get/list/watch, replace with optimistic concurrency, the three patch types,
delete preconditions, MicroTime strictness, and a write log to measure failover."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.leaderelection import electionconfig, leaderelection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

from tests.fakekube.server import FakeKube
from tests.fakekube_helpers import leases, next_event, raw_request, watch_from_list

NS = "activator"


def lease_body(name: str, holder: str, **spec: Any) -> client.V1Lease:
    now = datetime.now(UTC).replace(microsecond=123456)
    return client.V1Lease(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1LeaseSpec(
            holder_identity=holder,
            lease_duration_seconds=15,
            acquire_time=now,
            renew_time=now,
            lease_transitions=0,
            **spec,
        ),
    )


async def created_then_taken_over(api: client.ApiClient) -> client.V1Lease:
    """The lease "leader" as "a" created it, returned after "b" has taken it over by a
    patch: its resourceVersion is stale."""
    created = await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    await leases(api).patch_namespaced_lease(
        "leader",
        NS,
        {"spec": {"holderIdentity": "b"}},
        _content_type="application/merge-patch+json",
    )
    return created


def reason(caught: pytest.ExceptionInfo[ApiException]) -> str:
    return str(json.loads(caught.value.body)["reason"])


async def test_create_then_read_and_list(kube: FakeKube, api: client.ApiClient) -> None:
    created = await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    assert created.metadata.resource_version
    assert created.metadata.uid
    got = await leases(api).read_namespaced_lease("leader", NS)
    assert got.spec.holder_identity == "a"
    assert got.spec.renew_time.microsecond == 123456
    listing = await leases(api).list_namespaced_lease(NS)
    assert [item.metadata.name for item in listing.items] == ["leader"]
    assert kube.lease("leader", namespace=NS) is not None


async def test_micro_times_are_served_in_utc_with_six_digits(
    kube: FakeKube, api: client.ApiClient
) -> None:
    body = lease_body("leader", "a")
    body.spec.renew_time = "2026-01-02T03:04:05.000001+02:00"
    await leases(api).create_namespaced_lease(NS, body)
    stored = kube.lease("leader", namespace=NS)
    assert stored is not None
    assert stored["spec"]["renewTime"] == "2026-01-02T01:04:05.000001Z"


@pytest.mark.parametrize(
    "renew_time",
    [
        "2026-01-02T03:04:05Z",  # what isoformat() gives for microsecond=0
        "2026-01-02T03:04:05.123Z",
        "2026-01-02T03:04:05.123456",  # no zone
    ],
)
async def test_a_micro_time_without_six_fraction_digits_is_a_bad_request(
    api: client.ApiClient, renew_time: str
) -> None:
    body = lease_body("leader", "a")
    body.spec.renew_time = renew_time
    with pytest.raises(ApiException) as caught:
        await leases(api).create_namespaced_lease(NS, body)
    assert caught.value.status == 400
    assert "2006-01-02T15:04:05.000000Z07:00" in json.loads(caught.value.body)["message"]


async def test_second_create_is_already_exists(api: client.ApiClient) -> None:
    await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    with pytest.raises(ApiException) as caught:
        await leases(api).create_namespaced_lease(NS, lease_body("leader", "b"))
    assert caught.value.status == 409
    assert reason(caught) == "AlreadyExists"
    assert json.loads(caught.value.body)["message"] == (
        'leases.coordination.k8s.io "leader" already exists'
    )


async def test_replace_with_a_stale_resource_version_conflicts(api: client.ApiClient) -> None:
    first = await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    first.spec.holder_identity = "a"
    first.spec.renew_time = datetime.now(UTC).replace(microsecond=1)
    renewed = await leases(api).replace_namespaced_lease("leader", NS, first)
    assert int(renewed.metadata.resource_version) > int(first.metadata.resource_version)
    # Another replica still holds the first read: its write must lose.
    first.spec.holder_identity = "b"
    with pytest.raises(ApiException) as caught:
        await leases(api).replace_namespaced_lease("leader", NS, first)
    assert caught.value.status == 409
    assert reason(caught) == "Conflict"
    body = json.loads(caught.value.body)
    assert body["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "leader": the object '
        "has been modified; please apply your changes to the latest version and try again"
    )
    assert body["details"] == {"name": "leader", "group": "coordination.k8s.io", "kind": "leases"}
    current = await leases(api).read_namespaced_lease("leader", NS)
    assert current.spec.holder_identity == "a"


async def test_replace_without_a_resource_version_is_invalid(api: client.ApiClient) -> None:
    await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    with pytest.raises(ApiException) as caught:
        await leases(api).replace_namespaced_lease("leader", NS, lease_body("leader", "b"))
    assert caught.value.status == 422
    assert json.loads(caught.value.body)["message"] == (
        'leases.coordination.k8s.io "leader" is invalid: metadata.resourceVersion: '
        "Invalid value: 0x0: must be specified for an update"
    )


async def test_replace_of_a_missing_lease_creates_it(kube: FakeKube) -> None:
    async with raw_request(
        kube,
        "PUT",
        f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/leader",
        body={
            "metadata": {"name": "leader"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
        },
    ) as response:
        assert response.status == 201
    assert kube.lease_holders("leader", namespace=NS) == ["a"]


async def test_an_unchanged_replace_is_not_written(kube: FakeKube, api: client.ApiClient) -> None:
    created = await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    same = await leases(api).replace_namespaced_lease("leader", NS, created)
    assert same.metadata.resource_version == created.metadata.resource_version
    assert len(kube.lease_history("leader", namespace=NS)) == 1


@pytest.mark.parametrize(
    ("content_type", "patch"),
    [
        ("application/merge-patch+json", {"spec": {"holderIdentity": "b"}}),
        ("application/strategic-merge-patch+json", {"spec": {"holderIdentity": "b"}}),
        (
            "application/json-patch+json",
            [{"op": "replace", "path": "/spec/holderIdentity", "value": "b"}],
        ),
    ],
)
async def test_patch_types(api: client.ApiClient, content_type: str, patch: Any) -> None:
    await leases(api).create_namespaced_lease(NS, lease_body("leader", "a"))
    patched = await leases(api).patch_namespaced_lease(
        "leader", NS, patch, _content_type=content_type
    )
    assert patched.spec.holder_identity == "b"
    assert patched.spec.lease_duration_seconds == 15


async def test_patch_carrying_a_stale_resource_version_conflicts(api: client.ApiClient) -> None:
    created = await created_then_taken_over(api)
    with pytest.raises(ApiException) as caught:
        await leases(api).patch_namespaced_lease(
            "leader",
            NS,
            {
                "metadata": {"resourceVersion": created.metadata.resource_version},
                "spec": {"holderIdentity": "c"},
            },
            _content_type="application/merge-patch+json",
        )
    assert caught.value.status == 409
    with pytest.raises(ApiException) as caught:
        await leases(api).patch_namespaced_lease(
            "leader",
            NS,
            [{"op": "test", "path": "/spec/holderIdentity", "value": "a"}],
            _content_type="application/json-patch+json",
        )
    assert caught.value.status == 422


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"lease_duration_seconds": 0}, "spec.leaseDurationSeconds"),
        ({"lease_transitions": -1}, "spec.leaseTransitions"),
    ],
)
async def test_invalid_spec_is_422(api: client.ApiClient, spec: dict[str, int], field: str) -> None:
    body = lease_body("leader", "a")
    for key, value in spec.items():
        setattr(body.spec, key, value)
    with pytest.raises(ApiException) as caught:
        await leases(api).create_namespaced_lease(NS, body)
    assert caught.value.status == 422
    assert json.loads(caught.value.body)["details"]["causes"][0]["field"] == field


async def test_delete_checks_preconditions(kube: FakeKube, api: client.ApiClient) -> None:
    created = await created_then_taken_over(api)
    stale = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(resource_version=created.metadata.resource_version)
    )
    with pytest.raises(ApiException) as caught:
        await leases(api).delete_namespaced_lease("leader", NS, body=stale)
    assert caught.value.status == 409
    assert "Precondition failed: ResourceVersion in precondition" in caught.value.body
    status = await leases(api).delete_namespaced_lease("leader", NS)
    assert status.status == "Success"
    assert status.details.uid == created.metadata.uid
    with pytest.raises(ApiException) as caught:
        await leases(api).read_namespaced_lease("leader", NS)
    assert caught.value.status == 404
    assert [r.event for r in kube.lease_history("leader", namespace=NS)] == [
        "ADDED",
        "MODIFIED",
        "DELETED",
    ]


async def test_unknown_fields_are_dropped_with_a_warning(kube: FakeKube) -> None:
    async with raw_request(
        kube,
        "POST",
        f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases",
        body={"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "color": "red"}},
    ) as response:
        assert response.status == 201
        assert response.headers["Warning"] == '299 - "unknown field \\"spec.color\\""'
        assert (await response.json())["spec"] == {"holderIdentity": "a"}


async def test_watch_streams_lease_writes(kube: FakeKube, api: client.ApiClient) -> None:
    async with watch_from_list(leases(api).list_namespaced_lease, NS) as events:
        kube.put_lease("leader", holder="a", namespace=NS)
        event = await next_event(events)
    assert event["type"] == "ADDED"
    assert event["object"].spec.holder_identity == "a"


async def test_takeovers_record_who_held_the_lease_and_when(kube: FakeKube) -> None:
    kube.put_lease("leader", holder="a", namespace=NS)
    kube.put_lease("leader", holder="a", namespace=NS)
    kube.put_lease("leader", holder="b", namespace=NS)
    history = kube.lease_history("leader", namespace=NS)
    (takeover,) = kube.lease_takeovers("leader", namespace=NS)
    assert (takeover.previous, takeover.holder) == ("a", "b")
    assert takeover.previous_write == history[1].at
    assert takeover.at == history[2].at
    assert kube.lease_holders("leader", namespace=NS) == ["a", "b"]


async def _campaign(kube: FakeKube, identity: str, leading: dict[str, asyncio.Event]) -> None:
    """One replica's leader election with the library, restarted when it dies (a lost
    connection escapes the library as a client error, not an ApiException)."""
    api_client = await config.new_client_from_config(config_file=kube.kubeconfig_for(identity))
    async with api_client:
        lock = LeaseLock("leader", NS, identity, api_client)

        async def started() -> None:
            leading[identity].set()

        async def stopped() -> None:
            leading[identity].clear()

        while True:
            election = leaderelection.LeaderElection(
                electionconfig.Config(
                    lock,
                    lease_duration=2,
                    renew_deadline=1.5,
                    retry_period=1,
                    onstarted_leading=started,
                    onstopped_leading=stopped,
                )
            )
            with contextlib.suppress(aiohttp.ClientError):
                await election.run()
            leading[identity].clear()
            await asyncio.sleep(0.1)  # the pod's restart back-off


async def test_leader_election_fails_over_when_the_leader_is_partitioned(
    kube: FakeKube,
) -> None:
    leading = {name: asyncio.Event() for name in ("a", "b")}
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_campaign(kube, name, leading)) for name in leading]
        await kube.wait_until(lambda: bool(kube.lease_holders("leader", namespace=NS)))
        (first,) = kube.lease_holders("leader", namespace=NS)
        assert first is not None
        other = "b" if first == "a" else "a"
        seen = len(kube.requests)
        kube.partition(first, mode="refuse")
        await kube.wait_until(lambda: other in kube.lease_holders("leader", namespace=NS))
        takeover = kube.lease_takeovers("leader", namespace=NS)[-1]
        assert (takeover.previous, takeover.holder) == (first, other)
        # The new holder waited out the lease it last saw renewed.
        assert takeover.at - takeover.previous_write >= 2
        assert first not in {r.client for r in kube.requests[seen:]}
        for task in tasks:
            task.cancel()
