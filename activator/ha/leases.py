"""coordination.k8s.io/v1 Lease calls for the HA blocks: one bounded attempt each, typed
outcomes, no retries.

activator.backends.kube.calls.call retries 409 Conflict, which is right for a scale
patch and wrong here: for a Lease a 409 means another replica won a race (an election
takeover, a renewal that raced a takeover). That is an answer, not a failure, and
repeating the write would be a lost-update bug. So every caller here makes one attempt
within the time it has left (a leader: until its renew deadline) and owns its own
cadence (retry_period). Responses are read as plain dicts like the rest of the
Kubernetes backend (calls.read_json).
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from activator.backends.kube.calls import ApiFunction, Obj, describe, read_json
from activator.backends.kube.cluster import KubeCluster
from activator.backends.kube.informer import Informer, WatchPolicy
from activator.config.ha import HaSettings

GROUP = "coordination.k8s.io"
MERGE_PATCH = "application/merge-patch+json"


class LeaseError(Exception):
    """A Lease call failed. `status` is the HTTP status, 0 when no answer came (timeout,
    reset, refused). The message is one line, safe to log without a traceback."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Conflict(LeaseError):
    """409: a stale resourceVersion (someone else wrote first) or, on create, the Lease
    already exists (someone else created it first)."""


class NotFound(LeaseError):
    """404: no such Lease."""


def micro_time(when: datetime | None = None) -> str:
    """A MicroTime as the apiserver demands it: UTC, exactly six fractional digits."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(verb: str, name: str, namespace: str, exc: BaseException) -> LeaseError:
    what = f"{verb} lease {namespace}/{name}"
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        if status == 409:
            return Conflict(f"{what}: {describe(exc)}", status=409)
        if status == 404:
            return NotFound(f"{what}: not found", status=404)
        if status == 403:
            return LeaseError(
                f"RBAC: cannot {verb} leases in namespace {namespace} (grant the verb on "
                f"leases in API group {GROUP!r} to activator's service account): "
                f"{describe(exc)}",
                status=403,
            )
        return LeaseError(f"{what}: {describe(exc)}", status=status)
    if isinstance(exc, TimeoutError):
        return LeaseError(f"{what}: no answer in time")
    return LeaseError(f"{what}: {describe(exc)}")


class LeaseClient:
    """Lease calls in one namespace. Every call is bounded by `within` (seconds, the
    caller's time left) and raises LeaseError (Conflict, NotFound) on any failure.
    Cancel-safe: nothing stays open."""

    def __init__(self, api_client: client.ApiClient, *, namespace: str) -> None:
        self.namespace = namespace
        self.api = client.CoordinationV1Api(api_client)

    async def _call(
        self, verb: str, name: str, fn: ApiFunction, *args: Any, within: float, **kwargs: Any
    ) -> Obj:
        if within <= 0:
            raise LeaseError(f"{verb} lease {self.namespace}/{name}: no time left")
        try:
            async with asyncio.timeout(within):
                response = await fn(
                    *args, _preload_content=False, _request_timeout=within, **kwargs
                )
                return await read_json(response)
        except (ApiException, aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as e:
            raise _error(verb, name, self.namespace, e) from None

    async def get(self, name: str, *, within: float) -> Obj:
        return await self._call(
            "get", name, self.api.read_namespaced_lease, name, self.namespace, within=within
        )

    async def create(self, lease: Obj, *, within: float) -> Obj:
        name = lease["metadata"]["name"]
        return await self._call(
            "create",
            name,
            self.api.create_namespaced_lease,
            self.namespace,
            lease,
            within=within,
        )

    async def replace(self, lease: Obj, *, within: float) -> Obj:
        """PUT with the metadata.resourceVersion the body carries: Conflict when it is
        stale (the optimistic lock every write of the leader Lease relies on)."""
        name = lease["metadata"]["name"]
        return await self._call(
            "update",
            name,
            self.api.replace_namespaced_lease,
            name,
            self.namespace,
            lease,
            within=within,
        )

    async def patch(self, name: str, patch: Obj, *, within: float) -> Obj:
        """A JSON merge patch (no precondition unless the patch carries a
        resourceVersion)."""
        return await self._call(
            "patch",
            name,
            self.api.patch_namespaced_lease,
            name,
            self.namespace,
            patch,
            within=within,
            _content_type=MERGE_PATCH,
        )

    async def delete(
        self, name: str, *, within: float, resource_version: str | None = None
    ) -> None:
        body: Obj = {}
        if resource_version is not None:
            body = {"preconditions": {"resourceVersion": resource_version}}
        await self._call(
            "delete",
            name,
            self.api.delete_namespaced_lease,
            name,
            self.namespace,
            body=body,
            within=within,
        )

    def list_function(
        self, *, label_selector: str | None = None, field_selector: str | None = None
    ) -> ApiFunction:
        """list_namespaced_lease narrowed by selectors, for an Informer (list + watch)."""
        kwargs: dict[str, Any] = {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        return functools.partial(self.api.list_namespaced_lease, **kwargs)


def spec_of(lease: Obj | None) -> Obj:
    spec = (lease or {}).get("spec")
    return spec if isinstance(spec, dict) else {}


def annotations_of(lease: Obj | None) -> dict[str, str]:
    meta = (lease or {}).get("metadata")
    found = meta.get("annotations") if isinstance(meta, dict) else None
    if not isinstance(found, dict):
        return {}
    return {str(k): v for k, v in found.items() if isinstance(v, str)}


def holder_of(lease: Obj | None) -> str | None:
    """holderIdentity; None when the Lease is free (absent, empty: released)."""
    holder = spec_of(lease).get("holderIdentity")
    return holder if isinstance(holder, str) and holder else None


def lease_informer(
    cluster: KubeCluster,
    leases: LeaseClient,
    *,
    settings: HaSettings,
    label_selector: str | None = None,
    field_selector: str | None = None,
) -> Informer:
    """A list+watch of the Leases the selectors pick, owned by the caller (start() it,
    aclose() it).

    The watch is how a leader hears its followers and a follower its leader, so it is
    kept shorter-lived than the backend's: reconnect backoff capped at retry_period (back
    within one period after an outage), and each watch request ends after
    2 x lease_duration (at least 30 s), so one stuck on a half-dead connection is
    replaced within a minute or so instead of watch_timeout + 30 s. Watched Leases
    change every retry_period, so a healthy watch is never silent that long anyway."""
    kube, tuning = cluster.settings, cluster.tuning
    return Informer(
        resource="leases",
        namespace=leases.namespace,
        list_fn=leases.list_function(label_selector=label_selector, field_selector=field_selector),
        policy=WatchPolicy(
            timeout=min(kube.watch_timeout, max(30.0, 2 * settings.lease_duration)),
            request_timeout=kube.request_timeout,
            backoff_initial=min(tuning.watch_backoff_initial, settings.retry_period),
            backoff_max=min(tuning.watch_backoff_max, max(settings.retry_period, 0.5)),
            unreachable_after=tuning.unreachable_after,
        ),
        retry=tuning.retry,
    )
