"""The leader Lease's content, as pure functions of the Lease read: what a candidate
compares, what a new, renewed, taken or released Lease looks like (client-go's
LeaderElectionRecord rules on a LeaseSpec).

Every body built from a Lease read keeps its metadata.resourceVersion, so writing it
is a compare-and-swap; fields we do not own (labels, other annotations, strategy) are
kept; managedFields are dropped (a PUT without them leaves the server's as they are).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from activator.backends.kube.calls import Obj
from activator.ha.leases import spec_of

API_VERSION = "coordination.k8s.io/v1"
ROLE_LABEL = "activator.dev/role"
RECORD_FIELDS = (
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
)


def record_key(lease: Obj | None) -> tuple[Any, ...]:
    """The election record: a candidate restarts its expiry clock when this changes
    (not on any write: an edited label does not count as a renewal)."""
    spec = spec_of(lease)
    return tuple(spec.get(k) for k in RECORD_FIELDS)


def duration_of(lease: Obj | None, *, default: float) -> float:
    """How long to wait out the holder: the leaseDurationSeconds it wrote (client-go
    reads it from the record), else `default`."""
    duration = spec_of(lease).get("leaseDurationSeconds")
    if isinstance(duration, int) and not isinstance(duration, bool) and duration > 0:
        return float(duration)
    return default


def new_lease(
    name: str,
    *,
    namespace: str,
    identity: str,
    duration: int,
    now: str,
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": {ROLE_LABEL: "leader"}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": API_VERSION,
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": duration,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        },
    }


def _metadata(lease: Obj, annotations: Mapping[str, str]) -> Obj:
    meta = copy.deepcopy(
        {k: v for k, v in lease.get("metadata", {}).items() if k != "managedFields"}
    )
    if annotations:
        meta["annotations"] = dict(annotations)
    else:
        meta.pop("annotations", None)
    return meta


def held(
    lease: Obj,
    *,
    identity: str,
    duration: int,
    now: str,
    annotations: Mapping[str, str],
) -> Obj:
    """`lease` renewed (holder already `identity`) or taken over (anyone else, or no
    one): a takeover sets acquireTime and counts one more leaseTransition; a renewal
    keeps both."""
    spec = dict(spec_of(lease))
    taking = spec.get("holderIdentity") != identity
    spec.update(holderIdentity=identity, leaseDurationSeconds=duration, renewTime=now)
    if taking:
        spec["acquireTime"] = now
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    elif not spec.get("acquireTime"):
        spec["acquireTime"] = now
    return {
        "apiVersion": API_VERSION,
        "kind": "Lease",
        "metadata": _metadata(lease, annotations),
        "spec": spec,
    }


def released(lease: Obj, *, now: str) -> Obj:
    """client-go's release: no holder, leaseDurationSeconds 1, transitions kept, so the
    next candidate takes it at its next poll. Annotations stay (the next leader
    continues the published intent from them)."""
    spec = {
        **spec_of(lease),
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": now,
        "renewTime": now,
    }
    meta = _metadata(lease, lease.get("metadata", {}).get("annotations") or {})
    return {"apiVersion": API_VERSION, "kind": "Lease", "metadata": meta, "spec": spec}
