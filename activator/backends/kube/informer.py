"""List+watch of one resource in one namespace, shared by every backend that needs it.

The loop is the one client-go's reflector runs: list (the cache is replaced and the
differences handed to subscribers as ADDED/MODIFIED/DELETED), then watch from the list's
resourceVersion with bookmarks; when a watch ends (server timeout, dropped connection)
resume from the last resourceVersion seen; on 410 Gone relist. Failures back off with
jitter; after a few consecutive ones subscribers are told the API is unreachable, and
told again when a list or watch answers.

One task per informer, owned by the KubeCluster, started on first use and cancelled and
awaited in aclose().
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from activator.backends.kube.calls import (
    ApiFunction,
    LastingApiError,
    Obj,
    Op,
    RetryPolicy,
    call,
    describe,
    to_backend_error,
)
from activator.core.errors import BackendError

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    def informer_event(self, resource: str, event_type: str, obj: Obj) -> None:
        """ADDED / MODIFIED / DELETED for one object. Must not block or raise."""

    def informer_reachable(self, resource: str, reachable: bool) -> None:
        """The API answered again (True) or failed several times in a row (False)."""


@dataclass(frozen=True, kw_only=True)
class WatchPolicy:
    timeout: float = 300.0  # server-side timeoutSeconds of one watch request
    request_timeout: float = 30.0  # connect and list bound
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    # Consecutive failures before subscribers hear "unreachable". A single dropped watch
    # is routine; three failures in a row (with backoff) is an outage.
    unreachable_after: int = 3


class Informer:
    def __init__(
        self,
        *,
        resource: str,
        namespace: str,
        list_fn: ApiFunction,
        policy: WatchPolicy,
        retry: RetryPolicy,
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self._list_fn = list_fn
        self._policy = policy
        self._retry = retry
        self.objects: dict[str, Obj] = {}
        self.synced = asyncio.Event()  # set after the first successful list
        self.reachable = True
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task[None] | None = None
        self.relists = 0
        # The latest failure as a readable error (None after a success), and a pulse set
        # after every list attempt so a first user can wait for "synced or failed".
        self.last_error: BackendError | None = None
        self._attempted = asyncio.Event()

    def attempted(self) -> asyncio.Event:
        return self._attempted

    async def wait_synced(self) -> None:
        """Until the first list has been read. A lasting API error (RBAC, a resource the
        API does not serve) raises at once; anything else is retried: the caller bounds
        the wait."""
        while not self.synced.is_set():
            attempted = self.attempted()
            if isinstance(self.last_error, LastingApiError):
                raise self.last_error
            await attempted.wait()

    def _pulse(self) -> None:
        self._attempted.set()
        self._attempted = asyncio.Event()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"kube-informer-{self.resource}-{self.namespace}"
            )
            self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "kubernetes: informer %s/%s died",
                self.namespace,
                self.resource,
                exc_info=task.exception(),
            )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        rv: str | None = None
        failures = 0
        while True:
            try:
                if rv is None:
                    rv = await self._relist()
                rv = await self._watch(rv)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    log.info("kubernetes: %s watch expired (410 Gone); relisting", self.resource)
                    rv = None
                    continue
                failures += 1
                self._failed(failures, exc)
            except Exception as exc:  # any failure of one round: back off, then try again
                failures += 1
                self._failed(failures, exc)
            else:
                continue
            delay = min(
                self._policy.backoff_max, self._policy.backoff_initial * 2 ** min(failures - 1, 10)
            )
            await asyncio.sleep(random.uniform(delay / 2, delay))

    def _failed(self, failures: int, exc: BaseException) -> None:
        level = logging.WARNING if failures >= self._policy.unreachable_after else logging.INFO
        log.log(
            level,
            "kubernetes: %s in %s: list/watch failed (%d in a row): %s",
            self.resource,
            self.namespace,
            failures,
            describe(exc),
        )
        if failures >= self._policy.unreachable_after and self.reachable:
            self._set_reachable(False)
        self.last_error = to_backend_error(
            Op(
                verb="watch" if self.synced.is_set() else "list",
                resource=self.resource,
                namespace=self.namespace,
            ),
            exc,
        )
        self._pulse()

    def _set_reachable(self, reachable: bool) -> None:
        if self.reachable == reachable:
            return
        self.reachable = reachable
        for subscriber in list(self._subscribers):
            subscriber.informer_reachable(self.resource, reachable)

    async def _relist(self) -> str:
        op = Op(verb="list", resource=self.resource, namespace=self.namespace)
        # One attempt here: the loop above owns the backoff for list and watch alike.
        listing = await call(
            op,
            self._list_fn,
            self.namespace,
            per_attempt=self._policy.request_timeout,
            retry=RetryPolicy(attempts=1, total=self._policy.request_timeout),
        )
        self.relists += 1
        fresh = {item["metadata"]["name"]: item for item in listing.get("items") or []}
        old, self.objects = self.objects, fresh
        for name, obj in old.items():
            if name not in fresh:
                self._dispatch("DELETED", obj)
        for name, obj in fresh.items():
            if name not in old:
                self._dispatch("ADDED", obj)
            elif old[name]["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._dispatch("MODIFIED", obj)
        self.synced.set()
        self.last_error = None
        self._pulse()
        self._set_reachable(True)
        return str(listing["metadata"]["resourceVersion"])

    async def _watch(self, rv: str) -> str:
        """Stream events from `rv` until the server ends the watch; return the last rv."""
        response: aiohttp.ClientResponse = await self._list_fn(
            self.namespace,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=int(self._policy.timeout),
            _preload_content=False,
            # Connect bounded; a silent stream is cut a little after the server's own
            # timeout (bookmarks keep a healthy one talking).
            _request_timeout=(self._policy.request_timeout, self._policy.timeout + 30.0),
        )
        try:
            if response.status != 200:
                body = await response.read()
                raise ApiException(status=response.status, reason=body.decode(errors="replace"))
            self._set_reachable(True)
            async for raw in response.content:
                line = raw.strip()
                if line:
                    rv = self._handle(json.loads(line), rv)
        finally:
            response.release()
        return rv

    def _handle(self, event: dict[str, Any], rv: str) -> str:
        event_type = event.get("type")
        obj = event.get("object") or {}
        if event_type == "ERROR":
            raise ApiException(
                status=int(obj.get("code") or 500),
                reason=str(obj.get("message") or obj.get("reason")),
            )
        new_rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
        if event_type == "BOOKMARK":
            return new_rv
        name = obj["metadata"]["name"]
        if event_type == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
        self._dispatch(str(event_type), obj)
        return new_rv

    def _dispatch(self, event_type: str, obj: Obj) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber.informer_event(self.resource, event_type, obj)
            except Exception:  # one broken subscriber must not stop the shared watch
                log.exception("kubernetes: subscriber failed on %s %s", event_type, self.resource)
