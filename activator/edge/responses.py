"""The one place where errors become HTTP responses (OpenAI error envelope).

activator's own errors carry `"source": "activator"`; an engine's error that is not an
envelope is wrapped into one with `"source": "engine"` (`engine_error_body`).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from activator.core.errors import (
    ActivatorError,
    BadRequest,
    BodyTooLarge,
    InternalError,
    MethodNotAllowed,
    NotFound,
)

logger = logging.getLogger(__name__)

# An engine's error text kept in a wrapped envelope: enough for a traceback's last lines
# or an HTML error page's gist, never a whole page.
ENGINE_MESSAGE_CHARS = 4096


def error_headers(error: ActivatorError) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **error.headers()}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return headers


def error_response(error: ActivatorError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        headers=error_headers(error),
    )
    if error.closes_connection:
        response.force_close()
    return response


def sse_error_event(error: ActivatorError) -> bytes:
    """An error inside an already-started event stream (HTTP 200 was sent)."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def engine_error_body(status: int, data: bytes) -> bytes | None:
    """An engine's error answer as an OpenAI envelope, or None to relay it unchanged.

    Unchanged: a success, or an error that already is an envelope (`{"error": {"message":
    ...}}`, as vLLM's own errors are). Wrapped, keeping the status: anything else, such as
    FastAPI's `{"detail": "Not Found"}` for a route the engine lacks, vLLM's flat
    `{"error": "Unauthorized"}` or a plain-text page; SDKs would show only `Error code: 404`.
    """
    if status < 400:
        return None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    if _is_envelope(body):
        return None
    text = data.decode("utf-8", "replace")
    if len(text) > ENGINE_MESSAGE_CHARS:
        text = text[:ENGINE_MESSAGE_CHARS] + " [truncated]"
    error = {
        "message": text or f"the engine answered HTTP {status} with an empty body",
        "type": _engine_error_type(status),
        "param": None,
        "code": status,  # as vLLM's own envelopes have it
        "source": "engine",
    }
    return json.dumps({"error": error}).encode()


def _is_envelope(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("message"), str)
    )


def _engine_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _as_error(exc: web.HTTPException) -> ActivatorError | None:
    """aiohttp's error as ours, or None to let it through (a redirect, a success)."""
    text = exc.text or exc.reason
    if exc.status == 404:
        return NotFound(f"no route for this request: {text}")
    if exc.status == 405:
        allow = tuple(m for m in exc.headers.get("Allow", "").split(",") if m.strip())
        return MethodNotAllowed(text, allow=tuple(m.strip() for m in allow))
    if exc.status == 413:
        return BodyTooLarge(text)
    if 400 <= exc.status < 500:
        return BadRequest(text)
    return None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ActivatorError as error:
        return error_response(error)
    except web.HTTPException as exc:
        # aiohttp's own answers (the router's 404 for a request target no route can
        # match, such as CONNECT's host:port; its 405) in the envelope like ours.
        if (converted := _as_error(exc)) is None:
            raise
        return error_response(converted)
    except Exception:
        # A bug, not bad input: an envelope instead of aiohttp's bare text 500. The
        # proxy handler catches its own (with an access-log line); this is for the rest.
        logger.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(InternalError("internal error in activator; see its log"))
