"""What a follower does with the leader's intent, and what the leader decides from: pure
functions of plain data, tested with tables.

The design (docs/kubernetes.md, "Several replicas (HA)"): every replica runs the same
Models and the same pool loops. On the leader the pool decides (activator.placement.policy) from
views whose demand is the whole cluster's (`merge_views`). On a follower the same loop
calls `follow_event` for each model instead, and feeds the event it returns to the model:
an event of the one transition table (activator.model.transitions), whose effects on a
follower never touch the engine. So a follower:

- serves only an engine the leader says is ready, once it has probed it itself
  (`probe`: the adoption path: Backend.discover, readiness, /is_sleeping);
- holds new requests as soon as the intent leaves ready (`leader_draining`,
  `leader_starting`), and lets requests in flight here run on: the leader's drain waits
  for them, as they are published in this replica's demand;
- cuts what it still has in flight when the leader lets the engine go (`leader_stopped`,
  `leader_asleep`: intent stopping, falling_asleep, stopped, sleeping or failed).

Intent states (the leader's model states): stopped, failed, starting, ready, draining,
falling_asleep, sleeping, waking, stopping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from activator.ha.demand import ModelDemand, ReplicaReport, freshness
from activator.model.transitions import Event
from activator.placement.policy import ModelView

# Intent states in which the leader no longer serves from the engine and is releasing
# it (or has): a follower cuts what it has in flight.
_STOPPED = frozenset({"stopping", "stopped", "failed"})
_ASLEEP = frozenset({"falling_asleep", "sleeping"})
_COMING = frozenset({"starting", "waking"})


def follow_event(state: str, intent: str, *, probing: bool) -> Event | None:
    """The event that moves a follower's model (in `state`; `probing`: its transition
    task runs) toward the leader's `intent`, or None when it is where it should be.

    Every event returned leads to a state for which this returns None under the same
    intent (no loop), except a probe, which only ends in ready, in sleeping (the engine
    was found asleep) or stopped (not found): the caller paces repeated probes."""
    if intent == "ready":
        if state == "ready" or (state == "starting" and probing):
            return None
        return "probe"
    if intent == "draining":
        return "leader_draining" if state in ("ready", "starting") else None
    if intent in _COMING:
        # A model probing here already goes on: it is ready only once the engine serves.
        return "leader_starting" if state in ("ready", "stopped", "failed", "sleeping") else None
    if intent in _ASLEEP:
        return None if state == "sleeping" else "leader_asleep"
    if intent in _STOPPED:
        return None if state in ("stopped", "failed") else "leader_stopped"
    return None  # a state this version does not know: keep what we have


def merge_views(
    views: Sequence[ModelView],
    remote: Mapping[str, ModelDemand],
    *,
    unknown: bool,
    now: float,
) -> list[ModelView]:
    """The leader's views with every other replica's demand (`remote`, merged without
    the local one): in-flight and held requests summed, the oldest wait on any replica,
    the latest activity on any replica. While some replica's demand is `unknown` (see
    `evidence_unknown`) every model counts as active now, so none is idle: none is
    stopped on the evidence of a replica the leader cannot hear. The view's own
    `unknown` stays the backend's flag (the engine's state is unknown): a replica that
    cannot vouch for its demand says nothing about which engines run."""
    merged: list[ModelView] = []
    for view in views:
        found = remote.get(view.name)
        in_flight, queued = view.in_flight, view.queued
        oldest, last = view.oldest_wait, view.last_activity
        if found is not None:
            in_flight += found.in_flight
            queued += found.queued
            if found.oldest_wait is not None:
                oldest = found.oldest_wait if oldest is None else min(oldest, found.oldest_wait)
            if found.last_activity is not None:
                last = max(last, found.last_activity)
        if unknown:
            last = max(last, now)
        merged.append(
            dataclasses.replace(
                view, in_flight=in_flight, queued=queued, oldest_wait=oldest, last_activity=last
            )
        )
    return merged


def evidence_unknown(
    reports: Iterable[ReplicaReport], *, now: float, lease_duration: float, evidence_age: float
) -> bool:
    """Whether some replica's demand cannot be vouched for now: stale or unconfirmed
    (activator.ha.demand.freshness), or fresh but not heard renewing for `evidence_age`
    (a missed heartbeat or two: it may have been cut off from the API just now, and
    whatever it took since its last report is unknown)."""
    for report in reports:
        if freshness(report, now=now, lease_duration=lease_duration) != "fresh":
            return True
        if report.renewed_at is not None and now - report.renewed_at > evidence_age:
            return True
    return False


def drained_everywhere(
    reports: Iterable[ReplicaReport],
    model: str,
    *,
    epoch: int,
    now: float,
    lease_duration: float,
) -> bool:
    """Whether a leader draining `model` (its intent at `epoch`) may go on: no replica
    reports a request in flight for it, and every replica it can hear has applied that
    intent (reported `seen` >= epoch): it holds new requests. A stale replica cannot
    apply anything; its last reported requests still count."""
    for report in reports:
        found = report.models.get(model)
        if found is not None and found.in_flight:
            return False
        if freshness(report, now=now, lease_duration=lease_duration) == "stale":
            continue
        if found is None or found.seen is None or found.seen < epoch:
            return False
    return True


def probe_backoff(attempts: int, *, base: float, cap: float = 30.0) -> float:
    """Seconds before probing again for the same intent after `attempts` probes that
    did not end in ready (the engine not found, asleep, or not answering)."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))
