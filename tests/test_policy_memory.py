"""The pure pool policy in memory mode (issue 20), pinned with tables: several models on
one GPU, best-fit placement, wakes where the engine sleeps, starts beside leaving
models, victims that free memory (and what they keep asleep), and the legacy mode
untouched.

Clock: NOW = 1000.0 as in tests/test_policy.py. Units: bytes of a 24 GiB GPU unless a
case says otherwise; `share(0.45)` is a fraction of it, rounded up as the lead maps
fractions (ceil(f * capacity)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from activator.placement.memory import ledger, place, room_for
from activator.placement.policy import Decision, ModelView, Stop, decide

NOW = 1000.0
GIB = 2**30
CARD = 24 * GIB


def share(f: float, capacity: int = CARD) -> int:
    return math.ceil(f * capacity)


def view(name: str, state: str = "stopped", *, on: tuple[int, ...] = (), **keys: Any) -> ModelView:
    """A model view, idle for 1 s (ready ones resident 100 s); `on` is its placement."""
    if state == "ready":
        keys.setdefault("ready_since", NOW - 100.0)
    keys.setdefault("last_activity", NOW - 1.0)
    return ModelView(name=name, state=state, placement=on, **keys)


def waiting(name: str, since: float, **keys: Any) -> ModelView:
    return view(name, "stopped", queued=1, oldest_wait=since, **keys)


@dataclass(frozen=True)
class Case:
    id: str
    gpus: int
    models: list[ModelView]
    start: tuple[str, ...] = ()
    stop: tuple[Stop, ...] = ()
    waiting: tuple[str, ...] = ()
    placements: dict[str, tuple[int, ...]] = field(default_factory=dict)
    gpu_memory: int = CARD
    host: int | None = None
    wake_at: float | str | None = "unchecked"


CASES = [
    # ----- the reference scenario and packing ----------------------------------------
    Case(
        "reference_two_models_at_045_share_one_24_gib_gpu_without_a_swap",
        1,
        [
            view("chat", "ready", on=(0,), memory=share(0.45)),
            waiting("fim", NOW - 1, memory=share(0.45)),
        ],
        start=("fim",),
        placements={"fim": (0,)},
    ),
    Case(
        # Cold starts on one GPU run one at a time (vLLM's start-up profiling), the
        # oldest first; on two GPUs they would run side by side.
        "reference_cold_starts_on_one_gpu_take_turns",
        1,
        [waiting("chat", NOW - 2, memory=share(0.45)), waiting("fim", NOW - 1, memory=share(0.45))],
        start=("chat",),
        waiting=("fim",),
        placements={"chat": (0,)},
    ),
    Case(
        "cold_starts_on_two_gpus_run_side_by_side",
        2,
        [waiting("chat", NOW - 2, memory=share(0.45)), waiting("fim", NOW - 1, memory=share(0.45))],
        start=("chat", "fim"),
        placements={"chat": (0,), "fim": (1,)},
    ),
    Case(
        "a_start_lands_on_the_fullest_gpu_that_fits",
        2,
        [
            view("a", "ready", on=(0,), memory=share(0.5)),
            view("b", "ready", on=(1,), memory=share(0.3)),
            waiting("c", NOW - 1, memory=share(0.2)),
        ],
        start=("c",),
        placements={"c": (0,)},
    ),
    Case(
        "a_whole_gpu_model_holds_its_gpu_in_memory_mode",
        1,
        [view("whole", "ready", on=(0,)), waiting("small", NOW - 1, memory=share(0.1))],
        stop=(Stop("whole", "swap", for_model="small"),),
        waiting=("small",),
    ),
    # ----- eviction frees memory -----------------------------------------------------
    Case(
        "three_models_where_two_fit_the_cheapest_to_bring_back_leaves",
        1,
        [
            view("slow", "ready", on=(0,), memory=share(0.45), bring_back=40.0),
            view("quick", "ready", on=(0,), memory=share(0.45), bring_back=0.4),
            waiting("c", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("quick", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "an_idle_model_leaves_before_a_busy_one_even_if_dearer_to_bring_back",
        1,
        [
            view("busy", "ready", on=(0,), memory=share(0.45), in_flight=1, bring_back=0.1),
            view("idle", "ready", on=(0,), memory=share(0.45), bring_back=40.0),
            waiting("c", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("idle", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "one_large_victim_beats_two_small_ones",
        1,
        [
            view("s1", "ready", on=(0,), memory=share(0.2), bring_back=0.1),
            view("s2", "ready", on=(0,), memory=share(0.2), bring_back=0.1),
            view("big", "ready", on=(0,), memory=share(0.5), bring_back=40.0),
            waiting("c", NOW - 1, memory=share(0.5)),
        ],
        stop=(Stop("big", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "a_victim_that_does_not_make_room_is_not_chosen",
        1,
        [
            view("small", "ready", on=(0,), memory=share(0.2), bring_back=0.1),
            view("big", "ready", on=(0,), memory=share(0.7), bring_back=40.0),
            waiting("c", NOW - 1, memory=share(0.5)),
        ],
        stop=(Stop("big", "swap", for_model="c"),),
        waiting=("c",),
    ),
    Case(
        "busy_model_inside_min_residency_is_protected",
        1,
        [
            view("a", "ready", on=(0,), memory=share(0.6), in_flight=1, ready_since=NOW - 10),
            waiting("b", NOW - 5, memory=share(0.6)),
        ],
        waiting=("b",),
        wake_at=NOW - 10 + 30,
    ),
    # ----- a gpus: 2 model beside small ones -----------------------------------------
    Case(
        "a_two_gpu_model_starts_beside_small_ones_where_both_gpus_have_room",
        2,
        [
            view("a", "ready", on=(0,), memory=share(0.3)),
            view("b", "ready", on=(1,), memory=share(0.35)),
            waiting("x", NOW - 1, gpus=2, memory=share(0.6)),
        ],
        start=("x",),
        placements={"x": (0, 1)},
    ),
    Case(
        "a_two_gpu_model_evicts_on_each_gpu_it_needs",
        2,
        [
            view("a", "ready", on=(0,), memory=share(0.5)),
            view("b", "ready", on=(1,), memory=share(0.5)),
            waiting("x", NOW - 1, gpus=2, memory=share(0.6)),
        ],
        stop=(Stop("a", "swap", for_model="x"), Stop("b", "swap", for_model="x")),
        waiting=("x",),
    ),
    Case(
        "a_small_model_fits_beside_a_two_gpu_one",
        2,
        [
            view("x", "ready", on=(0, 1), gpus=2, memory=share(0.6)),
            waiting("a", NOW - 1, memory=share(0.35)),
        ],
        start=("a",),
        placements={"a": (0,)},
    ),
    # ----- overlap with leaving models -----------------------------------------------
    Case(
        "a_wake_that_fits_beside_a_stopping_model_begins_at_once",
        1,
        [
            view("old", "stopping", on=(0,), memory=share(0.5)),
            view(
                "new",
                "sleeping",
                on=(0,),
                memory=share(0.4),
                residue=share(0.05),
                sleep_level=1,
                queued=1,
                oldest_wait=NOW - 1,
            ),
        ],
        start=("new",),
        placements={"new": (0,)},
    ),
    Case(
        # vLLM's start-up profiling fails when another engine frees memory meanwhile.
        "a_cold_start_waits_for_a_model_leaving_its_gpu_though_it_fits",
        1,
        [
            view("old", "stopping", on=(0,), memory=share(0.5)),
            waiting("new", NOW - 1, memory=share(0.4)),
        ],
        waiting=("new",),
    ),
    Case(
        "a_cold_start_fits_on_another_gpu_than_the_one_a_model_leaves",
        2,
        [
            view("old", "stopping", on=(0,), memory=share(0.5)),
            waiting("new", NOW - 1, memory=share(0.4)),
        ],
        start=("new",),
        placements={"new": (1,)},
    ),
    Case(
        "a_start_that_does_not_fit_beside_a_stopping_model_waits",
        1,
        [
            view("old", "stopping", on=(0,), memory=share(0.5)),
            waiting("new", NOW - 1, memory=share(0.6)),
        ],
        waiting=("new",),
    ),
    Case(
        "no_new_eviction_while_a_model_is_leaving",
        1,
        [
            view("old", "draining", on=(0,), memory=share(0.3)),
            view("r", "ready", on=(0,), memory=share(0.5)),
            waiting("new", NOW - 1, memory=share(0.6)),
        ],
        waiting=("new",),
    ),
    Case(
        "a_start_fits_beside_a_model_falling_asleep",
        2,
        [
            view(
                "s", "falling_asleep", on=(0,), memory=share(0.8), residue=share(0.1), sleep_level=1
            ),
            waiting("new", NOW - 1, memory=share(0.8)),
        ],
        start=("new",),
        placements={"new": (1,)},
    ),
    # ----- sleepers and their residue ------------------------------------------------
    Case(
        "a_small_residue_leaves_room",
        1,
        [
            view("s", "sleeping", on=(0,), memory=share(0.45), residue=share(0.05), sleep_level=1),
            view("a", "ready", on=(0,), memory=share(0.45)),
            waiting("b", NOW - 1, memory=share(0.45)),
        ],
        start=("b",),
        placements={"b": (0,)},
    ),
    Case(
        "a_sleepers_residue_is_counted",
        1,
        [
            view(
                "s",
                "sleeping",
                on=(0,),
                memory=share(0.45),
                residue=share(0.2),
                sleep_level=1,
                bring_back=30.0,
            ),
            view("a", "ready", on=(0,), memory=share(0.45), bring_back=30.0),
            waiting("b", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("a", "swap", for_model="b"),),  # longest resident of two equals
        waiting=("b",),
    ),
    Case(
        "an_idle_sleeper_is_stopped_when_its_residue_is_cheapest_to_lose",
        1,
        [
            view(
                "s",
                "sleeping",
                on=(0,),
                memory=share(0.45),
                residue=share(0.2),
                sleep_level=1,
                bring_back=5.0,
            ),
            view("a", "ready", on=(0,), memory=share(0.45), bring_back=30.0),
            waiting("b", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("s", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "a_sleeper_wakes_where_its_engine_sleeps",
        2,
        [
            view("a", "ready", on=(1,), memory=share(0.45)),
            view(
                "s",
                "sleeping",
                on=(1,),
                memory=share(0.5),
                residue=share(0.1),
                sleep_level=1,
                queued=1,
                oldest_wait=NOW - 1,
            ),
        ],
        start=("s",),
        placements={"s": (1,)},
    ),
    Case(
        "a_sleeper_without_room_at_home_evicts_there_not_elsewhere",
        2,
        [
            view("a", "ready", on=(1,), memory=share(0.6)),
            view(
                "s",
                "sleeping",
                on=(1,),
                memory=share(0.5),
                residue=share(0.1),
                sleep_level=1,
                queued=1,
                oldest_wait=NOW - 1,
            ),
        ],
        stop=(Stop("a", "swap", for_model="s"),),
        waiting=("s",),
    ),
    Case(
        "a_victim_with_sleep_mode_sleeps_when_its_residue_leaves_room",
        1,
        [
            view("a", "ready", on=(0,), memory=share(0.6), residue=share(0.1), sleep_level=1),
            waiting("b", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("a", "swap", for_model="b", sleep=True),),
        waiting=("b",),
    ),
    Case(
        "a_victim_with_sleep_mode_stops_when_its_residue_would_be_in_the_way",
        1,
        [
            view("a", "ready", on=(0,), memory=share(0.6), residue=share(0.1), sleep_level=1),
            waiting("b", NOW - 1, memory=share(0.95)),
        ],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
    ),
    Case(
        "a_victim_sleeps_only_within_host_memory",
        1,
        [
            view(
                "a",
                "ready",
                on=(0,),
                memory=share(0.6),
                residue=share(0.1),
                sleep_level=1,
                sleep_host=16 * GIB,
            ),
            waiting("b", NOW - 1, memory=share(0.45)),
        ],
        stop=(Stop("a", "swap", for_model="b"),),
        waiting=("b",),
        host=8 * GIB,
    ),
    Case(
        "a_sleeper_with_held_requests_in_the_way_of_an_older_one_is_stopped",
        1,
        [
            view("whole", "sleeping", on=(0,), sleep_level=1, queued=1, oldest_wait=NOW - 9),
            view(
                "s",
                "sleeping",
                on=(0,),
                memory=share(0.5),
                residue=share(0.1),
                sleep_level=1,
                queued=1,
                oldest_wait=NOW - 1,
            ),
        ],
        stop=(Stop("s", "swap", for_model="whole"),),  # found by the property test: a deadlock
        waiting=("whole", "s"),
    ),
    # ----- over capacity and unplaced views ------------------------------------------
    Case(
        "an_over_committed_gpu_evicts_down_to_its_memory",
        1,
        [
            view("a", "ready", on=(0,), memory=share(0.6), in_flight=1),
            view("b", "ready", on=(0,), memory=share(0.6)),
        ],
        stop=(Stop("b", "capacity"),),
    ),
    Case(
        "a_running_model_without_a_placement_is_counted_best_fit",
        2,
        [view("a", "ready", memory=share(0.7)), waiting("b", NOW - 1, memory=share(0.7))],
        start=("b",),
        placements={"b": (1,)},
    ),
    Case(
        "a_footprint_larger_than_the_gpu_never_starts",
        1,
        [waiting("huge", NOW - 1, memory=share(1.2))],
        waiting=("huge",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide_in_memory_mode(case: Case) -> None:
    decision = decide(
        case.gpus, case.models, now=NOW, host_memory=case.host, gpu_memory=case.gpu_memory
    )
    expected_wake = decision.wake_at if case.wake_at == "unchecked" else case.wake_at
    assert decision == Decision(
        start=case.start,
        stop=case.stop,
        wake_at=expected_wake,
        waiting=case.waiting,
        placements=case.placements,
    )


def test_legacy_mode_ignores_footprints_and_places_nothing() -> None:
    """Without gpu_memory, GPUs are counted as before: two models of 0.45 swap."""
    models = [
        view("chat", "ready", on=(0,), memory=share(0.45)),
        waiting("fim", NOW - 1, memory=share(0.45)),
    ]
    assert decide(1, models, now=NOW) == Decision(
        stop=(Stop("chat", "swap", for_model="fim"),),
        wake_at=decide(1, models, now=NOW).wake_at,
        waiting=("fim",),
    )
    assert decide(1, [waiting("a", NOW - 1, memory=share(0.45))], now=NOW).placements == {}


def test_unconstrained_pool_starts_everything_in_memory_mode() -> None:
    d = decide(None, [waiting("a", NOW - 2), waiting("b", NOW - 1)], now=NOW, gpu_memory=CARD)
    assert d.start == ("a", "b") and d.placements == {}


@pytest.mark.parametrize(
    ("need", "gpus", "free", "expected"),
    [
        (5, 1, [10, 6, 5], (2,)),  # the fullest that fits
        (5, 1, [6, 6], (0,)),  # ties by index
        (5, 2, [10, 4, 6, 5], (2, 3)),
        (5, 2, [10, 4], None),
        (0, 0, [1], ()),
    ],
    ids=["fullest", "tie", "two", "too_few", "none_needed"],
)
def test_place_is_best_fit(
    need: int, gpus: int, free: list[int], expected: tuple[int, ...] | None
) -> None:
    assert place(need, gpus=gpus, free=free) == expected


def test_ledger_counts_awake_leaving_and_asleep_models() -> None:
    models = [
        view("awake", "ready", on=(0,), memory=30),
        view("leaving", "stopping", on=(1,), memory=20),
        view("asleep", "sleeping", on=(1,), memory=50, residue=5),
        view("whole_asleep", "sleeping", on=(0,)),  # a whole-GPU sleeper holds nothing
        view("stopped", "stopped", on=(0,), memory=40),
        view("two", "starting", on=(0, 1), gpus=2, memory=10),
    ]
    book = ledger(models, gpu_count=2, capacity=100)
    assert book.used == (40, 35)
    assert dict(book.where) == {"awake": (0,), "leaving": (1,), "asleep": (1,), "two": (0, 1)}
    assert not book.over()


def test_a_sleeper_needs_its_footprint_less_its_residue_at_home() -> None:
    s = view("s", "sleeping", on=(1,), memory=50, residue=10)
    book = ledger([s], gpu_count=2, capacity=100)
    assert room_for(s, free=[100, 60], capacity=100, where=book.where) == (1,)
    assert room_for(s, free=[100, 39], capacity=100, where=book.where) is None
