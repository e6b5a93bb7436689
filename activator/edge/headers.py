"""Which headers cross activator, each way, and the request id.

To the engine, an allow-list: what an OpenAI-compatible engine uses and nothing else.
Whatever a client sends beyond it stays here: cookies and credentials of any spelling
(`Cookie`, `X-Api-Key`, `Api-Key`, `Proxy-Authorization`, a cloud's tokens...), the
client's `Content-Encoding` and `Content-Length` (the body is decoded, and re-sent with
its own length), hop-by-hop headers. An allow-list stays right when clients invent new
credential headers; a strip-list would not.

Back to the client: the engine's headers, less hop-by-hop ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from multidict import CIMultiDictProxy

REQUEST_ID = "X-Request-Id"

# Client headers passed to the engine, by lower-case name.
FORWARDED = frozenset(
    {
        "accept",
        "user-agent",
        "traceparent",  # W3C trace context
        "tracestate",
    }
)
FORWARDED_PREFIXES = ("openai-", "x-stainless-")  # OpenAI-Organization/-Project/-Beta, SDK info

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

# A value fit to forward: visible ASCII, spaces and tabs. Anything else (a client's
# UTF-8 or control bytes) is dropped rather than re-encoded in some guessed charset.
_FIT = re.compile(r"[\t\x20-\x7e]*")
# A client's request id goes into logs and upstream: visible ASCII, no spaces, bounded.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id(given: str | None) -> str:
    """The client's X-Request-Id if it is fit for logs, else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # 128 random bits as 32 hex digits, as uuid4().hex spells them, at a quarter of its
    # cost (it runs on every request that brings no id).
    return os.urandom(16).hex()


def upstream_headers(
    client: CIMultiDictProxy[str],
    *,
    request_id: str,
    authorization: str | None,
) -> dict[str, str]:
    """Headers for the engine. `authorization`: the Authorization value to send (the
    model's upstream key, or the client's own when activator has no keys of its own), or
    None for none."""
    headers: dict[str, str] = {}
    for name, value in client.items():
        lower = name.lower()
        if (lower in FORWARDED or lower.startswith(FORWARDED_PREFIXES)) and _FIT.fullmatch(value):
            headers[name] = value
    headers["Content-Type"] = "application/json"  # the body was parsed as JSON
    # Engines may compress only what the client accepts; aiohttp would otherwise offer
    # gzip for a client that never asked (answers are relayed as encoded).
    accept_encoding = client.get("Accept-Encoding", "").strip()
    fit = accept_encoding and _FIT.fullmatch(accept_encoding)
    headers["Accept-Encoding"] = accept_encoding if fit else "identity"
    if authorization is not None:
        headers["Authorization"] = authorization
    headers[REQUEST_ID] = request_id
    return headers


def relay_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower() not in HOP_BY_HOP}
