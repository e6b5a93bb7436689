"""What others read of a model, as snapshots: the pool's view (`view`, the facts the pure
policy decides on, activator.placement.policy), the admin API's and the status page's
(`describe`), and the counts of its requests (`in_flight`, `queued`). Nothing here
changes the model. A part of activator.model.lifecycle.Model (a mixin), split out so
each file keeps one subject.

May import the model's own lower modules (lease), config, observability and placement;
never activator.model.lifecycle (it would be a cycle): Model's members used here are
declared below, for the type checker only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from activator.config.settings import ModelSettings
from activator.model.lease import Lease, Waiters
from activator.observability.metrics import Metrics
from activator.placement.policy import ModelView

if TYPE_CHECKING:
    from activator.placement.scaleout import ScaleOut


class ModelViews:
    """The read side of activator.model.lifecycle.Model (which sets every field below)."""

    name: str
    settings: ModelSettings
    state: str
    unknown: bool
    blocked: bool
    url: str | None
    last_error: str | None
    last_activity: float
    ready_since: float | None
    last_wake_seconds: float | None
    last_wake_from: str | None
    last_sleep_seconds: float | None
    phases: dict[str, float]
    host_held: int
    retiring: str | None
    scale: ScaleOut | None
    _metrics: Metrics
    _waiters: Waiters
    _leases: set[Lease]
    _wake_requested_at: float | None

    if TYPE_CHECKING:  # Model's own, used here

        @property
        def restart_pending(self) -> tuple[str, ...]: ...

    @property
    def in_flight(self) -> int:
        return len(self._leases)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def view(self) -> ModelView:
        s = self.settings
        # Waiters are kept in arrival order: the first is the oldest (O(1) with 10k held).
        oldest = self._waiters.oldest()
        waits = [] if oldest is None else [oldest]
        if self._wake_requested_at is not None:
            waits.append(self._wake_requested_at)
        return ModelView(
            name=self.name,
            state=self.state,
            # Every replica it asked for takes its GPUs (a stopped model: one's worth).
            gpus=s.gpus * (self.scale.replicas if self.scale is not None else 1),
            in_flight=len(self._leases),
            queued=len(self._waiters) + (self._wake_requested_at is not None),
            oldest_wait=min(waits) if waits else None,
            last_activity=self.last_activity,
            ready_since=self.ready_since,
            unknown=self.unknown,
            idle_timeout=s.idle_timeout,
            min_residency=s.min_residency,
            max_wait=s.max_wait,
            sleep_level=s.sleep.level if s.sleep is not None else None,
            sleep_host=s.sleep.host_bytes if s.sleep is not None else 0,
            host_held=self.host_held,
            blocked=self.blocked,
        )

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "aliases": list(s.aliases),
            "served_model_name": s.served_model_name,
            "state": "unknown" if self.unknown else self.state,
            "backend": self.settings.backend_kind,
            "pool": s.pool,
            "gpus": s.gpus,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "upstream_url": self.url,
            "last_wake_seconds": self.last_wake_seconds,
            "last_wake_from": self.last_wake_from,
            "wake_phases": dict(self.phases),
            "sleep": None
            if s.sleep is None
            else {
                "level": s.sleep.level,
                "host_memory": s.sleep.host_bytes,
                "host_held": self.host_held,
                "last_sleep_seconds": self.last_sleep_seconds,
            },
            "last_error": self.last_error,
            "idle_timeout": s.idle_timeout,
            "cost": self._metrics.cost.report(self.name),
            "restart_pending": bool(self.restart_pending),
            "restart_pending_keys": list(self.restart_pending),
            "removing": self.retiring is not None,
        }
