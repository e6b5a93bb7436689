"""Requests aiohttp's parser rejects (a bad request line, a control byte in a header, a
line over 8 KiB): logged once per client address and interval at WARNING, with nothing of
the request in the line, and answered with the OpenAI envelope plus an access-log line.

aiohttp answers these itself, in `RequestHandler.handle_error`: a plain-text 400 that
quotes the offending line, and an ERROR with a traceback that quotes it too, so a key in
a broken `Authorization` header would land in the log. The only part of that path an
application supplies is the logger it calls (the `logger` handler argument, one per app).
This is that logger: on a parser rejection it logs its own redacted line and raises the
envelope as an HTTPException, which aiohttp sends in place of its own answer (an
HTTPException is a Response in aiohttp 3). Everything else passes through to aiohttp's
logger unchanged. tests/test_http_edge.py pins this against aiohttp's behaviour.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError

from activator.core.errors import BadRequest
from activator.edge.proxy import write_access_line
from activator.edge.responses import error_headers

logger = logging.getLogger(__name__)

# One warning per client address per interval; further rejections from it in the interval
# are counted and the count is given with its next warning.
LOG_INTERVAL_S = 60.0
# Client addresses remembered at once: a flood from many addresses costs a bounded table
# (the oldest is forgotten first, which at worst logs it once more).
MAX_PEERS = 1024
# The part of the parser's description kept: its wording before the first colon, where
# aiohttp puts the offending bytes after it.
DESCRIPTION_CHARS = 80


class ParserRejections(logging.LoggerAdapter[logging.Logger]):
    """Pass as `logger` in the app's handler_args. `access_log`: the access-log format in
    force (text, json, off), set again by a reload."""

    def __init__(self, *, access_log: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.access_log = access_log
        self._clock = clock
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (window start, suppressed)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # Only handle_error logs a parser's exception: it runs inside the request
            # handler task, which turns the raise into the answer.
            peer = str(args[0]) if args else "-"
            self._rejected(peer, exc, quiet=isinstance(exc, BadHttpMethod))
        super().log(level, msg, *args, **kwargs)

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[object, MutableMapping[str, Any]]:
        return msg, kwargs

    def _rejected(self, peer: str, exc: HttpProcessingError, *, quiet: bool) -> None:
        what = described(exc)
        # A first request that is not HTTP at all (TLS to a plain port, a scanner):
        # aiohttp keeps those at DEBUG as noise, and so do we.
        if not quiet and (suppressed := self._due(peer)) is not None:
            more = (
                f" ({suppressed} more from it in the last {LOG_INTERVAL_S:g}s)"
                if suppressed
                else ""
            )
            logger.warning("request from %s rejected by the HTTP parser: %s%s", peer, what, more)
        status = exc.code if 400 <= exc.code < 500 else 400
        if self.access_log != "off":
            write_access_line(
                {"model": None, "endpoint": None, "status": status, "rejected": "http_parser"},
                fmt=self.access_log,
            )
        error = BadRequest(f"the request is not valid HTTP/1.1: {what}")
        headers = {k: v for k, v in error_headers(error).items() if k != "Content-Type"}
        answer = web.HTTPException(
            text=json.dumps(error.body()), content_type="application/json", headers=headers
        )
        answer.set_status(status)
        answer.force_close()
        raise answer

    def _due(self, peer: str) -> int | None:
        """None: logged already in this interval; else the rejections left unlogged since."""
        now = self._clock()
        window = self._peers.get(peer)
        if window is not None and now - window[0] < LOG_INTERVAL_S:
            self._peers[peer] = (window[0], window[1] + 1)
            return None
        self._peers.pop(peer, None)
        while len(self._peers) >= MAX_PEERS:
            del self._peers[next(iter(self._peers))]
        self._peers[peer] = (now, 0)
        return window[1] if window is not None else 0


def described(exc: HttpProcessingError) -> str:
    """The parser's complaint without the request's bytes: aiohttp quotes them after a
    colon (`Invalid header value char:\\n b'Authorization: Bearer ...'`) or gives them as
    the whole message (a request target), so only a first line's wording before a colon
    is kept."""
    first = str(exc.message).split("\n", 1)[0]
    head, colon, _ = first.partition(":")
    kept = "".join(c for c in head if c.isprintable())[:DESCRIPTION_CHARS].strip()
    name = type(exc).__name__
    return f"{name} ({kept})" if colon and kept else name
