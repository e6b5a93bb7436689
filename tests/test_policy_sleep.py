"""The pure pool policy with sleep mode, pinned with tables: sleep vs stop vs evict,
host memory bounds, waking sleepers, idle sleepers, and starts a sleeper blocks.

Clock: NOW = 1000.0, as in tests/test_policy.py; sizes in GiB for readability.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from activator.placement.policy import (
    STARTABLE_STATES,
    Decision,
    ModelView,
    Stop,
    decide,
    gpus_in_use,
    host_in_use,
    idle_deadline,
)
from tests.test_policy import random_traffic

NOW = 1000.0
GIB = 2**30


def view(name: str, state: str = "stopped", **keys: Any) -> ModelView:
    if state == "ready":
        keys.setdefault("ready_since", NOW - 100.0)
    keys.setdefault("last_activity", NOW - 1.0)
    return ModelView(name=name, state=state, **keys)


def sleepy(name: str, state: str = "ready", *, gib: float = 8, **keys: Any) -> ModelView:
    """A level-1 sleep model whose weights take `gib` GiB of host memory once asleep; a
    sleeping one holds them."""
    keys.setdefault("sleep_level", 1)
    keys.setdefault("sleep_host", int(gib * GIB))
    if state in ("sleeping", "falling_asleep", "waking"):
        keys.setdefault("host_held", keys["sleep_host"])
    return view(name, state, **keys)


def waiting(name: str, since: float, **keys: Any) -> ModelView:
    return view(name, "stopped", queued=1, oldest_wait=since, **keys)


@dataclass(frozen=True)
class Case:
    id: str
    capacity: int | None
    host: float | None  # GiB
    models: list[ModelView]
    start: tuple[str, ...] = ()
    stop: tuple[Stop, ...] = ()
    waiting: tuple[str, ...] = ()


CASES = [
    Case(
        "victim_with_sleep_mode_is_put_to_sleep",
        1,
        64,
        [sleepy("a"), waiting("b", NOW - 1)],
        stop=(Stop("a", "swap", for_model="b", sleep=True),),
        waiting=("b",),
    ),
    Case(
        "victim_without_sleep_mode_is_stopped",
        1,
        64,
        [view("a", "ready"), sleepy("b", "sleeping", queued=1, oldest_wait=NOW - 1)],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "sleeping_model_with_demand_wakes_on_a_free_gpu",
        1,
        64,
        [sleepy("a", "sleeping"), sleepy("b", "sleeping", queued=1, oldest_wait=NOW - 1)],
        start=("b",),
    ),
    Case(
        "a_sleeping_model_holds_no_gpu",
        1,
        64,
        [sleepy("a", "sleeping"), waiting("b", NOW - 1)],
        start=("b",),
    ),
    Case(
        "without_a_host_bound_every_sleep_victim_sleeps",
        1,
        None,
        [sleepy("a", gib=500), waiting("b", NOW - 1)],
        stop=(Stop("a", "swap", for_model="b", sleep=True),),
        waiting=("b",),
    ),
    Case(
        "full_host_memory_stops_the_least_recently_used_sleeper_first",
        1,
        16,
        [
            sleepy("old", "sleeping", last_activity=NOW - 100),
            sleepy("new", "sleeping", last_activity=NOW - 50),
            sleepy("a"),
            waiting("b", NOW - 1),
        ],
        stop=(Stop("old", "host_memory"),),
        waiting=("b",),
    ),
    Case(
        "the_model_the_room_is_for_is_never_evicted_from_host_memory",
        1,
        8,
        [sleepy("a"), sleepy("b", "sleeping", queued=1, oldest_wait=NOW - 1)],
        stop=(Stop("a", "swap", for_model="b"),),  # stopped: b's weights fill the host
        waiting=("b",),
    ),
    Case(
        "a_sleeper_with_held_requests_is_not_evicted_from_host_memory",
        1,
        8,
        [
            sleepy("s", "sleeping", queued=1, oldest_wait=NOW - 1),
            sleepy("a"),
            waiting("b", NOW - 5),
        ],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b", "s"),
    ),
    Case(
        "weights_larger_than_the_host_bound_are_stopped",
        1,
        16,
        [sleepy("a", gib=20), waiting("b", NOW - 1)],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "level_two_sleep_needs_no_host_memory",
        1,
        8,
        [
            sleepy("s", "sleeping", last_activity=NOW - 100),
            sleepy("a", sleep_level=2, sleep_host=0),
            waiting("b", NOW - 1),
        ],
        stop=(Stop("a", "swap", for_model="b", sleep=True),),
        waiting=("b",),
    ),
    Case(
        "two_victims_share_the_free_host_memory",
        2,
        8,
        [sleepy("a"), sleepy("c"), waiting("x", NOW - 1, gpus=2)],
        stop=(Stop("a", "swap", for_model="x", sleep=True), Stop("c", "swap", for_model="x")),
        waiting=("x",),
    ),
    Case(
        "a_model_that_slept_before_needs_no_more_host_memory_to_sleep_again",
        1,
        16,
        [sleepy("a", host_held=8 * GIB), sleepy("b", "sleeping", queued=1, oldest_wait=NOW - 1)],
        stop=(Stop("a", "swap", for_model="b", sleep=True),),
        waiting=("b",),
    ),
    Case(
        "an_idle_sleeper_stops_after_its_idle_timeout",
        1,
        64,
        [sleepy("a", "sleeping", last_activity=NOW - 601)],
        stop=(Stop("a", "idle"),),
    ),
    Case(
        "nothing_starts_while_a_model_falls_asleep",
        1,
        64,
        [sleepy("a", "falling_asleep"), sleepy("b", "sleeping", queued=1, oldest_wait=NOW - 1)],
        waiting=("b",),
    ),
    Case(
        "a_waking_model_holds_its_gpu_and_is_no_victim",
        1,
        64,
        [sleepy("a", "waking"), waiting("b", NOW - 400)],
        waiting=("b",),
    ),
    Case(
        "a_start_blocked_by_a_sleeping_pod_stops_the_least_recently_used_sleeper",
        2,
        64,
        [
            sleepy("recent", "sleeping", last_activity=NOW - 10),
            sleepy("old", "sleeping", last_activity=NOW - 100),
            view("b", "starting", blocked=True),
        ],
        stop=(Stop("old", "unschedulable"),),
    ),
    Case(
        "a_blocked_start_with_no_sleeper_waits",
        1,
        64,
        [view("b", "starting", blocked=True)],
    ),
    Case(
        "unconstrained_pool_wakes_every_sleeper_with_demand",
        None,
        None,
        [sleepy("a", "sleeping", queued=2, oldest_wait=NOW - 1), waiting("b", NOW - 2)],
        start=("b", "a"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide_with_sleep(case: Case) -> None:
    host = None if case.host is None else int(case.host * GIB)
    decision = decide(case.capacity, case.models, now=NOW, host_memory=host)
    assert decision == Decision(
        start=case.start, stop=case.stop, wake_at=decision.wake_at, waiting=case.waiting
    )


def test_idle_deadline_of_a_sleeper_counts_from_its_last_request() -> None:
    assert idle_deadline(sleepy("a", "sleeping", last_activity=NOW, idle_timeout=5)) == NOW + 5
    assert idle_deadline(sleepy("a", "sleeping", queued=1, oldest_wait=NOW)) is None
    assert idle_deadline(sleepy("a", "falling_asleep")) is None


def test_gpu_and_host_accounting() -> None:
    models = [
        sleepy("a", "sleeping", gib=8),
        sleepy("b", "falling_asleep", gib=4),
        sleepy("c", "waking", gib=2),
        sleepy("d", "ready", gib=16),
        sleepy("e", "sleeping", sleep_level=2, sleep_host=0),
    ]
    assert gpus_in_use(models) == 3  # b, c, d
    assert host_in_use(models) == 14 * GIB


STATES = (
    "stopped",
    "failed",
    "starting",
    "waking",
    "ready",
    "draining",
    "falling_asleep",
    "sleeping",
    "stopping",
)


def random_pool(rng: random.Random) -> tuple[int, int, list[ModelView]]:
    capacity = rng.choice([1, 2, 4])
    host_cap = rng.choice([8, 16, 32]) * GIB
    models: list[ModelView] = []
    held = 0
    for i in range(rng.randint(1, 6)):
        gpus = rng.choice([g for g in (1, 2, 4) if g <= capacity])
        level = rng.choice([None, 1, 1, 2])
        sleep_host = rng.choice([4, 8, 12]) * GIB if level == 1 else 0
        state = rng.choice(STATES if level is not None else (*STATES[:6], "stopping"))
        slept = state in ("sleeping", "falling_asleep", "waking") or (
            level == 1 and state in ("ready", "draining", "stopping") and rng.random() < 0.3
        )
        host_held = sleep_host if slept else 0
        if held + host_held > host_cap:  # the pool starts within its bound
            state, host_held = "stopped", 0
        held += host_held
        queued = rng.choice([0, 0, 1, 3])
        models.append(
            ModelView(
                name=f"m{i}",
                state=state,
                gpus=gpus,
                **random_traffic(rng, state=state, queued=queued),
                sleep_level=level,
                sleep_host=sleep_host,
                host_held=host_held,
                blocked=state == "starting" and rng.random() < 0.2,
            )
        )
    return capacity, host_cap, models


@pytest.mark.parametrize("seed", range(20))
def test_sleep_invariants_hold_for_random_pools(seed: int) -> None:
    """Starts fit and are of startable models; sleeps only for models with sleep mode and
    within host memory; host evictions are never decided with the sleeps they make room
    for; nothing is decided beside a transition but idle stops."""
    rng = random.Random(seed)
    for _ in range(500):
        capacity, host_cap, models = random_pool(rng)
        by_name = {m.name: m for m in models}
        d = decide(capacity, models, now=NOW, host_memory=host_cap)
        used = gpus_in_use(models)
        assert used + sum(by_name[n].gpus for n in d.start) <= max(capacity, used)
        assert all(by_name[n].state in STARTABLE_STATES for n in d.start)
        assert not (d.start and d.stop)
        sleeps = [s for s in d.stop if s.sleep]
        assert all(by_name[s.model].sleep_level is not None for s in sleeps)
        assert all(by_name[s.model].state == "ready" for s in sleeps)
        new_host = sum(
            max(0, by_name[s.model].sleep_host - by_name[s.model].host_held) for s in sleeps
        )
        assert host_in_use(models) + new_host <= host_cap, (d, models)
        evictions = [s for s in d.stop if s.reason == "host_memory"]
        assert not (evictions and sleeps)
        assert all(by_name[s.model].state == "sleeping" for s in evictions)
        for s in d.stop:
            if s.reason in ("host_memory", "unschedulable"):
                assert by_name[s.model].state == "sleeping"
            elif s.reason == "idle":
                assert by_name[s.model].state in ("ready", "sleeping")
            else:
                assert by_name[s.model].state == "ready"
        if any(m.state in ("draining", "falling_asleep", "stopping") for m in models):
            assert d.start == () and all(s.reason == "idle" for s in d.stop)
