"""The status page over HTTP (the browser tests are in test_ui_browser.py): its login and
session cookie, what the cookie may do, the event stream's bounds and its end at
shutdown, and the wake-duration summary."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.app import REGISTRY
from activator.edge.responses import errors_middleware
from activator.model.lifecycle import Model
from activator.observability.metrics import WAKE_BUCKETS, Metrics
from activator.ui import SESSION_COOKIE, UI_HEADER, EventStreams
from activator.ui.events import MAX_STREAMS, MAX_STREAMS_PER_CLIENT
from activator.ui.summary import snapshot, wake_durations
from activator.ui.throttle import MAX_FAILURES, WINDOW
from tests.conftest import ActivatorFactory
from tests.fakekube.server import FakeKube
from tests.harness import Running, chat, error_of, model_config, post, unique, wait_for
from tests.serve_process import serving
from tests.ui_support import open_ui_routes

ADMIN_KEY = "adm-s3cret;with=odd chars"

# The stand-in engine, started only once `gate` exists: a wake the test holds in
# "starting" for as long as it needs, then lets finish (no race with a startup delay).
GATE_SCRIPT = """
import pathlib, runpy, sys, time
gate = pathlib.Path(sys.argv[1])
while not gate.exists():
    time.sleep(0.02)
sys.argv = ["fake_engine", *sys.argv[2:]]
runpy.run_module("activator.testing.fake_engine", run_name="__main__", alter_sys=True)
"""


def gated_model(served: str, gate: Path, **keys: Any) -> dict[str, Any]:
    """A model on the stand-in engine that cannot become ready before `gate` exists."""
    config = model_config(served, startup_delay=0.0, **keys)
    python, _, _, *flags = config["process"]["command"]  # python -m fake_engine FLAGS
    config["process"]["command"] = [python, "-c", GATE_SCRIPT, str(gate), *flags]
    return config


class Events:
    """A server-sent event stream read by a real client: one event (or comment) at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self) -> tuple[str, str] | None:
        """(event name, data) of the next block; ("comment", text) for a comment line;
        None at the end of the stream."""
        try:
            block = await self.response.content.readuntil(b"\n\n")
        except aiohttp.ClientPayloadError:
            return None
        if not block:
            return None
        name, data = "message", []
        for line in block.decode().splitlines():
            if line.startswith(":"):
                return "comment", line[1:].strip()
            field, _, value = line.partition(":")
            if field == "event":
                name = value.strip()
            elif field == "data":
                data.append(value.removeprefix(" "))
            elif field == "retry":
                return "retry", value.strip()
        return name, "\n".join(data)

    async def snapshot(self) -> dict[str, Any]:
        """The next snapshot event, skipping comments."""
        while True:
            event = await self.next()
            assert event is not None, "the stream ended before a snapshot"
            if event[0] == "snapshot":
                parsed: dict[str, Any] = json.loads(event[1])
                return parsed


def state_of(snapshot: dict[str, Any], model: str) -> str:
    return str(next(m["state"] for m in snapshot["models"] if m["name"] == model))


async def login(running: Running, key: str, **headers: str) -> aiohttp.ClientResponse:
    async with running.session.post(
        running.url + "/ui/login", data={"key": key}, headers=headers, allow_redirects=False
    ) as resp:
        await resp.read()
        return resp


def session_of(resp: aiohttp.ClientResponse) -> str:
    """The session cookie's value from a login answer's Set-Cookie."""
    return resp.cookies[SESSION_COOKIE].value


# ----- the page, open and behind the admin key --------------------------------------------


async def test_without_an_admin_key_the_page_is_open_and_has_no_login(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("ui-open"))}})
    async with running.session.get(running.url + "/ui") as resp:
        assert resp.status == 200
        page = await resp.text()
        # Our own files only: no inline script, nothing from elsewhere.
        csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert 'data-login="off"' in page
    assert 'src="ui/static/app.js"' in page and "http" not in page.replace("http-equiv", "")
    async with running.session.get(running.url + "/ui/login", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "../ui")
    async with running.session.get(running.url + "/ui/", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "../ui")
    for name, content_type in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        async with running.session.get(running.url + "/ui/static/" + name) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith(content_type)
    for name in ("nope.js", "..%2F..%2Fapp.py", "index.html"):
        async with running.session.get(running.url + "/ui/static/" + name) as resp:
            assert resp.status == 404, name


async def test_login_sets_an_httponly_strict_session_cookie_that_is_not_the_key(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-in"))}}
    )
    async with running.session.get(running.url + "/ui", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "ui/login")
    async with running.session.get(running.url + "/ui/login") as resp:
        assert resp.status == 200
        assert 'type="password"' in await resp.text()

    wrong = await login(running, "not-the-key")
    assert wrong.status == 401
    assert SESSION_COOKIE not in wrong.cookies

    resp = await login(running, ADMIN_KEY)
    assert (resp.status, resp.headers["Location"]) == (303, "../ui")
    set_cookie = resp.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
    assert {"httponly", "path"} <= attributes and "secure" not in attributes  # plain http
    assert "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    token = session_of(resp)
    assert ADMIN_KEY not in set_cookie and len(token) >= 43  # a random id of 256 bits
    assert session_of(await login(running, ADMIN_KEY)) != token  # one per login

    cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
    async with running.session.get(running.url + "/ui", headers=cookie) as page:
        assert page.status == 200
        text = await page.text()
    assert 'data-login="on"' in text and ADMIN_KEY not in text and token not in text
    async with running.session.get(running.url + "/admin/models", headers=cookie) as models:
        assert models.status == 200


async def test_the_cookie_changes_things_only_from_the_page_and_bearer_still_works(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-csrf"))}}
    )
    token = session_of(await login(running, ADMIN_KEY))
    cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
    stop = running.url + "/admin/models/m/stop"

    # A form posted from another page carries the cookie but cannot add a header.
    async with running.session.post(stop, headers=cookie) as resp:
        assert resp.status == 401
    async with running.session.post(stop, headers={**cookie, UI_HEADER: "1"}) as resp:
        assert resp.status == 202
    async with running.session.post(stop, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 202
    for bad in ({"Cookie": f"{SESSION_COOKIE}={ADMIN_KEY}"}, {"Cookie": f"{SESSION_COOKIE}=x"}):
        async with running.session.get(running.url + "/admin/models", headers=bad) as resp:
            assert resp.status == 401
            assert "log in at /ui" in error_of(await resp.json())["message"]
        async with running.session.get(
            running.url + "/ui", headers=bad, allow_redirects=False
        ) as resp:
            assert resp.status == 303


async def test_logout_clears_the_cookie_and_https_makes_it_secure(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-out"))}}
    )
    # TLS ends at an ingress in front of activator: it says so in X-Forwarded-Proto.
    resp = await login(running, ADMIN_KEY, **{"X-Forwarded-Proto": "https"})
    assert "Secure" in resp.headers["Set-Cookie"]
    async with running.session.post(running.url + "/ui/logout", allow_redirects=False) as out:
        assert (out.status, out.headers["Location"]) == (303, "login")
        cleared = out.headers["Set-Cookie"]
    assert f"{SESSION_COOKIE}=" in cleared and "Max-Age=0" in cleared
    assert "HttpOnly" in cleared and "SameSite=Strict" in cleared


async def admin_status(running: Running, token: str) -> int:
    """What /admin/models answers a request that carries only the session cookie."""
    async with running.session.get(
        running.url + "/admin/models", headers={"Cookie": f"{SESSION_COOKIE}={token}"}
    ) as resp:
        return resp.status


async def test_logout_ends_the_session_on_the_server(activator: ActivatorFactory) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-end"))}}
    )
    token = session_of(await login(running, ADMIN_KEY))
    other = session_of(await login(running, ADMIN_KEY))  # another browser's session
    assert await admin_status(running, token) == 200
    cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
    async with running.session.post(
        running.url + "/ui/logout", headers=cookie, allow_redirects=False
    ) as out:
        assert out.status == 303
    # A copy of the cookie kept from before the logout is worth nothing now.
    assert await admin_status(running, token) == 401
    async with running.session.get(running.url + "/ui", headers=cookie, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "ui/login")
    assert await admin_status(running, other) == 200  # only that one session ended


async def test_a_session_ends_at_its_ttl(activator: ActivatorFactory) -> None:
    running = await activator(
        {
            "server": {"admin_api_key": ADMIN_KEY, "ui_session_ttl": "2s"},
            "models": {"m": model_config(unique("ui-ttl"))},
        }
    )
    token = session_of(await login(running, ADMIN_KEY))
    assert await admin_status(running, token) == 200

    async def expired() -> bool:
        return await admin_status(running, token) == 401

    await wait_for(expired, timeout=15.0, what="the session to expire")
    # A new login opens a new session, which works.
    assert await admin_status(running, session_of(await login(running, ADMIN_KEY))) == 200


async def test_wrong_keys_past_the_limit_get_429_and_the_right_key_works_from_elsewhere(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-429"))}}
    )
    for _ in range(MAX_FAILURES):
        assert (await login(running, "a-guess")).status == 401
    assert running.sample("activator_ui_logins_throttled_total") == 0
    # Throttled: even the right key gets no answer from this address (else the throttle
    # would still answer guesses).
    for key in ("another-guess", ADMIN_KEY):
        async with running.session.post(
            running.url + "/ui/login", data={"key": key}, allow_redirects=False
        ) as resp:
            assert resp.status == 429
            assert 1 <= int(resp.headers["Retry-After"]) <= WINDOW
            assert SESSION_COOKIE not in resp.cookies
            error = error_of(await resp.json())
        assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_login_attempts")
    assert running.sample("activator_ui_logins_throttled_total") == 2
    async with running.session.get(running.url + "/metrics") as resp:
        assert "activator_ui_logins_throttled_total 2.0" in await resp.text()
    # Another address (all of 127/8 is loopback) is not throttled by this one's guesses.
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as session:
        async with session.post(
            running.url + "/ui/login", data={"key": ADMIN_KEY}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            token = resp.cookies[SESSION_COOKIE].value
    assert await admin_status(running, token) == 200


async def test_a_login_form_must_be_small(activator: ActivatorFactory) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-big"))}}
    )
    big = {"key": "k" * 10_000}
    async with running.session.post(running.url + "/ui/login", data=big) as resp:
        assert resp.status == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b"key="
        yield b"k" * 10_000

    async with running.session.post(running.url + "/ui/login", data=chunked()) as resp:
        assert resp.status == 413


async def test_the_page_comes_with_its_snapshot_and_markup_in_it_stays_data() -> None:
    data = {"models": [{"name": "</script><script>alert(1)</script><!--&"}], "pools": []}
    streams = EventStreams(lambda: data)
    app = web.Application()
    app.router.add_routes(open_ui_routes(streams))
    async with (
        TestServer(app, host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/ui")) as resp,
    ):
        page = await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"  # the admin data is in it
    opening = '<script id="snapshot" type="application/json">'
    inline = page[page.index(opening) + len(opening) : page.index("</script>", page.index(opening))]
    assert json.loads(inline) == data
    assert "<" not in inline and ">" not in inline and "&" not in inline


# ----- the event stream ---------------------------------------------------------------


async def test_the_stream_pushes_a_snapshot_each_time_a_model_changes(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    running = await activator({"models": {"m": gated_model(unique("ui-sse"), gate)}})
    async with running.session.get(running.url + "/admin/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = Events(resp)
        assert await events.next() == ("retry", "2000")
        first = await events.snapshot()
        assert state_of(first, "m") == "stopped"
        assert first["pools"] == [] and "bounds" in first["wake_durations"]

        answer = asyncio.create_task(post(running, "/v1/chat/completions", chat("m")))
        seen = [first]
        while state_of(seen[-1], "m") != "starting":
            seen.append(await events.snapshot())
        gate.touch()
        while state_of(seen[-1], "m") != "ready":
            seen.append(await events.snapshot())
        status, _, _ = await answer
        assert status == 200
    # Only changes are pushed: no two snapshots in a row are the same.
    assert all(a != b for a, b in itertools.pairwise(seen))
    assert seen[-1]["wake_durations"]["models"]["m"]["ready"]["count"] == 1


async def test_a_quiet_stream_sends_heartbeats() -> None:
    streams = EventStreams(lambda: {"same": True}, heartbeat=0.0, tick=0.01)
    app = web.Application()
    app.router.add_get("/events", streams.handle)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/events")) as resp,
    ):
        events = Events(resp)
        assert await events.next() == ("retry", "2000")
        assert await events.next() == ("snapshot", '{"same":true}')
        assert await events.next() == ("comment", "heartbeat")


def from_address(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any of 127.0.0.0/8 on loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def test_open_streams_are_capped_and_a_closed_one_frees_its_slot(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("ui-cap"))}})
    url = running.url + "/admin/events"
    # MAX_STREAMS pages from as many addresses as the per-client cap asks for.
    addresses = [f"127.0.0.{i + 1}" for i in range(MAX_STREAMS // MAX_STREAMS_PER_CLIENT)]
    sessions = [from_address(address) for address in addresses]
    open_streams = []
    try:
        for session in sessions:
            for _ in range(MAX_STREAMS_PER_CLIENT):
                resp = await session.get(url)
                assert resp.status == 200
                await Events(resp).snapshot()
                open_streams.append(resp)
        async with from_address("127.0.0.99") as other, other.get(url) as resp:
            assert resp.status == 429
            assert error_of(await resp.json())["code"] == "too_many_streams"
            assert int(resp.headers["Retry-After"]) >= 1

        open_streams.pop().close()  # the client goes away: its handler is cancelled

        async def slot_free() -> bool:
            async with sessions[-1].get(url) as resp:
                return resp.status == 200

        await wait_for(slot_free, what="a stream slot freed by a client that left")
    finally:
        for resp in open_streams:
            resp.close()
        for session in sessions:
            await session.close()


async def test_one_address_cannot_take_more_than_its_share_of_the_streams(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("ui-share"))}})
    url = running.url + "/admin/events"
    open_streams = []
    try:
        for _ in range(MAX_STREAMS_PER_CLIENT):
            resp = await running.session.get(url)
            assert resp.status == 200
            await Events(resp).snapshot()
            open_streams.append(resp)
        async with running.session.get(url) as resp:
            assert resp.status == 429
            error = error_of(await resp.json())
            assert error["code"] == "too_many_streams_from_client"
            assert int(resp.headers["Retry-After"]) >= 1
        # Another address still gets its page.
        async with from_address("127.0.0.2") as other, other.get(url) as resp:
            assert resp.status == 200
            await Events(resp).snapshot()
    finally:
        for resp in open_streams:
            resp.close()


async def stalled_reader(port: int, path: str) -> socket.socket:
    """A client that sends its GET and never reads, with a small receive buffer: the
    server's writes back up after a few KiB. A bare socket: an asyncio stream would read
    up to 128 KiB on its own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_stalled_readers_are_dropped_and_a_fresh_page_gets_its_stream() -> None:
    # Each snapshot differs from the last for a while, then stays: about 60 KiB in all
    # per stream. That fills a stalled reader's buffers, yet stays under the 64 KiB after
    # which aiohttp's own write would wait for the client (and without a wait of our
    # own, no write ever timed out: the readers held their slots for good).
    pad = "x" * 2000
    changes = iter(range(30))
    last = {"n": -1}

    def snapshot() -> dict[str, Any]:
        last["n"] = next(changes, last["n"])
        return {"n": last["n"], "pad": pad}

    limit = 4
    streams = EventStreams(snapshot, limit=limit, per_client=limit, tick=0.01, write_timeout=0.5)
    app = web.Application(middlewares=[errors_middleware])  # a 429 while slots are held
    app.router.add_get("/events", streams.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        readers = [await stalled_reader(server.port, "/events") for _ in range(limit)]
        await wait_for(lambda: streams.active == limit, what="every slot taken")
        async with aiohttp.ClientSession() as session:

            async def a_page_gets_its_stream() -> bool:
                resp = await session.get(server.make_url("/events"))
                if resp.status != 200:
                    assert resp.status == 429, resp.status
                    resp.release()
                    return False
                assert await Events(resp).next() == ("retry", "2000")
                resp.close()
                return True

            await wait_for(a_page_gets_its_stream, what="a stream for a fresh page")
        await wait_for(lambda: streams.active == 0, what="the stalled streams dropped")
        for reader in readers:
            reader.close()


async def test_a_client_that_stops_reading_loses_its_stream() -> None:
    counter = iter(range(1_000_000))
    big = "x" * 1_000_000  # every snapshot differs and is large: the socket fills up

    streams = EventStreams(lambda: {"n": next(counter), "pad": big}, tick=0.01, write_timeout=0.2)
    app = web.Application()
    app.router.add_get("/events", streams.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: streams.active == 1, what="the stream to open")
        # Never read: the kernel's buffers fill, a write cannot finish, the stream ends.
        await wait_for(lambda: streams.active == 0, what="the stalled stream to be dropped")
        writer.close()


async def test_streams_end_with_a_closing_event_at_shutdown(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("ui-bye"))}})
    async with running.session.get(running.url + "/admin/events") as resp:
        events = Events(resp)
        await events.snapshot()
        closing = asyncio.create_task(running.server.close())
        rest = []
        while (event := await events.next()) is not None:
            rest.append(event[0])
        await closing
    # Ended by the shutdown hook, before aiohttp would wait for (then cancel) the handler.
    assert rest[-1] == "closing"


async def test_an_open_status_page_does_not_hold_up_a_sigterm_shutdown(tmp_path: Path) -> None:
    served_name = unique("ui-term")
    # A grace far longer than the wait on the exit below: only a stream that ends at
    # shutdown lets the process exit in time.
    config = {"server": {"shutdown_grace": "10m"}, "models": {"m": model_config(served_name)}}
    async with (
        serving(config, workdir=tmp_path, engines=[served_name]) as served,
        aiohttp.ClientSession() as session,
        session.get(served.url + "/admin/events") as resp,
    ):
        events = Events(resp)
        await events.snapshot()
        served.process.send_signal(signal.SIGTERM)
        names = []
        while (event := await events.next()) is not None:
            names.append(event[0])
        assert names[-1] == "closing"
        assert await served.exit_code() == 0, served.output()


# ----- wake durations -------------------------------------------------------------------


def test_wake_durations_put_each_wake_in_its_bucket() -> None:
    metrics = Metrics()
    metrics.add_model("a", backend="process")
    wakes = [(0.03, "ready", "zero"), (0.3, "ready", "sleep"), (0.3, "ready", "zero")]
    wakes += [(2000, "ready", "zero"), (7, "failed", "zero")]
    for took, outcome, source in wakes:  # a model's wakes from zero and from sleep together
        metrics.observe_wake(
            model="a", backend="process", outcome=outcome, source=source, seconds=took
        )

    summary = wake_durations(metrics)

    assert summary["bounds"] == [float(b) for b in WAKE_BUCKETS]
    ready = summary["models"]["a"]["ready"]
    assert ready["count"] == 4 and abs(ready["sum"] - 2000.63) < 1e-6
    assert len(ready["bins"]) == len(WAKE_BUCKETS) + 1
    bins = {i: n for i, n in enumerate(ready["bins"]) if n}
    assert bins == {0: 1, WAKE_BUCKETS.index(0.5): 2, len(WAKE_BUCKETS): 1}
    failed = summary["models"]["a"]["failed"]
    assert failed["count"] == 1 and failed["bins"][WAKE_BUCKETS.index(7.5)] == 1
    assert "timeout" not in summary["models"]["a"]  # no such wake: no series (metrics.py)


async def test_wake_durations_route_counts_a_real_wake(activator: ActivatorFactory) -> None:
    running = await activator(
        {"server": {"admin_api_key": ADMIN_KEY}, "models": {"m": model_config(unique("ui-wd"))}}
    )
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with running.session.get(running.url + "/admin/wake-durations") as resp:
        assert resp.status == 401
    status, _, _ = await post(running, "/v1/chat/completions", chat("m"))
    assert status == 200
    async with running.session.get(running.url + "/admin/wake-durations", headers=admin) as resp:
        assert resp.status == 200
        ready = (await resp.json())["models"]["m"]["ready"]
    assert ready["count"] == 1 and sum(ready["bins"]) == 1
    took = running.sample(
        "activator_wake_duration_seconds_sum", model="m", backend="process", outcome="ready"
    )
    assert took > 0 and abs(ready["sum"] - took) < 1e-5


# ----- the snapshot: what came after the page (scale-out, several replicas) ----------------


async def test_the_snapshot_shows_a_scaled_out_models_replicas_as_admin_models_does(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    from tests.test_scale_out import LONG, open_stream, scaled, start

    running = await start(activator, kube, {"coder": scaled(kube, "coder", most=3, target=1)})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        streams = [open_stream(session, running, "coder", tokens=LONG) for _ in range(2)]
        for stream in streams:
            await stream.started()  # one on each of two pods (1 request a pod)
        async with running.session.get(running.url + "/admin/events") as resp:
            events = Events(resp)
            while True:
                (coder,) = (await events.snapshot())["models"]
                if coder["replicas"]["routable"] == 2 and coder["in_flight"] == 2:
                    break
        admin = await running.admin("coder")
        for stream in streams:
            await stream.cancel()
    assert coder["replicas"] == admin["replicas"]
    assert coder["replicas"]["desired"] == 2 and coder["replicas"]["max"] == 3
    assert sorted(p["in_flight"] for p in coder["replicas"]["pods"]) == [1, 1]
    change = coder["replicas"]["last_change"]
    assert {k: change[k] for k in ("direction", "from", "to", "reason", "demand")} == {
        "direction": "up",
        "from": 1,
        "to": 2,
        "reason": "demand",
        "demand": 2,
    }
    assert "cluster" not in coder  # one activator: no cluster view


class TwoReplicas:
    """What activator.ha.wiring.Replica shows (scripted: the election is not under test)."""

    def describe(self) -> dict[str, Any]:
        return {
            "identity": "r2",
            "namespace": "serving",
            "role": "follower",
            "leader": "r1",
            "deciding": False,
            "election": {"holder": "r1"},
            "replicas": {"reports": [{"identity": "r1", "age_seconds": 0.123}]},
        }

    def describe_model(self, model: Model) -> dict[str, Any]:
        return {"in_flight": 3, "queued": 1, "replicas": ["r1", "r2"], "idle_seconds": 0.5}

    def check_decides(self, what: str) -> None:
        raise AssertionError("the snapshot only reads")


async def test_with_several_replicas_the_snapshot_says_the_role_and_leaves_out_clocks(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("ui-ha"))}})
    registry = running.app[REGISTRY]

    alone = snapshot(registry, running.metrics)
    assert alone["ha"] is None and "cluster" not in alone["models"][0]
    assert "replicas" not in alone["models"][0]  # not scaled out: no replicas entry

    several = snapshot(registry, running.metrics, replicas=TwoReplicas())
    # The header's line; nothing that moves on its own (ages) would push a snapshot a tick.
    assert several["ha"] == {
        "identity": "r2",
        "role": "follower",
        "leader": "r1",
        "deciding": False,
    }
    assert several["models"][0]["cluster"] == {
        "in_flight": 3,
        "queued": 1,
        "replicas": ["r1", "r2"],
    }
    assert several["models"][0]["restart_pending"] is False
    assert several["models"][0]["removing"] is False
