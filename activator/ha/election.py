"""Leader election over a coordination.k8s.io/v1 Lease, with client-go's semantics.

The rules (client-go tools/leaderelection, LeaseLock):

- A candidate reads the Lease every retry_period. It may take it when the Lease is free
  (holderIdentity empty: released), already names it, or when the election record it
  observed (holder, duration, acquire/renew times, transitions) has not changed for the
  record's leaseDurationSeconds, timed by the candidate's OWN monotonic clock from when
  it saw the record change. Timestamps in the record are never compared with a local
  clock, so clock skew between nodes does not matter. Instead of waiting for its next
  poll a waiting candidate wakes exactly when the lease it watches would expire, which
  bounds a takeover by lease_duration + retry_period after the last renewal.
- Taking and renewing are a replace (PUT) carrying metadata.resourceVersion of the
  record read: a 409 means someone else wrote first. That is the race being decided,
  not an error: never retried, logged at debug level, no traceback.
- The leader renews every retry_period. It stops leading as soon as renew_deadline has
  passed since the START of its last successful renewal, by a timer on its own
  monotonic clock, even while a renewal is still hanging. Any write it made was
  committed after it was sent, and others time the lease from when they saw that write,
  so the old leader stops at least lease_duration - renew_deadline before anyone can
  take over. (client-go times the deadline from the start of each renewal round, up to a
  retry_period later; timing it from the last success is stricter.) Every call a leader
  makes is also bounded by the time it has left.
- A takeover increments leaseTransitions; a renewal keeps acquireTime.
- On a graceful stop (cancel) the leader stops leading first, then releases the Lease:
  holderIdentity empty, leaseDurationSeconds 1 (client-go's ReleaseOnCancel), so a
  rolling restart fails over at the next poll instead of after lease_duration.

The leader Lease can also carry annotations (intent.py publishes the model states
there). The elector is the only writer of that Lease, so annotations ride on its
fenced writes: `set_annotation()` schedules a write (at most every write_interval), and
a deposed leader's write fails on its stale resourceVersion.

Why not kubernetes_asyncio.leaderelection: its API calls carry no timeout, so a renew
that hangs on a dead connection keeps the old leader "leading" past its deadline while
another replica takes over (two deciders: reproduced on the fake API server with a hung
partition); a reset connection escapes run() as an aiohttp error instead of a failed
renewal; its deadlines use the wall clock (time.time()), which jumps; it writes local
time labelled as UTC into renewTime; it logs a stack trace on every ordinary conflict;
and run() returns after one term, so the loop, the cancellation and release semantics
would have to be written around it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from activator.backends.kube.calls import Obj
from activator.backends.kube.cluster import KubeCluster
from activator.config.ha import HaSettings, default_identity
from activator.ha import records
from activator.ha.changes import Changes
from activator.ha.leases import (
    Conflict,
    LeaseClient,
    LeaseError,
    NotFound,
    annotations_of,
    holder_of,
    micro_time,
)

log = logging.getLogger(__name__)

# A release (graceful stop) cannot wait long: without it the others take over after
# lease_duration anyway.
RELEASE_TIMEOUT = 5.0
# Spread of candidate polls (client-go jitters by up to 1.2x the period; a smaller spread
# keeps failover close to lease_duration + retry_period).
POLL_JITTER = 0.2


@dataclass(frozen=True)
class Leadership:
    """One change an elector reports to its subscribers: it started or stopped leading,
    or it saw the Lease change hands."""

    identity: str
    is_leader: bool
    leader: str | None  # the holder last observed (None: free)
    previous_leader: str | None  # != leader: the Lease changed hands (a leader change)
    term: int  # how many times this elector has acquired the Lease
    reason: str


Subscriber = Callable[[Leadership], None]


class _Same:
    """Marker: the holder did not change with this event."""


_SAME = _Same()
_DELETED: tuple[Any, ...] = ("<deleted>",)


class LeaderElector:
    """Campaigns for `settings.lease_name` in `settings.namespace` as `identity` (default:
    the pod name) until stopped.

    Owns the leader Lease's content while it leads. Read `is_leader` right before acting
    (it also checks the deadline itself, so it is False even if the loop is late);
    `valid_for()` says how long leadership is guaranteed. Start it with `start()` (a
    named, guarded task) and stop it with `aclose()` (which releases the Lease if held).
    """

    def __init__(
        self,
        cluster: KubeCluster,
        *,
        settings: HaSettings,
        identity: str | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity or default_identity()
        self._leases = LeaseClient(cluster.api_client, namespace=settings.namespace)
        # Bounds a candidate's calls; a leader's are bounded by its time left.
        self._call_timeout = min(cluster.settings.request_timeout, settings.renew_deadline)
        self.changes = Changes()
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task[None] | None = None

        # The last Lease object seen or written (with its resourceVersion) and when its
        # election record last changed, by our monotonic clock.
        self._lease: Obj | None = None
        self._record: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._leader: str | None = None

        self._leading = False
        self._valid_until = 0.0
        self._expiry: asyncio.TimerHandle | None = None
        self._last_write = -float("inf")
        # Start of the last successful write while leading (time.monotonic()).
        self.renewed_at: float | None = None
        # Annotations to write while leading: key -> value (None: remove). Dropped when
        # leadership ends, so nothing of an old term leaks into a later one.
        self._overrides: dict[str, str | None] = {}
        self._overrides_version = 0
        self._written_version = 0
        self._kick = asyncio.Event()
        self._failures = 0

        self.term = 0
        self.acquired = 0  # times this elector became leader
        self.lost = 0  # times it stopped (deadline, deposed, shutdown)
        self.leader_changes = 0  # changes of the holder it observed

    # -- what callers read -------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._leading and time.monotonic() < self._valid_until

    @property
    def leader(self) -> str | None:
        """The holder of the Lease as last observed (self.identity while leading)."""
        return self.identity if self.is_leader else self._leader

    @property
    def lease_name(self) -> str:
        return self.settings.lease_name

    def valid_for(self) -> float:
        """Seconds of leadership left (0.0 when not leading). Check it right before a
        write that only the leader may make."""
        if not self._leading:
            return 0.0
        return max(0.0, self._valid_until - time.monotonic())

    def annotations(self) -> dict[str, str]:
        """The Lease's annotations as last read or written, with pending ones applied."""
        found = annotations_of(self._lease)
        for key, value in self._overrides.items():
            if value is None:
                found.pop(key, None)
            else:
                found[key] = value
        return found

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` synchronously on every Leadership change (must not block or
        raise). Returns the unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def wait_for(self, leading: bool = True) -> None:
        """Until is_leader == leading. Safe to cancel."""
        while True:
            seen = self.changes.count
            if self.is_leader == leading:
                return
            await self.changes.wait(seen)

    def set_annotation(self, key: str, value: str | None) -> bool:
        """While leading: write `key` (None removes it) with the next write, at most
        write_interval after the previous one. False (nothing scheduled) otherwise."""
        if not self.is_leader:
            return False
        if self.annotations().get(key) == value:
            return True
        self._overrides[key] = value
        self._overrides_version += 1
        self._kick.set()
        return True

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(
                self.run(), name=f"leader-election-{self.settings.namespace}/{self.lease_name}"
            )
            self._task.add_done_callback(self._died)
        return self._task

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("leader election: the loop died", exc_info=task.exception())

    async def aclose(self) -> None:
        """Stop campaigning: stop leading at once, release the Lease if held (when
        release_on_cancel), and return when done. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Campaign until cancelled. Never raises but CancelledError: an API failure or
        an unexpected error costs one round. On cancel it stops leading before anything
        else, then releases the Lease (bounded)."""
        log.info(
            "leader election: %s campaigning for lease %s/%s",
            self.identity,
            self.settings.namespace,
            self.lease_name,
        )
        try:
            while True:
                try:
                    wake_at = await (self._renew() if self._leading else self._try_acquire())
                except LeaseError as exc:
                    self._call_failed(exc)
                    wake_at = time.monotonic() + self._poll_period()
                except Exception:  # one bad round (a malformed Lease...) must not end it
                    log.exception("leader election: unexpected error; stepping down")
                    self._step_down("unexpected error")
                    wake_at = time.monotonic() + self._poll_period()
                await self._pause(wake_at)
        except asyncio.CancelledError:
            self._step_down("shutting down", graceful=True)
            if self.settings.release_on_cancel:
                await self._release()
            raise

    # -- one round ----------------------------------------------------------------------

    async def _try_acquire(self) -> float:
        """Read the Lease; take it if free, ours or expired. Returns when to try next."""
        try:
            lease: Obj | None = await self._leases.get(self.lease_name, within=self._call_timeout)
        except NotFound:
            lease = None
        self._call_ok()
        if lease is None:
            previous = holder_of(self._lease)
            if previous is not None and previous != self.identity:
                # Deleted under a holder we saw: that holder may still be leading (its
                # next renewal recreates the Lease), so wait it out like an expiry.
                if self._record != _DELETED:
                    self._record, self._observed_at = _DELETED, time.monotonic()
                expires = self._observed_at + records.duration_of(
                    self._lease, default=self.settings.lease_duration
                )
                if time.monotonic() < expires:
                    return min(time.monotonic() + self._poll_period(), expires)
            sent = time.monotonic()
            try:
                created = await self._leases.create(self._new_lease(), within=self._call_timeout)
            except Conflict:
                log.debug("leader election: %s lost the race to create the lease", self.identity)
                return time.monotonic() + self._poll_period()
            self._won(created, sent, "created the lease")
            return sent + self.settings.retry_period

        self._observe(lease)
        holder = holder_of(lease)
        now = time.monotonic()
        if holder is not None and holder != self.identity:
            expires = self._observed_at + records.duration_of(
                lease, default=self.settings.lease_duration
            )
            if now < expires:
                return min(now + self._poll_period(), expires)
        sent = time.monotonic()
        try:
            written = await self._leases.replace(
                self._held(lease),
                within=self._call_timeout,
            )
        except Conflict:
            log.debug("leader election: %s lost the race for the lease", self.identity)
            return time.monotonic() + self._poll_period()
        except NotFound:
            return time.monotonic()  # deleted meanwhile: create it now
        if holder is None:
            reason = "acquired the released lease"
        elif holder == self.identity:
            reason = "resumed its own lease"
        else:
            reason = f"took over from {holder} (lease expired)"
        self._won(written, sent, reason)
        return sent + self.settings.retry_period

    async def _renew(self) -> float:
        """One renewal (with any pending annotations). Returns when to renew next."""
        sent = time.monotonic()
        left = self._valid_until - sent
        if left <= 0:
            self._step_down("renew deadline passed")
            return sent
        assert self._lease is not None
        version = self._overrides_version
        try:
            written = await self._leases.replace(self._held(self._lease), within=left)
        except Conflict:
            return await self._after_conflict()
        except NotFound:
            # Someone deleted it under us. Stop acting now, then compete for a new one.
            self._step_down("the lease was deleted")
            return time.monotonic()
        except LeaseError as exc:
            # Keep trying within the deadline; the timer ends leadership if none succeeds.
            self._call_failed(exc)
            return min(sent + self.settings.retry_period, self._valid_until)
        self._call_ok()
        self._observe(written)
        self._last_write = sent
        if not self._leading:
            return time.monotonic()  # the deadline passed while the call was in flight
        self._written_version = version
        self._extend(sent)
        return sent + self.settings.retry_period

    async def _after_conflict(self) -> float:
        """A renewal hit a stale resourceVersion: read who holds the Lease now."""
        left = self._valid_until - time.monotonic()
        try:
            lease = await self._leases.get(self.lease_name, within=left)
        except NotFound:
            self._step_down("the lease was deleted")
            return time.monotonic()
        self._observe(lease)
        holder = holder_of(lease)
        if holder != self.identity:
            self._step_down(f"the lease is now held by {holder or 'no one'}")
            return time.monotonic() + self._poll_period()
        return time.monotonic()  # still ours (someone else edited it): renew at once

    # -- state changes (the only places leadership changes) ----------------------------

    def _won(self, lease: Obj, sent: float, reason: str) -> None:
        self._observe(lease)
        self._last_write = sent
        if time.monotonic() >= sent + self.settings.renew_deadline:
            # The write took longer than the deadline: no time left to act on it. As the
            # holder we renew at the next round without waiting.
            log.warning("leader election: %s acquired the lease too late to lead", self.identity)
            return
        self._leading = True
        self._written_version = self._overrides_version
        self.term += 1
        self.acquired += 1
        self._extend(sent)
        log.info(
            "leader election: %s is the leader of %s/%s (%s, term %d)",
            self.identity,
            self.settings.namespace,
            self.lease_name,
            reason,
            self.term,
        )
        self._emit(reason)

    def _extend(self, sent: float) -> None:
        self.renewed_at = sent
        self._valid_until = sent + self.settings.renew_deadline
        if self._expiry is not None:
            self._expiry.cancel()
        delay = max(0.0, self._valid_until - time.monotonic())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._deadline)

    def _deadline(self) -> None:
        """The timer: the renew deadline passed without a successful renewal."""
        self._expiry = None
        if not self._leading:
            return
        late = self._valid_until - time.monotonic()
        if late > 0:  # the timer's clock ran ahead of ours: wait the rest
            self._expiry = asyncio.get_running_loop().call_later(late, self._deadline)
            return
        self._step_down(
            f"no successful renewal within renew_deadline ({self.settings.renew_deadline}s)"
        )

    def _step_down(self, reason: str, *, graceful: bool = False) -> None:
        if not self._leading:
            return
        self._leading = False
        self._valid_until = 0.0
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._overrides.clear()
        self._written_version = self._overrides_version
        self.lost += 1
        log.log(
            logging.INFO if graceful else logging.WARNING,
            "leader election: %s stopped leading %s/%s: %s",
            self.identity,
            self.settings.namespace,
            self.lease_name,
            reason,
        )
        self._kick.set()
        self._emit(reason)

    def _observe(self, lease: Obj) -> None:
        """Remember a Lease read or written: its record's change time and its holder."""
        self._lease = lease
        record = records.record_key(lease)
        if record != self._record:
            self._record = record
            self._observed_at = time.monotonic()
        holder = holder_of(lease)
        if holder != self._leader:
            previous, self._leader = self._leader, holder
            self.leader_changes += 1
            log.info(
                "leader election: %s sees the lease %s/%s held by %s (was %s)",
                self.identity,
                self.settings.namespace,
                self.lease_name,
                holder or "no one",
                previous or "no one",
            )
            self._emit(f"leader is now {holder or 'no one'}", previous=previous)

    def _emit(self, reason: str, *, previous: str | _Same | None = _SAME) -> None:
        event = Leadership(
            identity=self.identity,
            is_leader=self.is_leader,
            leader=self.leader,
            previous_leader=self._leader if isinstance(previous, _Same) else previous,
            term=self.term,
            reason=reason,
        )
        self.changes.notify()
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break the election
                log.exception("leader election: subscriber failed")

    # -- bodies (pure, in records.py) -------------------------------------------------

    def _new_lease(self) -> Obj:
        return records.new_lease(
            self.lease_name,
            namespace=self.settings.namespace,
            identity=self.identity,
            duration=self.settings.lease_duration_seconds,
            now=micro_time(),
            annotations={k: v for k, v in self._overrides.items() if v is not None},
        )

    def _duration_of(self, lease: Obj | None) -> float:
        return records.duration_of(lease, default=self.settings.lease_duration)

    def _held(self, lease: Obj) -> Obj:
        return records.held(
            lease,
            identity=self.identity,
            duration=self.settings.lease_duration_seconds,
            now=micro_time(),
            annotations=self.annotations() if self._leading else annotations_of(lease),
        )

    # -- release ------------------------------------------------------------------------

    async def _release(self) -> None:
        """Empty the Lease if our last view says we hold it. One retry after a conflict
        if it is still ours. Bounded; failures are logged, not raised."""
        timeout = min(self._call_timeout, RELEASE_TIMEOUT)
        deadline = time.monotonic() + timeout
        lease = self._lease
        for _ in range(2):
            if lease is None or holder_of(lease) != self.identity:
                return
            body = records.released(lease, now=micro_time())
            try:
                self._lease = await self._leases.replace(body, within=deadline - time.monotonic())
                log.info("leader election: %s released the lease", self.identity)
                return
            except Conflict:
                try:
                    lease = await self._leases.get(
                        self.lease_name, within=deadline - time.monotonic()
                    )
                except LeaseError as exc:
                    log.info("leader election: release skipped: %s", exc)
                    return
            except LeaseError as exc:
                log.info("leader election: release failed: %s", exc)
                return

    # -- pacing -------------------------------------------------------------------------

    def _poll_period(self) -> float:
        return self.settings.retry_period * (1.0 + random.uniform(0.0, POLL_JITTER))

    async def _pause(self, until: float) -> None:
        """Sleep until `until`; a leader wakes earlier for pending annotations (no sooner
        than write_interval after its last write), anyone wakes when leadership ends."""
        leading = self._leading
        while self._leading == leading:
            now = time.monotonic()
            if now >= until:
                return
            wake = until
            if leading and self._overrides_version != self._written_version:
                ready = self._last_write + self.settings.write_interval
                if now >= ready:
                    return
                wake = min(wake, ready)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wake - now):
                    await self._kick.wait()

    def _call_ok(self) -> None:
        if self._failures:
            log.info(
                "leader election: %s reaches the API again (after %d failed calls)",
                self.identity,
                self._failures,
            )
        self._failures = 0

    def _call_failed(self, exc: LeaseError) -> None:
        """One line per outage, not one per retry."""
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "leader election: %s: %s", self.identity, exc)


def snapshot(elector: LeaderElector) -> Mapping[str, object]:
    """What /admin and the metrics show about the election."""
    return {
        "identity": elector.identity,
        "is_leader": elector.is_leader,
        "leader": elector.leader,
        "term": elector.term,
        "acquired": elector.acquired,
        "lost": elector.lost,
        "leader_changes": elector.leader_changes,
        "valid_for": round(elector.valid_for(), 3),
    }
