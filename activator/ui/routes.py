"""Routes of the status page: the page, its login and logout, its static files, and
the two data routes it reads (under /admin/, so they sit behind the admin key like the
rest of the admin API).

Every URL the page uses is relative (`ui/static/app.js`, `admin/events`), and redirects
are relative too: the page works unchanged behind a proxy that mounts activator under a
path prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources

from aiohttp import web

from activator.core.errors import NotFound
from activator.edge.auth import SESSION_COOKIE, clear_session, set_session
from activator.edge.body import BodyReads, read_form
from activator.observability.metrics import Metrics
from activator.ui.events import EventStreams
from activator.ui.summary import wake_durations
from activator.ui.throttle import LoginThrottle, LoginThrottled

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
EVENTS_PATH = "/admin/events"
WAKE_DURATIONS_PATH = "/admin/wake-durations"
# A login form is one short field; anything bigger is not from our form.
LOGIN_MAX_BYTES = 4096
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Nothing but our own files: no inline script or style, no framing, forms post only here.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
LOGIN_ERROR = '<p class="error" role="alert">That is not the admin key.</p>'


def ui_routes(
    *,
    admin_key: Callable[[], str | None],
    is_admin: Callable[[web.Request], bool],
    log_in: Callable[[str], str | None],
    log_out: Callable[[str], None],
    streams: EventStreams,
    metrics: Metrics,
    body_reads: BodyReads,
) -> list[web.RouteDef]:
    """`admin_key` gives the admin key in force (a reload may change it; None: none is
    set); `is_admin` says whether a request carries it (Bearer or the session cookie),
    always true when there is none; `log_in` gives a new session's id for the right key
    (None for a wrong one) and `log_out` ends a session (activator.edge.credentials).
    `body_reads` bounds the login form's body in time and in bodies per client, as every
    body (activator.edge.body)."""
    files = _load_static()
    throttle = LoginThrottle()
    template = files.pop("index.html")
    pages = {login: template.replace(b"{{login}}", login) for login in (b"on", b"off")}
    login_page = files.pop("login.html")

    def html(body: bytes, *, status: int = 200) -> web.Response:
        return web.Response(
            body=body,
            status=status,
            headers={**SECURITY_HEADERS, "Content-Type": STATIC_TYPES[".html"]},
        )

    async def show_page(request: web.Request) -> web.Response:
        if not is_admin(request):
            return _see_other("ui/login")
        page = pages[b"on" if admin_key() else b"off"]
        response = html(page.replace(b"{{snapshot}}", _inline_json(streams.current())))
        response.headers["Cache-Control"] = "no-store"  # it carries the admin data now
        return response

    async def trailing_slash(request: web.Request) -> web.Response:
        return _see_other("../ui")

    async def show_login(request: web.Request) -> web.Response:
        if admin_key() is None or is_admin(request):
            return _see_other("../ui")
        return html(login_page.replace(b"<!--error-->", b""))

    async def login(request: web.Request) -> web.Response:
        key = admin_key()
        if key is None:
            return _see_other("../ui")
        form = await read_form(request, limit=LOGIN_MAX_BYTES, reads=body_reads)
        given = form.get("key")
        return open_session(request, given if isinstance(given, str) else "")

    def open_session(request: web.Request, given: str) -> web.Response:
        """The login's answer once its form is read: 429 while the client is throttled
        (the key is not even compared), a session for the right key, 401 for a wrong one."""
        wait = throttle.wait(request.remote)
        if wait is not None:
            metrics.ui_logins_throttled.inc()
            raise LoginThrottled(
                "too many wrong admin keys from this address: try again later",
                retry_after=wait,
            )
        session_id = log_in(given)
        if session_id is None:
            # The key given is never logged; where it came from helps spot guessing.
            logger.warning("status page: wrong admin key from %s", request.remote)
            if throttle.failed(request.remote):
                logger.warning(
                    "status page: %d wrong admin keys from %s within %gs: its logins are "
                    "refused for up to %gs",
                    throttle.max_failures,
                    request.remote,
                    throttle.window,
                    throttle.window,
                )
            return html(login_page.replace(b"<!--error-->", LOGIN_ERROR.encode()), status=401)
        throttle.succeeded(request.remote)
        response = _see_other("../ui")
        set_session(response, request, session_id)
        return response

    async def logout(request: web.Request) -> web.Response:
        log_out(request.cookies.get(SESSION_COOKIE, ""))
        response = _see_other("login")
        clear_session(response, request)
        return response

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = files.get(name)
        if body is None:
            raise NotFound(f"no status page file {name!r}")
        suffix = name[name.rfind(".") :]
        return web.Response(
            body=body, headers={**SECURITY_HEADERS, "Content-Type": STATIC_TYPES[suffix]}
        )

    async def durations(request: web.Request) -> web.Response:
        return web.json_response(wake_durations(metrics))

    return [
        web.get(UI_PATH, show_page),
        web.get(UI_PATH + "/", trailing_slash),
        web.get(UI_PATH + "/login", show_login),
        web.post(UI_PATH + "/login", login),
        web.post(UI_PATH + "/logout", logout),
        web.get(UI_PATH + "/static/{name}", static),
        web.get(EVENTS_PATH, streams.handle, allow_head=False),  # a HEAD would never end
        web.get(WAKE_DURATIONS_PATH, durations),
    ]


def _inline_json(data: bytes) -> bytes:
    """JSON made safe inside <script type="application/json">: no `<`, `>` or `&` is left
    to end the element or open a comment (JSON has them only inside strings, where the
    escapes mean the same)."""
    return data.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")


def _see_other(location: str) -> web.Response:
    """303 to a location relative to the request's URL (see the module's docstring)."""
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def _load_static() -> dict[str, bytes]:
    """The page's files, read once from the package (they are package data)."""
    folder = resources.files("activator.ui").joinpath("static")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and entry.name[entry.name.rfind(".") :] in STATIC_TYPES
    }
