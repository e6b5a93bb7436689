"""The HTTP edge (issue 18): every body activator reads is bounded in time and in bodies
per client, the login form's bad bodies are 400s, and requests aiohttp's parser rejects
are logged once per client at WARNING without their bytes and answered with the envelope.

A real activator on loopback; raw sockets send what no HTTP client library would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from activator.app import BODY_READS
from tests.conftest import ActivatorFactory
from tests.harness import Running, error_of, model_config, unique, wait_for

ADMIN_KEY = "admin-key-for-edge-tests"
SECRET = "sk-never-in-the-log-4f9a"


async def start(activator: ActivatorFactory, **server: Any) -> Running:
    config = {
        "server": {"admin_api_key": ADMIN_KEY, **server},
        "models": {"m": model_config(unique("edge"))},
    }
    return await activator(config)


def port_of(running: Running) -> int:
    assert running.server.port is not None
    return running.server.port


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.x answer with a Content-Length body: status, headers, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange(running: Running, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes on a new connection; the answer, its body parsed as JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(20):
            status, headers, body = await read_answer(reader)
    finally:
        writer.close()
    return status, headers, json.loads(body)


def login_request(content_type: str, body: bytes) -> bytes:
    return (
        f"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def open_connections(running: Running) -> int:
    """Connections the server holds now (aiohttp's own table, not timing)."""
    server = running.server.runner.server if running.server.runner else None
    assert server is not None
    return len(server.connections)


# ---- defect 3: bodies bounded in time and in count, on every route -------------------


async def test_slow_login_bodies_are_cut_with_408_and_past_the_bound_refused(
    activator: ActivatorFactory,
) -> None:
    bound = 4
    running = await start(activator, body_timeout="5s", max_body_reads_per_client=bound)
    idle = open_connections(running)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    head = login_request("application/x-www-form-urlencoded", b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 4000") + b"k"
    try:
        for _ in range(bound):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
            writer.write(head)
            await writer.drain()
            held.append((reader, writer))
        # The bound is reached once all of them are being read.
        await wait_for(lambda: running.app[BODY_READS].reading() == bound, what="bodies being read")
        # Past it: answered at once (well inside body_timeout) with a 429 envelope.
        refused = []
        for _ in range(2 * bound):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
            held.append((reader, writer))
            writer.write(head)
            await writer.drain()
            async with asyncio.timeout(5):
                status, _, body = await read_answer(reader)
            refused.append((status, error_of(json.loads(body))["code"]))
        assert refused == [(429, "too_many_request_bodies")] * (2 * bound)
        # ... and their connections closed: the server holds the slow ones only.
        await wait_for(
            lambda: open_connections(running) <= idle + bound, what="refused ones closed"
        )
        for reader, _ in held[bound:]:
            assert await reader.read() == b""
        # The slow ones are cut after body_timeout, with the envelope.
        for reader, _ in held[:bound]:
            async with asyncio.timeout(20):
                status, _, body = await read_answer(reader)
                assert await reader.read() == b""
            assert status == 408
            assert error_of(json.loads(body))["code"] == "request_timeout"
        await wait_for(lambda: open_connections(running) <= idle, what="connections closed")
    finally:
        for _, writer in held:
            writer.close()


async def test_a_slow_body_no_handler_reads_is_bounded_too(
    activator: ActivatorFactory,
) -> None:
    # An unauthenticated POST to /admin/*: its body counts against the same bound.
    running = await start(activator, body_timeout="1s", max_body_reads_per_client=1)
    request = b"POST /admin/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\nk"
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
    try:
        writer.write(request)
        await writer.drain()
        await wait_for(lambda: running.app[BODY_READS].reading() == 1, what="body read")
        status, _, reply = await exchange(running, login_request("text/plain", b"x"))
        assert (status, error_of(reply)["code"]) == (429, "too_many_request_bodies")
        async with asyncio.timeout(20):
            status, _, _ = await read_answer(reader)
            assert await reader.read() == b""  # the body never came: closed after the 401
        assert status == 401
    finally:
        writer.close()


# ---- defect 4: bad login forms are 400 envelopes ----------------------------------------

BAD_FORMS = {
    "invalid utf-8": ("application/x-www-form-urlencoded", b"key=\xff\xfe"),
    "invalid utf-8, percent-encoded": ("application/x-www-form-urlencoded", b"key=%ff%fe"),
    "unknown charset": ("application/x-www-form-urlencoded; charset=bogus", b"key=a"),
    "not a text charset": ("application/x-www-form-urlencoded; charset=rot13", b"key=a"),
    "multipart without boundary": ("multipart/form-data", b"key=a"),
    "multipart part without name": (
        "multipart/form-data; boundary=zz",
        b"--zz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--zz--\r\n",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FORMS))
async def test_a_bad_login_form_is_a_400_envelope_without_a_traceback(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.INFO)
    running = await start(activator)
    content_type, body = BAD_FORMS[case]
    status, _, reply = await exchange(running, login_request(content_type, body))
    assert status == 400, reply
    error = error_of(reply)
    assert (error["code"], error["source"]) == ("invalid_request", "activator")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", f"key={ADMIN_KEY}".encode()),
        (
            "multipart/form-data; boundary=zz",
            b"--zz\r\nContent-Disposition: form-data; name=key\r\n\r\n"
            + ADMIN_KEY.encode()
            + b"\r\n--zz--\r\n",
        ),
    ],
)
async def test_a_good_login_form_logs_in_either_encoding(
    activator: ActivatorFactory, content_type: str, body: bytes
) -> None:
    running = await start(activator)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(running))
    try:
        writer.write(login_request(content_type, body))
        await writer.drain()
        async with asyncio.timeout(20):
            status, headers, _ = await read_answer(reader)
    finally:
        writer.close()
    assert status == 303 and headers["location"] == "../ui"
    assert "set-cookie" in headers


# ---- defect 5: what aiohttp's parser rejects ----------------------------------------


async def test_a_key_in_a_broken_header_never_reaches_the_log(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    running = await start(activator)
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n"
    status, _, reply = await exchange(running, request.encode())
    assert status == 400
    assert error_of(reply)["code"] == "invalid_request"
    assert SECRET not in json.dumps(reply)
    assert any(
        r.name == "activator.access" and "status=400" in r.getMessage() for r in caplog.records
    )
    logged = caplog.text + "".join(str(r.exc_info) + r.getMessage() for r in caplog.records)
    assert SECRET not in logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_bad_request_lines_are_logged_once_per_client_at_warning(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = await start(activator)
    line = b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(100):
        status, _, reply = await exchange(running, line)
        assert status == 400 and error_of(reply)["code"] == "invalid_request"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "rejected by the HTTP parser" in warnings[0].getMessage()
    assert len(warnings[0].getMessage()) < 300
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in caplog.records if r.name.startswith("aiohttp"))


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n", 404),
        (b"POST * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ],
)
async def test_aiohttps_own_answers_are_envelopes(
    activator: ActivatorFactory, request_bytes: bytes, status: int
) -> None:
    running = await start(activator)
    got, headers, reply = await exchange(running, request_bytes)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert error_of(reply)["source"] == "activator"
