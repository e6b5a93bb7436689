"""The pure pool policy, pinned with tables: capacity, multi-GPU fits, victim choice,
min_residency, max_wait, oldest-first order, sequenced swaps, over-capacity.

Clock: every table uses NOW = 1000.0; times in the views are absolute clock readings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from activator.placement.policy import (
    Decision,
    ModelView,
    Stop,
    choose_victims,
    decide,
    gpus_in_use,
    idle_deadline,
)

NOW = 1000.0


def view(name: str, state: str = "stopped", **keys: Any) -> ModelView:
    """A model view with test-friendly defaults: long idle timeout, 30 s residency,
    300 s max wait. A model in `ready` has been resident 100 s unless told otherwise."""
    if state == "ready":
        keys.setdefault("ready_since", NOW - 100.0)
        keys.setdefault("last_activity", NOW - 1.0)
    return ModelView(name=name, state=state, **keys)


def waiting(name: str, since: float, **keys: Any) -> ModelView:
    """A stopped model with one held request that arrived at clock time `since`."""
    return view(name, "stopped", queued=1, oldest_wait=since, **keys)


@dataclass(frozen=True)
class Case:
    id: str
    capacity: int | None
    models: list[ModelView]
    start: tuple[str, ...] = ()
    stop: tuple[Stop, ...] = ()
    waiting: tuple[str, ...] = ()
    # Pinned where the case is about it; otherwise idle deadlines of ready models would
    # make every table row restate them.
    wake_at: float | str | None = "unchecked"


CASES = [
    # ----- capacity and fits ---------------------------------------------------------
    Case(
        "unconstrained_starts_every_waiting_model_oldest_first",
        None,
        [waiting("b", NOW - 1), waiting("a", NOW - 5)],
        start=("a", "b"),
    ),
    Case("free_gpu_starts_the_waiting_model", 1, [waiting("a", NOW - 1)], start=("a",)),
    Case(
        "two_one_gpu_models_start_together_in_a_two_gpu_pool",
        2,
        [waiting("a", NOW - 2), waiting("b", NOW - 1)],
        start=("a", "b"),
    ),
    Case(
        "two_four_gpu_models_fit_an_eight_gpu_pool",
        8,
        [waiting("a4", NOW - 2, gpus=4), waiting("b4", NOW - 1, gpus=4)],
        start=("a4", "b4"),
    ),
    Case(
        "four_gpu_model_joins_a_running_four_gpu_model",
        8,
        [view("a4", "ready", gpus=4, in_flight=1), waiting("b4", NOW - 1, gpus=4)],
        start=("b4",),
    ),
    Case(
        "eight_gpu_model_evicts_the_idle_four_gpu_model",
        8,
        [view("a4", "ready", gpus=4), waiting("x8", NOW - 1, gpus=8)],
        stop=(Stop("a4", "swap", for_model="x8"),),
        waiting=("x8",),
    ),
    Case(
        "eight_gpu_model_evicts_both_four_gpu_models",
        8,
        [
            view("a4", "ready", gpus=4),
            view("b4", "ready", gpus=4),
            waiting("x8", NOW - 1, gpus=8),
        ],
        stop=(Stop("a4", "swap", for_model="x8"), Stop("b4", "swap", for_model="x8")),
        waiting=("x8",),
    ),
    Case(
        "four_gpu_model_waits_while_the_eight_gpu_model_is_starting",
        8,
        [view("x8", "starting", gpus=8), waiting("a4", NOW - 1, gpus=4)],
        waiting=("a4",),
    ),
    Case(
        "a_start_and_an_eviction_are_never_decided_together",
        2,
        [view("r", "ready"), waiting("a", NOW - 5), waiting("b", NOW - 4, gpus=2)],
        start=("a",),
        waiting=("b",),
    ),
    Case(
        "failed_model_with_demand_is_started_again",
        1,
        [view("a", "failed", queued=1, oldest_wait=NOW - 1)],
        start=("a",),
    ),
    Case("no_demand_no_decision", 1, [view("a"), view("b")]),
    # ----- victim choice -------------------------------------------------------------
    Case(
        "idle_model_is_evicted_before_a_busy_one_even_if_it_is_younger",
        2,
        [
            view("busy", "ready", in_flight=1, ready_since=NOW - 500),
            view("idle", "ready", ready_since=NOW - 50),
            waiting("c", NOW - 1),
        ],
        stop=(Stop("idle", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "fewest_victims_win_over_more_resident_ones",
        8,
        [
            view("a4", "ready", gpus=4, ready_since=NOW - 50),
            view("b2", "ready", gpus=2, ready_since=NOW - 500),
            view("c2", "ready", gpus=2, ready_since=NOW - 500),
            waiting("x4", NOW - 1, gpus=4),
        ],
        stop=(Stop("a4", "swap", for_model="x4"),),
        waiting=("x4",),
    ),
    Case(
        "longest_resident_goes_first_among_equals",
        2,
        [
            view("young", "ready", ready_since=NOW - 10),
            view("old", "ready", ready_since=NOW - 100),
            waiting("c", NOW - 1),
        ],
        stop=(Stop("old", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "starting_and_unknown_models_are_never_victims",
        2,
        [view("s", "starting"), view("u", "ready", unknown=True), waiting("c", NOW - 1)],
        waiting=("c",),
    ),
    # ----- min_residency and max_wait ------------------------------------------------
    Case(
        "busy_model_inside_min_residency_is_protected_until_it_ends",
        1,
        [view("a", "ready", in_flight=2, ready_since=NOW - 10), waiting("b", NOW - 5)],
        waiting=("b",),
        wake_at=NOW - 10 + 30,  # end of a's min_residency comes before b's max_wait
    ),
    Case(
        "protection_ends_when_max_wait_comes_first",
        1,
        [
            view("a", "ready", in_flight=2, ready_since=NOW - 10, min_residency=600),
            waiting("b", NOW - 5),
        ],
        waiting=("b",),
        wake_at=NOW - 5 + 300,
    ),
    Case(
        "held_requests_count_as_traffic_for_min_residency",
        1,
        [view("a", "ready", queued=1, oldest_wait=NOW, ready_since=NOW - 10), waiting("b", NOW)],
        waiting=("b",),
        wake_at=NOW - 10 + 30,
    ),
    Case(
        "busy_model_past_min_residency_is_evicted",
        1,
        [view("a", "ready", in_flight=2, ready_since=NOW - 31), waiting("b", NOW - 1)],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "idle_model_inside_min_residency_is_evicted",
        1,
        [view("a", "ready", ready_since=NOW - 1), waiting("b", NOW - 1)],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "max_wait_overrides_min_residency",
        1,
        [view("a", "ready", in_flight=2, ready_since=NOW - 10), waiting("b", NOW - 300)],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "max_wait_of_the_waiting_model_is_the_one_that_counts",
        1,
        [
            view("a", "ready", in_flight=2, ready_since=NOW - 10, max_wait=1),
            waiting("b", NOW - 5, max_wait=4),
        ],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "past_max_wait_behind_a_starting_model_sets_no_past_wake_up",
        1,
        [view("a", "starting"), waiting("b", NOW - 400)],
        waiting=("b",),
        wake_at=None,  # a's start ending kicks the scheduler; a past time would spin
    ),
    # ----- oldest-first order --------------------------------------------------------
    Case(
        "oldest_held_request_goes_first",
        1,
        [waiting("young", NOW - 1), waiting("old", NOW - 9)],
        start=("old",),
        waiting=("young",),
    ),
    Case(
        "ties_are_broken_by_name",
        1,
        [waiting("b", NOW - 1), waiting("a", NOW - 1)],
        start=("a",),
        waiting=("b",),
    ),
    Case(
        "eviction_is_for_the_oldest_waiting_model",
        1,
        [view("r", "ready"), waiting("young", NOW - 1), waiting("old", NOW - 9)],
        stop=(Stop("r", "swap", for_model="old"),),
        waiting=("old", "young"),
    ),
    Case(
        "a_younger_model_that_fits_does_not_jump_a_blocked_older_one",
        2,
        [
            view("r", "ready", in_flight=1, ready_since=NOW - 1),
            waiting("big", NOW - 9, gpus=2),
            waiting("small", NOW - 1),
        ],
        waiting=("big", "small"),
        wake_at=NOW - 1 + 30,
    ),
    # ----- sequenced swaps -----------------------------------------------------------
    Case(
        "nothing_starts_while_a_model_drains",
        2,
        [view("d", "draining"), waiting("a", NOW - 1)],
        waiting=("a",),
    ),
    Case(
        "nothing_starts_while_a_model_stops",
        3,
        [view("s", "stopping"), waiting("a", NOW - 1)],
        waiting=("a",),
    ),
    Case(
        "no_second_eviction_while_a_swap_is_under_way",
        2,
        [view("d", "draining"), view("r", "ready"), waiting("a", NOW - 1, gpus=2)],
        waiting=("a",),
    ),
    # ----- over capacity and idle ----------------------------------------------------
    Case(
        "over_capacity_evicts_the_idle_model",
        1,
        [view("busy", "ready", in_flight=1), view("idle", "ready", ready_since=NOW - 5)],
        stop=(Stop("idle", "capacity"),),
    ),
    Case(
        "over_capacity_evicts_even_a_protected_model",
        1,
        [
            view("a", "ready", in_flight=1, ready_since=NOW - 1),
            view("b", "ready", in_flight=1, ready_since=NOW - 2),
        ],
        stop=(Stop("b", "capacity"),),
    ),
    Case(
        "over_capacity_with_demand_starts_nothing",
        1,
        [view("a", "ready"), view("b", "ready"), waiting("c", NOW - 1)],
        stop=(Stop("a", "capacity"),),
        waiting=("c",),
    ),
    Case(
        "idle_model_stops_after_its_idle_timeout",
        1,
        [view("a", "ready", last_activity=NOW - 601), waiting("b", NOW - 1)],
        stop=(Stop("a", "idle"),),
        waiting=("b",),
    ),
    Case(
        "idle_timeout_not_reached_sets_the_wake_up",
        None,
        [view("a", "ready", last_activity=NOW - 100, idle_timeout=300)],
        wake_at=NOW + 200,
    ),
    Case(
        "busy_model_is_never_idle",
        None,
        [view("a", "ready", in_flight=1, last_activity=NOW - 10_000)],
        wake_at=None,
    ),
    Case(
        "unknown_model_is_never_idle",
        None,
        [view("a", "ready", unknown=True, last_activity=NOW - 10_000)],
        wake_at=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    decision = decide(case.capacity, case.models, now=NOW)
    expected_wake = decision.wake_at if case.wake_at == "unchecked" else case.wake_at
    assert decision == Decision(
        start=case.start, stop=case.stop, wake_at=expected_wake, waiting=case.waiting
    )


@pytest.mark.parametrize(
    ("candidates", "need", "expected"),
    [
        ([view("a", "ready")], 0, ()),
        ([], 1, None),
        ([view("a", "ready", gpus=2)], 4, None),
        ([view("a", "ready", gpus=2), view("b", "ready", gpus=2)], 4, ("a", "b")),
        (
            [view("a", "ready", gpus=8), view("b", "ready", gpus=1, in_flight=1)],
            1,
            ("a",),  # idle first, even if it frees more than needed
        ),
        (
            [view("a", "ready", gpus=1), view("b", "ready", gpus=1), view("c", "ready", gpus=2)],
            2,
            ("c",),  # one victim beats two
        ),
    ],
    ids=["need_nothing", "no_candidates", "not_enough", "all_needed", "idle_first", "fewest"],
)
def test_choose_victims(
    candidates: list[ModelView], need: int, expected: tuple[str, ...] | None
) -> None:
    chosen = choose_victims(candidates, need=need, now=NOW)
    assert (None if chosen is None else tuple(m.name for m in chosen)) == expected


def test_choose_victims_is_bounded_for_large_pools() -> None:
    many = [view(f"m{i:02}", "ready", ready_since=NOW - i) for i in range(40)]
    chosen = choose_victims(many, need=1, now=NOW)
    assert chosen is not None and [m.name for m in chosen] == ["m39"]


def test_idle_deadline_and_gpus_in_use() -> None:
    assert idle_deadline(view("a", "ready", last_activity=NOW, idle_timeout=5)) == NOW + 5
    assert idle_deadline(view("a", "starting")) is None
    models = [
        view("a", "starting", gpus=2),
        view("b", "ready", gpus=1),
        view("c", "draining", gpus=4),
        view("d", "stopped", gpus=8),
        view("e", "failed", gpus=8),
        view("f", "stopped", gpus=1, unknown=True),
    ]
    assert gpus_in_use(models) == 8


STATES = ("stopped", "failed", "starting", "ready", "draining", "stopping")


def random_traffic(rng: random.Random, *, state: str, queued: int) -> dict[str, Any]:
    """A random pool model's requests and times, as its `state` allows (ModelView keys);
    test_policy_sleep.py's random pools draw theirs here too."""
    return {
        "in_flight": rng.choice([0, 0, 2]) if state in ("ready", "draining") else 0,
        "queued": queued,
        "oldest_wait": NOW - rng.uniform(0, 400) if queued else None,
        "last_activity": NOW - rng.uniform(0, 900),
        "ready_since": NOW - rng.uniform(0, 60) if state == "ready" else None,
        "unknown": rng.random() < 0.05,
    }


def random_pool(rng: random.Random) -> tuple[int, list[ModelView]]:
    capacity = rng.choice([1, 2, 4, 8])
    models = []
    for i in range(rng.randint(1, 6)):
        gpus = rng.choice([g for g in (1, 2, 4, 8) if g <= capacity])
        queued = rng.choice([0, 0, 1, 3])
        state = rng.choice(STATES)
        models.append(
            ModelView(
                name=f"m{i}",
                state=state,
                gpus=gpus,
                **random_traffic(rng, state=state, queued=queued),
                idle_timeout=600,
                min_residency=30,
                max_wait=300,
            )
        )
    return capacity, models


@pytest.mark.parametrize("seed", range(20))
def test_invariants_hold_for_random_pools(seed: int) -> None:
    """Whatever the pool looks like: starts fit, stops are of ready models only, swaps
    never overlap a drain, protected models are not swapped out, wake-ups are future."""
    rng = random.Random(seed)
    for _ in range(500):
        capacity, models = random_pool(rng)
        by_name = {m.name: m for m in models}
        d = decide(capacity, models, now=NOW)
        used = gpus_in_use(models)
        assert used + sum(by_name[n].gpus for n in d.start) <= max(capacity, used)
        assert all(by_name[n].state in ("stopped", "failed") for n in d.start)
        assert all(by_name[s.model].state == "ready" for s in d.stop)
        assert not (d.start and d.stop)
        if any(m.state in ("draining", "stopping") for m in models):
            assert d.start == () and all(s.reason == "idle" for s in d.stop)
        for s in d.stop:
            if s.reason == "swap":
                victim, waiter = by_name[s.model], by_name[s.for_model or ""]
                assert waiter.oldest_wait is not None and victim.ready_since is not None
                protected = (
                    victim.busy
                    and NOW - victim.ready_since < victim.min_residency
                    and NOW - waiter.oldest_wait < waiter.max_wait
                )
                assert not protected, (s, models)
        assert d.wake_at is None or d.wake_at > NOW
        waiting_order = [by_name[n].oldest_wait for n in d.waiting]
        assert waiting_order == sorted(waiting_order)  # type: ignore[type-var]
