"""The status page's session cookie: it stands for the admin key in a browser.

The cookie holds a session's random id (activator.edge.sessions), not the key nor anything
derived from it: its value is always cookie-safe, a copied cookie gives nothing away for
`Authorization: Bearer` use elsewhere, and it stops working on logout, at its expiry and
when the key changes. It is HttpOnly (page scripts never see it), SameSite=Strict, Path=/
and Secure when the browser reached us over https. It carries no Max-Age: the browser
drops it when it closes; the server ends it at `server.ui_session_ttl` in any case.
"""

from __future__ import annotations

from aiohttp import web

SESSION_COOKIE = "activator_admin"
# Sent by the page's own fetch() calls. A cookie-authenticated request that changes
# something (POST) must carry it: a form on another site cannot set a header, and a
# cross-origin fetch() that does needs a CORS preflight activator never grants. This
# covers what SameSite=Strict does not: sibling subdomains count as the same site.
UI_HEADER = "X-Activator-UI"


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


def set_session(response: web.StreamResponse, request: web.Request, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
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
