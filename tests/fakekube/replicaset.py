"""Which pods a workload controller deletes when it scales down (pure functions).

A ReplicaSet deletes the pods ranked first by controller.ActivePodsWithRanks
(pkg/controller/controller_utils.go): unscheduled before scheduled; Pending before
Unknown before Running; not Ready before Ready; lower controller.kubernetes.io/
pod-deletion-cost first; Ready for less time first; more container restarts first; newer
first. The fake compares ready times and ages exactly, as with the LogarithmicScaleDown
gate off (on, pods of similar age tie and fall to a random UID order: not reproducible
in a test). The node-colocation rank does not apply: there is one node.

A StatefulSet deletes its highest ordinal first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.fakekube.store import Obj

PHASE_ORDER = {"Pending": 0, "Unknown": 1, "Running": 2}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def is_ready(pod: Obj) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def _deletion_cost(pod: Obj) -> int:
    try:
        return int(pod["metadata"].get("annotations", {}).get(DELETION_COST, 0))
    except ValueError:
        return 0


def _restarts(pod: Obj) -> int:
    return max(
        (s.get("restartCount", 0) for s in pod.get("status", {}).get("containerStatuses", [])),
        default=0,
    )


@dataclass(frozen=True)
class Candidate:
    pod: Obj
    # time.monotonic() of creation and of turning Ready: the API's timestamps have whole
    # seconds only, and tests need a strict order.
    created: float
    ready_at: float | None


def deletion_rank(candidate: Candidate) -> tuple[bool, int, bool, int, float, int, float]:
    """Sort key: the pod to delete first sorts first."""
    pod = candidate.pod
    ready = is_ready(pod)
    return (
        bool(pod.get("spec", {}).get("nodeName")),
        PHASE_ORDER.get(pod.get("status", {}).get("phase", ""), 0),
        ready,
        _deletion_cost(pod),
        -(candidate.ready_at or 0.0) if ready else 0.0,
        -_restarts(pod),
        -candidate.created,
    )


def replicaset_victims(candidates: list[Candidate], count: int) -> list[str]:
    """Names of the `count` pods a ReplicaSet deletes."""
    ranked = sorted(candidates, key=deletion_rank)
    return [c.pod["metadata"]["name"] for c in ranked[: max(0, count)]]


def statefulset_victims(names: list[str], count: int) -> list[str]:
    """Highest ordinal first (pods are named <set>-<ordinal>)."""
    ranked = sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]), reverse=True)
    return ranked[: max(0, count)]
