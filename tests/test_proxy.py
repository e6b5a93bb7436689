"""The /v1 request path: routing, rewriting, relaying, errors, auth and the allow-list.

A real activator on loopback, stand-in engines as real processes, the openai SDK and
aiohttp as clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from tests.conftest import ActivatorFactory
from tests.harness import (
    Running,
    chat,
    engine_pids,
    error_of,
    header,
    model_config,
    post,
    starts,
    unique,
    wait_for,
)

DEV_PATHS = ("/sleep", "/wake_up", "/collective_rpc", "/load_lora_adapter")


def aclient(running: Running, *, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.v1, api_key=api_key, max_retries=0)


async def engine_requests_running(url: str) -> float:
    """vllm:num_requests_running read from the engine itself, bypassing activator."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("vllm:num_requests_running{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("engine /metrics has no vllm:num_requests_running")


# ---- routing and rewriting ----------------------------------------------------------


async def test_every_endpoint_is_routed_with_model_rewritten_to_served_name(
    activator: ActivatorFactory,
) -> None:
    # The stand-in engine answers 404 to any model name but its served one.
    served = unique("served")
    running = await activator({"models": {"client-name": model_config(served)}})
    async with aclient(running) as client:
        reply = await client.chat.completions.create(
            model="client-name", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        completion = await client.completions.create(
            model="client-name", prompt="a b", max_tokens=2
        )
        embedding = await client.embeddings.create(model="client-name", input=["x", "y"])
        response = await client.responses.create(model="client-name", input="hello")
    assert reply.model == completion.model == embedding.model == response.model == served
    assert completion.choices[0].text == "a b"
    assert len(embedding.data) == 2
    assert response.output_text


async def test_aliases_route_to_the_same_model_and_engine(activator: ActivatorFactory) -> None:
    served = unique("aliased")
    running = await activator({"models": {"m": model_config(served, aliases=["short", "other"])}})
    async with aclient(running) as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "x"}], max_tokens=1
                )
                for name in ("m", "short", "other")
            )
        )
    assert {r.model for r in replies} == {served}
    assert starts(running, "m") == 1
    assert len(engine_pids(served)) == 1


async def test_models_list_every_name_and_alias_with_state_and_wakes_nothing(
    activator: ActivatorFactory,
) -> None:
    a, b = unique("list-a"), unique("list-b")
    running = await activator(
        {"models": {"a": model_config(a, aliases=["a2"]), "b": model_config(b)}}
    )
    async with aclient(running) as client:
        listed = await client.models.list()
        assert {m.id for m in listed.data} == {"a", "a2", a, "b", b}  # served names too
        async with running.session.get(running.v1 + "/models") as resp:
            cards = {card["id"]: card["activator"] for card in (await resp.json())["data"]}
        assert cards["a2"] == {"model": "a", "alias": True, "state": "stopped"}
        assert cards["b"] == {"model": "b", "alias": False, "state": "stopped"}
        assert not engine_pids(a) and not engine_pids(b)
        assert starts(running, "a") == starts(running, "b") == 0
        await client.chat.completions.create(
            model="a2", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        async with running.session.get(running.v1 + "/models") as resp:
            states = {
                card["id"]: card["activator"]["state"] for card in (await resp.json())["data"]
            }
    assert states == {"a": "ready", "a2": "ready", a: "ready", "b": "stopped", b: "stopped"}


# ---- relaying -----------------------------------------------------------------------


async def test_stream_is_relayed_chunk_by_chunk_while_the_engine_still_generates(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"models": {"m": model_config(unique("slow"), "--stream-delay", "0.3")}}
    )
    model = running.model("m")
    async with aclient(running) as client:
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a b c"}], max_tokens=6, stream=True
        )
        first = await anext(aiter(chunks))
        assert model.url is not None
        # The first chunk is here while the engine is still generating the rest.
        assert await engine_requests_running(model.url) == 1
        rest = [c async for c in chunks]
    assert first.choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == "a b c a b c"
    assert await engine_requests_running(model.url) == 0


async def test_engine_headers_are_kept_and_hop_by_hop_headers_dropped(
    activator: ActivatorFactory,
) -> None:
    running = await activator({"models": {"m": model_config(unique("headers"))}})
    headers = {"Connection": "keep-alive", "Keep-Alive": "timeout=5", "TE": "trailers"}
    for stream in (False, True):
        async with running.session.post(
            running.v1 + "/chat/completions",
            json=chat("m", max_tokens=2, stream=stream),
            headers=headers,
        ) as resp:
            body = await resp.read()
            assert resp.status == 200, body
            assert resp.headers["x-fake-engine"] == "1"
            assert "X-Request-Id" in resp.headers
            assert "Keep-Alive" not in resp.headers
            assert len(resp.headers.getall("Transfer-Encoding", [])) <= 1
            assert len(resp.headers.getall("Content-Length", [])) <= 1
            if stream:
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                assert body.endswith(b"data: [DONE]\n\n")
            else:
                assert resp.headers["Content-Type"].startswith("application/json")


async def test_request_id_reaches_the_engine_and_comes_back(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m": model_config(unique("request-id"))}})
    # The stand-in engine bases completion ids on the X-Request-Id it received.
    status, body, headers = await post(
        running, "/v1/chat/completions", chat("m"), headers={"X-Request-Id": "req-abc123"}
    )
    assert status == 200
    assert body["id"] == "chatcmpl-req-abc123"
    assert header(headers, "X-Request-Id") == "req-abc123"
    # An id unfit for logs is replaced by one of activator's, used upstream as well.
    status, body, headers = await post(
        running, "/v1/chat/completions", chat("m"), headers={"X-Request-Id": "two words"}
    )
    assert status == 200
    given = header(headers, "X-Request-Id")
    assert given and given != "two words"
    assert body["id"] == f"chatcmpl-{given}"


async def test_stream_keepalive_sends_comments_while_held_and_the_sdk_still_parses(
    activator: ActivatorFactory,
) -> None:
    config = model_config(unique("keepalive"), startup_delay=1.0, stream_keepalive="0.2s")
    running = await activator({"models": {"m": config}})

    async def raw() -> str:
        async with running.session.post(
            running.v1 + "/chat/completions", json=chat("m", "x", max_tokens=2, stream=True)
        ) as resp:
            assert resp.status == 200
            return (await resp.read()).decode()

    async def sdk() -> str:
        async with aclient(running) as client:
            chunks = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "y"}], max_tokens=2, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    text, sdk_text = await asyncio.gather(raw(), sdk())
    lines = text.splitlines()
    assert any(line.startswith(": waiting for m to start (") for line in lines)
    assert not any(line.startswith("id:") for line in lines)
    assert text.endswith("data: [DONE]\n\n")
    assert sdk_text == "y y"


# ---- errors -------------------------------------------------------------------------


async def test_unknown_model_is_404_listing_available_names(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m": model_config(unique("known"), aliases=["mm"])}})
    status, body, _ = await post(running, "/v1/chat/completions", chat("nope"))
    assert status == 404
    error = error_of(body)
    assert error["code"] == "model_not_found"
    assert error["source"] == "activator"
    assert "m" in error["message"] and "mm" in error["message"]
    assert starts(running, "m") == 0
    # A known model that is cold is never a 404: it is woken and answers.
    async with aclient(running) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=[])
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert reply.choices[0].message.content == "x"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 7}', "model"),
    ],
)
async def test_malformed_body_or_missing_model_is_400(
    activator: ActivatorFactory, body: bytes, param: str | None
) -> None:
    running = await activator({"models": {"m": model_config(unique("bad"))}})
    async with running.session.post(
        running.v1 + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        error = error_of(await resp.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert running.model("m").state == "stopped"


async def test_body_over_max_body_bytes_is_413_with_or_without_content_length(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"max_body_bytes": "1KiB"}, "models": {"m": model_config(unique("big"))}}
    )
    big = chat("m", "word " * 400)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * 512

    status, body, _ = await post(running, "/v1/chat/completions", big)
    assert status == 413
    assert error_of(body)["code"] == "request_too_large"
    async with running.session.post(running.v1 + "/chat/completions", data=chunked()) as resp:
        assert resp.status == 413
    assert running.model("m").state == "stopped"


async def test_engine_dying_mid_request_is_502(activator: ActivatorFactory) -> None:
    # The engine dies a second after it is ready, long before its answer is due.
    config = model_config(unique("dies"), "--exit-after", "1", "--response-delay", "60")
    running = await activator({"models": {"m": config}})
    async with aclient(running) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.status_code == 502
    assert error_of(caught.value.response.json())["source"] == "activator"


async def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(
    activator: ActivatorFactory,
) -> None:
    config = model_config(unique("dies-streaming"), "--exit-after", "1", "--stream-delay", "0.05")
    running = await activator({"models": {"m": config}})
    received: list[str] = []
    async with aclient(running) as client, asyncio.timeout(30):  # a hang fails, not stalls
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1000, stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            async for chunk in chunks:
                received.append(chunk.choices[0].delta.content or "")
    assert received, "the stream began before the engine died"
    assert "model 'm'" in caught.value.message
    await wait_for(lambda: running.model("m").state == "failed", what="model failed")


async def test_engine_exiting_while_ready_is_noticed_and_the_next_request_restarts_it(
    activator: ActivatorFactory,
) -> None:
    served = unique("exits")
    running = await activator({"models": {"m": model_config(served, "--exit-after", "2")}})
    assert (await post(running, "/v1/chat/completions", chat("m", max_tokens=1)))[0] == 200
    await wait_for(lambda: running.model("m").state == "failed", what="engine exit noticed")
    assert "exited with code 3" in (await running.admin("m"))["last_error"]
    assert not engine_pids(served)
    assert (await post(running, "/v1/chat/completions", chat("m", max_tokens=1)))[0] == 200
    assert starts(running, "m") == 2


# ---- auth ---------------------------------------------------------------------------


async def test_without_api_keys_v1_is_open_to_any_key(activator: ActivatorFactory) -> None:
    running = await activator({"models": {"m": model_config(unique("open"))}})
    async with aclient(running, api_key="anything") as client:
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert reply.choices[0].message.content == "x"
    async with running.session.get(running.url + "/admin/models") as resp:
        assert resp.status == 200


async def test_api_keys_guard_v1_and_admin_key_guards_admin_only(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {
            "server": {"api_keys": ["k1", "k2"], "admin_api_key": "adm"},
            "models": {"m": model_config(unique("auth"))},
        }
    )
    async with running.session.post(running.v1 + "/chat/completions", json=chat("m")) as resp:
        assert resp.status == 401
        assert error_of(await resp.json())["code"] == "invalid_api_key"
    async with aclient(running, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with aclient(running, api_key="adm") as client:  # the admin key is not a /v1 key
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert running.model("m").state == "stopped"
    async with aclient(running, api_key="k2") as client:
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        assert reply.choices[0].message.content == "x"
    admin = running.url + "/admin/models"
    for key, status in ((None, 401), ("k1", 401), ("adm", 200)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with running.session.get(admin, headers=headers) as resp:
            assert resp.status == status, key
    for path in ("/metrics", "/healthz", "/readyz"):
        async with running.session.get(running.url + path) as resp:
            assert resp.status == 200, path


async def test_upstream_api_key_replaces_the_clients_authorization(
    activator: ActivatorFactory,
) -> None:
    # The engine accepts only its own key: forwarding the client's would get a 401.
    config = model_config(unique("upstream-key"), "--api-key", "engine-secret")
    config["upstream_api_key"] = "engine-secret"
    running = await activator({"server": {"api_keys": ["client-key"]}, "models": {"m": config}})
    async with aclient(running, api_key="client-key") as client:
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "y"}], max_tokens=1, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert (reply.choices[0].message.content, streamed) == ("x", "y")


# ---- allow-list ---------------------------------------------------------------------


async def test_engine_dev_endpoints_are_never_proxied(activator: ActivatorFactory) -> None:
    config = model_config(unique("dev"))
    # The engine's access log shows every request it received.
    config["process"]["command"].remove("--disable-access-log")
    running = await activator({"models": {"m": config}})

    async def try_dev_paths() -> None:
        for path in (*DEV_PATHS, *(f"/v1{p}" for p in DEV_PATHS)):
            status, body, _ = await post(running, path, {"model": "m"})
            assert status == 404, path
            assert error_of(body)["source"] == "activator"
        async with running.session.get(running.url + "/is_sleeping") as resp:
            assert resp.status == 404

    await try_dev_paths()
    assert running.model("m").state == "stopped"  # nothing woke
    assert (await post(running, "/v1/chat/completions", chat("m", "first", max_tokens=1)))[0] == 200
    await try_dev_paths()
    assert (await post(running, "/v1/chat/completions", chat("m", "last", max_tokens=1)))[0] == 200

    async def engine_log() -> list[str]:
        async with running.session.get(running.url + "/admin/models/m/logs") as resp:
            lines: list[str] = (await resp.json())["lines"]
            return lines

    async def both_chats_logged() -> bool:
        return sum("POST /v1/chat/completions" in line for line in await engine_log()) == 2

    await wait_for(both_chats_logged, what="the engine's access log of both chats")
    seen = [line for line in await engine_log() if "POST /" in line or "GET /is_sleeping" in line]
    assert all("/v1/chat/completions" in line for line in seen), seen
