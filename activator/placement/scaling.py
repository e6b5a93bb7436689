"""Pure scale-out policy: how many replicas a running model should have, and when to look
again.

Everything here is a function of plain data (a `ReplicaPolicy`, a `ScaleView`, a window of
past demand and a clock reading), so it is tested with tables. Its caller (the model's
owner, or with several activator replicas the leader, from everyone's summed counts)
gathers the view, calls `decide`, scales the workload to `desired` and calls again at
`wake_at` or when the demand or the pool changes.

The rules, in the order `decide` applies them:
1. Demand: `ceil((in_flight + held) / target_concurrency)` replicas, capped at `max`.
   Scale-up is immediate and sized to the demand in one step: 200 concurrent requests at
   a target of 16 ask for 13, capped at `max`, at once (never one replica per interval).
2. Scale-down is delayed: the desired count is the largest demand seen over the last
   `scale_down_delay` (Knative's stable-window maximum), so a dip shorter than the delay
   never sheds a replica, and a replica goes only once demand stayed below it that long.
3. Never below 1: a model the caller asks about is wanted; 0 is the idle rule's
   business (activator.placement.policy), not this one's.
4. The pool bounds growth: each replica takes the model's `gpus`, and the model may add
   only as many replicas as `gpus_free` (GPUs the pool can give it now: `pool_room`)
   allows. Growth evicts nothing: it takes free GPUs only, never ones a waiting model
   needs, never a running model's (an idle one gives its GPUs back through the idle
   rule; one with traffic never does). A pool that asks GPUs back (`gpus_reclaim`:
   another model waits for them) gets them from the extra replicas at once, down to 1,
   before its own policy would swap a whole model out.
5. While the workload cannot be observed (`unknown`), nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from activator.placement.policy import STARTABLE_STATES, ModelView, gpus_in_use


@dataclass(frozen=True, kw_only=True)
class ReplicaPolicy:
    """A model's `replicas:` block, plus the GPUs one replica takes."""

    max: int = 1  # 1: today's behaviour, one engine per model
    target_concurrency: float = 16.0  # requests one replica should carry
    scale_down_delay: float = 300.0  # seconds demand must stay lower before a replica goes
    gpus: int = 1  # per replica, as the pool counts them

    def __post_init__(self) -> None:
        if self.max < 1:
            raise ValueError(f"max must be at least 1 (got {self.max})")
        if not self.target_concurrency > 0:
            raise ValueError(f"target_concurrency must be > 0 (got {self.target_concurrency})")
        if self.scale_down_delay < 0:
            raise ValueError(f"scale_down_delay must be >= 0 (got {self.scale_down_delay})")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0 (got {self.gpus})")


@dataclass(frozen=True, kw_only=True)
class ScaleView:
    """One model's demand and footprint now (summed over activator replicas with HA)."""

    in_flight: int = 0  # requests being answered by its engines
    held: int = 0  # requests activator holds for it (waiting for room on a pod, or a start)
    current: int = 1  # replicas it has asked for (spec.replicas): what the pool counts
    # GPUs the pool can give this model for more replicas right now; None: no pool
    # limit. The pool decides what counts (free GPUs; an idle model's only as its rules
    # allow; never a model's with traffic).
    gpus_free: int | None = None
    # GPUs the pool wants back for another model that waits (0: none).
    gpus_reclaim: int = 0
    unknown: bool = False  # the workload cannot be observed: change nothing


@dataclass(frozen=True)
class Sample:
    """Demand alone asked for `replicas` (capped at max) until clock time `at`, the last
    time it was seen at least that high."""

    at: float
    replicas: int


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    # "demand" (sized to the load now), "delay" (held up by the scale-down window),
    # "max" (demand exceeds max), "pool" (growth bounded by the pool's free GPUs),
    # "reclaim" (the pool takes GPUs back), "unknown" (no change while unobservable).
    reason: str
    # Replicas the demand asked for at this instant, uncapped: what a scale-up decision
    # reports as its cause (metrics, logs).
    demand: int
    # Clock time to decide again if nothing happens before (the scale-down window's peak
    # expires), or None.
    wake_at: float | None = None
    # The window to keep for the next call (this call's demand included).
    window: tuple[Sample, ...] = ()


def demand_replicas(in_flight: int, held: int, *, target_concurrency: float) -> int:
    """ceil((in_flight + held) / target): replicas the load asks for, uncapped."""
    load = max(0, in_flight) + max(0, held)
    return math.ceil(load / target_concurrency) if load else 0


def remember(window: Sequence[Sample], sample: Sample, *, delay: float) -> tuple[Sample, ...]:
    """The last `delay` seconds of demand with `sample` (demand now) added.

    Demand is a step function: the newest sample's level held until `sample.at`, so its
    time moves there first. Then a monotone queue: only samples that can still be the
    window's maximum stay (a newer sample at least as large outlives every older, smaller
    one), so the first is the maximum, values strictly decrease, and the window never
    holds more than `max + 1` samples however often it is fed. A sample last seen
    `delay` seconds ago or more leaves."""
    now = sample.at
    kept = [s for s in window if s.at <= now]
    if kept:
        kept[-1] = Sample(now, kept[-1].replicas)
    kept = [s for s in kept if s.at > now - delay]
    while kept and kept[-1].replicas <= sample.replicas:
        kept.pop()
    kept.append(sample)
    return tuple(kept)


def decide(
    policy: ReplicaPolicy,
    view: ScaleView,
    *,
    now: float,
    window: Sequence[Sample] = (),
) -> ScaleDecision:
    """Desired replicas for one running model. `window` is the previous decision's.

    Call it whenever the demand changes (a request held, started or finished) and at
    `wake_at`: between two calls the demand is taken as constant. It is cheap (the
    window holds at most max + 1 samples); scale only when `desired` changes."""
    demand = demand_replicas(
        view.in_flight, view.held, target_concurrency=policy.target_concurrency
    )
    capped = min(demand, policy.max)
    kept = remember(window, Sample(now, capped), delay=policy.scale_down_delay)
    if view.unknown:
        return ScaleDecision(max(1, view.current), "unknown", demand, None, kept)

    peak = kept[0]  # the window's maximum (see remember)
    wanted = max(1, peak.replicas)
    reason = "max" if demand > policy.max else "demand"
    wake_at: float | None = None
    if peak.replicas > max(1, capped):
        reason = "delay"
        # The peak leaves the window then; the next sample (or the demand now) rules.
        wake_at = peak.at + policy.scale_down_delay

    current = max(1, view.current)
    if view.gpus_reclaim > 0 and policy.gpus > 0 and current > 1:
        give = math.ceil(view.gpus_reclaim / policy.gpus)
        shrunk = max(1, current - give)
        if shrunk < wanted:
            return ScaleDecision(shrunk, "reclaim", demand, wake_at, kept)
    if wanted > current and view.gpus_free is not None and policy.gpus > 0:
        room = current + max(0, view.gpus_free) // policy.gpus
        if room < wanted:
            # The pool kicks its models when GPUs free up; wake_at still lets the count
            # come down once the peak that asked for more has passed.
            return ScaleDecision(room, "pool", demand, wake_at, kept)
    return ScaleDecision(wanted, reason, demand, wake_at, kept)


@dataclass(frozen=True)
class PoolRoom:
    free: int | None  # GPUs free for growth (None: the pool has no limit)
    reclaim: int  # GPUs waiting models need beyond the free ones


def pool_room(capacity: int | None, models: Sequence[ModelView]) -> PoolRoom:
    """What a pool can give its scaled models, from the views its policy already uses.

    Each view's `gpus` is the model's whole footprint: its GPUs per replica times the
    replicas it asked for (a stopped model: one replica's worth, what starting it takes).
    Growth gets the GPUs no model holds and no waiting model needs; `reclaim` is what the
    first waiting model lacks, to be taken from extra replicas first (give it to one
    scaled model at a time, the one with the most extra replicas; the next step sees the
    rest).
    """
    if capacity is None:
        return PoolRoom(None, 0)
    waiting = sorted(
        (m for m in models if m.state in STARTABLE_STATES and m.queued > 0 and not m.unknown),
        key=lambda m: (m.oldest_wait if m.oldest_wait is not None else math.inf, m.name),
    )
    free = capacity - gpus_in_use(models)
    # The pool serves waiting models oldest first, one at a time when GPUs are short: the
    # first in line is what must be made room for now.
    reclaim = max(0, waiting[0].gpus - max(0, free)) if waiting else 0
    return PoolRoom(max(0, free - sum(m.gpus for m in waiting)), reclaim)
