"""The names of a model's states, and nothing else.

activator.model.transitions is the one table of a model's moves and documents what each state
means; it takes the names from here. They live apart so that a layer below the model
(activator.observability.metrics labels its state gauge by them) can name the states
without importing the model's lifecycle. Imports nothing from activator.
"""

from __future__ import annotations

from typing import Literal

State = Literal[
    "stopped",
    "failed",
    "starting",
    "ready",
    "draining",
    "falling_asleep",
    "sleeping",
    "waking",
    "stopping",
]

STATES: tuple[State, ...] = State.__args__  # type: ignore[attr-defined]
