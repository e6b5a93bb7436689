"""One Kubernetes API call: bounded, retried when a retry can help, and failing with a
message a person can act on.

Calls go through kubernetes_asyncio's generated functions (URL building, auth, TLS from
the kubeconfig or the service account) with `_preload_content=False`, and the JSON is
read here as plain dicts: the backend only needs a few fields, and one representation
for lists, gets and watch events keeps it simple.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from activator.core.errors import BackendError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ApiFunction = Callable[..., Awaitable[Any]]

# 409: a conflicting write raced ours (a merge patch without a precondition rarely sees it,
# but it is safe to repeat). 429: the apiserver's priority-and-fairness throttling.
RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries of single API calls: exponential backoff with full jitter, bounded in
    attempts and in total time so a caller's deadline is never outlived by much."""

    attempts: int = 6
    initial: float = 0.2
    max_wait: float = 5.0
    total: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Op:
    """What a call does, for logs and error messages: ("patch", "deployments/scale", ns)."""

    verb: str
    resource: str
    namespace: str
    name: str | None = None

    def __str__(self) -> str:
        target = f"{self.resource}/{self.name}" if self.name else self.resource
        return f"{self.verb} {target} in namespace {self.namespace}"


def is_transient(exc: BaseException) -> bool:
    """A retry may help: server errors, throttling, conflicts, timeouts, resets."""
    if isinstance(exc, ApiException):
        return exc.status in RETRYABLE_STATUS or exc.status == 0
    return isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError)


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        message = _status_message(exc.body) or str(exc.reason or "").strip()
        return f"HTTP {exc.status}: {message}" if message else f"HTTP {exc.status}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _status_message(body: object) -> str | None:
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str) and body:
        try:
            status = json.loads(body)
        except ValueError:
            return body[:200]
        if isinstance(status, dict) and isinstance(status.get("message"), str):
            return str(status["message"])
    return None


class ConflictError(BackendError):
    """409 on a write that carried a resourceVersion precondition: someone else wrote
    first. Read again and decide again; repeating the write would lose their update."""


class LastingApiError(BackendError):
    """An API error that waiting will not fix: RBAC (403), credentials (401), a missing
    object or resource type (404)."""


# The API group of each resource activator reads or writes, as RBAC rules name it ("" is
# the core group, which a Role spells apiGroups: [""] and kubectl calls core).
API_GROUPS = {
    "deployments": "apps",
    "statefulsets": "apps",
    "endpointslices": "discovery.k8s.io",
    "leases": "coordination.k8s.io",
}


def to_backend_error(op: Op, exc: BaseException) -> BackendError:
    """The one place API failures become readable errors. A BackendError (already
    worded, by `call`) is returned as it is: a 403 stays a LastingApiError."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, ApiException) and exc.status == 403:
        group = API_GROUPS.get(op.resource.split("/", 1)[0], "core")
        return LastingApiError(
            f"RBAC: cannot {op.verb} {op.resource} in namespace {op.namespace} "
            f"(grant the verb on {op.resource} in API group {group!r} to activator's "
            f"service account): {describe(exc)}"
        )
    if isinstance(exc, ApiException) and exc.status == 404:
        return LastingApiError(f"Kubernetes: {op}: not found: {describe(exc)}")
    if isinstance(exc, ApiException) and exc.status == 401:
        return LastingApiError(f"Kubernetes: {op}: unauthorized (credentials rejected)")
    if isinstance(exc, ApiException) and exc.status == 409:
        return ConflictError(f"Kubernetes API: {op} failed: {describe(exc)}")
    return BackendError(f"Kubernetes API: {op} failed: {describe(exc)}")


async def read_json(response: aiohttp.ClientResponse) -> Obj:
    """Read a whole (non-watch) response; non-2xx raises ApiException like the client."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=_status_message(body) or response.reason)
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ApiException(status=0, reason="response is not a JSON object")
    return data


async def call(
    op: Op,
    fn: ApiFunction,
    *args: Any,
    per_attempt: float,
    retry: RetryPolicy,
    retry_conflict: bool = True,
    **kwargs: Any,
) -> Obj:
    """Run one API call with per-attempt timeout and bounded retries; BackendError when
    it cannot succeed. Cancel-safe (nothing is left open). `retry_conflict=False`: a
    409 is final (ConflictError), for writes with a resourceVersion precondition."""

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        log.warning(
            "kubernetes: %s failed (attempt %d): %s; retrying",
            op,
            state.attempt_number,
            describe(exc) if exc else "?",
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(retry.attempts) | stop_after_delay(retry.total),
        wait=wait_random_exponential(multiplier=retry.initial, max=retry.max_wait),
        retry=retry_if_exception(
            is_transient
            if retry_conflict
            else lambda e: is_transient(e) and getattr(e, "status", None) != 409
        ),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                async with asyncio.timeout(per_attempt):
                    response = await fn(
                        *args, _preload_content=False, _request_timeout=per_attempt, **kwargs
                    )
                    return await read_json(response)
    except (ApiException, aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as exc:
        raise to_backend_error(op, exc) from exc
    raise AssertionError("unreachable: tenacity either returns or reraises")
