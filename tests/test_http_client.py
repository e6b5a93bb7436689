from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from activator.app import HTTP
from activator.engine.http_client import HttpClient
from activator.placement.routing import sent_nothing
from tests.conftest import ActivatorFactory
from tests.harness import model_config, unique, wait_for


async def test_stopping_a_model_drops_its_pooled_engine_connections(
    activator: ActivatorFactory,
) -> None:
    # Behind a Kubernetes Service a deleted pod never closes its keep-alive connections;
    # reusing one would hang until the read timeout. So they go when the engine does.
    served = unique("pooled")
    running = await activator(
        {"models": {"m": model_config(served), "other": model_config(unique("other"))}}
    )
    http = running.app[HTTP]
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as sdk:
        await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        await sdk.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "b"}]
        )
        before, other = http.session("m"), http.session("other")
        async with running.session.post(running.url + "/admin/models/m/stop") as resp:
            assert resp.status == 202
        await wait_for(lambda: running.model("m").state == "stopped", what="m stopped")
        assert before.closed
        assert not other.closed  # another model's pool is left alone
        reply = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "again"}]
        )
    assert reply.choices[0].message.content
    assert http.session("m") is not before


async def test_a_retry_refused_after_a_pooled_connection_dropped_raises_the_first_failure() -> None:
    """The engine took a request on a pooled connection, then died: the one retry is
    refused, and the caller sees the disconnect, not a refused connect (which would say
    the request went nowhere, and a scaled-out model would send it to another pod)."""
    served = 0

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while await reader.readuntil(b"\r\n\r\n"):  # each request: headers, empty body
            served += 1
            if served == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
                continue
            server.close()  # the engine is gone: nothing listens any more
            writer.transport.abort()
            return

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = HttpClient()
    await http.open()
    try:
        timeouts = aiohttp.ClientTimeout(total=10)
        first = await http.post(
            "m", f"http://127.0.0.1:{port}/v1/x", data=b"", headers={}, timeouts=timeouts,
            request_id="a",
        )  # fmt: skip
        await first.read()
        first.release()
        with pytest.raises(aiohttp.ClientError) as caught:
            await http.post(
                "m", f"http://127.0.0.1:{port}/v1/x", data=b"", headers={}, timeouts=timeouts,
                request_id="b",
            )  # fmt: skip
        assert not sent_nothing(caught.value)
        assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)
    finally:
        await http.close()
        server.close()
