"""A request's claim on a ready engine (Lease), and the queue of requests held for one
(Waiters), with the count over all models that bounds it (HoldCounter).

The model (activator.model.lifecycle.Model) owns its Waiters and its leases; these classes
only keep the bookkeeping in one place: a held request is counted once, on the model and
in the app-wide HoldCounter, from the moment it is queued until it is granted a lease,
failed, or leaves (timeout, disconnect). A lease knows its model only as a `LeaseOwner`
(told when the lease ends): whoever acquired it (the proxy) holds the model itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from activator.core.errors import ActivatorError

if TYPE_CHECKING:
    from activator.placement.routing import PodLease


class HoldCounter:
    """Held requests over all models, for `server.max_queued_total`. Owned by the app."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


class LeaseOwner(Protocol):
    """What a lease needs from the model it was granted by (activator.model.lifecycle)."""

    def lease_ended(self, lease: Lease) -> None:
        """The request is over (Lease.release, once)."""


@dataclass(eq=False)
class Lease:
    """A request's claim on a ready upstream. Release exactly once (the proxy does)."""

    owner: LeaseOwner
    url: str
    cold: bool
    held_seconds: float
    cut_reason: str | None = None
    # What the client should get for a cut request (a status line not sent yet: this
    # error's response; a stream under way: this error as its last event). None: an
    # upstream error carrying `cut_reason`.
    cut_error: ActivatorError | None = None
    # A scaled-out model's request: its claim on one pod (activator.placement.routing), whose url
    # is this lease's; released with it, and a pod that disappears cuts it.
    pod_lease: PodLease | None = None
    _on_cut: list[Callable[[], None]] = field(default_factory=list)
    _released: bool = False

    @property
    def pod(self) -> str | None:
        """The pod the request goes to (a scaled-out model), else None."""
        return self.pod_lease.pod if self.pod_lease is not None else None

    def on_cut(self, callback: Callable[[], None]) -> None:
        """Register how to abort this request if the model must stop before it ends."""
        self._on_cut.append(callback)

    def cut(self, reason: str, *, error: ActivatorError | None = None) -> None:
        self.cut_reason = reason
        self.cut_error = error
        for callback in self._on_cut:
            callback()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.owner.lease_ended(self)
            if self.pod_lease is not None:
                self.pod_lease.release()  # room on the pod: held requests may take it

    def connect_failed(self) -> None:
        """The connection to its pod failed before a byte was sent: the pod takes no new
        request until it passes its probe again. Releases the lease."""
        if self.pod_lease is not None:
            self.pod_lease.connect_failed()
        self.release()


class Waiters:
    """The requests held for one model, in arrival order (the first is the oldest: O(1)
    with 10k held). Each is a future the model resolves with a Lease or an error."""

    def __init__(self, holds: HoldCounter) -> None:
        self._holds = holds
        self._waiting: dict[int, tuple[asyncio.Future[Lease], float]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def full(self, max_queued: int) -> bool:
        """No room for one more: the model's own cap, or the app-wide one."""
        return len(self._waiting) >= max_queued or self._holds.count >= self._holds.limit

    def oldest(self) -> float | None:
        """When the oldest held request arrived (clock time), or None."""
        return next(iter(self._waiting.values()))[1] if self._waiting else None

    def add(self, arrived: float) -> tuple[int, asyncio.Future[Lease]]:
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._seq += 1
        self._waiting[self._seq] = (future, arrived)
        self._holds.count += 1
        return self._seq, future

    def leave(self, key: int) -> bool:
        """The request stops waiting by itself (timeout, disconnect, an error); False if
        it was already granted or failed."""
        if self._waiting.pop(key, None) is None:
            return False
        self._holds.count -= 1
        return True

    def grant_while(self, lease_for: Callable[[float], Lease | None]) -> int:
        """Held requests get leases in arrival order for as long as `lease_for(arrived)`
        has one (a scaled-out model: while a pod has room). Returns how many."""
        granted = 0
        for key, (future, arrived) in list(self._waiting.items()):
            if future.done():
                continue  # cancelled: it leaves by itself
            lease = lease_for(arrived)
            if lease is None:
                break
            if self._waiting.pop(key, None) is None:
                lease.release()  # it left meanwhile
                continue
            self._holds.count -= 1
            future.set_result(lease)
            granted += 1
        return granted

    def grant_all(self, lease_for: Callable[[float], Lease]) -> None:
        """Every held request gets a lease (`lease_for(arrived)`), in arrival order."""
        waiting, self._waiting = self._waiting, {}
        for future, arrived in waiting.values():
            self._holds.count -= 1
            if not future.done():
                future.set_result(lease_for(arrived))

    def fail_all(self, error: ActivatorError) -> int:
        """Every held request fails with a copy of `error`. Returns how many."""
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            self._holds.count -= 1
            if not future.done():
                future.set_exception(
                    type(error)(error.message, retry_after=error.retry_after, extra=error.extra)
                )
        return len(waiting)
