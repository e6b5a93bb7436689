"""Several activators (separate `activator serve` processes, one identity each) on the fake
API server: one decider, every replica's demand, a wake happens once, and a GPU pool's
capacity holds cluster-wide."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakekube.server import FakeKube
from tests.ha_cluster import LEASE, NS, Cluster, cluster_of, kube_model
from tests.harness import wait_for


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(gpus=1, bookmark_interval=0.2) as fake:
        yield fake


def sample(text: str, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples whose labels include `labels`, from /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def header(headers: dict[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "")


async def test_a_wake_through_any_replica_scales_once_and_every_replica_serves_it(
    kube: FakeKube, tmp_path: Path
) -> None:
    models = {"coder": kube_model(kube, "coder")}
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        # Cold requests through both replicas at once; the follower's own wake included.
        asks = [cluster.ask(follower, "coder") for _ in range(3)]
        asks += [cluster.ask(leader, "coder") for _ in range(2)]
        answers = await asyncio.gather(*asks)
        assert [status for status, _, _ in answers] == [200] * 5, answers
        assert all(header(h, "X-Activator-Cold-Start") == "true" for _, _, h in answers)
        # One scale write, by the leader; the follower wrote nothing to the scale.
        assert cluster.scale_writes("coder", 1) == [leader]
        assert cluster.pods_created("coder") == 1
        # Warm now, through either.
        for name in (leader, follower):
            status, _, headers = await cluster.ask(name, "coder")
            assert status == 200 and header(headers, "X-Activator-Cold-Start") == "false"

        # The cluster-wide view: the leader decided; both replicas say so.
        for name in (leader, follower):
            (model,) = (await cluster.admin(name, "/admin/models"))["models"]
            assert model["state"] == "ready"
            assert model["cluster"]["decided_by"] == leader
            assert model["cluster"]["intent"]["state"] == "ready"
            assert model["cluster"]["leader"] == leader
        ha = await cluster.admin(follower, "/admin/ha")
        assert ha["role"] == "follower" and not ha["deciding"]
        assert ha["leader"] == leader
        assert leader in ha["replicas"]["fresh"]
        # Metrics: who leads; the wake is counted once, by the leader (a follower's probe
        # is no wake), so a sum over the replicas counts it once.
        for name, leads, wakes in ((leader, 1.0, 1.0), (follower, 0.0, 0.0)):
            text = await cluster.metrics(name)
            assert sample(text, "activator_leader", replica=name) == leads
            assert sample(text, "activator_wake_duration_seconds_count", model="coder") == wakes
            assert sample(text, "activator_requests_total", model="coder") > 0

        # A stop sent to the follower is the leader's decision: forwarded, and the
        # leader's answer relayed.
        await leader_address_known(cluster, follower, leader)
        # The leader's refusal too: coder has no sleep mode.
        status, body, headers = await post(cluster, follower, "/admin/models/coder/sleep")
        assert status == 409 and "sleep" in body["error"]["message"], body
        assert header(headers, "X-Activator-Forwarded-To") == leader
        status, body, headers = await post(cluster, follower, "/admin/models/coder/stop")
        assert status == 202, body
        assert body["name"] == "coder" and body["stopping"] is True
        assert header(headers, "X-Activator-Forwarded-To") == leader
        await idle(cluster, "coder")
        assert cluster.scale_writes("coder", 0) == [leader]


async def test_pool_capacity_holds_cluster_wide_with_three_replicas_and_random_traffic(
    kube: FakeKube, tmp_path: Path
) -> None:
    names = ("a", "b", "c")
    models = {
        name: kube_model(
            kube, name, pool="gpu", min_residency="0s", max_wait="2s", drain_timeout="5s"
        )
        for name in names
    }
    rng = random.Random(12)
    async with cluster_of(
        kube, tmp_path, models, names=("r1", "r2", "r3"), pools={"gpu": {"gpus": 1}}
    ) as cluster:
        await cluster.leader()
        replicas = sorted(cluster.replicas)
        plan = [(rng.choice(replicas), rng.choice(names)) for _ in range(14)]

        async def client(work: list[tuple[str, str]]) -> list[tuple[int, object]]:
            answers = []
            for replica, model in work:
                status, body, _ = await cluster.ask(replica, model)
                answers.append((status, body))
            return answers

        batches = await asyncio.gather(*(client(plan[i::3]) for i in range(3)))
        failed = [body for batch in batches for status, body in batch if status != 200]
        assert not failed, failed
        swaps = sum(len(cluster.scale_writes(name, 1)) for name in names)
        print(f"\n[capacity] {len(plan)} requests, {swaps} scale-ups, 3 replicas")
        assert swaps >= 2  # the traffic did move the GPU around
        # Never two models of the 1-GPU pool up at once: by the kubelet's own count and
        # by the API server's record of spec.replicas.
        assert kube.max_gpus_in_use == 1
        assert cluster.most_running_at_once(set(names)) == 1
        # Every scale write came from a leader; the followers wrote none.
        writers = {c for name in names for v in (0, 1) for c in cluster.scale_writes(name, v)}
        assert writers <= set(kube.lease_holders(LEASE, namespace=NS)), writers


async def idle(cluster: Cluster, name: str) -> None:
    await cluster.kube.wait_until(lambda: cluster.kube.replicas(name) == 0, within=60)


async def post(
    cluster: Cluster, identity: str, path: str, *, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    async with cluster.session.post(cluster.replicas[identity].url + path, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def leader_address_known(cluster: Cluster, follower: str, leader: str) -> str:
    """Until `follower` has read the admin address `leader` publishes; that address."""

    async def known() -> str | None:
        reports = (await cluster.admin(follower, "/admin/ha"))["replicas"]["reports"]
        return next((r["admin_url"] for r in reports if r["identity"] == leader), None)

    found: str = await wait_for(known, timeout=30, what=f"{leader}'s address on {follower}")
    return found


async def test_a_forwarded_decision_reaching_a_follower_is_not_forwarded_again(
    kube: FakeKube, tmp_path: Path
) -> None:
    """During a leader change a follower may forward to a replica that no longer leads:
    that one answers 503 (retry) and never forwards again, so a request makes one hop."""
    models = {"coder": kube_model(kube, "coder")}
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        status, _, _ = await cluster.ask(leader, "coder")  # up, so a stop would show
        assert status == 200
        await leader_address_known(cluster, follower, leader)

        hop = {"X-Activator-Forwarded-By": "r0"}
        status, body, headers = await post(
            cluster, follower, "/admin/models/coder/stop", headers=hop
        )
        assert status == 503, body
        assert body["error"]["code"] == "not_leader"
        message = body["error"]["message"]
        assert "r0" in message and leader in message and "not forwarded again" in message
        assert header(headers, "Retry-After")
        assert header(headers, "X-Activator-Forwarded-To") == ""  # answered here
        # Not forwarded: the leader took no stop (it would have before answering).
        assert (await cluster.admin(leader, "/admin/models/coder"))["state"] == "ready"
        assert "forwarded to the leader" not in cluster.replicas[follower].output()
        # The leader itself takes a forwarded decision: it is the one hop.
        status, body, _ = await post(cluster, leader, "/admin/models/coder/stop", headers=hop)
        assert status == 202 and body["stopping"] is True
        await idle(cluster, "coder")
        assert cluster.scale_writes("coder", 0) == [leader]


async def test_a_decision_for_an_unreachable_leader_is_a_503_naming_it(
    kube: FakeKube, tmp_path: Path
) -> None:
    """The leader publishes an address nothing listens on (127.0.0.2: loopback, but its
    server is bound to 127.0.0.1, so the connection is refused)."""
    models = {"coder": kube_model(kube, "coder")}
    async with cluster_of(kube, tmp_path, models, names=()) as cluster:
        await cluster.spawn("r1", pod_ip="127.0.0.2")
        assert await cluster.leader() == "r1"
        await cluster.spawn("r2")
        url = await leader_address_known(cluster, "r2", "r1")
        assert url == f"http://127.0.0.2:{cluster.replicas['r1'].port}"

        status, body, headers = await post(cluster, "r2", "/admin/models/coder/sleep")
        assert status == 503, body
        assert body["error"]["code"] == "leader_unreachable"
        message = body["error"]["message"]
        assert "r1" in message and url in message and "r2" in message
        assert header(headers, "Retry-After")
        # A reload is each replica's own: never forwarded, answered here.
        async with cluster.session.post(cluster.replicas["r2"].url + "/admin/reload") as resp:
            assert resp.status == 200, await resp.text()


async def test_a_model_busy_on_a_follower_is_not_idle_for_the_leader(
    kube: FakeKube, tmp_path: Path
) -> None:
    """A stream in flight through the follower keeps the model up past its idle timeout
    on the leader, which has no traffic of its own; the model idles once it ends."""
    from tests.fakekube.server import PodPlan

    models = {
        "coder": kube_model(
            kube,
            "coder",
            idle_timeout="1s",
            plan=PodPlan(engine_args=("--stream-delay", "0.25")),
        )
    }
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        stream = asyncio.create_task(
            cluster.ask(follower, "coder", stream=True, max_tokens=16)  # about 4 s
        )

        async def leader_sees_it() -> bool:
            (model,) = (await cluster.admin(leader, "/admin/models"))["models"]
            return bool(model["cluster"]["in_flight"] == 1 and model["in_flight"] == 0)

        await wait_for(leader_sees_it, timeout=30, what="the follower's stream, on the leader")
        status, body, _ = await stream
        assert status == 200
        assert isinstance(body, str) and "[DONE]" in body  # the whole stream, uncut
        # It was up all along: no stop before the stream ended.
        assert cluster.scale_writes("coder", 0) == []
        await idle(cluster, "coder")
        assert cluster.scale_writes("coder", 0) == [cluster.holder()]


async def test_a_start_that_fails_on_the_leader_fails_what_followers_hold(
    kube: FakeKube, tmp_path: Path
) -> None:
    """The follower's held request gets the leader's reason at once, not a hold timeout;
    and the follower never retries the start itself."""
    models = {"coder": kube_model(kube, "coder")}
    kube.fail_image_pull("coder")
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        leader = await cluster.leader()
        (follower,) = cluster.followers(leader)
        status, body, _ = await cluster.ask(follower, "coder")
        assert status == 503, body
        message = body["error"]["message"]
        assert "ImagePullBackOff" in message and leader in message
        assert cluster.intent()["coder"].failures >= 1
        assert set(cluster.scale_writes("coder", 1)) == {leader}


async def test_sleep_swaps_decided_by_the_leader_are_followed_and_served_everywhere(
    tmp_path: Path,
) -> None:
    """vLLM sleep mode on a shared GPU: the leader puts `a` to sleep for `b` and wakes it
    again; the follower mirrors the sleep, then probes the woken engine (/is_sleeping)
    and serves it, without ever calling the sleep API itself."""
    from tests.fakekube.server import PodPlan

    sleepy = PodPlan(
        engine_args=("--enable-sleep-mode", "--weights-gib", "2"),
        engine_env=(("VLLM_SERVER_DEV_MODE", "1"),),
    )
    keys = {
        "pool": "gpu",
        "min_residency": "0s",
        "sleep": {"level": 1, "host_memory": "2GiB", "timeout": "20s"},
    }
    async with FakeKube(gpus=1, gpu_sharing=2, bookmark_interval=0.2) as kube:
        models = {n: kube_model(kube, n, plan=sleepy, **keys) for n in ("a", "b")}
        pools = {"gpu": {"gpus": 1, "host_memory": "8GiB"}}
        async with cluster_of(kube, tmp_path, models, names=("r1", "r2"), pools=pools) as cluster:
            leader = await cluster.leader()
            (follower,) = cluster.followers(leader)
            for model in ("a", "b", "a"):  # a sleeps for b, then b for a: woken in place
                status, body, _ = await cluster.ask(follower, model)
                assert status == 200, body
            b = await cluster.admin(follower, "/admin/models/b")
            assert b["state"] == "sleeping"  # mirrored
            assert kube.replicas("a") == kube.replicas("b") == 1  # sleepers keep their pods
            assert cluster.pods_created("a") == 1  # woken, not cold-started
            # The follower's metrics hold no sleep or wake: the leader's do.
            follower_text = await cluster.metrics(follower)
            assert sample(follower_text, "activator_sleep_duration_seconds_count") == 0
            assert sample(await cluster.metrics(leader), "activator_swaps_total") == 2
