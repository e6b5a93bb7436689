"""The status page's session: a cookie that stands for the admin key in a browser.

The cookie holds a token derived from the admin key, not the key itself: its value is
always cookie-safe (any key works, whatever characters it has), a copied cookie does not
give the key away for `Authorization: Bearer` use elsewhere, and changing the key ends
every session. It is HttpOnly (page scripts never see it), SameSite=Strict, Path=/ and
Secure when the browser reached us over https.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

SESSION_COOKIE = "activator_admin"
# Sent by the page's own fetch() calls. A cookie-authenticated request that changes
# something (POST) must carry it: a form on another site cannot set a header, and a
# cross-origin fetch() that does needs a CORS preflight activator never grants. This
# covers what SameSite=Strict does not: sibling subdomains count as the same site.
UI_HEADER = "X-Activator-UI"
_TOKEN_LABEL = b"activator status page session v1"


def session_token(admin_key: str) -> str:
    """The cookie value that stands for `admin_key` (hex, so always cookie-safe)."""
    return hmac.new(admin_key.encode(), _TOKEN_LABEL, hashlib.sha256).hexdigest()


def cookie_may_authorize(request: web.Request) -> bool:
    """Whether the session cookie may stand for the admin key on this request: reads
    always, changes only from the page itself (UI_HEADER set)."""
    return request.method in ("GET", "HEAD") or request.headers.get(UI_HEADER) == "1"


def is_https(request: web.Request) -> bool:
    """Whether the browser talks https to us: directly, or through a proxy that says so.
    A client that lies about X-Forwarded-Proto only gets a Secure cookie it cannot send
    back over http: it locks itself out, nobody else."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def set_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def clear_session(response: web.StreamResponse, request: web.Request) -> None:
    # set_cookie, not del_cookie: the attributes must match the cookie being replaced,
    # and del_cookie takes them only from aiohttp 3.10 on.
    response.set_cookie(
        SESSION_COOKIE,
        "",
        max_age=0,
        expires="Thu, 01 Jan 1970 00:00:00 GMT",
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )
