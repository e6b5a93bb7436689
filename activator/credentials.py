"""The keys in force: the one object the auth middleware and the status page read.

Nothing captures a key at build time: a reload that changes `server.api_keys` or
`server.admin_api_key` calls `update`, and the next request is checked against the new
keys (and a status-page session of the old admin key no longer counts). Keys are kept as
bytes for `hmac.compare_digest`; every comparison is made in constant time, against every
key, with no early exit.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web

from activator.settings import ServerSettings
from activator.ui.auth import SESSION_COOKIE, cookie_may_authorize, session_token


class Credentials:
    """Owned by the app; `update` is called by the reloader (synchronously, between two
    requests' checks, so a check never sees half of an update)."""

    def __init__(self, server: ServerSettings) -> None:
        self.update(server)

    def update(self, server: ServerSettings) -> None:
        key = server.admin_api_key
        self.api_keys = tuple(k.encode() for k in server.api_keys)
        self.admin_key = key
        self.admin_keys = (key.encode(),) if key else ()
        self.admin_sessions = (session_token(key).encode(),) if key else ()

    def is_client(self, request: web.Request) -> bool:
        """Whether a /v1/* request may pass (always, when no api_keys are set)."""
        return not self.api_keys or _authorized(request, self.api_keys, sessions=())

    def is_admin(self, request: web.Request) -> bool:
        """Whether an /admin/* or status-page request carries the admin key, as a Bearer
        token or the page's session cookie (always true when no admin key is set)."""
        return not self.admin_keys or _authorized(
            request, self.admin_keys, sessions=self.admin_sessions
        )


def _authorized(request: web.Request, keys: Sequence[bytes], *, sessions: Sequence[bytes]) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, in constant time each: no early exit to time.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    # The cookie counts for reads, and for changes only from the page (activator.ui.auth).
    if sessions and cookie_may_authorize(request):
        cookie = request.cookies.get(SESSION_COOKIE, "").encode()
        for session in sessions:
            matched |= hmac.compare_digest(cookie, session)
    return matched
