"""The keys in force: the one object the auth middleware and the status page read.

Nothing captures a key at build time: a reload that changes `server.api_keys` or
`server.admin_api_key` calls `update`, and the next request is checked against the new
keys (and every status-page session ends when the admin key changes: they were opened
with the old one). Keys are kept as bytes for `hmac.compare_digest`; every comparison is
made in constant time, against every key, with no early exit. The status page's sessions
(activator.edge.sessions) are owned here, with the admin key they stand for.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from activator.config.settings import ServerSettings
from activator.edge.auth import SESSION_COOKIE, cookie_may_authorize
from activator.edge.sessions import SessionStore


class Credentials:
    """Owned by the app; `update` is called by the reloader (synchronously, between two
    requests' checks, so a check never sees half of an update)."""

    def __init__(
        self, server: ServerSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.sessions = SessionStore(ttl=server.ui_session_ttl, clock=clock)
        self.admin_key: str | None = None
        self.update(server)

    def update(self, server: ServerSettings) -> None:
        key = server.admin_api_key
        if key != self.admin_key:
            # Whoever logged in with the old key (or while there was none) is out.
            self.sessions.clear()
        self.sessions.ttl = server.ui_session_ttl
        self.api_keys = tuple(k.encode() for k in server.api_keys)
        self.admin_key = key
        self.admin_keys = (key.encode(),) if key else ()

    def log_in(self, given: str) -> str | None:
        """A new status-page session's id if `given` is the admin key in force (compared
        in constant time), else None. Read at the time of the check: a reload during the
        login's body read must not let the old key in."""
        if not self.admin_keys:
            return None
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.admin_keys[0]):
            return None
        return self.sessions.issue()

    def log_out(self, session_id: str) -> None:
        self.sessions.revoke(session_id)

    def is_client(self, request: web.Request) -> bool:
        """Whether a /v1/* request may pass (always, when no api_keys are set)."""
        return not self.api_keys or _authorized(request, self.api_keys, sessions=None)

    def is_admin(self, request: web.Request) -> bool:
        """Whether an /admin/* or status-page request carries the admin key, as a Bearer
        token or the page's session cookie (always true when no admin key is set)."""
        return not self.admin_keys or _authorized(request, self.admin_keys, sessions=self.sessions)


def _authorized(
    request: web.Request, keys: Sequence[bytes], *, sessions: SessionStore | None
) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, in constant time each: no early exit to time.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    # The cookie counts for reads, and for changes only from the page (activator.edge.auth).
    # A lookup of the id's hash, not a comparison (activator.edge.sessions says why).
    if sessions is not None and cookie_may_authorize(request):
        matched |= sessions.is_live(request.cookies.get(SESSION_COOKIE, ""))
    return matched
