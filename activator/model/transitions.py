"""A model's lifecycle as one table: (state, event) -> (next state, effect).

`activator.model.lifecycle.Model` owns the state and carries out the effects; this module only
says which moves exist, so the whole machine can be read (and tested) in one place. An
event that has no row for the current state is not a move: the model ignores it (a stop
asked of a model that is already stopping, a wake of one that is awake).

States (the GPU column is what `activator.placement.policy` counts):

    state           GPU   the engine
    stopped         -     does not run
    failed          -     does not run; the last start or the engine failed (a reason is kept)
    starting        yes   is being started (cold) or adopted, then probed until ready
    ready           yes   answers requests: the only state in which requests are forwarded
    draining        yes   gets no new requests; in-flight ones may finish (bounded)
    falling_asleep  yes   is being put to sleep (vLLM sleep mode); weights go to host memory
    sleeping        -     runs asleep: its weights are in host memory (level 1) or dropped
    waking          yes   is being woken; ready once its sleep state is confirmed off
    stopping        yes   is being stopped; stopped (or failed) once it is really gone

Events come from three places: the pool scheduler's decisions (start, stop, sleep), the
model's own transition task reporting how it ended (ready, start_failed, drained_*,
asleep, sleep_failed, wake_failed, stopped*), and the backend (died, lost).

Several replicas (activator.ha) add a fourth: the replica's role. Only the leader's pool
decides; a follower's pool turns the leader's published intent into the follower events
below (activator.ha.follow picks them), and a follower's effects never touch the engine
(probe, hold, let_go: it never calls Backend.start or Backend.stop, and its backend is
fenced besides: it writes nothing without leadership). A replica that becomes leader
reconciles every model from the API first (found_running, found_stopped); one that
stops leading drops its own work on the engine at once (demoted) and keeps serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

# The states' names live in activator.core.states (metrics labels by them); this table is
# still the one place that says how a model moves between them.
from activator.core.states import STATES as STATES
from activator.core.states import State as State

Event = Literal[
    "start",  # the pool: make it ready (a cold start, or a wake when it sleeps)
    "adopt",  # an engine runs that we did not start (activator restarted, a manual scale)
    "stop",  # the pool (idle, swap, capacity...) or an admin: stop it
    "sleep",  # the pool (swap) or an admin: put it to sleep
    "ready",  # the start or wake task: the engine answers and is confirmed awake
    "start_failed",  # the start task: the engine did not come up
    "wake_failed",  # the wake task: /wake_up failed or the engine stayed asleep
    "drained_for_stop",  # the drain task: nothing in flight any more (or the drain was cut)
    "drained_for_sleep",
    "asleep",  # the sleep task: /is_sleeping confirmed
    "sleep_failed",  # the sleep task: /sleep failed or the engine is still awake
    "found_asleep",  # the start task: the engine it adopted is asleep (left so by an activator)
    "stopped",  # the stop task: the engine is gone
    "stopped_after_failure",  # the stop task of a failure: the engine is gone
    "died",  # the backend: the engine exited or crashed on its own
    "lost",  # the backend: the engine was taken away (replicas reset, pod evicted)
    # Several replicas (activator.ha):
    "probe",  # follower: the leader's engine is ready; probe it here and serve it
    "probe_failed",  # follower: its probe (or re-probe) failed: hold, the leader decides
    "leader_draining",  # follower: the leader drains it; hold new requests here
    "leader_starting",  # follower: the leader (re)starts or wakes it; hold
    "leader_asleep",  # follower: the leader puts it to sleep; cut and hold
    "leader_stopped",  # follower: the leader stops it (or failed to start it); cut and hold
    "found_running",  # reconcile (a new leader, or a replica starting): the engine runs
    "found_stopped",  # reconcile: the engine does not run
    "demoted",  # this replica stopped leading: its own work on the engine is dropped
]
Effect = Literal[
    "start",  # run the start task (backend.start, readiness probe, warm-up)
    "adopt",  # run the start task on an engine that already runs
    "release",  # hand every held request a lease
    "fail_start",  # fail held requests with the reason, then stop what is left
    "drain_then_stop",
    "drain_then_sleep",
    "sleep",  # run the sleep task (POST /sleep, confirm /is_sleeping)
    "wake",  # run the wake task (POST /wake_up..., confirm)
    "stop",  # run the stop task (backend.stop)
    "stop_after_failure",  # cut what is in flight, run the stop task, end in failed
    "restart",  # the engine went away under us: back to starting, held requests wait
    "probe",  # follower: find the engine through the API, then as adopt (probe, /is_sleeping)
    "hold",  # drop this replica's task on the model; in-flight requests go on
    "let_go",  # follower: cut what is in flight here and forget the engine (no API write)
    "none",
]


EVENTS: tuple[Event, ...] = Event.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Move:
    next: State
    effect: Effect


def _table() -> Mapping[tuple[State, Event], Move]:
    rows: dict[tuple[State, Event], Move] = {
        # Making it ready.
        ("stopped", "start"): Move("starting", "start"),
        ("failed", "start"): Move("starting", "start"),
        ("sleeping", "start"): Move("waking", "wake"),
        ("stopped", "adopt"): Move("starting", "adopt"),
        ("failed", "adopt"): Move("starting", "adopt"),
        ("starting", "ready"): Move("ready", "release"),
        ("waking", "ready"): Move("ready", "release"),
        ("starting", "start_failed"): Move("stopping", "fail_start"),
        # An adopted engine that sleeps (a restarted activator kept it): it holds no GPU.
        ("starting", "found_asleep"): Move("sleeping", "none"),
        # A wake that fails stops the engine; held requests keep waiting, and since the
        # model still has demand the pool starts it again, cold.
        ("waking", "wake_failed"): Move("stopping", "stop"),
        # Leaving the GPU: drain first, then stop or sleep.
        ("ready", "stop"): Move("draining", "drain_then_stop"),
        ("ready", "sleep"): Move("draining", "drain_then_sleep"),
        ("draining", "drained_for_stop"): Move("stopping", "stop"),
        ("draining", "drained_for_sleep"): Move("falling_asleep", "sleep"),
        ("falling_asleep", "asleep"): Move("sleeping", "none"),
        # A sleep that fails falls back to a stop.
        ("falling_asleep", "sleep_failed"): Move("stopping", "stop"),
        ("sleeping", "stop"): Move("stopping", "stop"),
        ("stopping", "stopped"): Move("stopped", "none"),
        ("stopping", "stopped_after_failure"): Move("failed", "none"),
        # The engine's own failures. While starting, waking or falling asleep the running
        # task sees the death and ends with its own *_failed event instead.
        ("ready", "died"): Move("stopping", "stop_after_failure"),
        ("draining", "died"): Move("stopping", "stop_after_failure"),
        ("sleeping", "died"): Move("stopping", "stop_after_failure"),
        # Taken away while ready (a GitOps revert, an evicted pod): hold new requests and
        # bring it back; asleep, it is simply gone.
        ("ready", "lost"): Move("starting", "restart"),
        ("sleeping", "lost"): Move("stopping", "stop_after_failure"),
    }
    rows.update(_replica_rows())
    return MappingProxyType(rows)


def _replica_rows() -> dict[tuple[State, Event], Move]:
    """The moves of several replicas (activator.ha), as rows like the others."""
    rows: dict[tuple[State, Event], Move] = {}
    # A follower serves only an engine the leader made ready, once it probed it itself.
    # From draining too: requests in flight here go on through the probe.
    for state in STATES:
        if state != "ready":
            rows[(state, "probe")] = Move("starting", "probe")
    # A probe that fails (the engine went away while it ran: the leader swapped it out)
    # fails nothing here: requests stay held, and the leader's intent says what is next.
    rows[("starting", "probe_failed")] = Move("stopped", "none")
    # The leader drains: new requests are held here at once; what is in flight here goes
    # on (the leader's drain counts it) until the leader lets the engine go.
    rows[("ready", "leader_draining")] = Move("draining", "none")
    rows[("starting", "leader_draining")] = Move("draining", "hold")
    # The leader brings it up again (a lost engine, a restart): hold until it is ready.
    for state in ("ready", "stopped", "failed", "sleeping"):
        rows[(state, "leader_starting")] = Move("starting", "hold")
    # The leader lets the engine go: what is still in flight here is cut.
    for state in STATES:
        if state != "sleeping":
            rows[(state, "leader_asleep")] = Move("sleeping", "let_go")
        if state not in ("stopped", "failed"):
            rows[(state, "leader_stopped")] = Move("stopped", "let_go")
    # Reconcile from the API (a new leader before it decides; a replica at start-up): a
    # running engine is adopted (probed, asleep or not), a half-done start or wake is
    # thereby finished; an engine that does not run is made sure stopped (its pods gone).
    # A ready model stays ready: this replica has probed it.
    for state in STATES:
        if state != "ready":
            rows[(state, "found_running")] = Move("starting", "adopt")
        if state != "stopped":
            rows[(state, "found_stopped")] = Move("stopping", "stop")
    # Leadership lost: the task that would have written to the API is dropped at once;
    # the model keeps its state and follows the next leader's intent.
    for state in ("starting", "waking", "draining", "falling_asleep", "stopping"):
        rows[(state, "demoted")] = Move(state, "hold")
    return rows


TABLE = _table()


def move(state: State, event: Event) -> Move | None:
    """The move for `event` in `state`, or None when the event does not apply there."""
    return TABLE.get((state, event))


# Why a model leaves the GPU, as its log lines say it: the pool's policy reasons
# (activator.placement.policy.Stop), the admin API's, a reload's and shutdown's.
STOP_CAUSES: Mapping[str, str] = MappingProxyType(
    {
        "idle": "idle",
        "capacity": "over the pool's GPUs",
        "host_memory": "over the pool's host memory",
        "unschedulable": "its GPU given to a start that cannot be placed",
        "admin": "admin",
        "removed": "reload: removed from the config",
        "shutdown": "shutdown",
    }
)
# Events that begin a move of their own and carry no reason.
EVENT_CAUSES: Mapping[Event, str] = MappingProxyType(
    {
        "adopt": "adopted: found running",
        "found_running": "found running",
        "found_stopped": "found stopped",
        "found_asleep": "found asleep",
        "sleep_failed": "failed: the engine did not sleep",
        "wake_failed": "failed: the engine did not wake",
        "probe": "the leader's engine is ready",
        "probe_failed": "failed: probe",
        "demoted": "no longer the leader",
    }
)


def cause_of(event: Event, *, reason: str = "", for_model: str | None = None) -> str | None:
    """Why `event` moves a model, as the transition's log line says it: idle, evicted
    for X, admin, reload, failed: ..., request. None for an event that ends a step
    already under way (a drain that ends, a stop that is done): the move keeps the
    cause of the move that began it, so `stopping -> stopped` still says idle."""
    if event in ("stop", "sleep"):
        if for_model is not None:
            return f"evicted for {for_model}"
        return STOP_CAUSES.get(reason, reason or event)
    if event == "start":
        return reason or "request"
    if event in ("died", "start_failed"):
        return f"failed: {reason}" if reason else "failed"
    if event == "lost":
        return f"lost: {reason}" if reason else "lost"
    if event in EVENT_CAUSES:
        return EVENT_CAUSES[event]
    if event.startswith("leader_"):
        return f"leader: {reason}" if reason else "leader"
    return None
