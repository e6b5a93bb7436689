"""The whole HTTP surface against a live activator, with requests drawn by hypothesis.

Random methods, paths, headers, Content-Encodings and bodies (valid requests, random JSON,
deep nesting, broken JSON and bytes, sizes around max_body_bytes, compression bombs), sent
to a real activator with two stand-in engines (one warm, one that idles out quickly, so
some requests are held for a start) while other clients send valid requests throughout.

Invariants, per request: an answer within its timeout; every error is an OpenAI envelope;
activator's own errors are never 5xx (the engines never fail here); a non-POST on a
proxied endpoint is a 405 with `Allow: POST`. For the run: every request of the other
clients succeeded, every proxied request was counted once, and nothing is left held or
in flight.

Reproducible: derandomized (the same examples every run); a failure prints its example.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from yarl import URL

from activator.app import EVENT_STREAMS
from activator.edge.proxy import ENDPOINTS
from activator.ui.routes import EVENTS_PATH
from tests.harness import Running, chat, model_config, start_activator, unique, wait_for

MAX_BODY = 2048
KEY = "sk-properties"
AUTH = f"Bearer {KEY}"
ANSWER_TIMEOUT = 30.0  # a request that takes longer has hung
MODELS = ("m", "mm", "c", "nope")  # warm, its alias, the one that idles out, unknown


@dataclass(repr=False)  # a failing example prints its Case, not the whole server
class Surface:
    running: Running
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    background_failures: list[str] = field(default_factory=list)
    background_done: int = 0
    proxied: int = 0  # example requests that reached the proxy handler


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


# ---- strategies -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    # Duplicates weigh: about half are valid requests, so holds and streams happen too.
    kind = draw(st.sampled_from(["chat"] * 5 + ["json", "nested", "broken", "bytes", "sized"]))
    model = draw(st.sampled_from([*MODELS, "m", "c", ""]) | st.text(max_size=8))
    if kind == "chat":
        body: Any = chat(
            model,
            draw(st.text(max_size=30)),
            max_tokens=draw(st.sampled_from([1, 2, 5, -1, None])),
            stream=draw(st.booleans()),
        )
        return json.dumps(body, ensure_ascii=draw(st.booleans())).encode()
    if kind == "json":
        value = draw(json_values)
        if draw(st.booleans()):
            value = {"model": model, "extra": value}
        return json.dumps(value).encode()
    if kind == "nested":
        depth = draw(st.integers(1, 5000))
        nested = draw(st.sampled_from(["[", "{"])) == "["
        inner = "[" * depth + "]" * depth if nested else '{"a":' * depth + "1" + "}" * depth
        return f'{{"model": "{model}", "x": {inner}}}'.encode()
    if kind == "broken":
        whole = json.dumps(chat(model, "cut short")).encode()
        return whole[: draw(st.integers(0, len(whole) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    # Around the size limit, with the model last so a cut never loses the whole thing.
    size = MAX_BODY + draw(st.integers(-40, 40))
    head = json.dumps(chat("m", "pad", max_tokens=1))[:-1].encode() + b', "pad": "'
    return head + b"a" * max(0, size - len(head) - 2) + b'"}'


@st.composite
def encoded(draw: st.DrawFn, body: bytes) -> tuple[bytes, dict[str, str]]:
    how = draw(st.sampled_from(["none"] * 4 + ["gzip", "deflate", "mislabeled", "unknown", "bomb"]))
    if how == "none":
        return body, {}
    if how == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if how == "deflate":
        return zlib.compress(body), {"Content-Encoding": "deflate"}
    if how == "mislabeled":
        return body, {"Content-Encoding": draw(st.sampled_from(["gzip", "deflate"]))}
    if how == "unknown":
        return body, {"Content-Encoding": draw(st.sampled_from(["br", "zstd", "x-unknown"]))}
    return gzip.compress(b'{"model": "m", "pad": "' + b"0" * (MAX_BODY * 64) + b'"}'), {
        "Content-Encoding": "gzip"
    }


header_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=40
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    if draw(st.integers(0, 4)):
        path = draw(st.sampled_from(sorted(ENDPOINTS)))
    else:  # never proxied, whatever follows the prefix
        prefix = draw(st.sampled_from(["/v1/x-", "/x-"]))
        path = prefix + draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", max_size=12))
    method = draw(st.sampled_from(["POST"] * 10 + ["GET", "PUT", "DELETE", "PATCH", "HEAD"]))
    body, headers = draw(encoded(draw(payloads())))
    authorization = draw(st.sampled_from([AUTH] * 8 + [None, "Bearer wrong", "Basic eA=="]))
    if authorization is not None:
        headers["Authorization"] = authorization
    for name in draw(
        st.lists(
            st.sampled_from(
                ["X-Request-Id", "Cookie", "X-Api-Key", "User-Agent", "OpenAI-Beta", "Accept"]
            ),
            unique=True,
            max_size=3,
        )
    ):
        headers[name] = draw(header_text).strip() or "x"
    headers["Content-Type"] = draw(st.sampled_from(["application/json", "text/plain"]))
    return Case(method=method, path=path, headers=headers, body=body)


# ---- the live activator -------------------------------------------------------------------


async def other_clients(surface: Surface) -> None:
    """Valid requests, two at a time, for as long as the test runs; now and then one for
    "c", which has idled out by then, so it is held for a start (a held stream as well)."""
    running = surface.running

    async def one(model: str, stream: bool) -> None:
        body = chat(model, "steady", max_tokens=2, stream=stream)
        headers = {"Authorization": AUTH}
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                async with running.session.post(
                    running.v1 + "/chat/completions", json=body, headers=headers
                ) as resp:
                    data = await resp.read()
                    if resp.status != 200 or (stream and not data.endswith(b"[DONE]\n\n")):
                        surface.background_failures.append(f"{resp.status}: {data[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            surface.background_failures.append(repr(exc))
        surface.background_done += 1

    rounds = 0
    while not surface.stop.is_set():
        rounds += 1
        extra = [one("c", rounds % 2 == 0)] if rounds % 40 == 1 else []
        await asyncio.gather(one("m", False), one("m", True), *extra)


@pytest.fixture
async def surface() -> AsyncIterator[Surface]:
    running = await start_activator(
        {
            "server": {"max_body_bytes": MAX_BODY, "api_keys": [KEY], "body_timeout": "10s"},
            "models": {
                "m": model_config(unique("prop-m"), aliases=["mm"]),
                "c": model_config(unique("prop-c"), idle_timeout="0.2s", stream_keepalive="0.1s"),
            },
        }
    )
    surface = Surface(running=running)
    background = asyncio.create_task(other_clients(surface))
    try:
        yield surface
        # The run's invariants (the examples passed).
        surface.stop.set()
        await background
        assert surface.background_done > 0
        assert not surface.background_failures, surface.background_failures[:5]
        await wait_for(lambda: settled(running), what="nothing held or in flight")
        counted = sum(
            s.value
            for metric in running.metrics.registry.collect()
            if metric.name == "activator_requests"
            for s in metric.samples
            if s.name == "activator_requests_total"
        )
        # Each background round trip is counted once, and so is each proxied example.
        assert counted == surface.proxied + surface.background_done
    finally:
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await running.close()


def settled(running: Running) -> bool:
    gauges = ("activator_held_requests", "activator_in_flight_requests")
    return all(
        s.value == 0
        for metric in running.metrics.registry.collect()
        for s in metric.samples
        if s.name in gauges
    )


# ---- the property -------------------------------------------------------------------------


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
async def test_every_request_gets_an_enveloped_answer_and_others_are_undisturbed(
    surface: Surface, case: Case
) -> None:
    running = surface.running
    async with asyncio.timeout(ANSWER_TIMEOUT):  # a hang fails here, with its example
        async with running.session.request(
            case.method,
            running.url + case.path,
            data=io.BytesIO(case.body),
            headers=case.headers,
            auto_decompress=False,
        ) as resp:
            data = await resp.read()
    status = resp.status
    proxied = case.path in ENDPOINTS
    authorized = case.headers.get("Authorization") == AUTH
    if proxied and case.method != "POST" and authorized:
        assert status == 405, (status, data)
        assert resp.headers["Allow"] == "POST"
    if proxied and case.method == "POST" and authorized:
        surface.proxied += 1
    if case.method == "HEAD":
        assert status < 500, status
        return
    if status >= 400:
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str), data
        if error.get("source") == "activator":
            assert status < 500, data  # the engines never fail in this test
        else:  # the engine's own answer, relayed
            assert proxied and case.method == "POST" and authorized, data
    elif resp.content_type == "text/event-stream":
        assert data.endswith(b"data: [DONE]\n\n") or b'"error"' in data, data
    else:
        assert status == 200 and proxied, (status, data)
        json.loads(data)


# ---- the status page's login form ----------------------------------------------------------

LOGIN_KEY = "adm-properties"
FORM = "application/x-www-form-urlencoded"
CHARSETS = ["", "; charset=utf-8", "; charset=latin-1", "; charset=bogus", "; charset="]


@dataclass(frozen=True)
class Login:
    headers: dict[str, str]
    body: bytes
    chunked: bool  # sent without a Content-Length


@st.composite
def form_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """An urlencoded form: real ones (some with the right key), and raw bytes: bad
    percent escapes, invalid UTF-8, odd separators."""
    key = draw(st.sampled_from([LOGIN_KEY, "wrong", ""]) | st.text(max_size=20))
    if draw(st.booleans()):
        fields = draw(st.lists(st.tuples(st.text(max_size=6), st.text(max_size=20)), max_size=3))
        if draw(st.integers(0, 3)):
            fields.insert(draw(st.integers(0, len(fields))), ("key", key))
        body = urlencode(fields).encode()
    else:
        odd = st.sampled_from([b"key=\xff\xfe", b"key=%zz%", b"&&=", b"key=a;key=b"])
        body = draw(st.binary(max_size=200) | odd)
    return FORM + draw(st.sampled_from(CHARSETS)), body


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """multipart/form-data: with, without or with the wrong boundary; parts with no
    name, odd headers, invalid UTF-8."""
    boundary = draw(st.sampled_from(["b0undary", "x"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        disposition = draw(
            st.sampled_from(
                ['form-data; name="key"', "form-data", 'form-data; name="x"', "attachment", ""]
            )
        )
        value = draw(st.sampled_from([LOGIN_KEY.encode(), b"\xff\xfe"]) | st.binary(max_size=40))
        part = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            part += f"Content-Type: text/plain{draw(st.sampled_from(CHARSETS))}\r\n"
        parts.append(part.encode() + b"\r\n" + value + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    content_type = "multipart/form-data" + draw(
        st.sampled_from([f"; boundary={boundary}", "", "; boundary=", "; boundary=other"])
    )
    return content_type, body


@st.composite
def logins(draw: st.DrawFn) -> Login:
    kind = draw(st.sampled_from(["form"] * 3 + ["multipart"] * 2 + ["other"]))
    if kind == "form":
        content_type, body = draw(form_bodies())
    elif kind == "multipart":
        content_type, body = draw(multipart_bodies())
    else:  # not a form at all, or too big for one (4 KiB)
        content_type = draw(
            st.sampled_from(["application/json", "text/plain", "", "multipart/mixed", "a/b; c"])
        )
        body = draw(st.binary(max_size=300) | st.binary(min_size=4000, max_size=5000))
    headers = {"Content-Type": content_type} if content_type else {}
    return Login(headers=headers, body=body, chunked=draw(st.integers(0, 9)) == 0)


@pytest.fixture
async def login_form() -> AsyncIterator[Running]:
    running = await start_activator(
        {
            "server": {"admin_api_key": LOGIN_KEY, "body_timeout": "10s"},
            "models": {"m": model_config(unique("prop-login"))},
        }
    )
    try:
        yield running
    finally:
        await running.close()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=logins())
async def test_every_login_body_gets_a_well_formed_answer_and_never_a_5xx(
    login_form: Running, case: Login
) -> None:
    running = login_form

    async def chunks() -> AsyncIterator[bytes]:
        yield case.body

    data: Any = chunks() if case.chunked else case.body
    async with asyncio.timeout(ANSWER_TIMEOUT):  # a hang fails here, with its example
        async with running.session.post(
            running.url + "/ui/login", data=data, headers=case.headers, allow_redirects=False
        ) as resp:
            body = await resp.read()
    status = resp.status
    assert status < 500, (status, body)
    if status == 303:  # the right key: a session
        assert resp.headers["Location"] == "../ui"
        assert "activator_admin=" in resp.headers["Set-Cookie"]
    elif status == 401:  # a wrong or missing key: the form again
        assert resp.content_type == "text/html" and b"That is not the admin key" in body
    else:  # anything else is one of activator's own errors, in the envelope
        assert 400 <= status < 500, (status, body)
        error = json.loads(body)["error"]
        assert error["source"] == "activator" and isinstance(error["message"], str), body
        if status == 429:
            assert int(resp.headers["Retry-After"]) >= 1


# ---- the status page's event streams --------------------------------------------------------

ADMIN_KEY = "adm-properties"
# Exactly the stream's route, and near misses that must never become one.
STREAM_PATHS = ["/admin/events"] * 6 + ["/admin/events/", "/admin//events", "/admin/EVENTS"]


@dataclass(frozen=True)
class StreamCase:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    credentials: str  # "admin", "cookie", "client key", "wrong", "none"


@st.composite
def stream_cases(draw: st.DrawFn) -> StreamCase:
    credentials = draw(st.sampled_from(["admin", "cookie"] * 3 + ["client key", "wrong", "none"]))
    headers: dict[str, str] = {}
    for name in draw(
        st.lists(
            st.sampled_from(
                [
                    "Last-Event-ID",
                    "Accept",
                    "Accept-Encoding",
                    "Cache-Control",
                    "X-Activator-UI",
                    "Origin",
                    "Range",
                    "User-Agent",
                ]
            ),
            unique=True,
            max_size=4,
        )
    ):
        headers[name] = draw(header_text).strip() or "x"
    return StreamCase(
        method=draw(st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "OPTIONS"])),
        path=draw(st.sampled_from(STREAM_PATHS)),
        query=draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)),
        headers=headers,
        credentials=credentials,
    )


@dataclass
class StreamSurface:
    running: Running
    cookie: str  # a session cookie from a real login


@pytest.fixture
async def stream_surface() -> AsyncIterator[StreamSurface]:
    running = await start_activator(
        {
            "server": {"api_keys": [KEY], "admin_api_key": ADMIN_KEY},
            "models": {"m": model_config(unique("prop-ui"))},
        }
    )
    try:
        async with running.session.post(
            running.url + "/ui/login", data={"key": ADMIN_KEY}, allow_redirects=False
        ) as resp:
            assert resp.status == 303, resp.status
            cookie = resp.headers["Set-Cookie"].split(";", 1)[0]
        running.session.cookie_jar.clear()  # each example sends its own credentials
        yield StreamSurface(running=running, cookie=cookie)
    finally:
        await running.close()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=stream_cases())
async def test_status_page_streams_answer_every_request_and_stay_bounded(
    stream_surface: StreamSurface, case: StreamCase
) -> None:
    """Any query, headers and credentials on the event stream: never a 5xx, errors in the
    envelope, a stream only with the admin's credentials, the first snapshot within the
    timeout, and every slot free again once the client has gone."""
    running = stream_surface.running
    streams = running.app[EVENT_STREAMS]
    headers = dict(case.headers)
    if case.credentials == "cookie":
        headers["Cookie"] = stream_surface.cookie
    elif case.credentials != "none":
        key = {"admin": ADMIN_KEY, "client key": KEY, "wrong": "sk-wrong"}[case.credentials]
        headers["Authorization"] = f"Bearer {key}"
    url = URL(running.url + case.path).with_query(None).update_query(case.query)
    async with asyncio.timeout(ANSWER_TIMEOUT):  # a hang fails here, with its example
        async with running.session.request(
            case.method, url, headers=headers, allow_redirects=False
        ) as resp:
            status = resp.status
            if status == 200 and resp.content_type == "text/event-stream":
                first = await resp.content.readuntil(b"\n\n")
                assert first == b"retry: 2000\n\n", first
                block = await resp.content.readuntil(b"\n\n")
                while block.startswith(b":"):  # a heartbeat first: read on
                    block = await resp.content.readuntil(b"\n\n")
                name, data = block.split(b"\n", 1)
                assert name == b"event: snapshot", block
                assert "models" in json.loads(data.removeprefix(b"data: "))
                data = b""
            else:
                data = await resp.read()
    event(f"status {status}")  # --hypothesis-show-statistics: what the examples got
    assert status < 500, (status, data)
    admitted = case.credentials in ("admin", "cookie")
    if status == 200 and case.method == "GET" and case.path == EVENTS_PATH:
        assert admitted, status
        assert resp.content_type == "text/event-stream"
    if case.method == "GET" and case.path == EVENTS_PATH and admitted:
        assert status == 200, (status, data)
    if status >= 400 and case.method != "HEAD":
        assert isinstance(json.loads(data)["error"]["message"], str), data
    # The client has gone: its slot is free again (no stream outlives its client).
    await wait_for(lambda: streams.active == 0, what="every stream slot free again")
