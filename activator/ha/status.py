"""What a replica shows of the cluster: /admin/ha and each model's `cluster` entry in
/admin/models (activator.edge.admin renders them; activator.ha.wiring owns the state).

wiring calls this module, so this module does not import wiring: it sees the replica
through `ReplicaFacts` and the blocks as activator.ha.blocks.Blocks."""

from __future__ import annotations

import time
from typing import Any, Protocol

from activator.config.ha import HaSettings
from activator.ha.blocks import Blocks
from activator.ha.election import snapshot
from activator.model.lifecycle import Model


class ReplicaFacts(Protocol):
    """What the status needs of a replica (activator.ha.wiring.Replica is one)."""

    identity: str
    settings: HaSettings
    admin_url: str | None

    def leading(self) -> bool: ...

    def leader(self) -> str | None: ...

    def deciding(self) -> bool: ...

    def demand_unknown(self) -> bool: ...


def describe_model(replica: ReplicaFacts, blocks: Blocks, model: Model) -> dict[str, Any]:
    """One model over every replica heard from: requests in flight and held, since when
    none came, whether some replica cannot be heard (then nothing is stopped as idle),
    and the leader's intent for it with the replica that decided it."""
    now = time.monotonic()
    remote = blocks.cluster.view().models.get(model.name)
    intent = blocks.watcher.models.get(model.name)
    if replica.leading():
        intent = blocks.publisher.models.get(model.name) or intent
    last = model.last_activity
    if remote is not None and remote.last_activity is not None:
        last = max(last, remote.last_activity)
    return {
        "in_flight": model.in_flight + (remote.in_flight if remote else 0),
        "queued": model.queued + (remote.queued if remote else 0),
        "replicas": sorted({replica.identity, *(remote.replicas if remote else ())}),
        "idle_seconds": round(max(0.0, now - last), 3),
        "demand_unknown": replica.demand_unknown(),
        "intent": None if intent is None else {"state": intent.state, "epoch": intent.epoch},
        "decided_by": intent.by if intent is not None else None,
        "failures": intent.failures if intent is not None else 0,
        "leader": replica.leader(),
    }


def describe(replica: ReplicaFacts, blocks: Blocks) -> dict[str, Any]:
    """The election, the intent followed, the replicas heard from and their demand."""
    view = blocks.cluster.view()
    now = time.monotonic()
    return {
        "identity": replica.identity,
        "namespace": replica.settings.namespace,
        "role": "leader" if replica.leading() else "follower",
        "leader": replica.leader(),
        "deciding": replica.deciding(),
        "admin_url": replica.admin_url,  # published: where followers forward decisions
        "election": dict(snapshot(blocks.elector)),
        "intent": {
            "leader": blocks.watcher.leader,
            "fresh": blocks.watcher.fresh(),
            "synced": blocks.watcher.synced.is_set(),
            "models": {
                name: {"state": i.state, "epoch": i.epoch, "by": i.by, "failures": i.failures}
                for name, i in sorted(blocks.watcher.models.items())
            },
        },
        "replicas": {
            "fresh": sorted(view.fresh),
            "unconfirmed": sorted(view.unconfirmed),
            "stale": sorted(view.stale),
            "reports": [
                {
                    "identity": r.identity,
                    "admin_url": r.admin_url,
                    "age_seconds": round(now - r.received_at, 3),
                    "renewed_seconds_ago": None
                    if r.renewed_at is None
                    else round(now - r.renewed_at, 3),
                    "models": {
                        m: {"in_flight": d.in_flight, "queued": d.queued, "seen": d.seen}
                        for m, d in sorted(r.models.items())
                    },
                }
                for r in sorted(blocks.cluster.reports(), key=lambda r: r.identity)
            ],
        },
        "demand_lease": {
            "name": blocks.demand.lease_name,
            "writes": blocks.demand.writes,
            "last_error": blocks.demand.last_error,
        },
    }
