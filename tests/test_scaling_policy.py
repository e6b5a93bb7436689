"""The pure scale-out policy (activator.placement.scaling), pinned with tables: demand sizing, max,
one-step scale-up, the scale-down window, the pool bound and reclaim; then scenarios from
issue 14 (max 4, target_concurrency 16) and randomized invariants against a brute-force
window.

Clock: times are absolute clock readings; tables decide at NOW = 1000.0.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from activator.placement.policy import ModelView
from activator.placement.scaling import (
    PoolRoom,
    ReplicaPolicy,
    Sample,
    ScaleDecision,
    ScaleView,
    decide,
    demand_replicas,
    pool_room,
    remember,
)

NOW = 1000.0
# The example: replicas: {max: 4, target_concurrency: 16, scale_down_delay: 5m}
CODER = ReplicaPolicy(max=4, target_concurrency=16, scale_down_delay=300.0, gpus=1)


@dataclass(frozen=True)
class Case:
    id: str
    view: ScaleView
    desired: int
    reason: str
    policy: ReplicaPolicy = CODER
    window: tuple[Sample, ...] = ()
    wake_at: float | None = None
    demand: int | None = None


CASES = [
    # ----- sizing to demand ---------------------------------------------------------
    Case("idle_model_keeps_one_replica", ScaleView(current=1), 1, "demand", demand=0),
    Case("a_full_replica_is_enough", ScaleView(in_flight=16), 1, "demand"),
    Case("one_over_target_asks_for_two", ScaleView(in_flight=17), 2, "demand"),
    Case("held_requests_count_as_demand", ScaleView(in_flight=10, held=23), 3, "demand"),
    Case(
        "two_hundred_concurrent_ask_for_max_in_one_step",
        ScaleView(in_flight=40, held=160, current=1),
        4,
        "max",
        demand=13,
    ),
    Case(
        "default_max_one_is_todays_behaviour",
        ScaleView(in_flight=1000),
        1,
        "max",
        policy=ReplicaPolicy(),
    ),
    Case(
        "fractional_target",
        ScaleView(in_flight=3),
        6,
        "demand",
        policy=ReplicaPolicy(max=8, target_concurrency=0.5),
    ),
    Case("adopted_above_max_comes_down_to_max", ScaleView(in_flight=500, current=6), 4, "max"),
    # ----- the scale-down window ----------------------------------------------------
    Case(
        "a_recent_peak_holds_the_count",
        ScaleView(in_flight=0, current=4),
        4,
        "delay",
        window=(Sample(NOW - 10, 4), Sample(NOW - 10, 0)),  # 4 until 10 s ago, then 0
        wake_at=NOW - 10 + 300,
    ),
    Case(
        "a_peak_older_than_the_delay_is_forgotten",
        ScaleView(in_flight=0, current=4),
        1,
        "demand",
        window=(Sample(NOW - 300, 4), Sample(NOW - 300, 0)),
    ),
    Case(
        "the_highest_level_in_the_window_rules",
        ScaleView(in_flight=20, current=4),
        3,
        "delay",
        window=(Sample(NOW - 400, 4), Sample(NOW - 100, 3), Sample(NOW - 100, 1)),
        wake_at=NOW - 100 + 300,
    ),
    Case(
        "the_newest_level_lasted_until_now",
        ScaleView(in_flight=0, current=4),
        4,
        "delay",
        window=(Sample(NOW - 400, 4),),  # demand stayed at 4 until this call
        wake_at=NOW + 300,
    ),
    Case(
        "zero_delay_scales_down_at_once",
        ScaleView(in_flight=0, current=4),
        1,
        "demand",
        policy=ReplicaPolicy(max=4, target_concurrency=16, scale_down_delay=0.0),
        window=(Sample(NOW - 0.001, 4),),
    ),
    Case(
        "scale_up_ignores_the_window",
        ScaleView(in_flight=64, current=2),
        4,
        "demand",
        window=(Sample(NOW - 5, 2),),
    ),
    # ----- the pool -----------------------------------------------------------------
    Case(
        "pool_with_room_lets_it_grow",
        ScaleView(in_flight=200, current=1, gpus_free=3),
        4,
        "max",
    ),
    Case(
        "growth_is_bounded_by_free_gpus",
        ScaleView(in_flight=200, current=1, gpus_free=1),
        2,
        "pool",
    ),
    Case(
        "a_full_pool_keeps_the_current_count",
        ScaleView(in_flight=200, current=2, gpus_free=0),
        2,
        "pool",
    ),
    Case(
        "multi_gpu_replicas_need_whole_replicas_of_room",
        ScaleView(in_flight=200, current=1, gpus_free=5),
        3,
        "pool",
        policy=ReplicaPolicy(max=4, target_concurrency=16, gpus=2),
    ),
    Case(
        "the_pool_bound_never_forces_a_scale_down",
        ScaleView(in_flight=20, current=3, gpus_free=0),
        2,
        "demand",
        policy=ReplicaPolicy(max=4, target_concurrency=16, scale_down_delay=0.0),
    ),
    Case(
        "reclaim_gives_extra_replicas_back_at_once",
        ScaleView(in_flight=200, current=4, gpus_reclaim=1),
        3,
        "reclaim",
    ),
    Case(
        "reclaim_never_goes_below_one",
        ScaleView(in_flight=200, current=2, gpus_reclaim=8),
        1,
        "reclaim",
    ),
    Case(
        "reclaim_of_multi_gpu_replicas_rounds_up",
        ScaleView(in_flight=200, current=3, gpus_reclaim=3),
        1,
        "reclaim",
        policy=ReplicaPolicy(max=4, target_concurrency=16, gpus=2),
    ),
    Case(
        "reclaim_already_met_by_the_scale_down",
        ScaleView(in_flight=0, current=3, gpus_reclaim=1),
        1,
        "demand",
    ),
    Case(
        "unknown_workload_changes_nothing",
        ScaleView(in_flight=200, current=2, unknown=True),
        2,
        "unknown",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_table(case: Case) -> None:
    d = decide(case.policy, case.view, now=NOW, window=case.window)
    assert (d.desired, d.reason) == (case.desired, case.reason)
    assert d.wake_at == case.wake_at
    if case.demand is not None:
        assert d.demand == case.demand


# ----- scenarios over time ---------------------------------------------------------


@dataclass
class Scaler:
    """Feeds decisions one after another, as the model's owner does, and applies them."""

    policy: ReplicaPolicy = CODER
    current: int = 1
    window: tuple[Sample, ...] = ()
    changes: list[tuple[float, int, int]] = field(default_factory=list)  # (when, from, to)

    def step(self, now: float, **view: Any) -> ScaleDecision:
        d = decide(
            self.policy,
            ScaleView(current=self.current, **view),
            now=now,
            window=self.window,
        )
        self.window = d.window
        if d.desired != self.current:
            self.changes.append((now, self.current, d.desired))
            self.current = d.desired
        return d


def test_a_burst_of_200_streams_scales_1_to_4_in_one_step_and_back_after_the_delay() -> None:
    s = Scaler()
    s.step(0.0, in_flight=1)
    s.step(1.0, in_flight=40, held=160)  # 200 concurrent streams at once
    assert s.changes == [(1.0, 1, 4)]
    s.step(2.0, in_flight=64, held=136)
    s.step(60.0, in_flight=64)  # the queue has drained onto the four pods
    d = s.step(90.0, in_flight=0)  # the burst is over
    assert s.current == 4 and d.reason == "delay"
    assert d.wake_at == 90.0 + 300.0
    assert s.step(389.9, in_flight=0).desired == 4  # not before the delay
    assert s.step(d.wake_at, in_flight=0).desired == 1  # at its end, all the way down
    assert s.changes == [(1.0, 1, 4), (390.0, 4, 1)]


def test_a_gradual_ramp_grows_with_demand_and_never_shrinks_on_the_way_up() -> None:
    s = Scaler()
    for n in range(1, 201):
        s.step(float(n), in_flight=n)
    assert [to for _, _, to in s.changes] == [2, 3, 4]
    assert [when for when, _, _ in s.changes] == [17.0, 33.0, 49.0]


def test_a_dip_shorter_than_the_delay_sheds_nothing() -> None:
    s = Scaler()
    s.step(0.0, in_flight=200)
    for t in range(1, 299):
        s.step(float(t), in_flight=0)
    s.step(299.0, in_flight=200)
    s.step(500.0, in_flight=200)
    assert s.changes == [(0.0, 1, 4)]


def test_scale_down_steps_through_each_level_a_delay_after_it_was_last_seen() -> None:
    s = Scaler()
    s.step(0.0, in_flight=64)  # 4
    s.step(100.0, in_flight=32)  # 2 from now: 4 was last seen at 100
    d = s.step(200.0, in_flight=0)  # 1 from now: 2 was last seen at 200
    assert d.wake_at == 400.0
    d = s.step(400.0, in_flight=0)
    assert (d.desired, d.wake_at) == (2, 500.0)
    assert s.step(500.0, in_flight=0).desired == 1
    assert s.changes == [(0.0, 1, 4), (400.0, 4, 2), (500.0, 2, 1)]


def test_the_window_is_bounded_by_max_however_often_it_is_fed() -> None:
    rng = random.Random(7)
    window: tuple[Sample, ...] = ()
    for i in range(10_000):
        window = remember(window, Sample(i * 0.01, rng.randint(0, 4)), delay=300.0)
        assert len(window) <= 5
        values = [w.replicas for w in window]
        assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


# ----- the pool: a 2-GPU pool, a scaled 1-GPU model and another model -----------------


def pool_views(**others: ModelView) -> list[ModelView]:
    return list(others.values())


def coder(replicas: int) -> ModelView:
    """The scaled model as its owner reports it: its whole footprint in `gpus`."""
    return ModelView(name="coder", state="ready", gpus=replicas, in_flight=200)


def test_pool_room_counts_free_gpus_and_reserves_them_for_waiting_models() -> None:
    chat_stopped = ModelView(name="chat", state="stopped")
    chat_busy = ModelView(name="chat", state="ready", in_flight=3)
    chat_idle = ModelView(name="chat", state="ready")
    chat_waiting = ModelView(name="chat", state="stopped", queued=1, oldest_wait=NOW - 1)
    assert pool_room(2, [coder(1), chat_stopped]) == PoolRoom(1, 0)
    assert pool_room(2, [coder(1), chat_busy]) == PoolRoom(0, 0)
    # An idle model's GPU is not for growth: the idle rule gives it back in its time.
    assert pool_room(2, [coder(1), chat_idle]) == PoolRoom(0, 0)
    assert pool_room(2, [coder(1), chat_waiting]) == PoolRoom(0, 0)
    assert pool_room(2, [coder(2), chat_waiting]) == PoolRoom(0, 1)
    assert pool_room(None, [coder(3), chat_waiting]) == PoolRoom(None, 0)
    # Oldest waiting first: its GPUs are what must be made room for.
    big = ModelView(name="big", state="stopped", gpus=2, queued=1, oldest_wait=NOW - 9)
    assert pool_room(4, [coder(3), chat_waiting, big]) == PoolRoom(0, 1)


def test_two_gpu_pool_never_runs_a_one_gpu_model_past_two_replicas() -> None:
    s = Scaler()
    others = ModelView(name="chat", state="stopped")
    for t in range(50):
        room = pool_room(2, [coder(s.current), others])
        d = s.step(float(t), in_flight=200, gpus_free=room.free, gpus_reclaim=room.reclaim)
        assert s.current <= 2
    assert (s.current, d.reason) == (2, "pool")


def test_growth_never_swaps_out_a_busy_model_and_a_waiting_one_takes_back_extra_replicas() -> None:
    s = Scaler()
    busy = ModelView(name="chat", state="ready", in_flight=1)
    room = pool_room(2, [coder(s.current), busy])
    s.step(0.0, in_flight=200, gpus_free=room.free)
    assert s.current == 1  # the busy model keeps its GPU
    # It goes (idle stop); coder grows into the GPU it gave back.
    room = pool_room(2, [coder(s.current), ModelView(name="chat", state="stopped")])
    s.step(10.0, in_flight=200, gpus_free=room.free)
    assert s.current == 2
    # A request for chat is held: coder's extra replica goes at once, not after the delay.
    waiting = ModelView(name="chat", state="stopped", queued=1, oldest_wait=20.0)
    room = pool_room(2, [coder(s.current), waiting])
    d = s.step(20.0, in_flight=200, gpus_free=room.free, gpus_reclaim=room.reclaim)
    assert (s.current, d.reason) == (1, "reclaim")


def test_policy_rejects_settings_that_cannot_scale() -> None:
    for bad in ({"max": 0}, {"target_concurrency": 0}, {"scale_down_delay": -1}, {"gpus": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReplicaPolicy(**bad)


# ----- randomized invariants -------------------------------------------------------


def brute_force_peak(history: list[tuple[float, int]], *, now: float, delay: float) -> int:
    """The largest capped demand whose level lasted into (now - delay, now]: level i held
    from its call until the next call (the last one until now)."""
    peak = 0
    for i, (_, value) in enumerate(history):
        until = history[i + 1][0] if i + 1 < len(history) else math.inf
        if until > now - delay:
            peak = max(peak, value)
    return peak


@pytest.mark.parametrize("seed", range(20))
def test_invariants_hold_for_random_demand(seed: int) -> None:
    """Whatever the demand and the pool do: 1 <= desired <= max; scale-up is immediate
    and sized to demand (up to the pool's room); the count is the window's maximum,
    exactly as a brute force computes it; growth never exceeds the pool's free GPUs;
    reclaim never adds; wake-ups are in the future."""
    rng = random.Random(seed)
    policy = ReplicaPolicy(
        max=rng.choice([1, 2, 4, 8]),
        target_concurrency=rng.choice([1, 4, 16, 2.5]),
        scale_down_delay=rng.choice([0.0, 5.0, 60.0]),
        gpus=rng.choice([0, 1, 2]),
    )
    s = Scaler(policy=policy)
    history: list[tuple[float, int]] = []
    now = 0.0
    for _ in range(400):
        now += rng.choice([0.0, 0.1, 1.0, 7.0, 61.0])
        in_flight, held = rng.randint(0, 100), rng.choice([0, 0, rng.randint(0, 200)])
        free = rng.choice([None, 0, 1, 3, 100])
        reclaim = rng.choice([0, 0, 0, 1, 2])
        unknown = rng.random() < 0.03
        before = s.current
        d = s.step(
            now,
            in_flight=in_flight,
            held=held,
            gpus_free=free,
            gpus_reclaim=reclaim,
            unknown=unknown,
        )
        capped = min(policy.max, demand_replicas(in_flight, held, **_target(policy)))
        history.append((now, capped))
        if unknown:
            assert d.desired == before
            continue
        assert 1 <= d.desired <= policy.max
        peak = max(1, brute_force_peak(history, now=now, delay=policy.scale_down_delay))
        room = math.inf if free is None or policy.gpus == 0 else before + free // policy.gpus
        if d.reason == "reclaim":
            assert d.desired < before and d.desired < peak
        else:
            assert d.desired == (peak if peak <= before else min(peak, max(room, before)))
        assert d.desired <= max(before, room)
        assert d.wake_at is None or d.wake_at > now
        if d.wake_at is not None:
            assert peak > max(1, capped)


def _target(policy: ReplicaPolicy) -> dict[str, float]:
    return {"target_concurrency": policy.target_concurrency}
