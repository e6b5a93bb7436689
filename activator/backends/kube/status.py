"""Pure reading of pods and events: wake phases, failure reasons, the scheduling rule.

No I/O and no clock: the backend passes in what it saw and how long it has waited, so
every rule here is tested with tables.

The scheduling rule (when is a Pending pod a failure?):

1. FailedScaleUp from the cluster autoscaler (e.g. "GCE out of resources", quota): fail
   at once; no node is coming.
2. NotTriggerScaleUp: the autoscaler looked and no node group can fit the pod (max size
   reached, no GPU group): fail at once, with the scheduler's message.
3. TriggeredScaleUp: a node is being provisioned; Pending (and the FailedScheduling events
   the scheduler keeps emitting meanwhile) is expected, for as long as startup_timeout
   allows. Not a failure.
4. FailedScheduling (or PodScheduled=False/Unschedulable) with no autoscaler verdict:
   wait `grace` (the autoscaler's reaction time); if still no verdict, fail with the
   scheduler's message: this cluster will not make room by itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# Container waiting reasons from which a pod does not recover without a change by a
# person. ErrImagePull is not here: the kubelet retries, and a real pull error turns into
# ImagePullBackOff within seconds (a transient registry error does not).
FATAL_WAITING = frozenset(
    {
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CrashLoopBackOff",
    }
)
AUTOSCALER_REASONS = frozenset({"TriggeredScaleUp", "FailedScaleUp", "NotTriggerScaleUp"})


@dataclass(frozen=True)
class PodView:
    name: str
    created: str  # creationTimestamp
    scheduled: bool
    image_pulled: bool
    started: bool
    ready: bool
    terminating: bool
    unschedulable: str | None  # the scheduler's message while PodScheduled=False
    failure: str | None  # why this pod cannot serve, if it cannot
    failure_key: str | None  # identifies one occurrence, for reporting it once
    summary: str  # one log line


def _conditions(pod: Obj) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in pod.get("status", {}).get("conditions") or []}


def view_pod(pod: Obj) -> PodView:
    meta, status = pod.get("metadata", {}), pod.get("status", {})
    name = meta.get("name", "?")
    conditions = _conditions(pod)
    scheduled_cond = conditions.get("PodScheduled", {})
    scheduled = scheduled_cond.get("status") == "True" or bool(pod.get("spec", {}).get("nodeName"))
    unschedulable = None
    if not scheduled and scheduled_cond.get("reason") == "Unschedulable":
        unschedulable = str(scheduled_cond.get("message") or "Unschedulable")
    containers = list(status.get("containerStatuses") or [])
    started = any("running" in (c.get("state") or {}) for c in containers)
    # A container that ran at all had its image: running, terminated, or restarted.
    pulled = started or any(
        "terminated" in (c.get("state") or {})
        or (c.get("lastState") or {})
        or c.get("restartCount", 0) > 0
        or c.get("imageID")
        for c in containers
    )
    ready = conditions.get("Ready", {}).get("status") == "True"
    failure, key = _failure(name, status, containers)
    phase = status.get("phase", "Unknown")
    states = ", ".join(_container_summary(c) for c in containers) or "no containers yet"
    summary = (
        f"pod {name}: {phase}{' (terminating)' if meta.get('deletionTimestamp') else ''}, "
        f"scheduled={scheduled}, ready={ready}, {states}"
        + (f", unschedulable: {unschedulable}" if unschedulable else "")
    )
    return PodView(
        name=name,
        created=str(meta.get("creationTimestamp") or ""),
        scheduled=scheduled,
        image_pulled=bool(pulled),
        started=started,
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        unschedulable=unschedulable,
        failure=failure,
        failure_key=key,
        summary=summary,
    )


def _container_summary(container: Obj) -> str:
    state = container.get("state") or {}
    kind = next(iter(state), "unknown")
    reason = (state.get(kind) or {}).get("reason")
    text = f"{container.get('name', '?')}={kind}" + (f"({reason})" if reason else "")
    if container.get("restartCount"):
        text += f" restarts={container['restartCount']}"
    return text


def _failure(name: str, status: Obj, containers: list[Obj]) -> tuple[str | None, str | None]:
    if status.get("phase") == "Failed":
        reason = status.get("reason") or "Failed"
        return f"pod {name} failed: {reason}: {status.get('message', '')}".rstrip(": "), (
            f"{name}:phase-failed"
        )
    for container in containers:
        cname = container.get("name", "?")
        restarts = container.get("restartCount", 0)
        state = container.get("state") or {}
        last = (container.get("lastState") or {}).get("terminated") or {}
        terminated = state.get("terminated") or {}
        for ended in (terminated, last):
            if ended.get("reason") == "OOMKilled":
                return (
                    f"OOMKilled: container {cname} of pod {name} was killed for exceeding its "
                    f"memory limit (exit code {ended.get('exitCode', 137)}); raise the memory "
                    "limit or lower max-model-len / gpu-memory-utilization",
                    f"{name}:{cname}:oom:{restarts}",
                )
        waiting = state.get("waiting") or {}
        reason = waiting.get("reason")
        if reason in FATAL_WAITING:
            detail = str(waiting.get("message") or "")
            if reason == "CrashLoopBackOff" and last:
                detail = (
                    f"container {cname} exited with code {last.get('exitCode', '?')} "
                    f"({last.get('reason', 'Error')}), restarting with back-off"
                )
            text = f"{reason}: pod {name}" + (f": {detail}" if detail else "")
            return text, f"{name}:{cname}:{reason}:{restarts}"
    return None, None


@dataclass
class SchedulingSignals:
    """What the scheduler and the cluster autoscaler said about one Pending pod."""

    failed_scheduling: str | None = None
    triggered_scale_up: str | None = None
    failed_scale_up: str | None = None
    not_triggered: str | None = None

    def note(self, reason: str, message: str) -> bool:
        """Record an event; True if it was one of ours."""
        if reason == "FailedScheduling":
            self.failed_scheduling = message
        elif reason == "TriggeredScaleUp":
            self.triggered_scale_up = message
        elif reason == "FailedScaleUp":
            self.failed_scale_up = message
        elif reason == "NotTriggerScaleUp":
            self.not_triggered = message
        else:
            return False
        return True


def scheduling_failure(signals: SchedulingSignals, *, waited: float, grace: float) -> str | None:
    """The scheduling rule (module docstring). None: not (yet) a failure."""
    if signals.failed_scale_up:
        return f"FailedScaleUp: {signals.failed_scale_up}"
    if signals.not_triggered:
        scheduler = signals.failed_scheduling or "pod is unschedulable"
        return f"FailedScheduling: {scheduler}; NotTriggerScaleUp: {signals.not_triggered}"
    if signals.triggered_scale_up:
        return None
    if signals.failed_scheduling and waited >= grace:
        return (
            f"FailedScheduling: {signals.failed_scheduling} (no cluster autoscaler scale-up "
            f"within {grace:g}s)"
        )
    return None


def owns_pod_name(workload_kind: str, workload: str, pod: str) -> bool:
    """Whether `pod` is named like a pod of the workload (for events that arrive before
    the pod itself): Deployment pods are name-<rs hash>-<5 chars>, StatefulSet name-<n>."""
    if workload_kind == "StatefulSet":
        return re.fullmatch(rf"{re.escape(workload)}-\d+", pod) is not None
    return re.fullmatch(rf"{re.escape(workload)}-[a-z0-9]{{6,10}}-[a-z0-9]{{5}}", pod) is not None


def labels_match(selector: dict[str, str], obj: Obj) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def event_time(event: Obj) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or event.get("metadata", {}).get("creationTimestamp")
        or ""
    )


def event_line(event: Obj) -> str:
    involved = event.get("involvedObject") or {}
    return (
        f"{event_time(event)} {involved.get('kind', '?')}/{involved.get('name', '?')} "
        f"{event.get('type', 'Normal')} {event.get('reason', '?')}: "
        f"{(event.get('message') or '').strip()}"
    )
