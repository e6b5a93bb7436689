"""The leader's intent (per-model state and epoch) on the leader Lease: written only by
the leader's fenced writes, mirrored by followers, continued by the next leader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping

import pytest

from activator.config.ha import HaSettings
from activator.ha.election import LeaderElector
from activator.ha.intent import (
    ANNOTATION,
    IntentPublisher,
    IntentWatcher,
    ModelIntent,
    decode,
    encode,
    intent_of,
)
from tests.fakekube.server import FakeKube
from tests.ha_support import LEASE, NS, Recorder, connect, electors, leaders
from tests.harness import wait_for

FAST = HaSettings(namespace=NS, lease_duration=3, renew_deadline=2, retry_period=0.5)


def test_intent_round_trips_compactly() -> None:
    models = {"coder": ModelIntent("sleeping", 3), "chat": ModelIntent("ready", 7)}
    text = encode(models)
    assert text == '{"chat":{"state":"ready","epoch":7},"coder":{"state":"sleeping","epoch":3}}'
    assert decode(text) == models


@pytest.mark.parametrize(
    "entry",
    [{"state": "Ready!", "epoch": 1}, {"state": "ready", "epoch": -1}, {"state": "ready"}, 3],
)
def test_a_malformed_intent_entry_is_skipped(entry: object) -> None:
    text = json.dumps({"bad": entry, "chat": {"state": "ready", "epoch": 1}})
    assert decode(text) == {"chat": ModelIntent("ready", 1)}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


async def _intent_seen(watcher: IntentWatcher, wanted: Mapping[str, ModelIntent]) -> None:
    async with asyncio.timeout(10):
        seen = watcher.changes.count
        while watcher.models != wanted:
            seen = await watcher.changes.wait(seen)


async def test_followers_mirror_what_the_leader_publishes(kube: FakeKube) -> None:
    publishers: dict[str, IntentPublisher] = {}

    def attach(elector: LeaderElector) -> None:
        publishers[elector.identity] = IntentPublisher(elector)

    watcher_cluster = await connect(kube, "c")
    watcher = IntentWatcher(watcher_cluster, settings=FAST)
    watcher.start()
    try:
        async with electors(kube, ["a", "b"], FAST, Recorder(), extra=attach) as found:
            await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
            (leader,) = leaders(found)
            (follower,) = set(found) - {leader}
            # A follower cannot publish.
            assert publishers[follower].publish("chat", "ready") is None
            assert publishers[leader].publish("chat", "starting") == ModelIntent("starting", 1)
            assert publishers[leader].publish("chat", "ready") == ModelIntent("ready", 2)
            assert publishers[leader].publish("chat", "ready") == ModelIntent("ready", 2)
            publishers[leader].publish("coder", "sleeping")
            await _intent_seen(
                watcher, {"chat": ModelIntent("ready", 2), "coder": ModelIntent("sleeping", 1)}
            )
            assert watcher.leader == leader
            await wait_for(watcher.fresh, timeout=10, what="a renewal seen")
            # The follower's elector read nothing it could not have: only the leader wrote.
            writers = {
                r.client for r in kube.requests if r.resource == "leases" and r.verb == "update"
            }
            assert writers == {leader}
    finally:
        await watcher.aclose()
        await watcher_cluster.aclose()


async def test_a_deposed_leaders_intent_write_fails(kube: FakeKube) -> None:
    cluster = await connect(kube, "a")
    elector = LeaderElector(cluster, settings=FAST, identity="a")
    publisher = IntentPublisher(elector)
    elector.start()
    try:
        await elector.wait_for(True)
        publisher.publish("chat", "ready")
        await kube.wait_until(lambda: intent_of(kube.lease(LEASE, namespace=NS)) != {})
        # Another holder writes the Lease; before a has heard of it, it decides to stop.
        kube.put_lease(LEASE, holder="other", namespace=NS, duration=3)
        assert publisher.publish("chat", "stopping") == ModelIntent("stopping", 2)
        await elector.wait_for(False)
        assert elector.leader == "other"
        attempted = [
            r
            for r in kube.requests
            if r.client == "a" and r.verb == "update" and "stopping" in json.dumps(r.body)
        ]
        assert attempted  # the write was made, with the resourceVersion a held...
        stored = kube.lease(LEASE, namespace=NS)
        assert intent_of(stored) == {"chat": ModelIntent("ready", 1)}  # ...and refused
        assert stored is not None and stored["spec"]["holderIdentity"] == "other"
        assert publisher.publish("chat", "stopped") is None
    finally:
        await elector.aclose()
        await cluster.aclose()


async def test_the_next_leader_continues_the_epochs(kube: FakeKube) -> None:
    publishers: dict[str, IntentPublisher] = {}

    def attach(elector: LeaderElector) -> None:
        publishers[elector.identity] = IntentPublisher(elector)

    watcher_cluster = await connect(kube, "c")
    watcher = IntentWatcher(watcher_cluster, settings=FAST)
    watcher.start()
    try:
        async with electors(kube, ["a", "b"], FAST, Recorder(), extra=attach) as found:
            await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
            (first,) = leaders(found)
            (second,) = set(found) - {first}
            publishers[first].publish("chat", "starting")
            publishers[first].publish("chat", "ready")
            await _intent_seen(watcher, {"chat": ModelIntent("ready", 2)})
            await found[first].aclose()  # a rolling restart: release, hand over
            await found[second].wait_for(True)
            # The intent survived the handover, and the epochs go on from it.
            assert publishers[second].models == {"chat": ModelIntent("ready", 2)}
            assert publishers[second].publish("chat", "draining") == ModelIntent("draining", 3)
            await _intent_seen(watcher, {"chat": ModelIntent("draining", 3)})
            assert watcher.leader == second
            lease = kube.lease(LEASE, namespace=NS)
            assert lease is not None and ANNOTATION in lease["metadata"]["annotations"]
    finally:
        await watcher.aclose()
        await watcher_cluster.aclose()


async def test_a_follower_cut_off_from_the_api_knows_its_intent_is_not_fresh(
    kube: FakeKube,
) -> None:
    watcher_cluster = await connect(kube, "c")
    watcher = IntentWatcher(watcher_cluster, settings=FAST)
    watcher.start()
    try:
        async with electors(kube, ["a"], FAST, Recorder()) as found:
            await found["a"].wait_for(True)
            await wait_for(watcher.fresh, timeout=10, what="renewals seen")
            kube.partition("c", mode="hang")  # its watch stalls; the leader carries on
            await wait_for(lambda: not watcher.fresh(), timeout=15, what="not fresh")
            assert found["a"].is_leader
            kube.heal("c")
            await wait_for(watcher.fresh, timeout=15, what="fresh again")
    finally:
        kube.heal("c")
        await watcher.aclose()
        await watcher_cluster.aclose()
