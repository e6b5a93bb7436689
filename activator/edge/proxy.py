"""The OpenAI-compatible request path: route by model, hold while it wakes, relay.

The handler sees a narrow seam: `ModelRegistry.resolve(name)` and `Model.acquire()`,
which returns a Lease on a ready upstream. It never looks at a model's state and never
imports a backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from activator.config.settings import ServerSettings
from activator.core.errors import (
    ActivatorError,
    InternalError,
    MethodNotAllowed,
    ModelUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from activator.edge.body import BodyReads, read_body
from activator.edge.headers import REQUEST_ID, relay_headers, request_id, upstream_headers
from activator.edge.payload import PayloadParser
from activator.edge.responses import engine_error_body, error_response, sse_error_event
from activator.engine.http_client import HttpClient
from activator.fleet.registry import ModelRegistry
from activator.model.lease import Lease
from activator.model.lifecycle import Model
from activator.observability.metrics import UNKNOWN_MODEL, Metrics
from activator.observability.usage import StreamTail, Usage, find_usage
from activator.placement.routing import sent_nothing

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("activator.access")

# The allow-list: only these paths reach an engine. vLLM leaves /sleep, /wake_up,
# /collective_rpc and the adapter endpoints open; a client must never reach them.
ENDPOINTS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
# Pods of a scaled-out model one request may be sent to, when each refuses the connection
# before any byte goes out (a pod that died since its last probe): then it is an error.
POD_ATTEMPTS = 3


@dataclass
class Exchange:
    """What we learn about one request, for metrics and the access log."""

    request_id: str
    endpoint: str
    started: float
    model: str = UNKNOWN_MODEL
    cold: bool = False
    held: float = 0.0
    pod: str | None = None  # the pod that answered (a scaled-out model)
    ttfb: float | None = None
    status: int = 0
    # The client's response once its status line went out (a stream): from then on an
    # error can only travel inside it.
    sent: web.StreamResponse | None = None


@dataclass
class Attempt:
    """The lease a request is being sent on (another pod's after a refused connection),
    and the model it was acquired from."""

    model: Model
    lease: Lease


class ClientGone(Exception):
    """The client's connection closed under a write to it (not an engine failure)."""


class Proxy:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        http: HttpClient,
        metrics: Metrics,
        max_body_bytes: int,
        body_reads: BodyReads,
        strip_client_auth: bool,
        access_log: str,
    ) -> None:
        self._registry = registry
        self._http = http
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._body_reads = body_reads  # its owner (the app) applies reloads to it
        self._parser = PayloadParser()
        # The client's Authorization is activator's own key when api_keys is set: it is
        # a secret of ours and never goes to an engine.
        self._strip_client_auth = strip_client_auth
        self._access_log = access_log

    def configure(self, server: ServerSettings) -> None:
        """A reload: server settings in force from the next request on."""
        self._max_body = server.max_body_bytes
        self._strip_client_auth = bool(server.api_keys)
        self._access_log = server.access_log

    async def close(self) -> None:
        """At the app's cleanup: stops the body-parsing worker, if one started."""
        await self._parser.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request gets an answer, an access-log line and a metric: whatever fails,
        whether or not the client stays."""
        ex = Exchange(
            request_id=request_id(request.headers.get(REQUEST_ID)),
            endpoint=ENDPOINTS[request.path],
            started=time.monotonic(),
        )
        try:
            response = await self._handle(request, ex)
        except ActivatorError as error:
            response = await self._error(ex, error)
        except asyncio.CancelledError:
            ex.status = 499  # the client went away (nginx's convention)
            self._finish(ex)
            raise
        except (ConnectionResetError, ClientGone):
            # Gone between two writes, before the cancellation: nothing left to answer.
            ex.status = 499
            self._finish(ex)
            return ex.sent or web.Response(status=499)
        except Exception:
            logger.exception("model=%s request_id=%s unexpected error", ex.model, ex.request_id)
            bug = f"internal error in activator (request id {ex.request_id}); see its log"
            response = await self._error(ex, InternalError(bug))
        if not response.prepared:
            response.headers.update(self._headers(ex))
        ex.status = ex.status or response.status
        self._finish(ex)
        return response

    @staticmethod
    async def _error(ex: Exchange, error: ActivatorError) -> web.StreamResponse:
        """An error's answer: its envelope, or an error event if a stream already began
        (its status line went out while the request was held)."""
        ex.status = error.status
        if ex.sent is None:
            return error_response(error)
        with contextlib.suppress(ClientGone):
            await _end(ex.sent, sse_error_event(error))
        return ex.sent

    @staticmethod
    async def method_not_allowed(request: web.Request) -> web.Response:
        """Any method but POST on a proxied endpoint (the engine is never asked)."""
        error = MethodNotAllowed(
            f"{request.path} takes POST, not {request.method}", allow=("POST",)
        )
        return error_response(error)

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        body = await read_body(request, limit=self._max_body, reads=self._body_reads)
        payload = await self._parser.parse(body)
        model = self._registry.resolve(payload.model)
        ex.model = model.name
        body = payload.with_model(body, model.settings.served_model_name)
        keepalive = model.settings.stream_keepalive
        if payload.stream and keepalive:
            return await self._held_stream(request, ex, model, body, keepalive)
        lease = await self._acquire(ex, model)
        return await self._forward(request, ex, model, lease, body)

    async def _acquire(
        self, ex: Exchange, model: Model, *, exclude: frozenset[str] = frozenset()
    ) -> Lease:
        """`model.acquire()`, noting a hold that ends without a lease (the start failed or
        timed out, shutdown, the client left): that request was held for a wake too, and
        its headers, metrics and log line say so and for how long."""
        started = time.monotonic()
        try:
            return await model.acquire(exclude=exclude)
        except (ModelUnavailable, asyncio.CancelledError):
            ex.cold, ex.held = True, time.monotonic() - started
            raise

    async def _held_stream(
        self, request: web.Request, ex: Exchange, model: Model, body: bytes, interval: float
    ) -> web.StreamResponse:
        """Hold a streaming request, sending SSE comments so nothing times out.

        Headers are sent only once the hold lasts longer than one interval: a warm model
        answers with the engine's own status and headers. Never emits `id:` fields (the
        OpenAI SDK would start to track them).
        """
        acquiring = asyncio.ensure_future(self._acquire(ex, model))
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({acquiring}, timeout=interval)
                if done:
                    break
                if ex.sent is None:
                    # The hold is not over: the header carries the hold so far.
                    ex.held = time.monotonic() - started
                    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                    response = web.StreamResponse(
                        status=200, headers={**headers, **self._headers(ex, cold=True)}
                    )
                    await _prepare(request, ex, response)
                waited = time.monotonic() - started
                note = f": waiting for {model.name} to start ({waited:.0f}s)\n\n"
                await _write(ex.sent, note.encode())
        finally:
            if not acquiring.done():
                acquiring.cancel()
                await asyncio.wait({acquiring})
        # A failed hold raises: `handle` answers it, in the stream if one began.
        return await self._forward(request, ex, model, acquiring.result(), body)

    async def _forward(
        self, request: web.Request, ex: Exchange, model: Model, lease: Lease, body: bytes
    ) -> web.StreamResponse:
        ex.cold, ex.held = lease.cold, lease.held_seconds
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=model.settings.upstream_read_timeout
        )
        attempt = Attempt(model=model, lease=lease)
        try:
            upstream = await self._post(request, ex, attempt, body, timeout)
            lease = attempt.lease
            async with upstream:
                lease.on_cut(upstream.close)
                if upstream.content_type == "text/event-stream":
                    return await self._relay_stream(request, ex, model, lease, upstream)
                data = await upstream.read()
                ex.ttfb = time.monotonic() - ex.started
        except aiohttp.ClientPayloadError as exc:
            raise self._upstream_error(model, "disconnect", attempt.lease, exc) from exc
        except TimeoutError as exc:
            # Before ClientConnectionError: aiohttp's read timeouts are both.
            self._metrics.upstream_errors.labels(model=model.name, kind="timeout").inc()
            raise UpstreamTimeout(f"model {model.name!r} did not answer in time") from exc
        except aiohttp.ClientConnectionError as exc:
            raise self._upstream_error(model, "connect", attempt.lease, exc) from exc
        finally:
            attempt.lease.release()
        self._count_tokens(model, upstream, lambda: find_usage(data))
        if ex.sent is not None:  # headers went out while held
            return await _end(ex.sent, _as_sse(upstream.status, data))
        headers = relay_headers(upstream.headers)
        encoded = headers.get("Content-Encoding", "identity").lower() != "identity"
        wrapped = None if encoded else engine_error_body(upstream.status, data)
        if wrapped is not None:
            headers["Content-Type"] = "application/json"
        return web.Response(status=upstream.status, body=wrapped or data, headers=headers)

    async def _post(
        self,
        request: web.Request,
        ex: Exchange,
        attempt: Attempt,
        body: bytes,
        timeouts: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """POST to the attempt's upstream until its status line is in. A scaled-out
        model's pod that refuses the connection (or does not accept it in time: nothing
        was sent) leaves rotation until its probe passes again, and the request goes to
        another pod (waiting for room like any request), up to POD_ATTEMPTS pods. Apart
        from HttpClient.post's one retry of a pooled connection the engine closed."""
        tried: set[str] = set()
        model = attempt.model
        while True:
            lease = attempt.lease
            try:
                upstream = await self._http.post(
                    model.name,
                    lease.url + request.path,
                    data=body,
                    headers=self._upstream_headers(request, ex, model),
                    timeouts=timeouts,
                    request_id=ex.request_id,
                )
            except aiohttp.ClientError as exc:
                if lease.pod is None or not sent_nothing(exc) or len(tried) + 1 >= POD_ATTEMPTS:
                    raise
                tried.add(lease.pod)
                logger.warning(
                    "model=%s request_id=%s pod %s did not take the connection (%r): sending "
                    "to another pod",
                    model.name,
                    ex.request_id,
                    lease.pod,
                    exc,
                )
                lease.connect_failed()
                self._metrics.upstream_retries.labels(model=model.name, reason="another_pod").inc()
                attempt.lease = await self._acquire(ex, model, exclude=frozenset(tried))
                continue
            ex.pod = lease.pod
            return upstream

    async def _relay_stream(
        self,
        request: web.Request,
        ex: Exchange,
        model: Model,
        lease: Lease,
        upstream: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        response = ex.sent
        if response is None:
            headers = {**relay_headers(upstream.headers), **self._headers(ex)}
            response = await _prepare(
                request, ex, web.StreamResponse(status=upstream.status, headers=headers)
            )
        ex.status = upstream.status
        chunks = upstream.content.iter_any()
        # Only the last reads are kept, for the usage at the end (activator.observability.usage).
        tail = StreamTail()
        keep = tail.append
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Headers are gone: the error travels inside the stream, and the stream ends.
                if lease.cut_reason:
                    kind = "cut"
                else:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "disconnect"
                error = self._upstream_error(model, kind, lease, exc)
                ex.status = error.status
                return await _end(response, sse_error_event(error))
            if ex.ttfb is None:
                ex.ttfb = time.monotonic() - ex.started
            keep(chunk)
            await _write(response, chunk)
        self._count_tokens(model, upstream, tail.usage)
        return await _end(response)

    def _count_tokens(
        self, model: Model, upstream: aiohttp.ClientResponse, usage: Callable[[], Usage | None]
    ) -> None:
        """Count the tokens of a successful answer whose body is readable (an engine
        compresses only when asked, and then its usage goes uncounted)."""
        if upstream.status != 200:
            return
        if upstream.headers.get("Content-Encoding", "identity").lower() != "identity":
            return
        found = usage()
        if found is not None:
            self._metrics.count_tokens(model.name, found)

    def _upstream_error(
        self, model: Model, kind: str, lease: Lease, exc: BaseException
    ) -> ActivatorError:
        self._metrics.upstream_errors.labels(model=model.name, kind=kind).inc()
        if lease.cut_error is not None:  # cut on purpose (shutdown): its own error
            return lease.cut_error
        if lease.cut_reason:
            return UpstreamError(lease.cut_reason)
        logger.warning("model=%s upstream %s error: %r", model.name, kind, exc)
        return UpstreamError(f"connection to model {model.name!r} failed ({kind})")

    def _upstream_headers(self, request: web.Request, ex: Exchange, model: Model) -> dict[str, str]:
        key = model.settings.upstream_api_key
        if key:
            authorization: str | None = f"Bearer {key}"
        elif self._strip_client_auth:
            authorization = None
        else:  # activator has no key of its own: the client's is the engine's business
            authorization = request.headers.get("Authorization")
        return upstream_headers(
            request.headers, request_id=ex.request_id, authorization=authorization
        )

    @staticmethod
    def _headers(ex: Exchange, *, cold: bool | None = None) -> dict[str, str]:
        return {
            "X-Activator-Cold-Start": "true" if (ex.cold if cold is None else cold) else "false",
            "X-Activator-Held-Ms": str(round(ex.held * 1000)),
            REQUEST_ID: ex.request_id,
        }

    def _finish(self, ex: Exchange) -> None:
        duration = time.monotonic() - ex.started
        self._metrics.request_finished(
            ex.model,
            endpoint=ex.endpoint,
            code=ex.status,
            cold=ex.cold,
            seconds=duration,
            ttfb=ex.ttfb,
        )
        if self._access_log == "off" or not access_logger.isEnabledFor(logging.INFO):
            return
        record: dict[str, Any] = {
            "model": ex.model,
            "endpoint": ex.endpoint,
            "status": ex.status,
            "cold": ex.cold,
            "held_ms": round(ex.held * 1000, 1),
            "ttfb_ms": None if ex.ttfb is None else round(ex.ttfb * 1000, 1),
            "duration_ms": round(duration * 1000, 1),
            "request_id": ex.request_id,
            "pod": ex.pod,
        }
        write_access_line(record, fmt=self._access_log)


def write_access_line(record: dict[str, Any], *, fmt: str) -> None:
    """One access-log line, text or json (`server.access_log`; the caller skips "off")."""
    if fmt == "json":
        access_logger.info("%s", json.dumps(record))
    else:
        access_logger.info("%s", " ".join(f"{k}={_text(v)}" for k, v in record.items()))


def _text(value: object) -> str:
    """A value of the text access log as its JSON twin spells it (true, not True); a
    missing one as `-`, as web servers' logs do."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _prepare(
    request: web.Request, ex: Exchange, response: web.StreamResponse
) -> web.StreamResponse:
    """Send a stream's status line and headers; from now on errors go inside it."""
    try:
        await response.prepare(request)
    except ConnectionResetError as exc:
        raise ClientGone from exc
    ex.sent = response
    return response


async def _write(response: web.StreamResponse | None, data: bytes) -> None:
    assert response is not None, "written only once prepared"
    try:
        await response.write(data)
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError included
        raise ClientGone from exc


async def _end(response: web.StreamResponse, data: bytes = b"") -> web.StreamResponse:
    if data:
        await _write(response, data)
    try:
        await response.write_eof()
    except ConnectionResetError as exc:
        raise ClientGone from exc
    return response


def _as_sse(status: int, data: bytes) -> bytes:
    """A non-stream upstream answer for a client whose stream already began: a success as
    one event, an error as an error event (wrapped into an envelope if it is not one)."""
    if status < 400:
        return b"data: " + data + b"\n\ndata: [DONE]\n\n"
    return b"data: " + (engine_error_body(status, data) or data) + b"\n\n"
