"""What a model needs from around it: from its pool (`Scheduler`) and from the other
activator replicas (`Replicas`), as Protocols the model's parts type against.

Implemented by activator.fleet.pool (PoolScheduler) and activator.ha.wiring (Replica),
which sit above the model; these Protocols name only plain facts (a model's name, its
state), never the Model type, so the model's modules import this one and nothing here
imports them back. May import only the standard library.
"""

from __future__ import annotations

from typing import Protocol


class Scheduler(Protocol):
    """What a model needs from its pool: a nudge to decide again."""

    def kick(self) -> None: ...


class Replicas(Protocol):
    """The model's link to the other activator replicas (activator.ha.wiring). None when
    this activator runs alone: then every decision is its own."""

    def leading(self) -> bool:
        """Whether this replica decides for the models now (the elected leader)."""

    def changed(self, name: str, *, state: str, error: str | None) -> None:
        """Model `name`'s state or demand changed (synchronous, cheap): publish it."""

    async def drained_elsewhere(self, name: str) -> None:
        """Until no other replica has a request in flight for model `name`, and every one
        heard from holds new requests for it (it applied the drain). Safe to cancel."""
