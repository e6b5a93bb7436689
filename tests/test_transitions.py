"""The lifecycle table (activator.model.transitions), checked as a whole: every state is
reachable and can get back to stopped, the pool's decisions apply exactly where the
policy expects them to, and every task that can fail has a way out. With several
replicas: a follower's moves never touch the engine, every event the follower rule
(activator.ha.follow) returns is a move, and none of them loops."""

from __future__ import annotations

from collections import deque

import pytest

from activator.ha.follow import follow_event
from activator.model.transitions import EVENTS, STATES, TABLE, Move, move
from activator.placement import policy

# A follower's events: it mirrors the leader's intent. Its GPU accounting does not count
# (it decides nothing), and a replica that becomes leader reconciles every model from
# the API before it decides (found_running / found_stopped).
FOLLOWER_EVENTS = {
    "probe",
    "probe_failed",
    "leader_draining",
    "leader_starting",
    "leader_asleep",
    "leader_stopped",
}
# Effects that act on the engine or the API: a leader's only.
ENGINE_EFFECTS = {
    "start",
    "drain_then_stop",
    "drain_then_sleep",
    "sleep",
    "wake",
    "fail_start",
    "stop_after_failure",
}


def reachable(start: str) -> set[str]:
    seen, todo = {start}, deque([start])
    while todo:
        state = todo.popleft()
        for (source, _), m in TABLE.items():
            if source == state and m.next not in seen:
                seen.add(m.next)
                todo.append(m.next)
    return seen


def test_every_state_is_reachable_from_stopped() -> None:
    assert reachable("stopped") == set(STATES)


@pytest.mark.parametrize("state", STATES)
def test_every_state_can_get_back_to_stopped(state: str) -> None:
    assert "stopped" in reachable(state)


@pytest.mark.parametrize(
    ("event", "states"),
    [
        ("start", policy.STARTABLE_STATES),
        ("stop", {"ready", "sleeping"}),
        ("sleep", {"ready"}),
    ],
)
def test_pool_decisions_apply_where_the_policy_decides_them(event: str, states: set[str]) -> None:
    assert {s for s in STATES if move(s, event) is not None} == set(states)  # type: ignore[arg-type]


def test_gpu_accounting_agrees_with_the_table() -> None:
    """Moves into a state that holds no GPU come only from a task that freed it (stopping,
    falling asleep), from an adoption that found the engine asleep, or from a state that
    held none."""
    gpu_free = set(STATES) - policy.RUNNING_STATES
    assert gpu_free == {"stopped", "failed", "sleeping"}
    for (source, event), m in TABLE.items():
        if event in FOLLOWER_EVENTS:
            continue
        if m.next in gpu_free and source in policy.RUNNING_STATES:
            assert (source, event) in {
                ("stopping", "stopped"),
                ("stopping", "stopped_after_failure"),
                ("falling_asleep", "asleep"),
                ("starting", "found_asleep"),
            }, (source, event, m)


def test_a_followers_moves_never_act_on_the_engine() -> None:
    for (_, event), m in TABLE.items():
        if event in FOLLOWER_EVENTS or event == "demoted":
            assert m.effect in {"probe", "hold", "let_go", "none"}, (event, m)
            assert m.effect not in ENGINE_EFFECTS


def test_a_demotion_keeps_the_state_and_drops_the_task() -> None:
    for (state, event), m in TABLE.items():
        if event == "demoted":
            assert m == Move(state, "hold")
    # Models without a task of their own keep serving, or holding, as they were.
    for state in ("ready", "stopped", "sleeping", "failed"):
        assert move(state, "demoted") is None  # type: ignore[arg-type]


def test_a_new_leader_reconciles_every_model_but_a_ready_one() -> None:
    for state in STATES:
        running, stopped = move(state, "found_running"), move(state, "found_stopped")
        if state == "ready":
            assert running is None  # probed by this replica already: it keeps serving
        else:
            assert running == Move("starting", "adopt")
        if state == "stopped":
            assert stopped is None
        else:
            assert stopped == Move("stopping", "stop")  # made sure: the pods are gone


INTENTS = ("stopped", "failed", "starting", "ready", "draining", "falling_asleep", "sleeping",
           "waking", "stopping")  # fmt: skip


@pytest.mark.parametrize("intent", INTENTS)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("probing", [False, True])
def test_the_follower_rule_moves_by_the_table_and_settles(
    state: str, intent: str, probing: bool
) -> None:
    event = follow_event(state, intent, probing=probing)
    if event is None:
        return
    step = move(state, event)  # type: ignore[arg-type]
    assert step is not None, f"{event} has no row in {state}"
    if event == "probe":
        return  # settles when the probe ends: ready, sleeping (found asleep) or stopped
    # One move and it is where the intent wants it: no second event.
    assert follow_event(step.next, intent, probing=step.effect == "probe") is None


@pytest.mark.parametrize(
    ("state", "intent", "probing", "event", "then"),
    [
        # The leader's engine is ready: probe it here before serving it.
        ("stopped", "ready", False, "probe", "starting"),
        ("sleeping", "ready", False, "probe", "starting"),
        ("draining", "ready", False, "probe", "starting"),  # a new leader adopted it back
        ("starting", "ready", True, None, None),  # a probe already runs
        ("ready", "ready", False, None, None),
        # The leader drains: hold new requests here at once, in-flight ones go on.
        ("ready", "draining", False, "leader_draining", "draining"),
        ("starting", "draining", True, "leader_draining", "draining"),
        ("stopped", "draining", False, None, None),
        # The leader lets the engine go: cut what is still in flight here.
        ("draining", "stopping", False, "leader_stopped", "stopped"),
        ("ready", "stopped", False, "leader_stopped", "stopped"),
        ("draining", "falling_asleep", False, "leader_asleep", "sleeping"),
        ("ready", "sleeping", False, "leader_asleep", "sleeping"),
        ("stopped", "failed", False, None, None),
        # The leader (re)starts or wakes it: hold.
        ("ready", "starting", False, "leader_starting", "starting"),
        ("sleeping", "waking", False, "leader_starting", "starting"),
        ("starting", "waking", True, None, None),
        # A state this version does not know: keep what we have.
        ("ready", "exploded", False, None, None),
    ],
)
def test_follower_rule_table(
    state: str, intent: str, probing: bool, event: str | None, then: str | None
) -> None:
    assert follow_event(state, intent, probing=probing) == event
    if event is not None:
        step = move(state, event)  # type: ignore[arg-type]
        assert step is not None and step.next == then


@pytest.mark.parametrize(
    ("state", "success", "failure"),
    [
        ("starting", "ready", "start_failed"),
        ("waking", "ready", "wake_failed"),
        ("falling_asleep", "asleep", "sleep_failed"),
        ("stopping", "stopped", "stopped_after_failure"),
    ],
)
def test_every_task_has_a_success_and_a_failure_exit(
    state: str, success: str, failure: str
) -> None:
    assert move(state, success) is not None  # type: ignore[arg-type]
    assert move(state, failure) is not None  # type: ignore[arg-type]


def test_failed_sleeps_and_wakes_fall_back_to_a_stop() -> None:
    assert move("falling_asleep", "sleep_failed") == Move("stopping", "stop")
    assert move("waking", "wake_failed") == Move("stopping", "stop")


def test_an_engine_lost_while_ready_holds_new_requests_until_it_is_back() -> None:
    assert move("ready", "lost") == Move("starting", "restart")


def test_only_ready_is_entered_by_releasing_requests() -> None:
    assert {m.next for m in TABLE.values() if m.effect == "release"} == {"ready"}


def test_table_uses_only_known_states_and_events() -> None:
    for (state, event), m in TABLE.items():
        assert state in STATES and m.next in STATES and event in EVENTS
