"""One wake of a Kubernetes workload, as seen from its pods and events: which phases were
reached, and whether (and why) it cannot come up.

A WakeTracker lives from start()/discover()/adoption until stop(); the backend feeds it
the workload's pods and events and it reports to the model's listener, each phase and
each failure once (pod status and events repeat themselves). Synchronous, on the event
loop; its only timer is the scheduling grace (see activator.backends.kube.status).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from activator.backends.base import BackendListener
from activator.backends.kube.calls import Obj
from activator.backends.kube.status import (
    AUTOSCALER_REASONS,
    SchedulingSignals,
    event_time,
    scheduling_failure,
    view_pod,
)

log = logging.getLogger(__name__)

PHASES = ("scheduled", "image_pulled", "started")


class WakeTracker:
    def __init__(
        self,
        *,
        model: str,
        listener: BackendListener,
        scheduling_grace: float,
        pods: Callable[[], list[Obj]],
        line: Callable[[str], None],
        tolerated: Callable[[str], bool] = lambda pod: False,
    ) -> None:
        """`tolerated(pod)`: a failure of this pod does not fail the model (several
        pods, and others serve): it is logged once, and the pod is left to its
        controller."""
        self._model = model
        self._listener = listener
        self._grace = scheduling_grace
        self._pods = pods  # the workload's pods, as the pod informer holds them
        self._line = line
        self._tolerated = tolerated
        self._phases: set[str] = set()
        self._reported: set[str] = set()
        self._signals: dict[str, SchedulingSignals] = {}
        self._unschedulable_since: dict[str, float] = {}
        # Events for pods not seen yet (pod and event watches are separate streams).
        self._early: deque[Obj] = deque(maxlen=50)
        self._timer: asyncio.TimerHandle | None = None
        self._blocked = False
        self.reverts = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._block(False)

    def _block(self, blocked: bool) -> None:
        if blocked != self._blocked:
            self._blocked = blocked
            self._listener.backend_blocked(blocked)

    def fail(self, key: str, reason: str) -> None:
        """Report a failure, once per key in this wake."""
        if key in self._reported:
            return
        self._reported.add(key)
        self._line(f"failed: {reason}")
        self._listener.backend_failed(reason)

    def pod_failed(self, pod: str, key: str, reason: str) -> None:
        """A pod cannot serve: the model's failure, unless other pods serve it."""
        if not self._tolerated(pod):
            self.fail(key, reason)
            return
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning(
            "kubernetes: %s: %s (the model keeps serving on its other pods)", self._model, reason
        )
        self._line(f"pod failed (others serve): {reason}")

    def refresh(self) -> None:
        for pod in self._pods():
            self.assess_pod(pod)

    def pod_deleted(self, name: str) -> None:
        self._signals.pop(name, None)
        self._unschedulable_since.pop(name, None)

    def assess_pod(self, pod: Obj) -> None:
        view = view_pod(pod)
        if view.terminating:
            return
        for event in [e for e in self._early if _involved(e) == view.name]:
            self._early.remove(event)
            self.note_event(event, pod)
        reached = {
            "scheduled": view.scheduled,
            "image_pulled": view.image_pulled,
            "started": view.started,
        }
        # Report in wake order even when several are seen at once (a cached Running pod).
        for phase in PHASES:
            if reached[phase]:
                self._phase(phase)
        if view.scheduled:
            self._block(False)
        if view.failure and view.failure_key:
            # No progress nudge with a failure: there is nothing to probe.
            self.pod_failed(view.name, view.failure_key, view.failure)
            return
        if view.unschedulable:
            signals = self._signals.setdefault(view.name, SchedulingSignals())
            signals.failed_scheduling = signals.failed_scheduling or view.unschedulable
        if not view.scheduled and view.name in self._signals:
            self._judge_scheduling(view.name)
        self._listener.backend_progress()

    def note_event(self, event: Obj, pod: Obj | None) -> None:
        """An event about one of the workload's pods (`pod` None: not seen yet)."""
        if pod is None:
            self._early.append(event)
            return
        # Events outlive pods and a StatefulSet reuses pod names: only this pod's own.
        if event_time(event) < str(pod["metadata"].get("creationTimestamp") or ""):
            return
        name = pod["metadata"]["name"]
        reason, message = str(event.get("reason") or ""), str(event.get("message") or "")
        if reason == "Pulled":
            self._phase("scheduled")
            self._phase("image_pulled")
        elif reason == "FailedScheduling" or reason in AUTOSCALER_REASONS:
            self._signals.setdefault(name, SchedulingSignals()).note(reason, message)
            if not view_pod(pod).scheduled:
                self._judge_scheduling(name)

    def _phase(self, phase: str) -> None:
        if phase not in self._phases:
            self._phases.add(phase)
            log.info("kubernetes: %s wake phase %s", self._model, phase)
            self._listener.backend_phase(phase)

    def _judge_scheduling(self, pod: str) -> None:
        self._block(True)
        loop = asyncio.get_running_loop()
        since = self._unschedulable_since.setdefault(pod, loop.time())
        waited = loop.time() - since
        failure = scheduling_failure(self._signals[pod], waited=waited, grace=self._grace)
        if failure is not None:
            self.pod_failed(pod, f"{pod}:scheduling", f"pod {pod}: {failure}")
        elif self._signals[pod].triggered_scale_up is None and self._timer is None:
            # Wake up when the grace ends, to judge a pod nobody says anything more about.
            self._timer = loop.call_later(self._grace - waited + 0.01, self._grace_over)

    def _grace_over(self) -> None:
        self._timer = None
        self.refresh()


def _involved(event: Obj) -> str:
    return str((event.get("involvedObject") or {}).get("name") or "")
