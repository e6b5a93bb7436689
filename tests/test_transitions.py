"""The lifecycle table (activator.transitions), checked as a whole: every state is
reachable and can get back to stopped, the pool's decisions apply exactly where the
policy expects them to, and every task that can fail has a way out."""

from __future__ import annotations

from collections import deque

import pytest

from activator import policy
from activator.transitions import EVENTS, STATES, TABLE, Move, move


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
        if m.next in gpu_free and source in policy.RUNNING_STATES:
            assert (source, event) in {
                ("stopping", "stopped"),
                ("stopping", "stopped_after_failure"),
                ("falling_asleep", "asleep"),
                ("starting", "found_asleep"),
            }, (source, event, m)


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
