"""A model's GPU memory, resolved against its pool: the share of each of its GPUs it takes
awake (`memory_fraction`) and keeps asleep (`residue_fraction`). Pure: activator.config.load
calls `resolve` once the pool is known and reports the problems it returns.

The footprint is declared once: `gpu_memory` (a share, or a size that the pool's
`gpu_memory` turns into a share) or the engine's own --gpu-memory-utilization in
process.command; where both are given they must agree. With neither, the model takes its
GPUs whole, as before packing existed. A Kubernetes model's flag lives in its pod
template, which activator does not read: such a model declares `gpu_memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

from activator.config.settings import ModelSettings, PoolSettings
from activator.config.types import format_size

# vLLM's share and a size's share must agree this closely: the flag is written with two
# decimals (0.45), and 36GiB of 80GiB is 0.45 exactly, but 20GiB of an "80GB" card is not.
AGREEMENT = 0.005
# What a sleeping vLLM engine keeps on each GPU, level 1 or 2: the CUDA context, the
# allocator's pool and the CUDA graphs' memory. Reported: 0.77 GiB at tensor parallelism 1
# and 1.14 GB per GPU at TP 4 (vLLM 0.13, vllm-project/vllm#32714); more with TP (NCCL
# buffers). 1.5 GiB covers those; measure yours (nvidia-smi while it sleeps) and set
# sleep.gpu_residue. vLLM 0.14-0.15 kept about 16 GB at level 1 (#32714): declare it there.
DEFAULT_GPU_RESIDUE = 3 * 2**29  # 1.5 GiB
# The same as a share, for a pool whose gpu_memory is not given: 5% is 1.2 GiB of a
# 24 GiB L4 and 4 GiB of an 80 GiB H100, at or above the sizes above.
DEFAULT_GPU_RESIDUE_SHARE = 0.05

Problem = tuple[tuple[str, ...], str]  # the key path under the model, and what is wrong


@dataclass(frozen=True)
class Resolved:
    memory_fraction: float | None  # of each of its GPUs, awake; None = its GPUs whole
    residue_fraction: float  # of each of its GPUs, asleep


def resolve(model: ModelSettings, pool: PoolSettings | None) -> tuple[Resolved, list[Problem]]:
    """The model's shares of each GPU of `pool` (None: it has no pool), and the problems of
    its gpu_memory keys; the shares are meaningful only when there are none."""
    problems: list[Problem] = []
    gpu_bytes = pool.gpu_memory if pool is not None else None
    memory = _footprint(model, pool, problems)
    residue = 0.0
    declared = model.sleep.gpu_residue if model.sleep is not None else None
    where = ("sleep", "gpu_residue")
    if model.sleep is None or memory is None:
        if declared is not None:
            problems.append((where, "counts only for a model with gpu_memory (a model that "
                             "takes its GPUs whole frees them all when it sleeps)"))  # fmt: skip
    elif declared is not None:
        share = declared.share(gpu_bytes)
        if share is None:
            problems.append((where, _needs_gpu_memory(declared, pool)))
        elif share > memory:
            problems.append((where, f"{declared} exceeds the model's gpu_memory ({memory:g})"))
        residue = min(share or 0.0, memory)
    else:
        default = DEFAULT_GPU_RESIDUE / gpu_bytes if gpu_bytes else DEFAULT_GPU_RESIDUE_SHARE
        residue = min(default, memory)
    return Resolved(memory_fraction=memory, residue_fraction=residue), problems


def _footprint(
    model: ModelSettings, pool: PoolSettings | None, problems: list[Problem]
) -> float | None:
    declared = model.gpu_memory
    flag = model.process.gpu_memory_utilization if model.process is not None else None
    if declared is None:
        return flag
    gpu_bytes = pool.gpu_memory if pool is not None else None
    share = declared.share(gpu_bytes)
    if share is None:
        problems.append((("gpu_memory",), _needs_gpu_memory(declared, pool)))
        return flag
    if share > 1:
        assert pool is not None and gpu_bytes is not None
        size = format_size(gpu_bytes)
        message = f"{declared} is more than a GPU (pools.{pool.name}.gpu_memory is {size})"
        problems.append((("gpu_memory",), message))
        return None
    if flag is not None and abs(share - flag) > AGREEMENT:
        of_pool = (
            f" ({share:.3g} of pools.{pool.name}.gpu_memory)"
            if declared.size is not None and pool is not None
            else ""
        )
        message = (
            f"{declared}{of_pool} disagrees with --gpu-memory-utilization {flag:g} in "
            "process.command (declare it once: drop gpu_memory, or make them agree)"
        )
        problems.append((("gpu_memory",), message))
    return share if flag is None else flag


def _needs_gpu_memory(declared: object, pool: PoolSettings | None) -> str:
    where = f"pools.{pool.name}.gpu_memory" if pool is not None else "a pool with gpu_memory"
    return f"{declared} is a size: it needs {where} (the memory of each GPU), or a share like 0.45"
