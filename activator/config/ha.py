"""What the HA building blocks are configured with: one small frozen object, validated
the way client-go validates a LeaderElectionConfig, plus the pod facts they read from
the environment (identity, owner Pod)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

# client-go's JitterFactor: the renew deadline must leave room for more than one retry.
JITTER_FACTOR = 1.2
# Below this the API sees a write storm from every replica for no gain in failover time.
MIN_RETRY_PERIOD = 0.1

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


@dataclass(frozen=True, kw_only=True)
class HaSettings:
    """Leader election and demand sharing in `namespace` (activator's own namespace).

    Defaults are client-go's (15 s / 10 s / 2 s): a failover within about
    lease_duration + retry_period, a few writes per replica every retry_period.
    """

    namespace: str
    lease_name: str = "activator-leader"
    # leaseDurationSeconds written on the Lease: how long candidates wait, by their own
    # clock, after they last saw the record change. Whole seconds (the field is int32).
    lease_duration: float = 15.0
    # The leader stops leading this long after the start of its last successful renewal,
    # whether or not a renewal is still in flight. Must be below lease_duration: the gap
    # is the margin for clock-rate differences and scheduling delays.
    renew_deadline: float = 10.0
    # Candidates poll, and the leader renews, this often; replicas heartbeat this often.
    retry_period: float = 2.0
    # The least time between two writes of one Lease made because something changed
    # (a replica's demand, the leader's intent). Heartbeats keep their own period.
    write_interval: float = 0.15
    # On a graceful stop the leader empties the Lease so another replica takes over at
    # its next poll instead of after lease_duration (client-go's ReleaseOnCancel).
    release_on_cancel: bool = True

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def lease_duration_seconds(self) -> int:
        return int(self.lease_duration)


def validate(settings: HaSettings) -> list[str]:
    s = settings
    problems: list[str] = []
    if _DNS_LABEL.match(s.namespace) is None or len(s.namespace) > 63:
        problems.append(f"namespace {s.namespace!r} is not a DNS label")
    if _DNS_SUBDOMAIN.match(s.lease_name) is None or len(s.lease_name) > 253:
        problems.append(f"lease_name {s.lease_name!r} is not a DNS subdomain")
    if s.lease_duration < 1 or s.lease_duration != int(s.lease_duration):
        problems.append(
            f"lease_duration must be a whole number of seconds >= 1, not {s.lease_duration}"
        )
    if not s.lease_duration > s.renew_deadline:
        problems.append(
            f"lease_duration ({s.lease_duration}) must be greater than renew_deadline "
            f"({s.renew_deadline})"
        )
    if not s.renew_deadline > JITTER_FACTOR * s.retry_period:
        problems.append(
            f"renew_deadline ({s.renew_deadline}) must be greater than {JITTER_FACTOR} x "
            f"retry_period ({s.retry_period})"
        )
    if not s.retry_period >= MIN_RETRY_PERIOD:
        problems.append(f"retry_period must be at least {MIN_RETRY_PERIOD}s, not {s.retry_period}")
    if not 0 <= s.write_interval < s.retry_period:
        problems.append(
            f"write_interval ({s.write_interval}) must be >= 0 and below retry_period "
            f"({s.retry_period})"
        )
    return problems


def default_identity(env: Mapping[str, str] = os.environ) -> str:
    """The replica's name: the pod name (downward API POD_NAME, else HOSTNAME, which
    Kubernetes sets to the pod name), else the host name."""
    return env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname()


REPLICA_LEASE_PREFIX = "activator-replica-"


def replica_lease_name(identity: str) -> str:
    """`activator-replica-<identity>`, made a valid object name: a pod name already is;
    anything else is lowercased, cleaned and suffixed with a hash so that two identities
    never share a Lease."""
    if _DNS_SUBDOMAIN.match(identity) and len(identity) <= 253 - len(REPLICA_LEASE_PREFIX):
        return REPLICA_LEASE_PREFIX + identity
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9-]+", "-", identity.lower()).strip("-")[:200]
    return f"{REPLICA_LEASE_PREFIX}{cleaned}-{digest}" if cleaned else REPLICA_LEASE_PREFIX + digest


@dataclass(frozen=True)
class PodOwner:
    """The replica's own Pod, as the owner of its Lease: Kubernetes' garbage collector
    deletes the Lease with the Pod."""

    name: str
    uid: str

    def reference(self) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}


def pod_owner_from_env(namespace: str, env: Mapping[str, str] = os.environ) -> PodOwner | None:
    """POD_NAME and POD_UID from the downward API, when both are set. None when the pod
    runs in another namespace than the Leases (POD_NAMESPACE): the garbage collector
    treats a cross-namespace owner as absent and would delete the Lease at once."""
    name, uid = env.get("POD_NAME"), env.get("POD_UID")
    if not name or not uid:
        return None
    pod_namespace = env.get("POD_NAMESPACE")
    if pod_namespace and pod_namespace != namespace:
        return None
    return PodOwner(name, uid)
