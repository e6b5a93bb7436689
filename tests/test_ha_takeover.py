"""Losing the leader: SIGKILL during a wake and during a swap, and a leader partitioned
from the API. Another replica takes over within lease_duration + 2 s, reconciles the
models from the API, answers the requests held on the survivors, stops nothing that has
traffic, and leaves nothing running once idle. Replicas are separate processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakekube.server import FakeKube, PodPlan
from tests.ha_cluster import (
    ISSUE_BOUND,
    LEASE,
    LEASE_DURATION,
    NS,
    SLACK,
    Cluster,
    cluster_of,
    kube_model,
)
from tests.harness import wait_for


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(gpus=1, bookmark_interval=0.2) as fake:
        yield fake


async def takeover_after(cluster: Cluster, old: str, since: float, what: str) -> str:
    """Wait for another replica to take the Lease from `old`; check and report the time
    from `since` (the failure) to the takeover, as the API server recorded it."""
    await wait_for(
        lambda: cluster.holder() not in (None, old), timeout=30, what=f"takeover ({what})"
    )
    takeover = cluster.kube.lease_takeovers(LEASE, namespace=NS)[-1]
    assert takeover.previous == old and takeover.holder is not None
    gap = takeover.at - since
    assert takeover.previous_write is not None
    waited = takeover.at - takeover.previous_write
    print(
        f"\n[{what}] {takeover.holder} took over {gap:.2f}s after the leader's failure "
        f"({waited:.2f}s after its last renewal; lease_duration {LEASE_DURATION}s)"
    )
    assert gap <= ISSUE_BOUND + SLACK, f"{what}: takeover after {gap:.2f}s"
    assert waited >= LEASE_DURATION  # the old leader's lease was waited out, never cut short
    return takeover.holder


async def all_idle(cluster: Cluster, names: tuple[str, ...]) -> None:
    """Nothing left running: every model scaled to 0 and its pods gone."""
    kube = cluster.kube
    await kube.wait_until(
        lambda: all(kube.replicas(n) == 0 and not kube.pods(n) for n in names), within=60
    )


async def test_leader_sigkill_during_a_wake(kube: FakeKube, tmp_path: Path) -> None:
    models = {
        "coder": kube_model(
            kube, "coder", idle_timeout="2s", plan=PodPlan(engine_startup_delay=2.0)
        )
    }
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2", "r3")) as cluster:
        leader = await cluster.leader()
        first, second = cluster.followers(leader)
        held = asyncio.create_task(cluster.ask(first, "coder"))
        # The leader decided and scaled; the engine is still loading.
        await kube.wait_until(lambda: kube.replicas("coder") == 1 and bool(kube.pods("coder")))
        assert not held.done()
        killed = cluster.kill(leader)
        also_held = asyncio.create_task(cluster.ask(second, "coder"))
        new = await takeover_after(cluster, leader, killed, "sigkill during a wake")
        # The held requests on the survivors are answered by the engine the old leader
        # started: the new one adopted it (no second scale-up, no second pod).
        for task in (held, also_held):
            status, body, _ = await task
            assert status == 200, body
        assert cluster.scale_writes("coder", 1) == [leader]
        assert cluster.pods_created("coder") == 1
        assert cluster.intent()["coder"].by == new
        # The dead replica's demand is unknown (its Lease goes stale): no idle stop
        # until the kubelet restarts it (same pod, same identity) and it reports again.
        await cluster.spawn(leader)
        await all_idle(cluster, ("coder",))
        assert cluster.scale_writes("coder", 0) == [new]


async def test_leader_sigkill_during_a_swap(kube: FakeKube, tmp_path: Path) -> None:
    """Pool of one GPU: the leader drains `a` (a stream in flight through a follower) to
    make room for `b` (held on another follower), and dies. The new leader adopts `a`,
    decides the swap again, lets the stream finish, then stops `a` and starts `b`."""
    slow = PodPlan(engine_args=("--stream-delay", "0.3"))
    keys = {"pool": "gpu", "min_residency": "0s", "drain_timeout": "60s", "idle_timeout": "3s"}
    models = {"a": kube_model(kube, "a", plan=slow, **keys), "b": kube_model(kube, "b", **keys)}
    async with cluster_of(
        kube, tmp_path, models, names=("r1", "r2", "r3"), pools={"gpu": {"gpus": 1}}
    ) as cluster:
        leader = await cluster.leader()
        streaming, waiting = cluster.followers(leader)
        assert (await cluster.ask(streaming, "a", max_tokens=1))[0] == 200
        stream = asyncio.create_task(
            cluster.ask(streaming, "a", stream=True, max_tokens=20)  # about 6 s
        )

        async def leader_counts_it() -> bool:
            (model,) = [
                m for m in (await cluster.admin(leader, "/admin/models"))["models"]
                if m["name"] == "a"
            ]  # fmt: skip
            return bool(model["cluster"]["in_flight"] == 1)

        await wait_for(leader_counts_it, timeout=30, what="the stream, counted by the leader")
        swap = asyncio.create_task(cluster.ask(waiting, "b"))
        await wait_for(
            lambda: (
                cluster.intent().get("a") is not None and cluster.intent()["a"].state == "draining"
            ),
            timeout=30,
            what="the leader draining a",
        )
        assert not stream.done()
        killed = cluster.kill(leader)
        new = await takeover_after(cluster, leader, killed, "sigkill during a swap")

        status, body, _ = await stream
        ended = time.monotonic()
        assert status == 200
        assert isinstance(body, str) and "[DONE]" in body  # never cut
        status, body, _ = await swap
        assert status == 200, body
        # Nothing was stopped while it had traffic: a went to 0 only after its stream.
        stops = [at for at, name, replicas in cluster.record if name == "a" and replicas == 0]
        assert stops and min(stops) > ended - 0.5  # the stream's last bytes in transit
        assert cluster.scale_writes("a", 0) == [new]
        # One model of the pool up at a time, by the kubelet and by the API's record.
        assert kube.max_gpus_in_use == 1
        assert cluster.most_running_at_once({"a", "b"}) == 1
        await cluster.spawn(leader)
        await all_idle(cluster, ("a", "b"))


async def test_a_leader_cut_off_from_the_api_hands_over_and_keeps_serving(
    kube: FakeKube, tmp_path: Path
) -> None:
    """The leader's API connection hangs: it stops deciding at its renew deadline,
    another replica takes over, and the cut-off one keeps serving the warm model and
    holding requests for the cold one. Its demand is unknown to the new leader, which
    therefore never stops the warm model as idle while it cannot hear it."""
    idle = 3.0
    models = {
        "warm": kube_model(kube, "warm", idle_timeout=f"{idle}s"),
        "cold": kube_model(kube, "cold", idle_timeout=f"{idle}s"),
    }
    kube.scale("warm", 1)  # running before the replicas start: adopted by both
    await kube.wait_until(lambda: bool(kube.get("warm")["status"].get("readyReplicas")))
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (other,) = cluster.followers(leader)

        async def settled() -> bool:  # the follower hears the leader, and its intent
            body = await cluster.admin(other, "/admin/ha")
            return leader in body["replicas"]["fresh"] and set(cluster.intent()) == set(models)

        await wait_for(settled, timeout=15, what="the leader heard, its intent published")
        assert (await cluster.ask(leader, "warm"))[0] == 200  # fresh activity: not idle yet
        kube.partition(leader, mode="hang")
        cut = time.monotonic()
        new = await takeover_after(cluster, leader, cut, "leader partitioned")
        assert new == other

        async def stepped_down() -> bool:
            return (await cluster.admin(leader, "/admin/ha"))["role"] == "follower"

        await wait_for(stepped_down, timeout=10, what="the cut-off leader stops leading")
        # Warm: served by the cut-off replica; cold: held there.
        status, body, headers = await cluster.ask(leader, "warm")
        assert status == 200, body
        assert headers.get("X-Activator-Cold-Start") == "false"
        cold = asyncio.create_task(cluster.ask(leader, "cold"))

        async def held_there() -> bool:
            body = await cluster.admin(leader, "/admin/models/cold")
            return bool(body["queued"] == 1)

        await wait_for(held_there, timeout=10, what="the cold request held")

        # The new leader cannot hear the cut-off replica: as far as it knows `warm` has
        # had no request for twice its idle timeout, and still it does not stop it.
        async def idle_but_unknown() -> bool:
            body = await cluster.admin(new, "/admin/models/warm")
            return bool(
                body["state"] == "ready"
                and body["cluster"]["demand_unknown"]
                and body["cluster"]["idle_seconds"] > 2 * idle
            )

        await wait_for(idle_but_unknown, timeout=30, what="warm idle by the leader's knowledge")
        ha = await cluster.admin(new, "/admin/ha")
        assert leader in ha["replicas"]["stale"]
        assert kube.replicas("warm") == 1
        assert cluster.scale_writes("warm", 0) == []
        healed = time.monotonic()
        kube.heal(leader)
        # Its held request reaches the leader's decision, and is answered.
        status, body, _ = await cold
        assert status == 200, body
        assert cluster.scale_writes("cold", 1) == [new]
        await all_idle(cluster, ("warm", "cold"))
        first_stop = min(at for at, name, r in cluster.record if name == "warm" and r == 0)
        assert first_stop > healed  # never while the cut-off replica could not be heard
        print(f"[partition] lasted {healed - cut:.1f}s; warm idled only after the heal")
