"""A follower's admin decision forwarded to the leader (activator.ha.forward), between
real aiohttp servers on loopback: what travels, what is relayed, and every way the
leader can fail to answer. The whole path through `activator serve` replicas is in
tests/test_ha_serve.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.edge.responses import errors_middleware
from activator.ha.forward import (
    FORWARDED_BY,
    FORWARDED_TO,
    MAX_ANSWER_BYTES,
    LeaderUnreachable,
    own_admin_url,
    parse_admin_url,
    relay,
)

KEY = "sk-admin-secret"


@dataclass
class Leader:
    """A stand-in leader: records what reaches it, answers as told."""

    server: TestServer
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class Pair:
    leader: Leader
    follower: TestServer
    session: aiohttp.ClientSession
    target: dict[str, str]  # where the follower forwards to: {"url": ...}

    def url(self, path: str) -> str:
        return str(self.follower.make_url(path))


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    leader_app = web.Application()
    leader = Leader(TestServer(leader_app, host="127.0.0.1", port=0))

    async def decide(request: web.Request) -> web.StreamResponse:
        leader.seen.append(
            {
                "method": request.method,
                "path_qs": request.path_qs,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        action = request.match_info["action"]
        if action == "hang":
            await leader.release.wait()
        if action == "huge":
            return web.Response(body=b"x" * (MAX_ANSWER_BYTES + 1))
        return web.json_response(
            {"error": {"message": "refused by the leader"}},
            status=409,
            headers={"Retry-After": "3"},
        )

    leader_app.router.add_post("/admin/models/{name}/{action}", decide)
    await leader.server.start_server()

    follower_app = web.Application(middlewares=[errors_middleware])
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as forwarding:
        target = {"url": leader.url}

        async def forward(request: web.Request) -> web.StreamResponse:
            within = 0.2 if request.match_info["action"] == "hang" else 10.0
            return await relay(
                forwarding,
                request,
                url=target["url"],
                identity="r2",
                leader="r1",
                what="a stop",
                admin_key=KEY,
                within=within,
            )

        follower_app.router.add_post("/admin/models/{name}/{action}", forward)
        follower = TestServer(follower_app, host="127.0.0.1", port=0)
        await follower.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                yield Pair(leader, follower, session, target)
        finally:
            leader.release.set()
            await follower.close()
            await leader.server.close()


async def test_credentials_body_and_hop_mark_travel_and_the_leaders_answer_is_relayed(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Cookie": "activator_admin=page-session; tracking=abc",
        "X-Activator-UI": "1",
        "X-Unrelated": "stays here",
        "Content-Type": "application/json",
    }
    async with pair.session.post(
        pair.url("/admin/models/coder/stop?drain=1"), data=b'{"why":"test"}', headers=headers
    ) as resp:
        assert resp.status == 409
        assert await resp.json() == {"error": {"message": "refused by the leader"}}
        assert resp.headers["Retry-After"] == "3"
        assert resp.headers[FORWARDED_TO] == "r1"
    (seen,) = pair.leader.seen
    assert seen["method"] == "POST"
    assert seen["path_qs"] == "/admin/models/coder/stop?drain=1"
    assert seen["body"] == b'{"why":"test"}'
    sent = seen["headers"]
    assert sent["Authorization"] == f"Bearer {KEY}"
    assert "Cookie" not in sent  # a session is the follower's own: it never travels
    assert sent["X-Activator-UI"] == "1"
    assert sent["Content-Type"] == "application/json"
    assert sent[FORWARDED_BY] == "r2"
    assert "X-Unrelated" not in sent
    assert "forwarded to the leader r1" in caplog.text
    assert KEY not in caplog.text and "page-session" not in caplog.text


async def test_a_decision_a_page_session_authorised_travels_with_the_admin_key(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    # Sessions are each replica's own: the leader would not know the follower's cookie.
    caplog.set_level(logging.DEBUG)
    headers = {"Cookie": "activator_admin=page-session", "X-Activator-UI": "1"}
    async with pair.session.post(pair.url("/admin/models/coder/stop"), headers=headers) as resp:
        assert resp.status == 409
    (seen,) = pair.leader.seen
    sent = seen["headers"]
    assert sent["Authorization"] == f"Bearer {KEY}"
    assert "Cookie" not in sent
    assert KEY not in caplog.text and "page-session" not in caplog.text


async def test_a_refused_connection_is_a_503_naming_the_leader_and_the_reason(
    pair: Pair,
) -> None:
    # 127.0.0.2 is loopback too, but the leader's server is bound to 127.0.0.1 only.
    port = pair.leader.server.port
    unreachable = f"http://127.0.0.2:{port}"
    pair.target["url"] = unreachable
    async with pair.session.post(pair.url("/admin/models/coder/stop")) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        error = (await resp.json())["error"]
    assert error["code"] == LeaderUnreachable.code
    assert "r1" in error["message"] and unreachable in error["message"]
    assert "Connect" in error["message"]  # the reason: aiohttp's connection error
    assert pair.leader.seen == []


async def test_a_leader_that_does_not_answer_in_time_is_a_503(pair: Pair) -> None:
    async with pair.session.post(pair.url("/admin/models/coder/hang")) as resp:
        assert resp.status == 503
        error = (await resp.json())["error"]
    assert error["code"] == LeaderUnreachable.code
    assert "no answer within 0.2s" in error["message"]


async def test_an_oversized_answer_is_not_relayed(pair: Pair) -> None:
    async with pair.session.post(pair.url("/admin/models/coder/huge")) as resp:
        assert resp.status == 503
        error = (await resp.json())["error"]
    assert f"exceeds {MAX_ANSWER_BYTES} bytes" in error["message"]


@pytest.mark.parametrize(
    ("pod_ip", "port", "url"),
    [
        ("10.0.3.7", 8080, "http://10.0.3.7:8080"),
        (" 10.0.3.7\n", 9000, "http://10.0.3.7:9000"),
        ("fd00::7", 8080, "http://[fd00::7]:8080"),
        ("", 8080, None),  # no downward API: followers answer 409 naming the leader
        ("my-pod.local", 8080, None),  # not an IP: never a name someone else resolves
        ("10.0.3.7:80", 8080, None),
    ],
)
def test_the_published_admin_address_comes_from_pod_ip(
    pod_ip: str, port: int, url: str | None
) -> None:
    assert own_admin_url({"POD_IP": pod_ip}, port=port) == url
    assert own_admin_url({}, port=port) is None


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("http://10.0.3.7:8080", "http://10.0.3.7:8080"),
        ("http://[fd00::7]:8080/", "http://[fd00::7]:8080"),
        ("https://activator-0.example:8443", "https://activator-0.example:8443"),
        ("http://10.0.3.7", None),  # no port
        ("http://10.0.3.7:8080/admin", None),  # a path: credentials would go elsewhere
        ("http://user:pw@10.0.3.7:8080", None),
        ("http://10.0.3.7:8080?x=1", None),
        ("ftp://10.0.3.7:21", None),
        ("http://10.0.3.7:99999", None),
        ("not a url", None),
        ("", None),
        (None, None),
        (8080, None),
        ("http://" + "a" * 400 + ":80", None),
    ],
)
def test_a_published_admin_address_is_used_only_when_it_is_one(text: object, url: str) -> None:
    assert parse_admin_url(text) == url
