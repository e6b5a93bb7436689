"""GPU memory as the policy counts it: per-GPU footprints, best-fit placement, and the
set of victims whose departure makes room. Pure: plain data in, plain data out.

Units are integers per GPU (bytes, or 10_000 to a GPU when a pool declares no size), so
that sums never over-commit through float rounding. A pool has `gpu_count` GPUs of
`capacity` units each.

What a model holds on each GPU of its placement:
- awake, or on its way in or out (starting, waking, ready, draining, falling asleep,
  stopping), or of unknown state: its `memory`, or the whole GPU when it declares none
  (a whole-GPU model, as before memory packing). A model stopping from sleep is counted
  awake: the view does not say where it came from, and its stop is short.
- asleep: its `residue` (the CUDA context and what the engine keeps); a whole-GPU model
  holds nothing asleep, as before, where a sleeper does not block its GPU.
- stopped or failed: nothing.

`activator.placement.policy.decide` is the caller; this module reads its model views through the
`Footprint` protocol so that it imports nothing from the policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

HOLDING_STATES = frozenset(
    {"starting", "waking", "ready", "draining", "falling_asleep", "stopping"}
)
# Subsets of victims are enumerated; pools hold a handful of models. Past this many
# candidates only the best-ranked are considered (2**12 subsets, each a few small sums).
MAX_VICTIM_CANDIDATES = 12


class Footprint(Protocol):
    """What this module reads of a model (activator.placement.policy.ModelView has it all)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def gpus(self) -> int: ...
    @property
    def memory(self) -> int | None: ...
    @property
    def residue(self) -> int: ...
    @property
    def placement(self) -> tuple[int, ...]: ...
    @property
    def unknown(self) -> bool: ...
    @property
    def busy(self) -> bool: ...
    @property
    def ready_since(self) -> float | None: ...
    @property
    def bring_back(self) -> float: ...
    @property
    def sleep_level(self) -> int | None: ...


def awake_size(m: Footprint, *, capacity: int) -> int:
    """Per-GPU units the model holds awake: its footprint, or the whole GPU."""
    return capacity if m.memory is None else m.memory


def asleep_size(m: Footprint) -> int:
    """Per-GPU units the model keeps asleep; a whole-GPU model keeps none (as before)."""
    return 0 if m.memory is None else m.residue


def held(m: Footprint, *, capacity: int) -> int:
    """Per-GPU units the model holds now, on each GPU of its placement."""
    if m.state in HOLDING_STATES or m.unknown:
        return awake_size(m, capacity=capacity)
    if m.state == "sleeping":
        return asleep_size(m)
    return 0


def place(need: int, *, gpus: int, free: Sequence[int]) -> tuple[int, ...] | None:
    """Best fit: the `gpus` fullest GPUs that still have `need` units free (ties by
    index), as sorted indices; None when fewer than `gpus` GPUs have room. Filling the
    fullest GPUs first keeps whole GPUs free for the models that need them."""
    if gpus <= 0:
        return ()
    fitting = sorted((room, i) for i, room in enumerate(free) if room >= need)
    if len(fitting) < gpus:
        return None
    return tuple(sorted(i for _, i in fitting[:gpus]))


def fits_on(need: int, placement: Sequence[int], free: Sequence[int]) -> bool:
    return bool(placement) and all(0 <= i < len(free) and free[i] >= need for i in placement)


@dataclass(frozen=True)
class Ledger:
    """Where every model that holds memory sits, and what each GPU has committed."""

    capacity: int
    where: Mapping[str, tuple[int, ...]]  # models holding memory -> their GPUs
    used: tuple[int, ...]  # committed units per GPU

    @property
    def free(self) -> list[int]:
        return [self.capacity - u for u in self.used]

    def over(self) -> bool:
        return any(u > self.capacity for u in self.used)


def ledger(models: Sequence[Footprint], *, gpu_count: int, capacity: int) -> Ledger:
    """Commit every model's holding on its placement. A model that holds memory but has
    no valid placement (adopted, or a view from before placements were recorded) is
    given one here, best fit in name order, or the first GPUs when none fits (then the
    pool shows over-committed, and the policy evicts down to capacity)."""
    used = [0] * gpu_count
    where: dict[str, tuple[int, ...]] = {}
    unplaced: list[Footprint] = []
    for m in models:
        size = held(m, capacity=capacity)
        if size <= 0:
            continue
        spot = tuple(i for i in m.placement if 0 <= i < gpu_count)
        if not spot:
            unplaced.append(m)
            continue
        where[m.name] = spot
        for i in spot:
            used[i] += size
    for m in sorted(unplaced, key=lambda m: m.name):
        size = held(m, capacity=capacity)
        gpus = min(max(m.gpus, 1), gpu_count)
        spot = place(size, gpus=gpus, free=[capacity - u for u in used]) or tuple(range(gpus))
        where[m.name] = spot
        for i in spot:
            used[i] += size
    return Ledger(capacity=capacity, where=where, used=tuple(used))


def start_need(m: Footprint, *, capacity: int) -> int:
    """Per-GPU units a start or wake of `m` adds: its footprint, less what a sleeper
    keeps on its own placement."""
    awake = awake_size(m, capacity=capacity)
    return awake - asleep_size(m) if m.state == "sleeping" and m.placement else awake


def room_for(
    m: Footprint, *, free: Sequence[int], capacity: int, where: Mapping[str, tuple[int, ...]]
) -> tuple[int, ...] | None:
    """The GPUs `m` can start or wake on given `free`, or None. A sleeping model with a
    placement wakes where its engine is, needing its footprint less what it keeps
    there; any other model is placed best fit."""
    need = start_need(m, capacity=capacity)
    if m.state == "sleeping" and m.placement:
        own = where.get(m.name, m.placement)
        return tuple(own) if fits_on(need, own, free) else None
    return place(need, gpus=m.gpus, free=free)


@dataclass(frozen=True)
class Victims:
    models: tuple[Footprint, ...]
    # True when the set makes room only if its sleep-mode members stop rather than sleep
    # (their residue would be in the way).
    stop_all: bool


def freed(
    victims: Sequence[Footprint],
    *,
    gpu_count: int,
    capacity: int,
    where: Mapping[str, tuple[int, ...]],
    sleep: bool,
) -> list[int]:
    """Units per GPU that leave when the victims go. With `sleep`, a ready victim with
    sleep mode is assumed to fall asleep and keep its residue (a lower bound: if host
    memory makes it stop instead, more leaves); a sleeping victim is stopped."""
    out = [0] * gpu_count
    for v in victims:
        keep = asleep_size(v) if sleep and v.state == "ready" and v.sleep_level is not None else 0
        for i in where.get(v.name, ()):
            out[i] += held(v, capacity=capacity) - keep
    return out


def choose_victims(
    candidates: Sequence[Footprint],
    *,
    room: Callable[[Sequence[int]], bool],
    free: Sequence[int],
    capacity: int,
    where: Mapping[str, tuple[int, ...]],
    now: float,
) -> Victims | None:
    """The best set of candidates whose departure makes `room(free + freed)` true, or
    None. Ranked: fewer busy models, then fewer models, then sets whose sleepers may
    sleep, then cheaper to bring back (sum of `bring_back`), then longest resident,
    then names. Bounded: only the MAX_VICTIM_CANDIDATES best single candidates are
    combined."""

    def resident(m: Footprint) -> float:
        return now - (m.ready_since if m.ready_since is not None else now)

    ranked = sorted(candidates, key=lambda m: (m.busy, m.bring_back, -resident(m), m.name))
    ranked = ranked[:MAX_VICTIM_CANDIDATES]
    gpu_count = len(free)
    best: Victims | None = None
    best_key: tuple[int, int, bool, float, float, tuple[str, ...]] | None = None
    for size in range(1, len(ranked) + 1):
        for combo in itertools.combinations(ranked, size):
            for sleep in (True, False):
                gone = freed(
                    combo, gpu_count=gpu_count, capacity=capacity, where=where, sleep=sleep
                )
                if room([f + g for f, g in zip(free, gone, strict=True)]):
                    break
            else:
                continue
            key = (
                sum(m.busy for m in combo),
                size,
                not sleep,
                sum(m.bring_back for m in combo),
                -sum(resident(m) for m in combo),
                tuple(m.name for m in combo),
            )
            if best_key is None or key < best_key:
                best, best_key = Victims(models=combo, stop_all=not sleep), key
    return best
