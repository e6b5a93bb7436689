"""Scaling a model out with several activators (separate `activator serve` processes on
the fake API server): the leader sizes the model from every replica's demand and is the
only one writing the scale; every replica routes its own requests to the pods itself.

Each activator routes with its own counts, so one replica's requests alone never ask for
more than its own share: the tests below put load through both, so that only the sum
asks for the replicas reached.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import streams
from tests.fakekube.server import FakeKube
from tests.ha_cluster import Cluster, cluster_of
from tests.harness import wait_for
from tests.streams import Stream
from tests.test_ha_serve import sample
from tests.test_scale_out import scaled

LONG = 2000  # tokens: 200 s of stream at the engines' 0.1 s a token, for "until cancelled"
MODEL = "coder"


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


def open_stream(cluster: Cluster, identity: str, *, tokens: int = LONG) -> Stream:
    url = cluster.replicas[identity].url + "/v1/chat/completions"
    return streams.open_stream(cluster.session, url, MODEL, tokens=tokens)


async def scaled_view(cluster: Cluster, identity: str) -> dict[str, Any]:
    """The `replicas` part of /admin/models/coder on replica `identity`."""
    view: dict[str, Any] = (await cluster.admin(identity, f"/admin/models/{MODEL}"))["replicas"]
    return view


async def load(cluster: Cluster, identity: str) -> dict[str, int]:
    """Requests in flight per pod, as replica `identity`'s own router counts them."""
    pods = (await scaled_view(cluster, identity))["pods"]
    return {p["name"]: p["in_flight"] for p in pods if p["in_flight"]}


async def routable(cluster: Cluster, identity: str) -> int:
    return int((await scaled_view(cluster, identity))["routable"])


def scale_writers(cluster: Cluster) -> set[str]:
    """Every client that wrote a Deployment's scale subresource."""
    return {
        r.client
        for r in cluster.kube.requests
        if r.verb == "patch" and r.resource == "deployments/scale"
    }


def pod_writers(cluster: Cluster) -> set[str]:
    """Every client that patched a pod (the deletion costs before a scale-down)."""
    return {r.client for r in cluster.kube.requests if r.verb == "patch" and r.resource == "pods"}


def history(cluster: Cluster) -> list[int]:
    """spec.replicas of the model's Deployment, each change in order (from 0)."""
    seen = [0]
    for _, name, replicas in cluster.record:
        if name == MODEL and replicas != seen[-1]:
            seen.append(replicas)
    return seen


async def ramp(cluster: Cluster, leader: str, follower: str) -> list[Stream]:
    """Two long streams through the follower, then two through the leader: the model
    goes 0 -> 1 -> 2 on the follower's demand alone, then up to 4 on the sum (2 + 2),
    one step per request the leader takes (its streams arrive one by one)."""
    through_follower = [open_stream(cluster, follower) for _ in range(2)]
    for stream in through_follower:
        await stream.started()
    # The follower's second request was held until a second pod was up: the leader,
    # with no request of its own, scaled for it.
    assert history(cluster) == [0, 1, 2]
    through_leader = [open_stream(cluster, leader) for _ in range(2)]
    for stream in through_leader:
        await stream.started()
    await cluster.kube.wait_until(lambda: cluster.kube.replicas(MODEL) == 4, within=60)
    return through_follower + through_leader


@pytest.mark.timeout(180)
async def test_the_leader_scales_out_from_every_replicas_demand_and_back_after_the_delay(
    kube: FakeKube, tmp_path: Path
) -> None:
    models = {MODEL: scaled(kube, MODEL, most=4, target=1, delay="2s")}
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        streams = await ramp(cluster, leader, follower)
        steps = history(cluster)
        assert steps[:3] == [0, 1, 2] and steps == sorted(set(steps)) and steps[-1] == 4, steps
        # The scale-up to 2 counted the follower's held requests (the leader had none).
        (up_to_2,) = re.findall(
            r"scale up 1 -> 2 .* from (\d+) in flight \+ (\d+) held",
            cluster.replicas[leader].output(),
        )
        assert int(up_to_2[1]) >= 1, up_to_2
        # Every scale write is the leader's; the follower never decided anything.
        assert scale_writers(cluster) == {leader}
        decided = await scaled_view(cluster, leader)
        assert decided["last_decision"]["demand"] == 4 and decided["desired"] == 4
        unasked = await scaled_view(cluster, follower)
        assert unasked["last_decision"] is None and unasked["desired"] is None
        leader_text, follower_text = await cluster.metrics(leader), await cluster.metrics(follower)
        assert sample(leader_text, "activator_scale_decisions_total", direction="up") >= 2
        assert sample(follower_text, "activator_scale_decisions_total") == 0
        # Each replica routes its own two streams to two pods, by its own counts.
        for identity in (leader, follower):
            assert sorted((await load(cluster, identity)).values()) == [1, 1], identity
        assert sample(follower_text, "activator_pod_in_flight_requests", model=MODEL) == 2
        # The follower probes the new pods itself: all four take its requests.
        await wait_for(lambda: _routable_is(cluster, follower, 4), what="4 pods on the follower")

        for stream in streams:
            await stream.cancel()
        await kube.wait_until(lambda: kube.replicas(MODEL) == 1, within=60)
        down = history(cluster)[len(steps) - 1 :]
        assert down == sorted(down, reverse=True) and down[-1] == 1, history(cluster)
        assert scale_writers(cluster) == {leader}
        assert pod_writers(cluster) == {leader}  # the deletion costs too
        for identity in (leader, follower):  # scaled in, not stopped: that is idle's rule
            assert (await cluster.admin(identity, f"/admin/models/{MODEL}"))["state"] == "ready"


async def _routable_is(cluster: Cluster, identity: str, count: int) -> bool:
    return await routable(cluster, identity) == count


@pytest.mark.timeout(180)
async def test_a_new_leader_keeps_the_replicas_for_the_scale_down_delay(
    kube: FakeKube, tmp_path: Path
) -> None:
    """The leader's streams end and it hands over (a rolling restart): the new leader's
    own demand asks for 2 of the 4 replicas, but a replica goes only once demand stayed
    lower for scale_down_delay, on a new leader as on the old one."""
    models = {MODEL: scaled(kube, MODEL, most=4, target=1, delay="10m")}
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        streams = await ramp(cluster, leader, follower)
        for stream in streams[2:]:
            await stream.cancel()
        assert await cluster.terminate(leader) == 0
        assert await cluster.leader() == follower

        async def decided() -> dict[str, Any] | None:
            decision: dict[str, Any] | None = (await scaled_view(cluster, follower))[
                "last_decision"
            ]
            return decision if decision is not None and decision["demand"] == 2 else None

        decision = await wait_for(decided, timeout=30, what="the new leader's decision")
        assert decision == {"desired": 4, "reason": "delay", "demand": 2}
        assert kube.replicas(MODEL) == 4 and history(cluster)[-1] == 4
        assert sorted((await load(cluster, follower)).values()) == [1, 1]
        for stream in streams[:2]:
            assert not stream.task.done()  # type: ignore[union-attr]
            await stream.cancel()
