"""A rolling restart of the activator Deployment under load (maxSurge 1, maxUnavailable
0): each replica is replaced by a new one, which becomes Ready before the old one leaves
the Service's endpoints and gets SIGTERM. Clients go through the activator Service (the
fake kube-proxy): zero failed requests for warm models, and zero extra cold starts
(models are adopted, never stopped and started again)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakekube.server import FakeKube
from tests.ha_cluster import NS, Cluster, cluster_of, kube_model
from tests.harness import chat, wait_for

SERVICE = "activator"


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


async def route_to(cluster: Cluster, names: list[str]) -> None:
    """The Service's endpoints: exactly these replicas (as the endpoints controller
    shows Ready pods and drops a terminating one), once kube-proxy routes by them."""
    wanted = sorted(("127.0.0.1", cluster.replicas[n].port) for n in names)
    cluster.kube.set_endpoints(SERVICE, wanted, namespace=NS)
    await wait_for(
        lambda: sorted(cluster.kube.routable(SERVICE, namespace=NS)) == wanted,
        what=f"the Service routing to {names}",
    )


async def warm_everywhere(cluster: Cluster) -> None:
    """Every replica has probed both engines (a follower does once the leader's intent
    says ready): the load starts on warm models only."""

    async def ready() -> bool:
        for name in cluster.replicas:
            models = (await cluster.admin(name, "/admin/models"))["models"]
            if any(m["state"] != "ready" for m in models):
                return False
        return True

    await wait_for(ready, what="both models ready on every replica")


async def test_rolling_restart_under_load_fails_nothing_and_cold_starts_nothing(
    kube: FakeKube, tmp_path: Path
) -> None:
    models = {"a": kube_model(kube, "a"), "b": kube_model(kube, "b")}
    service = kube.add_service(SERVICE, namespace=NS)
    proxy = kube.proxy.services[(NS, SERVICE)]
    async with cluster_of(kube, tmp_path, models, names=("r1", "r2")) as cluster:
        await cluster.leader()
        for name in ("a", "b"):  # warm
            assert (await cluster.ask("r1", name))[0] == 200
        await warm_everywhere(cluster)
        await route_to(cluster, ["r1", "r2"])

        outcomes: Counter[str] = Counter()
        failures: list[str] = []
        done = asyncio.Event()

        async def client(model: str) -> None:
            # A connection per request, as kube-proxy balances connections: every
            # request picks among the endpoints of its moment.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while not done.is_set():
                    try:
                        async with (
                            asyncio.timeout(30),
                            session.post(f"{service}/v1/chat/completions", json=chat(model)) as r,
                        ):
                            body = await r.read()
                            outcome = str(r.status)
                            if r.status != 200:
                                failures.append(f"{model}: {r.status} {body[:300]!r}")
                            elif r.headers.get("X-Activator-Cold-Start") != "false":
                                outcome = "cold"
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        outcome = "error"
                        failures.append(f"{model}: {exc!r}")
                    outcomes[outcome] += 1

        clients = [asyncio.create_task(client(m)) for m in ("a", "b", "a")]
        handovers = []
        for old, new in (("r1", "r3"), ("r2", "r4")):
            before = outcomes.total()
            await cluster.spawn(new)  # the surge pod, Ready first
            await route_to(cluster, sorted({*cluster.replicas} - {old}))
            # The preStop pause: SIGTERM comes once what was routed to it is answered.
            endpoint = ("127.0.0.1", cluster.replicas[old].port)
            await wait_for(lambda e=endpoint: proxy.open[e] == 0, what=f"{old} drained")
            was_leader = cluster.holder() == old
            assert await cluster.terminate(old) == 0  # SIGTERM: in-flight ones finish
            handovers.append(was_leader)
            await wait_for(
                lambda before=before: outcomes.total() > before + 20,
                what="traffic through the new replica set",
            )
        await cluster.leader()  # a deciding leader among the new replicas
        done.set()
        await asyncio.gather(*clients)

        total = outcomes.total()
        cold_starts = {name: len(cluster.scale_writes(name, 1)) - 1 for name in ("a", "b")}
        print(
            f"\n[rolling restart] {total} requests, failed {len(failures)}, "
            f"cold answers {outcomes['cold']}, extra cold starts {cold_starts}, "
            f"leader replaced in steps {handovers}"
        )
        assert failures == []
        assert outcomes["cold"] == 0
        assert True in handovers  # the leader itself was replaced under load
        # No model was stopped, started again or given a second pod.
        assert cold_starts == {"a": 0, "b": 0}
        assert cluster.scale_writes("a", 0) == cluster.scale_writes("b", 0) == []
        assert cluster.pods_created("a") == cluster.pods_created("b") == 1
        assert kube.replicas("a") == kube.replicas("b") == 1
