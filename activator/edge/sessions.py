"""The status page's sessions: random ids with an expiry, kept server-side.

The cookie carries only a session's id (`secrets.token_urlsafe`, 256 bits: never
guessed). The store keeps, per session, when it was issued, keyed by the SHA-256 of its
id, and answers whether an id is live. A session ends when it expires
(`server.ui_session_ttl` after login), on logout (`revoke`), when the admin key changes
(`clear`, called by activator.edge.credentials) and when the store is full and it is the
oldest.

Why a dict keyed by the id's hash, not a constant-time comparison against every id:
a lookup is O(1) where comparing against every live session would cost each cookie
request O(sessions); and the dict compares digests, not ids, so a lookup's timing says
nothing an attacker can steer about a live id (changing one character of a guess changes
the whole digest). The store never holds a cookie's value either.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

# Only a right admin key makes a session, so this bounds what key holders can pile up:
# a handful of operators log in a few times a day, but a script that logs in through the
# form on every call (instead of sending Authorization: Bearer) would add one per call
# for ui_session_ttl. 256 sessions are a few tens of KiB; past it the oldest session
# (the nearest to its expiry) ends and its browser is sent to the login form again.
MAX_SESSIONS = 256
# 32 bytes of randomness: 43 cookie-safe characters.
ID_BYTES = 32


class SessionStore:
    """Owned by activator.edge.credentials.Credentials. Event loop only (no locks); every
    method is synchronous, so a check never sees half of a change."""

    def __init__(
        self,
        *,
        ttl: float,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl  # a reload may change it: it applies to live sessions at once
        self.max_sessions = max_sessions
        self._clock = clock
        # digest of the id -> when it was issued; in issue order, so the oldest (and the
        # first to expire, as every session has the same ttl) comes first.
        self._issued: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._issued)

    def issue(self) -> str:
        """A new session's id (for the cookie). Evicts the oldest session when full."""
        self._prune()
        while len(self._issued) >= self.max_sessions:
            self._issued.popitem(last=False)
        session_id = secrets.token_urlsafe(ID_BYTES)
        self._issued[_digest(session_id)] = self._clock()
        return session_id

    def is_live(self, session_id: str) -> bool:
        """Whether `session_id` is a session that has not ended."""
        if not session_id:
            return False
        issued = self._issued.get(_digest(session_id))
        if issued is None:
            return False
        if self._clock() - issued >= self.ttl:
            self._prune()
            return False
        return True

    def revoke(self, session_id: str) -> None:
        """End one session (logout); an unknown or empty id is a no-op."""
        if session_id:
            self._issued.pop(_digest(session_id), None)

    def clear(self) -> None:
        """End every session (the admin key changed)."""
        self._issued.clear()

    def _prune(self) -> None:
        """Drop expired sessions: they are at the front (issue order = expiry order)."""
        now = self._clock()
        while self._issued:
            issued = next(iter(self._issued.values()))
            if now - issued < self.ttl:
                break
            self._issued.popitem(last=False)


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).digest()
