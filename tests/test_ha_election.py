"""Leader election over a Lease on the fake API server: several electors in one process,
each with its own API identity so one can be partitioned while the others carry on."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from activator.config.ha import HaSettings, default_identity, pod_owner_from_env
from activator.ha import records
from activator.ha.election import LeaderElector
from tests.fakekube.server import FakeKube
from tests.ha_support import (
    LEASE,
    NS,
    Recorder,
    assert_one_leader_at_a_time,
    connect,
    electors,
    leaders,
)
from tests.harness import wait_for

# Short durations (3 s / 2 s / 0.5 s) so failovers take seconds; client-go's 1 s
# minimum on the retry period does not apply here.
FAST = HaSettings(namespace=NS, lease_duration=3, renew_deadline=2, retry_period=0.5)


def lease(holder: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": LEASE,
            "resourceVersion": "41",
            "labels": {"team": "ml"},
            "annotations": {"note": "kept"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "T0",
            "renewTime": "T1",
            "leaseTransitions": 4,
            **spec,
        },
    }


@pytest.mark.parametrize(
    ("holder", "acquire", "transitions"),
    [("a", "T0", 4), ("b", "NOW", 5), ("", "NOW", 5)],
    ids=["renewal", "takeover", "released"],
)
def test_a_held_lease_is_a_compare_and_swap_of_the_one_read(
    holder: str, acquire: str, transitions: int
) -> None:
    body = records.held(lease(holder), identity="a", duration=3, now="NOW", annotations={"k": "v"})
    assert body["metadata"] == {
        "name": LEASE,
        "resourceVersion": "41",  # the precondition
        "labels": {"team": "ml"},
        "annotations": {"k": "v"},
    }
    assert body["spec"] == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 3,
        "acquireTime": acquire,
        "renewTime": "NOW",
        "leaseTransitions": transitions,
    }


def test_a_release_empties_the_holder_and_keeps_the_rest() -> None:
    body = records.released(lease("a"), now="NOW")
    assert body["spec"] == {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": "NOW",
        "renewTime": "NOW",
        "leaseTransitions": 4,
    }
    assert body["metadata"]["annotations"] == {"note": "kept"}
    assert body["metadata"]["resourceVersion"] == "41"


def test_only_the_election_record_restarts_a_candidates_clock() -> None:
    relabelled = lease("a")
    relabelled["metadata"]["labels"] = {"other": "x"}
    assert records.record_key(relabelled) == records.record_key(lease("a"))
    assert records.record_key(lease("a", renewTime="T2")) != records.record_key(lease("a"))
    assert records.duration_of(lease("a"), default=3) == 15
    assert records.duration_of(lease("a", leaseDurationSeconds=None), default=3) == 3
    assert records.duration_of(None, default=3) == 3


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as fake:
        yield fake


@pytest.mark.parametrize(
    ("timings", "problem"),
    [
        ({"lease_duration": 10, "renew_deadline": 10}, "greater than renew_deadline"),
        ({"renew_deadline": 2.0, "retry_period": 2.0}, "1.2 x retry_period"),
        ({"retry_period": 0.05, "renew_deadline": 1}, "at least 0.1"),
        ({"lease_duration": 2.5, "renew_deadline": 2}, "whole number"),
        ({"write_interval": 3.0}, "below retry_period"),
    ],
)
def test_timings_are_validated_like_client_go(timings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        HaSettings(namespace=NS, **timings)


def test_defaults_are_client_gos() -> None:
    settings = HaSettings(namespace=NS)
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (15, 10, 2)


def test_identity_and_owner_come_from_the_pod() -> None:
    env = {"POD_NAME": "activator-7d-abc", "HOSTNAME": "h", "POD_UID": "u-1"}
    assert default_identity(env) == "activator-7d-abc"
    assert default_identity({"HOSTNAME": "activator-7d-xyz"}) == "activator-7d-xyz"
    owner = pod_owner_from_env(NS, env)
    assert owner is not None and owner.reference()["uid"] == "u-1"
    # The garbage collector would delete a Lease whose owner is in another namespace.
    assert pod_owner_from_env(NS, {**env, "POD_NAMESPACE": "elsewhere"}) is None
    assert pod_owner_from_env(NS, {"POD_NAME": "p"}) is None


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"]])
async def test_one_elector_leads_and_all_agree_on_who(kube: FakeKube, names: list[str]) -> None:
    recorder = Recorder()
    async with electors(kube, names, FAST, recorder) as found:
        await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
        (leader,) = leaders(found)
        await wait_for(
            lambda: all(e.leader == leader for e in found.values()),
            timeout=15,
            what="everyone sees the leader",
        )
        assert kube.lease_holders(LEASE, namespace=NS) == [leader]
        lease = kube.lease(LEASE, namespace=NS)
        assert lease is not None
        assert lease["spec"]["leaseDurationSeconds"] == 3
        assert lease["spec"]["leaseTransitions"] == 0
        # It keeps renewing while the others keep waiting.
        renewals = len(kube.lease_history(LEASE, namespace=NS))
        await wait_for(
            lambda: len(kube.lease_history(LEASE, namespace=NS)) >= renewals + 3,
            timeout=15,
            what="renewals",
        )
        assert leaders(found) == [leader]
        assert found[leader].valid_for() > 0
    assert_one_leader_at_a_time(kube, recorder)


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"]])
@pytest.mark.parametrize("mode", ["hang", "refuse"])
async def test_a_partitioned_leader_stops_leading_before_another_takes_over(
    kube: FakeKube, mode: str, names: list[str]
) -> None:
    recorder = Recorder()
    async with electors(kube, names, FAST, recorder) as found:
        await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
        (old,) = leaders(found)
        cut_at = time.monotonic()
        kube.partition(old, mode=mode)  # type: ignore[arg-type]
        await wait_for(
            lambda: any(n != old for n in leaders(found)), timeout=20, what="a new leader"
        )
        (new,) = leaders(found)
        takeover = kube.lease_takeovers(LEASE, namespace=NS)[-1]
        assert (takeover.previous, takeover.holder) == (old, new)
        assert takeover.previous_write is not None
        ((stepped_down, last_renewal),) = recorder.step_downs(old)
        assert last_renewal is not None
        # The old leader stopped by its own deadline timer, though its calls hung or
        # failed, and before anyone else could take over.
        assert stepped_down >= last_renewal + FAST.renew_deadline
        assert stepped_down < takeover.at
        assert not found[old].is_leader
        lease = kube.lease(LEASE, namespace=NS)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1
        print(
            f"\n[{mode}, {len(names)} electors] leader {old} cut at +0: stepped down at "
            f"+{stepped_down - cut_at:.2f}s ({stepped_down - last_renewal:.2f}s after its "
            f"last renewal), {new} took over at +{takeover.at - cut_at:.2f}s "
            f"({takeover.at - takeover.previous_write:.2f}s after the last renewal write)"
        )
        kube.heal(old)
        await wait_for(lambda: found[old].leader == new, timeout=15, what="old sees new")
        assert leaders(found) == [new]
    assert_one_leader_at_a_time(kube, recorder)


async def test_a_graceful_stop_releases_the_lease_for_an_immediate_takeover(
    kube: FakeKube,
) -> None:
    # A long lease: without the release the other would wait 15 s.
    settings = HaSettings(namespace=NS, lease_duration=15, renew_deadline=10, retry_period=0.5)
    recorder = Recorder()
    async with electors(kube, ["a", "b"], settings, recorder) as found:
        await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
        (old,) = leaders(found)
        (other,) = set(found) - {old}
        stopping = time.monotonic()
        await found[old].aclose()
        assert not found[old].is_leader
        released = kube.lease_history(LEASE, namespace=NS)[-1]
        assert (released.holder, released.duration) == ("", 1)
        await wait_for(lambda: found[other].is_leader, timeout=10, what="takeover")
        takeover = kube.lease_takeovers(LEASE, namespace=NS)[-1]
        assert (takeover.previous, takeover.holder) == ("", other)
        gap = takeover.at - stopping
        print(f"\n[graceful] {other} took over {gap:.2f}s after {old} began to stop")
        assert gap < settings.lease_duration  # did not wait the lease out
        lease = kube.lease(LEASE, namespace=NS)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1
    assert_one_leader_at_a_time(kube, recorder)


async def test_a_lost_race_is_not_an_error(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="activator.ha")
    # b's first create and first update both lose a race (409 from the API server).
    kube.fail_next(1, status=409, verb="create", resource="leases", client="b")
    kube.fail_next(1, status=409, verb="update", resource="leases", client="b")
    kube.put_lease(LEASE, holder="gone", namespace=NS, duration=1)
    cluster = await connect(kube, "b")
    elector = LeaderElector(cluster, settings=FAST, identity="b")
    try:
        elector.start()
        await elector.wait_for(True)
    finally:
        await elector.aclose()
        await cluster.aclose()
    conflicts = [r for r in kube.requests if r.client == "b" and r.verb == "update"]
    assert len(conflicts) >= 2  # the 409 and the winning write
    assert "lost the race" in caplog.text
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_a_deposed_leader_steps_down_at_its_next_write(kube: FakeKube) -> None:
    recorder = Recorder()
    async with electors(kube, ["a"], FAST, recorder) as found:
        await found["a"].wait_for(True)
        # Someone else writes the Lease (another controller, a person): a's next
        # renewal carries a stale resourceVersion.
        kube.put_lease(LEASE, holder="intruder", namespace=NS, duration=3, transitions=5)
        await found["a"].wait_for(False)
        assert found["a"].leader == "intruder"
        # It waits the intruder's lease out, then takes the Lease back.
        await found["a"].wait_for(True)
        lease = kube.lease(LEASE, namespace=NS)
        assert lease is not None and lease["spec"]["leaseTransitions"] == 6
        takeover = kube.lease_takeovers(LEASE, namespace=NS)[-1]
        assert takeover.previous_write is not None
        assert takeover.at - takeover.previous_write >= 3


async def test_is_leader_is_false_once_the_deadline_passes_even_before_the_timer(
    kube: FakeKube,
) -> None:
    cluster = await connect(kube, "a")
    elector = LeaderElector(cluster, settings=FAST, identity="a")
    try:
        elector.start()
        await elector.wait_for(True)
        kube.partition("a", mode="hang")
        renewed = elector.renewed_at
        assert renewed is not None
        await wait_for(
            lambda: time.monotonic() >= renewed + FAST.renew_deadline, timeout=10, what="deadline"
        )
        assert not elector.is_leader
        assert elector.valid_for() == 0.0
    finally:
        kube.heal("a")
        await elector.aclose()
        await cluster.aclose()


async def test_a_deleted_lease_is_recreated_by_its_leader_while_the_others_wait(
    kube: FakeKube,
) -> None:
    # A PUT recreates a missing Lease (create-on-update, like the apiserver), so the
    # leader's next renewal brings it back; the candidates that saw it held wait the
    # lease out instead of creating it under a leader that may still be leading.
    recorder = Recorder()
    async with electors(kube, ["a", "b", "c"], FAST, recorder) as found:
        await wait_for(lambda: len(leaders(found)) == 1, timeout=15, what="a leader")
        await wait_for(
            lambda: all(e.leader is not None for e in found.values()),
            timeout=15,
            what="everyone saw the holder",
        )
        (leader,) = leaders(found)
        kube.store.delete("leases", NS, LEASE)
        await kube.wait_until(lambda: kube.lease(LEASE, namespace=NS) is not None, within=10)
        assert kube.lease_holders(LEASE, namespace=NS) == [leader]
        assert leaders(found) == [leader]
        assert sum(e.term for e in found.values()) == 1
    assert_one_leader_at_a_time(kube, recorder)


async def test_stopping_a_leader_whose_calls_hang_is_prompt_and_bounded(kube: FakeKube) -> None:
    cluster = await connect(kube, "a")
    elector = LeaderElector(cluster, settings=FAST, identity="a")
    try:
        elector.start()
        await elector.wait_for(True)
        kube.partition("a", mode="hang")
        flips: list[bool] = []
        elector.subscribe(lambda event: flips.append(event.is_leader))
        await elector.aclose()  # cancels a hung renewal; the release hangs, bounded
        assert flips[0] is False  # it stopped leading before trying to release
        assert not elector.is_leader
        assert kube.lease_holders(LEASE, namespace=NS) == ["a"]  # nothing crossed
    finally:
        kube.heal("a")
        await cluster.aclose()
