"""The one place where errors become HTTP responses (OpenAI error envelope)."""

from __future__ import annotations

import json
import logging
import math

from aiohttp import web
from aiohttp.typedefs import Handler

from activator.errors import ActivatorError, InternalError

logger = logging.getLogger(__name__)


def error_headers(error: ActivatorError) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
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


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ActivatorError as error:
        return error_response(error)
    except web.HTTPException:
        raise
    except Exception:
        # A bug, not bad input: an envelope instead of aiohttp's bare text 500. The
        # proxy handler catches its own (with an access-log line); this is for the rest.
        logger.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(InternalError("internal error in activator; see its log"))
