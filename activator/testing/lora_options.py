"""The stand-in engine's LoRA options (activator.testing.lora says what they do): vLLM's
flags --enable-lora, --max-loras, --max-lora-rank, --max-cpu-loras, its
VLLM_ALLOW_RUNTIME_LORA_UPDATING variable, and --lora-load-delay. Imports nothing of
the engine; `engine_options` and `lora` import it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

# vLLM's envs.py reads it as ("1", "true"), case-insensitively.
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True, slots=True)
class LoraOptions:
    enable_lora: bool = False
    max_loras: int = 1  # vLLM's defaults
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_load_delay: float = 0.0
    runtime_updating: bool = False  # from the environment, as vLLM reads it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--enable-lora", action="store_true")
    add("--max-loras", type=int, default=1, help="adapters one batch may use (vLLM's meaning)")
    add("--max-lora-rank", type=int, default=16)
    add("--max-cpu-loras", type=int, default=None)
    add("--lora-load-delay", type=float, default=0.0, help="seconds each adapter load takes")


def take_options(args: dict[str, Any]) -> LoraOptions:
    """The LoRA options, removed from `args` (argparse's dict)."""
    flag = os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower()
    return LoraOptions(
        enable_lora=args.pop("enable_lora"),
        max_loras=args.pop("max_loras"),
        max_lora_rank=args.pop("max_lora_rank"),
        max_cpu_loras=args.pop("max_cpu_loras"),
        lora_load_delay=args.pop("lora_load_delay"),
        runtime_updating=flag in ("1", "true"),
    )
