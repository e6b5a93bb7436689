"""Command-line options for sleep mode, shared by the stand-in engines.

The names are vLLM's where vLLM has the option (--enable-sleep-mode; VLLM_SERVER_DEV_MODE
in the environment); the rest size and time the simulation and name the memory report.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.testing.sleepmode.controller import SimulatedDevice, SleepConfig
from activator.testing.sleepmode.state import Footprint

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class SleepOptions:
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: the routes exist
    enable_sleep_mode: bool = False  # a sleep frees memory
    memory_report: Path | None = None
    kv_cache_gib: float = 1.0
    # Left on the GPU while asleep: vLLM's is about 0.8-1.2 GiB at TP=1 (CUDA context,
    # allocations outside its sleep pool), several GiB with tensor parallelism.
    gpu_residue_gib: float = 1.0
    # vLLM's flag, accepted so that an engine command can carry it (activator reads it as
    # the model's GPU memory share) and shown in the memory report.
    gpu_memory_utilization: float | None = None
    # The CPU stand-in's simulation only (the GPU stand-in has real weights and times).
    weights_gib: float = 1.0
    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    reload_delay: float = 0.0

    def config(self, *, served_model_name: str, weights_bytes: int | None = None) -> SleepConfig:
        weights = int(self.weights_gib * GIB) if weights_bytes is None else weights_bytes
        footprint = Footprint(
            weights=weights,
            kv_cache=int(self.kv_cache_gib * GIB),
            residue=int(self.gpu_residue_gib * GIB),
        )
        return SleepConfig(
            served_model_name=served_model_name,
            footprint=footprint,
            routes=self.dev_mode,
            pooled=self.enable_sleep_mode,
            memory_report=self.memory_report,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )

    def simulated_device(self) -> SimulatedDevice:
        return SimulatedDevice(
            sleep_delay=self.sleep_delay, wake_delay=self.wake_delay, reload_delay=self.reload_delay
        )


def dev_mode(environ: Mapping[str, str]) -> bool:
    """vLLM's reading of VLLM_SERVER_DEV_MODE: bool(int(value)). Anything else raises
    ValueError, which stops vLLM at start."""
    return bool(int(environ.get("VLLM_SERVER_DEV_MODE", "0")))


def add_arguments(parser: argparse.ArgumentParser, *, simulated: bool) -> None:
    """Adds the sleep options; `simulated` adds the CPU stand-in's sizes and delays."""
    add = parser.add_argument
    add(
        "--enable-sleep-mode",
        action="store_true",
        help="a /sleep frees GPU memory (the routes need VLLM_SERVER_DEV_MODE=1, as in vLLM)",
    )
    add(
        "--memory-report",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep DIR/<pid>.json current: state, gpu_bytes, host_bytes (removed at exit)",
    )
    add("--kv-cache-gib", type=float, default=1.0, help="KV cache (GiB)")
    add(
        "--gpu-residue-gib",
        type=float,
        default=1.0,
        help="GPU memory still held while asleep (vLLM: about 0.8-1.2 GiB at TP=1)",
    )
    add(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM's share of the GPU the engine may take; shown in the memory report",
    )
    if simulated:
        add("--weights-gib", type=float, default=1.0, help="simulated weights (GiB)")
        add("--sleep-delay", type=float, default=0.0, help="seconds a level 1 or 2 sleep takes")
        add("--wake-delay", type=float, default=0.0, help="seconds to copy weights back")
        add("--reload-delay", type=float, default=0.0, help="seconds reload_weights takes")


COMMON = (
    "enable_sleep_mode",
    "memory_report",
    "kv_cache_gib",
    "gpu_residue_gib",
    "gpu_memory_utilization",
)
SIMULATED = ("weights_gib", "sleep_delay", "wake_delay", "reload_delay")


def take_options(
    args: dict[str, Any], *, simulated: bool, environ: Mapping[str, str] = os.environ
) -> SleepOptions:
    """Removes the options `add_arguments` added from parsed `args` (vars of a
    Namespace) and returns them, with dev mode read from the environment (ValueError if
    malformed)."""
    names = COMMON + (SIMULATED if simulated else ())
    taken = {name: args.pop(name) for name in names}
    return SleepOptions(**taken, dev_mode=dev_mode(environ))
