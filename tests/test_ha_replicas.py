"""Demand sharing: the wire format and the leader's merge as tables, then replicas
publishing on Leases of their own on the fake API server and a leader merging them."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Mapping

import pytest

from activator.backends.kube.cluster import KubeCluster
from activator.config.ha import HaSettings, PodOwner, replica_lease_name
from activator.ha import demand as wire
from activator.ha.demand import Demand, ModelDemand, ReplicaReport, Reported, merge
from activator.ha.replicas import REPLICA_SELECTOR, ClusterDemand, DemandPublisher
from tests.fakekube.server import FakeKube
from tests.ha_support import NS, connect
from tests.harness import wait_for

FAST = HaSettings(namespace=NS, lease_duration=3, renew_deadline=2, retry_period=0.5)

# -- the wire format ------------------------------------------------------------------------


def test_demand_is_published_as_ages_and_read_back() -> None:
    text = wire.encode(
        {
            "chat": Demand(in_flight=2, queued=1, oldest_wait=97.0, last_activity=99.5),
            "coder": Demand(last_activity=40.0),
            "idle": Demand(),  # never used: left out
        },
        now=100.0,
    )
    assert json.loads(text) == {
        "chat": {"in_flight": 2, "queued": 1, "oldest_wait_age_s": 3.0, "last_activity_age_s": 0.5},
        "coder": {"in_flight": 0, "queued": 0, "last_activity_age_s": 60.0},
    }
    assert " " not in text
    assert wire.decode(text) == {
        "chat": Reported(in_flight=2, queued=1, oldest_wait_age=3.0, last_activity_age=0.5),
        "coder": Reported(last_activity_age=60.0),
    }


@pytest.mark.parametrize(
    "entry",
    [
        {"in_flight": -1},
        {"in_flight": True},
        {"queued": "3"},
        {"oldest_wait_age_s": -2},
        {"last_activity_age_s": math.inf},
        {"last_activity_age_s": "soon"},
        "not an object",
    ],
)
def test_a_malformed_entry_is_skipped_and_the_rest_still_counts(entry: object) -> None:
    text = json.dumps({"bad": entry, "good": {"in_flight": 1, "queued": 0}}, allow_nan=True)
    assert wire.decode(text) == {"good": Reported(in_flight=1)}


@pytest.mark.parametrize("text", ["", "[1, 2]", "null", "{", '"chat"'])
def test_an_unusable_annotation_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        wire.decode(text)


# -- the merge ------------------------------------------------------------------------------


def report(
    identity: str,
    models: Mapping[str, Reported],
    *,
    received_at: float = 100.0,
    renewed_at: float | None = 99.0,
) -> ReplicaReport:
    return ReplicaReport(
        identity=identity, models=models, received_at=received_at, renewed_at=renewed_at
    )


def test_counts_are_summed_and_the_oldest_wait_and_latest_activity_win() -> None:
    view = merge(
        [
            report("b", {"chat": Reported(in_flight=1, queued=2, oldest_wait_age=5.0)}),
            report(
                "c",
                {"chat": Reported(in_flight=3, oldest_wait_age=1.0, last_activity_age=0.5)},
                received_at=101.0,
            ),
        ],
        now=101.0,
        lease_duration=15,
        local={"chat": Demand(in_flight=1, last_activity=90.0), "coder": Demand(queued=1)},
        local_identity="a",
    )
    assert view.get("chat") == ModelDemand(
        in_flight=5,
        queued=2,
        oldest_wait=95.0,  # b's: received at 100 with 5 s of waiting
        last_activity=100.5,  # c's: received at 101, 0.5 s old
        unknown=False,
        replicas=("a", "b", "c"),
    )
    assert view.get("coder") == ModelDemand(queued=1, replicas=("a",))
    assert view.get("nothing") == ModelDemand()
    assert view.fresh == {"b", "c"} and not view.unknown


@pytest.mark.parametrize(
    ("renewed_at", "freshness"),
    [(99.0, "fresh"), (85.0, "stale"), (None, "unconfirmed")],
)
def test_a_replica_not_seen_renewing_makes_every_model_unknown(
    renewed_at: float | None, freshness: str
) -> None:
    view = merge(
        [
            report("b", {"chat": Reported(queued=2)}, renewed_at=renewed_at),
            report("c", {"coder": Reported(in_flight=1)}),
        ],
        now=101.0,
        lease_duration=15,
    )
    unknown = freshness != "fresh"
    assert getattr(view, freshness) == {"b"} | ({"c"} if freshness == "fresh" else set())
    # Its last held requests still want the model...
    assert view.get("chat").queued == 2
    # ...and it may have taken requests for any model since: none is idle evidence.
    assert view.get("chat").unknown is unknown
    assert view.get("coder").unknown is unknown
    assert view.get("never-seen").unknown is unknown


# -- on the fake API server -----------------------------------------------------------------


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


class Replica:
    """A replica's demand, as the lifecycle would hold it, and its publisher."""

    def __init__(self, cluster: KubeCluster, identity: str, **kwargs: object) -> None:
        self.demand: dict[str, Demand] = {}
        self.changed = asyncio.Event()
        self.publisher = DemandPublisher(
            cluster,
            settings=FAST,
            demand=lambda: self.demand,
            changed=self.changed,
            identity=identity,
            **kwargs,  # type: ignore[arg-type]
        )

    def set(self, model: str, demand: Demand) -> None:
        self.demand[model] = demand
        self.changed.set()


@pytest.fixture
async def clusters(kube: FakeKube) -> AsyncIterator[dict[str, KubeCluster]]:
    found = {name: await connect(kube, name) for name in ("a", "b", "c")}
    yield found
    for cluster in found.values():
        await cluster.aclose()


async def test_a_replica_publishes_its_demand_on_a_lease_of_its_own(
    kube: FakeKube, clusters: dict[str, KubeCluster]
) -> None:
    replica = Replica(clusters["b"], "b", owner=PodOwner("activator-b", "uid-b"))
    replica.demand["chat"] = Demand(in_flight=1, last_activity=time.monotonic())
    name = replica_lease_name("b")
    assert name == "activator-replica-b"
    replica.publisher.start()
    try:
        await kube.wait_until(lambda: kube.lease(name, namespace=NS) is not None)
        lease = kube.lease(name, namespace=NS)
        assert lease is not None
        assert lease["metadata"]["labels"] == {"activator.dev/role": "replica"}
        assert lease["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Pod", "name": "activator-b", "uid": "uid-b"}
        ]
        assert lease["spec"]["holderIdentity"] == "b"
        assert lease["spec"]["leaseDurationSeconds"] == 3
        published = json.loads(lease["metadata"]["annotations"]["activator.dev/demand"])
        assert published["chat"]["in_flight"] == 1
        # Heartbeats renew it.
        renewed = lease["spec"]["renewTime"]
        await kube.wait_until(
            lambda: (kube.lease(name, namespace=NS) or {})["spec"]["renewTime"] != renewed
        )
        # A burst of changes is written in a few debounced writes, the last state last.
        writes = replica.publisher.writes
        for queued in range(1, 21):
            replica.set("chat", Demand(in_flight=1, queued=queued, oldest_wait=time.monotonic()))
            await asyncio.sleep(0)  # let the publisher run between changes
        await wait_for(
            lambda: _published(kube, name).get("chat", {}).get("queued") == 20,
            timeout=10,
            what="the last state",
        )
        assert replica.publisher.writes - writes < 10  # far fewer writes than changes
        # Someone deletes it: the next heartbeat recreates it.
        kube.store.delete("leases", NS, name)
        await kube.wait_until(lambda: kube.lease(name, namespace=NS) is not None)
    finally:
        await replica.publisher.aclose()
    assert kube.lease(name, namespace=NS) is None  # deleted on a graceful stop


def _published(kube: FakeKube, name: str) -> dict[str, dict[str, float]]:
    lease = kube.lease(name, namespace=NS)
    text = (lease or {}).get("metadata", {}).get("annotations", {}).get("activator.dev/demand")
    return json.loads(text) if text else {}


async def test_the_leader_merges_every_replicas_demand_and_hears_new_requests_at_once(
    kube: FakeKube, clusters: dict[str, KubeCluster]
) -> None:
    local = {"chat": Demand(in_flight=1, last_activity=time.monotonic())}
    leader = ClusterDemand(clusters["a"], settings=FAST, identity="a", local=lambda: local)
    followers = {name: Replica(clusters[name], name) for name in ("b", "c")}
    leader.start()
    for replica in followers.values():
        replica.publisher.start()
    try:
        started = time.monotonic()
        followers["b"].set("chat", Demand(in_flight=2, last_activity=started))
        followers["c"].set("coder", Demand(queued=1, oldest_wait=started))
        await wait_for(lambda: leader.view().fresh == {"b", "c"}, timeout=10, what="both confirmed")
        view = leader.view()
        assert not view.unknown
        assert (view.get("chat").in_flight, view.get("chat").replicas) == (3, ("a", "b"))
        coder = view.get("coder")
        assert coder.queued == 1
        # The age came over the wire and back onto our clock: never before it began.
        assert coder.oldest_wait is not None
        assert started <= coder.oldest_wait <= time.monotonic()

        # A follower holds a new request: the leader is told at once.
        seen = leader.changes.count
        followers["c"].set("coder", Demand(queued=2, oldest_wait=started))
        async with asyncio.timeout(10):
            while leader.view().get("coder").queued != 2:
                seen = await leader.changes.wait(seen)
    finally:
        for replica in followers.values():
            await replica.publisher.aclose()
        await leader.aclose()


@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_a_replica_cut_off_from_the_api_goes_stale_and_keeps_every_model_busy(
    kube: FakeKube, clusters: dict[str, KubeCluster], mode: str
) -> None:
    leader = ClusterDemand(clusters["a"], settings=FAST, identity="a", local=dict)
    followers = {name: Replica(clusters[name], name) for name in ("b", "c")}
    leader.start()
    for replica in followers.values():
        replica.publisher.start()
    try:
        followers["b"].set("chat", Demand(queued=1, oldest_wait=time.monotonic()))
        await wait_for(lambda: leader.view().fresh == {"b", "c"}, timeout=10, what="confirmed")
        seen = leader.changes.count
        kube.partition("b", mode=mode)  # type: ignore[arg-type]
        followers["b"].set("coder", Demand(in_flight=1))  # cannot be published
        async with asyncio.timeout(FAST.lease_duration + 10):
            while "b" not in leader.view().stale:
                seen = await leader.changes.wait(seen)  # the staleness timer notifies
        view = leader.view()
        assert view.get("chat").queued == 1  # its last held request still counts
        assert view.get("chat").unknown and view.get("coder").unknown
        assert view.get("coder").in_flight == 0  # what it could not publish is unknown
        kube.heal("b")
        await wait_for(lambda: leader.view().fresh == {"b", "c"}, timeout=15, what="back")
        await wait_for(
            lambda: leader.view().get("coder").in_flight == 1, timeout=10, what="caught up"
        )
        assert not leader.view().unknown
        # A replica that stops gracefully deletes its Lease: dropped at once.
        await followers["b"].publisher.aclose()
        await wait_for(lambda: "b" not in leader.view().fresh, timeout=10, what="dropped")
        view = leader.view()
        assert view.fresh == {"c"} and not view.unknown
        assert view.get("chat").queued == 0
    finally:
        for replica in followers.values():
            await replica.publisher.aclose()
        await leader.aclose()


async def test_a_leader_just_started_does_not_trust_a_report_it_has_not_seen_renewed(
    kube: FakeKube, clusters: dict[str, KubeCluster]
) -> None:
    # A Lease left over from a replica that died without its pod being deleted.
    name = replica_lease_name("ghost")
    kube.put_lease(name, holder="ghost", namespace=NS, duration=3)
    lease = kube.lease(name, namespace=NS)
    assert lease is not None

    def label(obj: dict[str, object]) -> None:
        obj["metadata"]["labels"] = {"activator.dev/role": "replica"}  # type: ignore[index]
        obj["metadata"]["annotations"] = {"activator.dev/demand": "{}"}  # type: ignore[index]

    kube.store.update("leases", NS, name, label)
    leader = ClusterDemand(clusters["a"], settings=FAST, identity="a", local=dict)
    leader.start()
    try:
        await asyncio.wait_for(leader.synced.wait(), 10)
        assert leader.view().unconfirmed == {"ghost"}
        assert leader.view().get("chat").unknown
        assert REPLICA_SELECTOR == "activator.dev/role=replica"
    finally:
        await leader.aclose()
