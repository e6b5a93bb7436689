"""What the leader decides from and when its drain may go on, as tables
(activator.ha.follow); the follower rule itself is checked with the transition table in
tests/test_transitions.py. And the replica's settings from its environment."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from activator.config.settings import LeaderElectionSettings
from activator.ha import demand as wire
from activator.ha import wiring
from activator.ha.demand import ModelDemand, ReplicaReport, Reported
from activator.ha.follow import (
    drained_everywhere,
    evidence_unknown,
    merge_views,
    probe_backoff,
)
from activator.ha.intent import ModelIntent, decode, encode
from activator.ha.wiring import ha_settings
from activator.placement.policy import ModelView, decide

NOW = 1000.0
LEASE = 15.0


def view(name: str = "chat", **keys: object) -> ModelView:
    defaults: dict[str, object] = {"state": "ready", "last_activity": 900.0, "idle_timeout": 60.0}
    return ModelView(name=name, **{**defaults, **keys})  # type: ignore[arg-type]


def report(
    identity: str, models: Mapping[str, Reported], *, renewed_at: float | None = NOW - 1
) -> ReplicaReport:
    return ReplicaReport(identity=identity, models=models, received_at=NOW, renewed_at=renewed_at)


def test_the_leader_sums_every_replicas_requests_and_takes_the_oldest_wait() -> None:
    remote = {"chat": ModelDemand(in_flight=2, queued=1, oldest_wait=950.0, last_activity=990.0)}
    (merged,) = merge_views(
        [view(in_flight=1, queued=2, oldest_wait=980.0)], remote, unknown=False, now=NOW
    )
    assert (merged.in_flight, merged.queued) == (3, 3)
    assert merged.oldest_wait == 950.0  # the oldest wait on any replica
    assert merged.last_activity == 990.0  # the latest activity on any replica
    assert not merged.unknown  # the backend's flag, untouched


def test_a_model_busy_only_on_a_follower_is_not_idle_for_the_leader() -> None:
    idle_here = view(last_activity=0.0)
    assert [s.model for s in decide(None, [idle_here], now=NOW).stop] == ["chat"]
    remote = {"chat": ModelDemand(in_flight=1)}
    merged = merge_views([idle_here], remote, unknown=False, now=NOW)
    assert decide(None, merged, now=NOW).stop == ()


def test_while_some_replica_cannot_vouch_for_its_demand_nothing_is_idle() -> None:
    idle_here = view(last_activity=0.0)
    merged = merge_views([idle_here], {}, unknown=True, now=NOW)
    assert decide(None, merged, now=NOW).stop == ()
    assert not merged[0].unknown  # which engines run is still known: starts go on
    waiting = view("other", state="stopped", queued=1, oldest_wait=990.0)
    assert decide(1, merge_views([waiting], {}, unknown=True, now=NOW), now=NOW).start == ("other",)


@pytest.mark.parametrize(
    ("renewed_at", "unknown"),
    [
        (NOW - 1.0, False),  # heard a heartbeat ago
        (NOW - 4.0, True),  # missed two heartbeats: it may be cut off since
        (NOW - 20.0, True),  # stale
        (None, True),  # not seen renewing yet
    ],
)
def test_evidence_from_a_replica_counts_only_while_it_is_heard(
    renewed_at: float | None, unknown: bool
) -> None:
    reports = [report("b", {}, renewed_at=renewed_at)]
    assert evidence_unknown(reports, now=NOW, lease_duration=LEASE, evidence_age=3.0) is unknown
    assert not evidence_unknown([], now=NOW, lease_duration=LEASE, evidence_age=3.0)


@pytest.mark.parametrize(
    ("reported", "renewed_at", "drained"),
    [
        (Reported(seen=7), NOW - 1, True),  # applied the drain, nothing in flight
        (Reported(seen=8), NOW - 1, True),  # applied a later intent
        (Reported(seen=6), NOW - 1, False),  # has not applied it: could take a request
        (Reported(), NOW - 1, False),  # never applied anything
        (None, NOW - 1, False),  # reports nothing for the model
        (Reported(in_flight=1, seen=7), NOW - 1, False),  # still answering one
        (Reported(seen=6), NOW - 20, True),  # stale: cannot apply anything
        (Reported(in_flight=1, seen=6), NOW - 20, False),  # stale, its requests count
        (Reported(seen=6), None, False),  # unconfirmed: may be alive
    ],
)
def test_a_drain_waits_for_every_replica_to_apply_it_and_finish(
    reported: Reported | None, renewed_at: float | None, drained: bool
) -> None:
    models = {"chat": reported} if reported is not None else {}
    reports = [report("b", models, renewed_at=renewed_at), report("c", {"chat": Reported(seen=9)})]
    assert drained_everywhere(reports, "chat", epoch=7, now=NOW, lease_duration=LEASE) is drained


def test_probes_of_one_intent_back_off_and_are_capped() -> None:
    assert [probe_backoff(n, base=0.5) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert probe_backoff(50, base=2.0) == 30.0


def test_demand_carries_the_intent_applied() -> None:
    text = wire.encode({"chat": wire.Demand(seen=3), "idle": wire.Demand()}, now=NOW)
    assert wire.decode(text) == {"chat": Reported(seen=3)}
    assert wire.decode('{"chat":{"in_flight":0,"queued":0,"seen":-1}}') == {}


def test_intent_names_its_writer_and_counts_failures() -> None:
    failed = ModelIntent("failed", 4, by="r1", failures=2, error="ImagePullBackOff: pod x")
    text = encode({"chat": failed, "coder": ModelIntent("ready", 1)})
    assert text == (
        '{"chat":{"state":"failed","epoch":4,"by":"r1","failures":2,'
        '"error":"ImagePullBackOff: pod x"},"coder":{"state":"ready","epoch":1}}'
    )
    (decoded,) = [i for m, i in decode(text).items() if m == "chat"]
    assert (decoded.by, decoded.failures, decoded.error) == ("r1", 2, "ImagePullBackOff: pod x")
    assert decode('{"chat":{"state":"ready","epoch":1,"failures":true,"by":3}}') == {
        "chat": ModelIntent("ready", 1)
    }


def test_the_namespace_comes_from_the_config_the_pod_or_the_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "namespace"
    monkeypatch.setattr(wiring, "SERVICE_ACCOUNT_NAMESPACE", str(account))
    config = LeaderElectionSettings(
        enabled=True, lease_duration=3, renew_deadline=2, retry_period=0.5
    )
    with pytest.raises(ValueError, match=r"\$POD_NAMESPACE"):
        ha_settings(config, {})
    account.write_text("from-the-account\n")
    assert ha_settings(config, {}).namespace == "from-the-account"
    assert ha_settings(config, {"POD_NAMESPACE": "ops"}).namespace == "ops"
    named = config.model_copy(update={"namespace": "activator"})
    settings = ha_settings(named, {"POD_NAMESPACE": "ops"})
    assert settings.namespace == "activator"
    assert (settings.lease_duration, settings.renew_deadline, settings.retry_period) == (3, 2, 0.5)
