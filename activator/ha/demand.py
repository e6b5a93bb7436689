"""Per-model demand, and how the leader merges what every replica reports: pure data and
functions, no I/O (tested with tables).

A replica reports ages, not timestamps ("the oldest held request has waited 3.2 s"), so
no two clocks are ever compared: the leader turns an age into a time on its own clock
by subtracting it from when it received the report. A follower also reports, per model,
the epoch of the leader's intent it has applied (`seen`): a leader draining a model
waits until every follower it hears from has applied the drain, so none of them takes
a new request for an engine about to go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

ANNOTATION = "activator.dev/demand"
# Annotations of one object total at most 256 KiB; keep well inside.
MAX_ENCODED = 128 * 1024

Freshness = Literal["fresh", "unconfirmed", "stale"]


@dataclass(frozen=True, kw_only=True)
class Demand:
    """One model's demand on one replica, in that replica's clock (the lifecycle's:
    time.monotonic by default), as Model.view() has it."""

    in_flight: int = 0
    queued: int = 0
    oldest_wait: float | None = None  # clock time the oldest held request arrived
    last_activity: float | None = None  # clock time of the last request start or end
    seen: int | None = None  # the leader's intent epoch applied for this model

    @property
    def empty(self) -> bool:
        return (
            not self.in_flight
            and not self.queued
            and self.oldest_wait is None
            and (self.last_activity is None)
            and self.seen is None
        )


@dataclass(frozen=True, kw_only=True)
class Reported:
    """One model's demand as a replica published it: ages in seconds at write time."""

    in_flight: int = 0
    queued: int = 0
    oldest_wait_age: float | None = None
    last_activity_age: float | None = None
    seen: int | None = None


def _age(now: float, when: float | None) -> float | None:
    return None if when is None else round(max(0.0, now - when), 3)


def encode(demand: Mapping[str, Demand], *, now: float) -> str:
    """The annotation's value: compact JSON, per model in_flight, queued and the two
    ages (absent when unknown). Models with no demand and no activity are left out. If
    it grows too large, only models with requests are kept."""
    out: dict[str, dict[str, float | int]] = {}
    for model, d in sorted(demand.items()):
        if d.empty:
            continue
        entry: dict[str, float | int] = {"in_flight": d.in_flight, "queued": d.queued}
        if (age := _age(now, d.oldest_wait)) is not None:
            entry["oldest_wait_age_s"] = age
        if (age := _age(now, d.last_activity)) is not None:
            entry["last_activity_age_s"] = age
        if d.seen is not None:
            entry["seen"] = d.seen
        out[model] = entry
    text = json.dumps(out, separators=(",", ":"))
    if len(text) > MAX_ENCODED:
        busy = {m: e for m, e in out.items() if e["in_flight"] or e["queued"]}
        text = json.dumps(busy, separators=(",", ":"))[:MAX_ENCODED]
    return text


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not an age: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not an age: {value!r}")
    return float(value)


def decode(text: str) -> dict[str, Reported]:
    """The annotation back into per-model reports. Raises ValueError when the whole
    value is unusable; a malformed model entry is skipped (the rest still counts)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("demand is not a JSON object")
    out: dict[str, Reported] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict):
            continue
        try:
            out[str(model)] = Reported(
                in_flight=_count(entry.get("in_flight", 0)),
                queued=_count(entry.get("queued", 0)),
                oldest_wait_age=_seconds(entry.get("oldest_wait_age_s")),
                last_activity_age=_seconds(entry.get("last_activity_age_s")),
                seen=_count(entry["seen"]) if "seen" in entry else None,
            )
        except ValueError:
            continue
    return out


# -- the merge -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReplicaReport:
    """What the leader knows of one other replica, on the leader's clock."""

    identity: str
    models: Mapping[str, Reported]
    received_at: float  # when this version of the report arrived
    # When the leader last saw the replica renew its Lease (None: not since the leader
    # started watching; the report may be arbitrarily old).
    renewed_at: float | None
    # Where its admin API answers (activator.ha.forward), if it published one.
    admin_url: str | None = None


def freshness(report: ReplicaReport, *, now: float, lease_duration: float) -> Freshness:
    """fresh: renewed within lease_duration by our clock. unconfirmed: not seen renewing
    yet. stale: not renewed for lease_duration (dead, or cut off from the API)."""
    if report.renewed_at is None:
        return "unconfirmed"
    return "fresh" if now - report.renewed_at < lease_duration else "stale"


@dataclass(frozen=True, kw_only=True)
class ModelDemand:
    """One model's demand over all replicas, in the leader's clock."""

    in_flight: int = 0
    queued: int = 0
    oldest_wait: float | None = None  # the oldest wait on any replica
    last_activity: float | None = None  # the latest activity on any replica
    # Some replica's demand is not known right now (stale or unconfirmed): never treat
    # the model as idle while this is True.
    unknown: bool = False
    replicas: tuple[str, ...] = ()  # replicas reporting demand or activity for it

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0


@dataclass(frozen=True, kw_only=True)
class ClusterView:
    models: Mapping[str, ModelDemand] = field(default_factory=dict)
    fresh: frozenset[str] = frozenset()
    unconfirmed: frozenset[str] = frozenset()
    stale: frozenset[str] = frozenset()

    @property
    def unknown(self) -> bool:
        """Some replica cannot vouch for its demand now."""
        return bool(self.unconfirmed or self.stale)

    def get(self, model: str) -> ModelDemand:
        """The merged demand of `model` (no demand anywhere: zeros, with `unknown`)."""
        found = self.models.get(model)
        return found if found is not None else ModelDemand(unknown=self.unknown)


@dataclass
class _Sum:
    in_flight: int = 0
    queued: int = 0
    oldest: float | None = None
    last: float | None = None
    who: list[str] = field(default_factory=list)

    def add(
        self, who: str, in_flight: int, queued: int, oldest: float | None, last: float | None
    ) -> None:
        self.in_flight += in_flight
        self.queued += queued
        if oldest is not None:
            self.oldest = oldest if self.oldest is None else min(self.oldest, oldest)
        if last is not None:
            self.last = last if self.last is None else max(self.last, last)
        self.who.append(who)

    def result(self, *, unknown: bool) -> ModelDemand:
        return ModelDemand(
            in_flight=self.in_flight,
            queued=self.queued,
            oldest_wait=self.oldest,
            last_activity=self.last,
            unknown=unknown,
            replicas=tuple(sorted(self.who)),
        )


def merge(
    reports: Iterable[ReplicaReport],
    *,
    now: float,
    lease_duration: float,
    local: Mapping[str, Demand] | None = None,
    local_identity: str = "",
) -> ClusterView:
    """Merge every replica's demand with the local one (already on our clock).

    in_flight and queued are summed over all replicas, stale ones included (their last
    held requests still want the model). The oldest wait is the earliest on any replica,
    the last activity the latest. A replica that is stale or unconfirmed may have taken
    requests for ANY model since it last reported, so while one exists every model is
    `unknown`: never idle evidence.
    """
    states: dict[Freshness, set[str]] = {"fresh": set(), "unconfirmed": set(), "stale": set()}
    acc: dict[str, _Sum] = {}
    for model, d in (local or {}).items():
        if not d.empty:
            acc.setdefault(model, _Sum()).add(
                local_identity, d.in_flight, d.queued, d.oldest_wait, d.last_activity
            )
    for report in reports:
        states[freshness(report, now=now, lease_duration=lease_duration)].add(report.identity)
        at = report.received_at
        for model, r in report.models.items():
            acc.setdefault(model, _Sum()).add(
                report.identity,
                r.in_flight,
                r.queued,
                None if r.oldest_wait_age is None else at - r.oldest_wait_age,
                None if r.last_activity_age is None else at - r.last_activity_age,
            )
    unknown = bool(states["unconfirmed"] or states["stale"])
    models = {model: total.result(unknown=unknown) for model, total in acc.items()}
    return ClusterView(
        models=models,
        fresh=frozenset(states["fresh"]),
        unconfirmed=frozenset(states["unconfirmed"]),
        stale=frozenset(states["stale"]),
    )
