"""The one place where errors become HTTP responses (OpenAI error envelope)."""

from __future__ import annotations

import json
import math

from aiohttp import web
from aiohttp.typedefs import Handler

from activator.errors import ActivatorError


def error_headers(error: ActivatorError) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return headers


def error_response(error: ActivatorError) -> web.Response:
    return web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        headers=error_headers(error),
    )


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
