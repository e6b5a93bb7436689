"""The fake API server's object store: etcd-like revisions, a bounded event history and
watchers fed in commit order.

Everything here is synchronous and runs on the event loop thread, so a write, its history
entry and its fan-out to watchers happen atomically with respect to other coroutines: a
watcher registered before a snapshot can never miss or double a write.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (resource, namespace, name)

# Sentinels a watch stream reacts to besides events.
BOOKMARK = "BOOKMARK"
CLOSE = "CLOSE"
ABORT = "ABORT"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Gone(Exception):
    """The requested resourceVersion is older than the history still held (HTTP 410)."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")


@dataclass(frozen=True)
class Change:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    # time.monotonic() of the commit: lets tests measure (failover, endpoint lag).
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Watcher:
    """One open watch stream. `queue` holds Changes or the sentinels above.

    The queue is bounded like a real apiserver's watch cache buffer: a watcher that falls
    that far behind is closed and must resume (or relist), never silently skipped.
    """

    resource: str
    namespace: str
    match: Callable[[Obj], bool]
    queue: asyncio.Queue[Change | str] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))
    overflowed: bool = False

    def offer(self, item: Change | str) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("fake kube: watch on %s overflowed; closing it", self.resource)


class Store:
    def __init__(self, *, history_limit: int = 10_000) -> None:
        self._objects: dict[Key, Obj] = {}
        self._history: deque[Change] = deque(maxlen=history_limit)
        self._rv = itertools.count(1)
        self.revision = 0
        # Watches asking for a revision below this get 410 Gone.
        self.oldest = 0
        self._watchers: set[Watcher] = set()
        self._observers: list[Callable[[Change], None]] = []
        self._unobserved: deque[Change] = deque()
        self._observing = False
        self._pulse = asyncio.Event()

    def observe(self, observer: Callable[[Change], None]) -> None:
        """Call `observer` with every committed change, in commit order: the in-process
        controllers' informer. It runs synchronously after the write and may write
        itself (a controller reacting at once): such writes commit immediately and
        reach every observer after the change being observed. It must not raise."""
        self._observers.append(observer)

    def next_change(self) -> asyncio.Event:
        """An event set by the next write: lets tests wait for a condition, not poll."""
        return self._pulse

    # -- reads ------------------------------------------------------------------------

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        obj = self._objects.get((resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self, resource: str, namespace: str, match: Callable[[Obj], bool] = lambda _: True
    ) -> list[Obj]:
        return [
            copy.deepcopy(obj)
            for (res, ns, _), obj in sorted(self._objects.items())
            if res == resource and ns == namespace and match(obj)
        ]

    def names(self, resource: str, namespace: str) -> Iterator[str]:
        return (n for (r, ns, n) in list(self._objects) if r == resource and ns == namespace)

    # -- writes -----------------------------------------------------------------------

    def _commit(self, change_type: str, resource: str, obj: Obj) -> Obj:
        rv = next(self._rv)
        self.revision = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        if len(self._history) == self._history.maxlen:
            self.oldest = self._history[0].rv
        change = Change(rv=rv, resource=resource, type=change_type, obj=copy.deepcopy(obj))
        self._history.append(change)
        self._pulse.set()
        self._pulse = asyncio.Event()
        ns = obj["metadata"].get("namespace", "")
        for watcher in list(self._watchers):
            if watcher.resource == resource and watcher.namespace == ns and watcher.match(obj):
                watcher.offer(change)
        self._unobserved.append(change)
        if not self._observing:
            self._observing = True
            try:
                while self._unobserved:
                    observed = self._unobserved.popleft()
                    for observer in self._observers:
                        observer(observed)
            finally:
                self._observing = False
        return copy.deepcopy(obj)

    def create(self, resource: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        key = (resource, meta.get("namespace", ""), meta["name"])  # "": cluster-scoped
        if key in self._objects:
            raise KeyError(f"{resource} {key[1]}/{key[2]} exists")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_iso())
        stored = copy.deepcopy(obj)
        self._objects[key] = stored
        return self._commit("ADDED", resource, stored)

    def update(
        self, resource: str, namespace: str, name: str, mutate: Callable[[Obj], None]
    ) -> Obj:
        """Apply `mutate` to the stored object and commit it as one revision."""
        stored = self._objects[(resource, namespace, name)]
        mutate(stored)
        return self._commit("MODIFIED", resource, stored)

    def delete(self, resource: str, namespace: str, name: str) -> Obj | None:
        stored = self._objects.pop((resource, namespace, name), None)
        if stored is None:
            return None
        return self._commit("DELETED", resource, stored)

    # -- watches ----------------------------------------------------------------------

    def watch(
        self,
        resource: str,
        namespace: str,
        *,
        since: int | None,
        match: Callable[[Obj], bool],
    ) -> Watcher:
        """Open a watcher. since=None: synthetic ADDED for every current object first
        (the apiserver's "state, then changes" for an empty resourceVersion); else replay
        the changes after `since`, or raise Gone if they are no longer held."""
        if since is not None and since < self.oldest:
            raise Gone(since, self.oldest)
        watcher = Watcher(resource=resource, namespace=namespace, match=match)
        if since is None:
            for obj in self.list(resource, namespace, match):
                watcher.offer(
                    Change(
                        rv=int(obj["metadata"]["resourceVersion"]),
                        resource=resource,
                        type="ADDED",
                        obj=obj,
                    )
                )
        else:
            for change in self._history:
                if (
                    change.rv > since
                    and change.resource == resource
                    and change.obj["metadata"].get("namespace", "") == namespace
                    and match(change.obj)
                ):
                    watcher.offer(change)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def broadcast(self, item: str) -> int:
        """Send a sentinel (BOOKMARK, CLOSE, ABORT) to every open watcher."""
        for watcher in list(self._watchers):
            watcher.offer(item)
        return len(self._watchers)

    def compact(self) -> None:
        """Forget all history, like etcd compaction: older resourceVersions get 410."""
        self._history.clear()
        self.oldest = self.revision
