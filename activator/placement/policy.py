"""Pure scheduling policy: which models start, which stop or sleep, and when to look again.

Everything here is a function of plain data (`ModelView`s and a clock reading), so it is
tested with tables. `activator.fleet.pool.PoolScheduler` gathers the views, calls `decide` and
carries out the decision; it is the only caller.

The rules, in the order `decide` applies them:
1. Idle: a ready model with nothing in flight, nothing held and no activity for its
   `idle_timeout` is stopped; so is a sleeping model whose last request is that old. A
   model whose state is unknown is never idle.
2. While any model of the pool is draining, falling asleep or stopping, no start and no
   new eviction is decided: swaps are sequenced, never interleaved (its GPUs are not
   free yet, or its host memory is not).
3. A start that cannot be scheduled because a sleeping engine still holds the GPU (a
   Kubernetes pod asleep on a GPU the device plugin does not share) stops the sleeper
   least recently used.
4. Over capacity (engines adopted at start-up, or scaled by hand): evict down to the
   capacity with the victim rule below.
5. Demand is served oldest-first: the waiting model (stopped, failed or asleep) whose
   oldest held request has waited longest goes next. If it fits in the free GPUs, it
   starts, or wakes (and the next one is considered). If not, victims are chosen among
   the ready models; if none may go yet, nothing behind it jumps the queue (no
   starvation), and the decision says when to look again.
Victims: a model may be evicted unless it is inside its `min_residency` while it has
traffic, or the waiting model has waited `max_wait`. Among the sets of victims that make
room, prefer those with fewer busy models, then fewer models, then the longest resident.
A victim that has sleep mode is put to sleep rather than stopped when the pool's host
memory can take its weights; if it cannot, the sleeping models least recently used are
stopped first (one decision), and if even that does not make room, the victim is stopped.

Memory mode (`gpu_memory` set; activator.placement.memory counts it): a GPU is memory,
not a slot. Several models share a GPU while their footprints fit; a start is placed
best fit (`Decision.placements`), a sleeper wakes where its engine is. Rule 2 softens:
a start that fits beside models still leaving (their memory counted until they are
gone) begins at once; one that does not waits for them, and no new eviction is decided
while any model is leaving. Over capacity (rule 4) means a GPU with more committed than
its memory. Victims free memory, not slots: among the evictable ready models and the
sleepers (their residue), the set whose departure makes room for the waiting model
on some placement, ranked by fewer busy models, then fewer models, then cheaper to bring
back (`bring_back`), then longest resident. A victim that sleeps keeps its residue, so
the set is sized for that; when only stopping its sleep-mode members would make room,
they stop. In every decision the memory committed on a GPU stays within its capacity.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from activator.placement import memory

# States in which a model's engine occupies its GPUs. A model stopping from sleep is
# counted too: conservative, and its stop is short.
RUNNING_STATES = frozenset(
    {"starting", "waking", "ready", "draining", "falling_asleep", "stopping"}
)
# GPUs (or host memory) being given back: nothing else starts until they are free.
TRANSIT_STATES = frozenset({"draining", "falling_asleep", "stopping"})
STARTABLE_STATES = frozenset({"stopped", "failed", "sleeping"})
# Subsets of victims are enumerated; pools hold a handful of models. Past this many
# candidates only the best-ranked are considered (keeps `decide` cheap and bounded).
MAX_VICTIM_CANDIDATES = 12


@dataclass(frozen=True, kw_only=True)
class ModelView:
    name: str
    state: str  # one of activator.model.transitions.STATES
    gpus: int = 1
    in_flight: int = 0
    queued: int = 0  # requests held for this model (plus an admin wake)
    oldest_wait: float | None = None  # clock time the oldest held request arrived
    last_activity: float = 0.0
    ready_since: float | None = None
    unknown: bool = False  # the backend cannot observe the engine right now
    idle_timeout: float = 600.0
    min_residency: float = 30.0
    max_wait: float = 300.0
    # Sleep mode: None when the model has none. `sleep_host` is the host memory its
    # weights take once asleep (level 1; ~0 at level 2); `host_held` what its engine
    # holds in host memory now: reserved from the moment its first sleep is decided
    # until the engine stops (vLLM keeps its pinned backup after a wake, #16663).
    sleep_level: int | None = None
    sleep_host: int = 0
    host_held: int = 0
    # Starting, but its engine cannot be placed until a sleeping engine gives its GPU up.
    blocked: bool = False
    # Memory mode (decide's `gpu_memory`), in units per GPU. `memory`: the footprint on
    # each of its GPUs while awake (None: it takes its GPUs whole); `residue`: what it
    # keeps on each asleep. `placement`: the GPU indices it holds memory on now (awake,
    # in transit, asleep with a residue). `bring_back`: estimated seconds to bring it
    # back from how it would leave (a recent wake if it would sleep, else a cold start).
    memory: int | None = None
    residue: int = 0
    placement: tuple[int, ...] = ()
    bring_back: float = 0.0

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0

    @property
    def holds_gpus(self) -> bool:
        return self.state in RUNNING_STATES or self.unknown


@dataclass(frozen=True)
class Stop:
    model: str
    # "idle", "swap", "capacity", "host_memory" (a sleeper makes room in host memory)
    # or "unschedulable" (a sleeper gives its GPU to a start that cannot be placed).
    reason: str
    for_model: str | None = None  # the model it makes room for (swaps)
    sleep: bool = False  # put to sleep instead of stopped


@dataclass(frozen=True)
class Decision:
    # Models to make ready: a cold start, or a wake for a sleeping one.
    start: tuple[str, ...] = ()
    stop: tuple[Stop, ...] = ()
    # When to decide again if nothing happens before (clock time), or None.
    wake_at: float | None = None
    waiting: tuple[str, ...] = field(default=())  # models held for a GPU, in turn order
    # Memory mode: the GPU indices of each start (a wake: where its engine sleeps).
    # Empty when decide runs without `gpu_memory` (GPUs are counted, not placed).
    placements: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def idle_deadline(m: ModelView) -> float | None:
    """Clock time at which a ready or sleeping model becomes idle, or None if it cannot."""
    if m.state not in ("ready", "sleeping") or m.unknown or m.busy:
        return None
    return m.last_activity + m.idle_timeout


def gpus_in_use(models: Sequence[ModelView]) -> int:
    return sum(m.gpus for m in models if m.holds_gpus)


def host_in_use(models: Sequence[ModelView]) -> int:
    return sum(m.host_held for m in models)


def _evictable(m: ModelView, *, now: float, waited: float) -> bool:
    if m.state != "ready" or m.unknown:
        return False
    resident = now - (m.ready_since if m.ready_since is not None else now)
    return not (m.busy and resident < m.min_residency and waited < m.max_wait)


def choose_victims(
    candidates: Sequence[ModelView], *, need: int, now: float
) -> tuple[ModelView, ...] | None:
    """The best set of candidates freeing at least `need` GPUs, or None if none does."""
    if need <= 0:
        return ()

    def resident(m: ModelView) -> float:
        return now - (m.ready_since if m.ready_since is not None else now)

    ranked = sorted(candidates, key=lambda m: (m.busy, -resident(m), m.name))
    ranked = ranked[:MAX_VICTIM_CANDIDATES]
    best: tuple[ModelView, ...] | None = None
    best_key: tuple[int, int, float, tuple[str, ...]] | None = None
    for size in range(1, len(ranked) + 1):
        for combo in itertools.combinations(ranked, size):
            if sum(m.gpus for m in combo) < need:
                continue
            key = (
                sum(m.busy for m in combo),
                size,
                -sum(resident(m) for m in combo),
                tuple(m.name for m in combo),
            )
            if best_key is None or key < best_key:
                best, best_key = combo, key
    return best


def plan_sleeps(
    victims: Sequence[ModelView],
    models: Sequence[ModelView],
    *,
    host_memory: int | None,
    keep: str,
) -> tuple[list[Stop], set[str]]:
    """How the victims leave the GPU: (sleepers to stop first, victims that sleep).

    A victim sleeps when its weights fit in the pool's free host memory. When they would
    fit only after stopping sleeping models (least recently used first; never `keep`,
    the model the room is for, nor a sleeper with held requests), those stops are
    returned and the victims wait for them: host memory is given back before it is
    taken, so the pool is never over `host_memory`, not even for a moment.
    """
    sleepers = sorted(
        (m for m in models if m.state == "sleeping" and m.name != keep and not m.busy),
        key=lambda m: (m.last_activity, m.name),
    )
    free = None if host_memory is None else host_memory - host_in_use(models)
    evict: list[ModelView] = []
    sleep: set[str] = set()
    for v in victims:
        if v.sleep_level is None:
            continue
        if free is None:
            sleep.add(v.name)
            continue
        need = max(0, v.sleep_host - v.host_held)  # an engine that slept before keeps it
        while need > free and sleepers:
            gone = sleepers.pop(0)
            evict.append(gone)
            free += gone.host_held
        if need <= free:
            sleep.add(v.name)
            free -= need
    if evict:
        return [Stop(m.name, "host_memory") for m in evict], set()
    return [], sleep


def _look_again(
    ready: Sequence[ModelView], waiting: ModelView, *, now: float, wake: list[float]
) -> None:
    """No victim may go yet for `waiting`: when one may (appended to `wake`), if ever."""
    again = _next_eligibility(
        ready,
        now=now,
        oldest_wait=waiting.oldest_wait if waiting.oldest_wait is not None else now,
        max_wait=waiting.max_wait,
    )
    if again is not None:
        wake.append(again)


def _next_eligibility(
    running: Sequence[ModelView], *, now: float, oldest_wait: float, max_wait: float
) -> float | None:
    """Earliest future time a currently protected model may become a victim, or None.

    Only future times count: once `max_wait` has passed every ready model is a victim
    candidate, so what still blocks is a model starting or of unknown state, and its
    transition kicks the scheduler. A past time here would make the loop spin."""
    times = [oldest_wait + max_wait]
    for m in running:
        if m.state == "ready" and not m.unknown and m.ready_since is not None:
            times.append(m.ready_since + m.min_residency)
    future = [t for t in times if t > now]
    return min(future) if future else None


def decide(
    capacity: int | None,
    models: Sequence[ModelView],
    *,
    now: float,
    host_memory: int | None = None,
    gpu_memory: int | None = None,
) -> Decision:
    """Decide starts, stops and sleeps for one pool. `capacity` None means unconstrained;
    `host_memory` None means sleeping models are not bounded by host memory;
    `gpu_memory` (units per GPU, with `capacity` GPUs) turns on memory mode, None counts
    whole GPUs."""
    stops: list[Stop] = []
    wake: list[float] = []
    stopping: set[str] = set()

    for m in models:
        deadline = idle_deadline(m)
        if deadline is None:
            continue
        if deadline <= now:
            stops.append(Stop(m.name, "idle"))
            stopping.add(m.name)
        else:
            wake.append(deadline)

    demand = sorted(
        (m for m in models if m.state in STARTABLE_STATES and m.queued > 0 and not m.unknown),
        key=lambda m: (m.oldest_wait if m.oldest_wait is not None else now, m.name),
    )
    waiting = tuple(m.name for m in demand)

    def done(
        start: Sequence[str] = (), placed: Mapping[str, tuple[int, ...]] | None = None
    ) -> Decision:
        return Decision(
            start=tuple(start),
            stop=tuple(stops),
            wake_at=min(wake) if wake else None,
            waiting=tuple(n for n in waiting if n not in start),
            placements=dict(placed or {}),
        )

    if capacity is None:
        return done([m.name for m in demand])

    if gpu_memory is not None:
        leaving = bool(stopping) or any(m.state in TRANSIT_STATES for m in models)
        memory_starts, placed = _memory_round(
            models,
            demand,
            gpu_count=capacity,
            capacity=gpu_memory,
            now=now,
            host_memory=host_memory,
            leaving=leaving,
            stops=stops,
            wake=wake,
        )
        return done(memory_starts, placed)

    if any(m.state in TRANSIT_STATES for m in models) or stopping:
        return done()

    if _unblock(models, stops):
        return done()

    used = gpus_in_use(models)
    ready = [m for m in models if m.state == "ready" and not m.unknown]
    if used > capacity:
        victims = choose_victims(ready, need=used - capacity, now=now)
        for v in victims or ():
            stops.append(Stop(v.name, "capacity"))
        return done()

    starts: list[str] = []
    free = capacity - used
    for m in demand:
        if m.gpus <= free:
            starts.append(m.name)
            free -= m.gpus
            continue
        if starts:
            break  # let the starts land before evicting anything for the next in line
        waited = now - (m.oldest_wait if m.oldest_wait is not None else now)
        eligible = [r for r in ready if _evictable(r, now=now, waited=waited)]
        victims = choose_victims(eligible, need=m.gpus - free, now=now)
        if victims:
            evict, sleep = plan_sleeps(victims, models, host_memory=host_memory, keep=m.name)
            if evict:
                stops.extend(evict)
            else:
                stops.extend(
                    Stop(v.name, "swap", for_model=m.name, sleep=v.name in sleep) for v in victims
                )
        else:
            _look_again(ready, m, now=now, wake=wake)
        break
    return done(starts)


def _unblock(models: Sequence[ModelView], stops: list[Stop]) -> bool:
    """Rule 3: a start blocked by a sleeping pod stops the sleeper least recently used."""
    if any(m.state == "starting" and m.blocked for m in models):
        sleepers = sorted(
            (m for m in models if m.state == "sleeping"), key=lambda m: (m.last_activity, m.name)
        )
        if sleepers:
            stops.append(Stop(sleepers[0].name, "unschedulable"))
            return True
    return False


def _memory_round(
    models: Sequence[ModelView],
    demand: Sequence[ModelView],
    *,
    gpu_count: int,
    capacity: int,
    now: float,
    host_memory: int | None,
    leaving: bool,
    stops: list[Stop],
    wake: list[float],
) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Rules 3 to 5 in memory mode: the starts with their placements; stops and wake-up
    times are appended to `stops` and `wake`. `leaving`: a model is draining, falling
    asleep or stopping, or an idle stop was just decided (their memory counts as used,
    and no eviction is decided beside them)."""
    book = memory.ledger(models, gpu_count=gpu_count, capacity=capacity)
    free = book.free
    ready = [m for m in models if m.state == "ready" and not m.unknown]

    if not leaving and _unblock(models, stops):
        return [], {}
    if not leaving and book.over():
        victims = memory.choose_victims(
            ready,
            room=lambda f: all(x >= 0 for x in f),
            free=free,
            capacity=capacity,
            where=book.where,
            now=now,
        )
        stops.extend(Stop(v.name, "capacity") for v in (victims.models if victims else ()))
        return [], {}

    starts: list[str] = []
    placed: dict[str, tuple[int, ...]] = {}
    # GPUs where memory may be released soon: a model leaving, or one starting cold
    # (vLLM's start-up profiling frees what it measured with). A wake may overlap there,
    # a cold start may not: vLLM measures free memory while it starts and fails when
    # another process releases memory meanwhile ("Error in memory profiling", vLLM
    # #56830); a wake does not measure. So cold starts on one GPU run one at a time.
    releasing = {
        i
        for v in models
        if v.state in TRANSIT_STATES or v.state == "starting"
        for i in book.where.get(v.name, ())
    }
    for m in demand:
        cold = m.state != "sleeping"
        usable = free
        if cold and releasing:
            usable = [0 if i in releasing else f for i, f in enumerate(free)]
        spot = memory.room_for(m, free=usable, capacity=capacity, where=book.where)
        if spot is not None:
            if cold:
                releasing.update(spot)
            starts.append(m.name)
            placed[m.name] = spot
            need = memory.start_need(m, capacity=capacity)
            for i in spot:
                free[i] -= need
            continue
        if starts or leaving:
            break  # let the starts land, or the leaving go, before evicting anything
        waited = now - (m.oldest_wait if m.oldest_wait is not None else now)
        eligible: list[memory.Footprint] = [
            r for r in ready if _evictable(r, now=now, waited=waited)
        ]
        # Sleepers holding a residue, those with held requests too (ranked last as busy):
        # a sleeper queued behind the waiting model may sit where it must wake.
        eligible += [
            s
            for s in models
            if s.state == "sleeping" and not s.unknown and s.name != m.name and s.name in book.where
        ]

        def room(f: Sequence[int], m: ModelView = m) -> bool:
            return memory.room_for(m, free=f, capacity=capacity, where=book.where) is not None

        victims = memory.choose_victims(
            eligible, room=room, free=free, capacity=capacity, where=book.where, now=now
        )
        if victims:
            by_name = {v.name: v for v in models}
            awake = [by_name[v.name] for v in victims.models if v.state == "ready"]
            evict: list[Stop] = []
            sleep: set[str] = set()
            if not victims.stop_all:
                evict, sleep = plan_sleeps(awake, models, host_memory=host_memory, keep=m.name)
            if evict:
                stops.extend(evict)
            else:
                stops.extend(
                    Stop(v.name, "swap", for_model=m.name, sleep=v.name in sleep)
                    for v in victims.models
                )
        else:
            _look_again(ready, m, now=now, wake=wake)
        break
    return starts, placed
