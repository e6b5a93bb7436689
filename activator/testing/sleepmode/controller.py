"""The owner of an engine's sleep state: control calls, the requests in the engine, reports.

An engine supplies a `SleepDevice` that carries out memory effects (the CPU stand-in
simulates them, the GPU one copies); everything else is here, shared.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from activator.testing.sleepmode.report import report_path, write_report
from activator.testing.sleepmode.state import (
    DISCARD_WEIGHTS,
    OFFLOAD_WEIGHTS,
    RELOAD_WEIGHTS,
    RESTORE_WEIGHTS,
    Effect,
    Footprint,
    PauseMode,
    Plan,
    SleepState,
    memory_of,
    plan_reload,
    plan_sleep,
    plan_wake_up,
)

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Phase = Literal["awake", "falling_asleep", "sleeping", "waking"]
# Kept for /debug/timings: enough for a benchmark's run, bounded for a long-lived engine.
TIMINGS_KEPT = 1000


class SleepDevice(Protocol):
    """Carries out one effect. May take time; must leave the memory as the effect says
    when it returns. Never called concurrently (the controller serialises)."""

    async def apply(self, effect: Effect) -> None: ...


@dataclass(frozen=True, slots=True)
class SleepConfig:
    served_model_name: str
    footprint: Footprint
    routes: bool = False  # VLLM_SERVER_DEV_MODE=1: the control routes exist
    pooled: bool = False  # --enable-sleep-mode: a sleep frees memory
    memory_report: Path | None = None  # a directory: <pid>.json kept current
    gpu_memory_utilization: float | None = None  # as the engine was started with


class Ticket:
    """One request in the engine: parked while the engine sleeps, then generating.

    Used only from the request's own handler task. `aborted` is set by the controller;
    `_kick` wakes the handler when the pause or the abort changes.
    """

    def __init__(self, controller: SleepController) -> None:
        self._controller = controller
        self._kick = asyncio.Event()
        self.aborted = False
        self.running = False

    def kick(self) -> None:
        self._kick.set()

    async def _wait_kick(self, limit: float | None) -> None:
        self._kick.clear()
        try:
            await asyncio.wait_for(self._kick.wait(), limit)
        except TimeoutError:
            pass

    async def admitted(self) -> bool:
        """Waits while the engine sleeps (the request hangs, as in vLLM); False if the
        request was aborted meanwhile (a sleep with mode=abort)."""
        controller = self._controller
        if not controller.state.admits and not self.aborted:
            controller.waiting += 1
            try:
                while not controller.state.admits and not self.aborted:
                    await self._wait_kick(None)
            finally:
                controller.waiting -= 1
        if self.aborted:
            return False
        controller.started(self)
        return True

    async def step(self, delay: float) -> bool:
        """One generation step taking `delay` seconds; frozen while a keep-mode sleep
        lasts. False once aborted: stop generating and finish with "abort"."""
        controller = self._controller
        if delay > 0 and not self.aborted:
            if not controller.config.routes:
                await asyncio.sleep(delay)  # nothing can abort it: the cheap path
            else:
                deadline = time.monotonic() + delay
                while not self.aborted and (left := deadline - time.monotonic()) > 0:
                    await self._wait_kick(left)
        while controller.state.freezes and not self.aborted:
            await self._wait_kick(None)
        return not self.aborted

    @property
    def garbage(self) -> bool:
        """Whether a token produced now comes from wrong weights (level 2, no reload)."""
        return not self._controller.state.weights_valid


class SleepController:
    """The one owner of an engine's sleep state. Control calls run one at a time under
    `_lock` (as vLLM's engine core runs them); every transition is logged, counted in
    the metric and written to the memory report."""

    def __init__(self, config: SleepConfig, *, device: SleepDevice) -> None:
        self.config = config
        self.state = SleepState()
        self.running = 0  # requests generating (vllm:num_requests_running)
        self.waiting = 0  # requests parked while asleep (vllm:num_requests_waiting)
        self.timings: deque[JsonObject] = deque(maxlen=TIMINGS_KEPT)
        self.port: int | None = None  # for the report, once known
        self._device = device
        self._lock = asyncio.Lock()
        self._tickets: set[Ticket] = set()
        self._idle = asyncio.Event()  # no request generating: what mode=wait waits for
        self._idle.set()
        self._recorded = (0, 0)  # vLLM's record_sleep_state(sleep, level) for the metric
        self._report_seq = 0

    # -- requests --

    @contextmanager
    def ticket(self) -> Iterator[Ticket]:
        """A request's presence in the engine, from arrival to its last byte."""
        ticket = Ticket(self)
        self._tickets.add(ticket)
        try:
            yield ticket
        finally:
            self._tickets.discard(ticket)
            if ticket.running:
                self.running -= 1
                if self.running == 0:
                    self._idle.set()

    def started(self, ticket: Ticket) -> None:
        """The ticket's request left the queue and generates (called by the ticket)."""
        ticket.running = True
        self.running += 1
        self._idle.clear()

    def _kick_all(self) -> None:
        for ticket in self._tickets:
            ticket.kick()

    # -- control calls --

    async def sleep(self, *, level: int, mode: PauseMode) -> None:
        async with self._lock:
            started = time.perf_counter()
            aborted = 0
            if mode == "abort":
                # vLLM's finish_requests(None, ABORTED): every request in the engine,
                # parked ones included.
                for ticket in self._tickets:
                    aborted += not ticket.aborted
                    ticket.aborted = True
            self.state = replace(self.state, pause="paused_all" if mode == "keep" else "paused_new")
            self._kick_all()
            self._report("falling_asleep")
            if mode == "wait":
                await self._idle.wait()
            plan = plan_sleep(self.state, level=level, pooled=self.config.pooled)
            self._recorded = (1, level)
            seconds = await self._carry_out(plan, phase="falling_asleep")
            self._record("sleep", started, level=level, mode=mode, aborted=aborted, effects=seconds)

    async def wake_up(self, *, tags: tuple[str, ...] | None) -> bool:
        """Returns whether the engine is fully awake (generation resumed)."""
        async with self._lock:
            started = time.perf_counter()
            plan = plan_wake_up(self.state, tags=tags)
            seconds = await self._carry_out(plan, phase="waking")
            fully_awake = not self.state.sleeping_tags
            if fully_awake:
                self.state = replace(self.state, pause="unpaused")
                self._recorded = (0, 0)
                self._kick_all()
            self._report()
            self._record("wake_up", started, tags=tags, awake=fully_awake, effects=seconds)
            return fully_awake

    async def reload_weights(self) -> None:
        async with self._lock:
            started = time.perf_counter()
            plan = plan_reload(self.state)
            seconds = await self._carry_out(plan, phase=self._settled_phase())
            self._record("reload_weights", started, effects=seconds)

    async def is_sleeping(self) -> bool:
        async with self._lock:  # served after the control call in progress
            return self.state.is_sleeping

    async def reset_prefix_cache(self, *, reset_running_requests: bool) -> bool:
        async with self._lock:
            # vLLM refuses (success false) while running requests hold cache blocks.
            return reset_running_requests or self.running == 0

    async def _carry_out(self, plan: Plan, *, phase: Phase) -> JsonObject:
        """Runs the plan's effects in order, the state following each; then the tags."""
        if plan.warning:
            logger.warning("%s: %s", self.config.served_model_name, plan.warning)
        seconds: JsonObject = {}
        if plan.effects:
            self._report(phase, upcoming=plan.effects)
        try:
            for effect in plan.effects:
                began = time.perf_counter()
                await self._device.apply(effect)
                seconds[effect.name] = round(time.perf_counter() - began, 6)
                self.state = self.state.after(effect)
            # As in vLLM, the executor's tags change only when the whole call succeeded;
            # where the memory is follows each effect that completed.
            if plan.sleeping_tags is not None:
                self.state = replace(self.state, sleeping_tags=plan.sleeping_tags)
        finally:
            self._report()
        return seconds

    def _record(self, op: str, started: float, **details: Any) -> None:
        seconds = round(time.perf_counter() - started, 6)
        entry = {"op": op, "seconds": seconds, "at": time.time(), **details}
        self.timings.append(entry)
        logger.info(
            "%s: %s took %.3f s (%s); now %s",
            self.config.served_model_name,
            op,
            seconds,
            ", ".join(f"{k}={v}" for k, v in details.items()),
            self.describe(),
        )

    # -- what is seen from outside --

    def describe(self) -> str:
        s = self.state
        tags = ",".join(sorted(s.sleeping_tags)) or "-"
        return f"pause={s.pause} sleeping_tags={tags} weights={s.weights} kv_cache={s.kv_cache}"

    def metric_lines(self, labels: str) -> list[str]:
        """vLLM's vllm:engine_sleep_state gauge, recorded as vLLM records it: the
        requested level at /sleep, awake after a full wake."""
        asleep, level = self._recorded
        values = {
            "awake": 0 if asleep else 1,
            "weights_offloaded": int(asleep == 1 and level == 1),
            "discard_all": int(asleep == 1 and level == 2),
        }
        return [
            "# TYPE vllm:engine_sleep_state gauge",
            *(
                f'vllm:engine_sleep_state{{{labels},sleep_state="{name}"}} {float(value)}'
                for name, value in values.items()
            ),
        ]

    def report(self, phase: Phase | None = None) -> JsonObject:
        """The memory report: what this process holds now (during a transition, the
        larger of before and after, so an observer never undercounts)."""
        return self._report_body(phase or self._settled_phase(), upcoming=())

    def _settled_phase(self) -> Phase:
        return "sleeping" if self.state.is_sleeping else "awake"

    def _report_body(self, phase: Phase, *, upcoming: tuple[Effect, ...]) -> JsonObject:
        state, footprint = self.state, self.config.footprint
        gpu, host = memory_of(state, footprint)
        for effect in upcoming:
            state = state.after(effect)
            after_gpu, after_host = memory_of(state, footprint)
            gpu, host = max(gpu, after_gpu), max(host, after_host)
        asleep, level = self._recorded
        return {
            "pid": os.getpid(),
            "port": self.port,
            "served_model_name": self.config.served_model_name,
            "state": phase,
            "level": level if asleep else None,
            "is_sleeping": self.state.is_sleeping,
            "sleeping_tags": sorted(self.state.sleeping_tags),
            "weights": self.state.weights,
            "kv_cache": self.state.kv_cache,
            "weights_valid": self.state.weights_valid,
            "holds_gpu": gpu > footprint.residue,
            "gpu_bytes": gpu,
            "host_bytes": host,
            "footprint": asdict(footprint),
            # Where and within what share it runs (memory packing): CUDA_VISIBLE_DEVICES as
            # activator set it, and the share it was started with.
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "seq": self._report_seq,
            "updated": time.time(),
        }

    def _report(self, phase: Phase | None = None, *, upcoming: tuple[Effect, ...] = ()) -> None:
        if self.config.memory_report is None:
            return
        self._report_seq += 1
        body = self._report_body(phase or self._settled_phase(), upcoming=upcoming)
        write_report(self.config.memory_report, body)

    def open_report(self, *, port: int) -> None:
        """Writes the first report (the engine is serving)."""
        self.port = port
        self._report()

    def close_report(self) -> None:
        if self.config.memory_report is not None:
            report_path(self.config.memory_report).unlink(missing_ok=True)


@dataclass(slots=True)
class SimulatedDevice:
    """Each effect takes the time the flags give: --sleep-delay for a sleep (copy out or
    free), --wake-delay for bringing weights back from host, --reload-delay for reading
    the checkpoint again. Mapping fresh memory and the KV cache cost nothing."""

    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    reload_delay: float = 0.0
    applied: list[str] = field(default_factory=list)

    async def apply(self, effect: Effect) -> None:
        delay = {
            OFFLOAD_WEIGHTS.name: self.sleep_delay,
            DISCARD_WEIGHTS.name: self.sleep_delay,
            RESTORE_WEIGHTS.name: self.wake_delay,
            RELOAD_WEIGHTS.name: self.reload_delay,
        }.get(effect.name, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        self.applied.append(effect.name)
