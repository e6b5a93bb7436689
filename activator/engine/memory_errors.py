"""What an engine's own words say about GPU memory, when a start fails: the signs that
the GPU has less free memory than the pool counts (an engine uses more than it
declared, another process holds the GPU) or that memory moved under a start.

activator counts the footprints models declare (memory packing, docs/pools.md); it
cannot see what an engine really allocates. The engine can: vLLM refuses to start when
its share of the card is not free, and aborts when free memory changes while it profiles.
A start that fails with one of these is logged loudly with what it means. Pure: lines in,
one sentence out.
"""

from __future__ import annotations

from collections.abc import Sequence

# (a phrase of the engine's message, what it means for the pool's accounting)
SIGNS = (
    (
        "less than desired GPU memory utilization",
        "the GPU had less free memory than this model's share: something on it uses more "
        "than the pool counts (an engine over its gpu_memory, a sleeper's residue above "
        "sleep.gpu_residue, or a process activator does not run)",
    ),
    (
        "Error in memory profiling",
        "GPU memory was released on the card while the engine measured it at start",
    ),
    (
        "CUDA out of memory",
        "the engine ran out of GPU memory: its gpu_memory share (or the GPU's free memory) "
        "is too small for its weights, KV cache and activations",
    ),
    (
        "OutOfMemoryError",
        "the engine ran out of GPU memory: its gpu_memory share (or the GPU's free memory) "
        "is too small for its weights, KV cache and activations",
    ),
)


def memory_verdict(lines: Sequence[str]) -> str | None:
    """What the engine's last lines say about GPU memory, or None if nothing."""
    for line in reversed(lines):
        for phrase, meaning in SIGNS:
            if phrase in line:
                return meaning
    return None
