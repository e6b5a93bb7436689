"""A follower's admin decisions, forwarded to the leader (docs/kubernetes.md, "Several
replicas (HA)").

Behind activator's Service a client reaches any replica, but only the leader decides: a
stop or a sleep sent to a follower is sent on to the leader, with the same method, path,
body and credentials, and the leader's answer (status, body) is relayed unchanged.

Each replica publishes its own admin address on its replica Lease (POD_IP from the
downward API and the server port); a follower finds the leader's there, by the leader
identity it knows. A forwarded request carries FORWARDED_BY (the follower's identity),
and a replica that gets one and does not decide answers at once and never forwards it
again: a request crosses at most one hop, whatever the replicas believe about who leads
during a leader change.

The credentials travel, they are never logged: the Authorization header as given. A status
page session is this replica's own (activator.edge.sessions: the leader does not know its
id), so a request that only its session cookie authorised here travels with the admin
key as a Bearer token instead: the follower has checked the session, and the leader
checks the key.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from activator.core.errors import ActivatorError
from activator.edge.auth import SESSION_COOKIE, UI_HEADER

log = logging.getLogger(__name__)

FORWARDED_BY = "X-Activator-Forwarded-By"
# On a relayed answer: the replica that decided it.
FORWARDED_TO = "X-Activator-Forwarded-To"
ADMIN_URL_ANNOTATION = "activator.dev/admin-url"
# The leader answers a stop or a sleep at once (202, the drain goes on behind it): this
# only bounds a leader that hangs, or a connection to a pod that is gone.
FORWARD_TIMEOUT = 10.0
# Admin answers are a model's description: far below this.
MAX_ANSWER_BYTES = 1024 * 1024
# The request headers that travel with it (besides FORWARDED_BY); the rest stay here.
_KEPT = ("Authorization", "Content-Type", UI_HEADER)
_RELAYED = ("Content-Type", "Retry-After")
_IDENTITY_CHARS = 64  # of a client-supplied FORWARDED_BY, in a message


class LeaderUnreachable(ActivatorError):
    """A follower could not get the leader's answer to a forwarded admin decision."""

    status = 503
    type = "server_error"
    code = "leader_unreachable"
    retryable = True


class NotDecidingHere(ActivatorError):
    """A forwarded admin decision reached a replica that does not decide: the leader
    changed meanwhile. Never forwarded again; the client retries (through any replica)."""

    status = 503
    type = "server_error"
    code = "not_leader"
    retryable = True


def own_admin_url(env: Mapping[str, str], *, port: int) -> str | None:
    """This replica's admin address for the others: http://$POD_IP:port (downward API
    status.podIP). None without a usable POD_IP: followers then answer 409 naming the
    leader, as before forwarding existed."""
    text = env.get("POD_IP", "").strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}"


def parse_admin_url(text: object) -> str | None:
    """A published admin address, if it is one: http(s)://host:port and nothing more
    (credentials are sent to it, so a value with a path, user info or an odd scheme is
    ignored rather than half-used)."""
    if not isinstance(text, str) or len(text) > 300:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return None
    if parts.username or parts.password or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment:
        return None
    return text.rstrip("/")


def shown(identity: str) -> str:
    """A client-supplied identity, fit for a message (bounded, printable)."""
    cleaned = "".join(c if c.isprintable() else "?" for c in identity[:_IDENTITY_CHARS])
    return cleaned + ("..." if len(identity) > _IDENTITY_CHARS else "")


def forward_headers(
    request: web.Request, *, identity: str, admin_key: str | None = None
) -> dict[str, str]:
    """What goes to the leader: the Bearer token as given, the body's type, and the hop
    mark. A request with no Authorization but a session cookie (which this replica has
    already accepted: only authorised requests are forwarded) carries `admin_key`
    instead, the session being unknown to the leader; with no admin key set, none is
    needed there either."""
    headers = {name: request.headers[name] for name in _KEPT if name in request.headers}
    if (
        "Authorization" not in headers
        and admin_key
        and request.cookies.get(SESSION_COOKIE) is not None
    ):
        headers["Authorization"] = f"Bearer {admin_key}"
    headers[FORWARDED_BY] = identity
    return headers


async def relay(
    session: aiohttp.ClientSession,
    request: web.Request,
    *,
    url: str,
    identity: str,
    leader: str,
    what: str,
    admin_key: str | None = None,
    within: float = FORWARD_TIMEOUT,
) -> web.Response:
    """Send `request` on to the leader at `url`; its answer, relayed. LeaderUnreachable
    (503) when there is none: refused, reset, timed out, or too large. `admin_key`: the
    key in force here, for a request that a session cookie authorised (forward_headers)."""
    body = await request.read()
    target = url + request.path_qs
    log.info("admin: %s %s forwarded to the leader %s at %s", what, request.path, leader, url)
    try:
        async with session.request(
            request.method,
            target,
            data=body,
            headers=forward_headers(request, identity=identity, admin_key=admin_key),
            timeout=aiohttp.ClientTimeout(total=within),
            allow_redirects=False,
        ) as resp:
            data = await _read_bounded(resp)
            status = resp.status
            relayed = {name: resp.headers[name] for name in _RELAYED if name in resp.headers}
    except (aiohttp.ClientError, TimeoutError, _TooLarge) as exc:
        reason = _reason(exc, within=within)
        log.warning("admin: %s could not be forwarded to the leader %s: %s", what, leader, reason)
        raise LeaderUnreachable(
            f"this replica ({identity}) does not decide and could not forward {what} to the "
            f"leader ({leader}) at {url}: {reason}; retry",
            param="name",
            retry_after=1.0,
        ) from None
    relayed[FORWARDED_TO] = leader
    return web.Response(status=status, body=data, headers=relayed)


class _TooLarge(Exception):
    pass


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise _TooLarge(f"its answer exceeds {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: BaseException, *, within: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {within:g}s"
    if isinstance(exc, _TooLarge):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
