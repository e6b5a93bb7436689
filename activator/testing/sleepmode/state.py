"""The sleep state of one engine and its transitions, as vLLM has them (pure).

vLLM keeps two things: the scheduler's pause state (vllm/v1/engine/core.py) and the
executor's set of sleeping tags (vllm/v1/executor/abstract.py). Where each tag's memory
is (GPU, host, gone) follows from the sleep allocator (vllm/device_allocator/cumem.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Residence = Literal["gpu", "host", "gone"]
PauseState = Literal["unpaused", "paused_new", "paused_all"]
PauseMode = Literal["abort", "wait", "keep"]

WEIGHTS, KV_CACHE = "weights", "kv_cache"
SLEEP_TAGS = frozenset((WEIGHTS, KV_CACHE))
SCHEDULING_TAG = "scheduling"  # vLLM's level-0 wake tag: resume scheduling only
SLEEP_LEVELS = (0, 1, 2)
PAUSE_MODES: dict[str, PauseMode] = {"abort": "abort", "wait": "wait", "keep": "keep"}


@dataclass(frozen=True, slots=True)
class Effect:
    """One memory operation a device carries out: moves one tag to `to`."""

    name: str
    tag: str
    to: Residence
    valid: bool | None = None  # the weights' content after it; None: unchanged


OFFLOAD_WEIGHTS = Effect("offload_weights", WEIGHTS, "host")  # level 1: copy out, free
DISCARD_WEIGHTS = Effect("discard_weights", WEIGHTS, "gone", valid=False)  # level 2: free
RESTORE_WEIGHTS = Effect("restore_weights", WEIGHTS, "gpu")  # copy back from host
MAP_WEIGHTS = Effect("map_weights", WEIGHTS, "gpu", valid=False)  # fresh memory: garbage
RELOAD_WEIGHTS = Effect("reload_weights", WEIGHTS, "gpu", valid=True)  # read the checkpoint
DISCARD_KV = Effect("discard_kv_cache", KV_CACHE, "gone")
MAP_KV = Effect("map_kv_cache", KV_CACHE, "gpu")

# (tag, where it is, event) -> the effect that moves it. Events: "sleep1", "sleep2", "wake".
# Absent: nothing to do (already there). KV content is never kept, at any level.
TRANSITIONS: dict[tuple[str, Residence, str], Effect] = {
    (WEIGHTS, "gpu", "sleep1"): OFFLOAD_WEIGHTS,
    (WEIGHTS, "gpu", "sleep2"): DISCARD_WEIGHTS,
    (WEIGHTS, "host", "wake"): RESTORE_WEIGHTS,
    (WEIGHTS, "gone", "wake"): MAP_WEIGHTS,
    (KV_CACHE, "gpu", "sleep1"): DISCARD_KV,
    (KV_CACHE, "gpu", "sleep2"): DISCARD_KV,
    (KV_CACHE, "gone", "wake"): MAP_KV,
}


@dataclass(frozen=True, slots=True)
class SleepState:
    """What vLLM tracks (scheduler pause, executor's sleeping tags) and where memory is."""

    pause: PauseState = "unpaused"
    sleeping_tags: frozenset[str] = frozenset()
    weights: Residence = "gpu"
    kv_cache: Residence = "gpu"
    weights_valid: bool = True  # False after a level-2 sleep until reload_weights

    @property
    def is_sleeping(self) -> bool:
        return self.pause != "unpaused" or bool(self.sleeping_tags)

    @property
    def admits(self) -> bool:
        """New requests are scheduled (otherwise they queue: the hang)."""
        return self.pause == "unpaused"

    @property
    def freezes(self) -> bool:
        """Requests already generating stop where they are (a keep-mode sleep)."""
        return self.pause == "paused_all"

    def where(self, tag: str) -> Residence:
        return self.weights if tag == WEIGHTS else self.kv_cache

    def after(self, effect: Effect) -> SleepState:
        valid = self.weights_valid if effect.valid is None else effect.valid
        if effect.tag == WEIGHTS:
            return replace(self, weights=effect.to, weights_valid=valid)
        return replace(self, kv_cache=effect.to)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one control call does: the effects in order, then the executor's tags."""

    effects: tuple[Effect, ...] = ()
    sleeping_tags: frozenset[str] | None = None  # None: unchanged
    warning: str | None = None  # vLLM logs a warning and does nothing

    def apply(self, state: SleepState) -> SleepState:
        """The state once every effect is done and the tags are set."""
        for effect in self.effects:
            state = state.after(effect)
        if self.sleeping_tags is not None:
            state = replace(state, sleeping_tags=self.sleeping_tags)
        return state


def plan_sleep(state: SleepState, *, level: int, pooled: bool) -> Plan:
    """The memory part of /sleep (the scheduler is paused before, by the caller).

    Without the sleep allocator (`pooled` False) vLLM still marks every tag asleep but
    no allocation is in its pool, so nothing moves.
    """
    if level == 0:
        return Plan()
    if WEIGHTS in state.sleeping_tags:
        return Plan(warning="Executor is already sleeping.")
    event = f"sleep{level}"
    effects = (
        tuple(
            effect
            for tag in (WEIGHTS, KV_CACHE)
            if (effect := TRANSITIONS.get((tag, state.where(tag), event))) is not None
        )
        if pooled
        else ()
    )
    return Plan(effects=effects, sleeping_tags=SLEEP_TAGS)


def plan_wake_up(state: SleepState, *, tags: tuple[str, ...] | None) -> Plan:
    """The executor part of /wake_up: all tags (None) or some; any tag that is not
    asleep makes it a no-op, as in vLLM."""
    if tags is not None:
        tags = tuple(t for t in tags if t != SCHEDULING_TAG)
        if not tags:
            return Plan()
    if not state.sleeping_tags:
        return Plan(warning="Executor is not sleeping.")
    waking = state.sleeping_tags if tags is None else frozenset(tags)
    if stray := sorted(waking - state.sleeping_tags):
        return Plan(warning=f"Tag {stray[0]} is not in sleeping tags {sorted(state.sleeping_tags)}")
    effects = tuple(
        effect
        for tag in (WEIGHTS, KV_CACHE)
        if tag in waking and (effect := TRANSITIONS.get((tag, state.where(tag), "wake")))
    )
    return Plan(effects=effects, sleeping_tags=state.sleeping_tags - waking)


class SleepError(Exception):
    """A control call refused, answered in vLLM's error envelope."""

    def __init__(self, message: str, *, status: int, type_: str, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param

    def body(self) -> dict[str, object]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.status}}


def plan_reload(state: SleepState) -> Plan:
    """collective_rpc reload_weights: reads the checkpoint into the resident weights.

    With the weights asleep vLLM would write into unmapped memory (undefined; a crash at
    best): refused here with a 500 so a wrong wake order shows up in a test.
    """
    if WEIGHTS in state.sleeping_tags or state.weights != "gpu":
        raise SleepError(
            "reload_weights with the weights asleep: wake_up?tags=weights first",
            status=500,
            type_="InternalServerError",
        )
    return Plan(effects=(RELOAD_WEIGHTS,))


# ---- memory ----


@dataclass(frozen=True, slots=True)
class Footprint:
    """An engine's memory in bytes. residue: what stays on the GPU while asleep (CUDA
    context, NCCL buffers, allocations outside vLLM's pool: about 0.5-1.5 GiB per engine
    in vLLM at TP=1, several GiB with tensor parallelism)."""

    weights: int
    kv_cache: int
    residue: int


def memory_of(state: SleepState, footprint: Footprint) -> tuple[int, int]:
    """(GPU bytes, host bytes) in a state. Host: the level-1 weight backup; level 2 keeps
    only the model's buffers (rope tables and such, counted as 0)."""
    gpu = footprint.residue
    gpu += footprint.weights if state.weights == "gpu" else 0
    gpu += footprint.kv_cache if state.kv_cache == "gpu" else 0
    host = footprint.weights if state.weights == "host" else 0
    return gpu, host
