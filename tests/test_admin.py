"""Admin API: a model is named the way clients name it (name or alias), an unknown name
gets the clients' 404 envelope listing every name, and a 401 says which key it wants."""

from __future__ import annotations

import pytest

from activator.backends.process import probe_access_line
from tests.conftest import ActivatorFactory
from tests.harness import chat, engine_pids, error_of, model_config, post, unique, wait_for


async def test_every_admin_route_accepts_a_models_alias(activator: ActivatorFactory) -> None:
    served = unique("admin-alias")
    running = await activator({"models": {"demo-small": model_config(served, aliases=["small"])}})
    model = running.model("demo-small")
    admin = running.url + "/admin/models/small"

    async with running.session.get(admin) as resp:
        assert resp.status == 200
        assert (await resp.json())["name"] == "demo-small"
    async with running.session.post(admin + "/wake") as resp:
        assert resp.status == 202
    await wait_for(lambda: model.state == "ready", what="ready after a wake by alias")
    async with running.session.get(admin + "/logs") as resp:
        assert resp.status == 200
        logs = await resp.json()
    assert logs["model"] == "demo-small"
    assert logs["lines"], "the engine's start-up output"
    async with running.session.post(admin + "/stop") as resp:
        assert resp.status == 202
        assert (await resp.json())["stopping"] is True
    await wait_for(lambda: model.state == "stopped", what="stopped after a stop by alias")
    assert not engine_pids(served)


async def test_an_unknown_name_is_a_404_envelope_listing_the_valid_names(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {
            "models": {
                # Served names equal to the names: a served name is a name too (listed).
                "demo-small": model_config("demo-small", aliases=["small"]),
                "chat": model_config("chat"),
            }
        }
    )
    routes = [("GET", ""), ("GET", "/logs"), ("POST", "/wake"), ("POST", "/stop")]
    for method, suffix in routes:
        url = f"{running.url}/admin/models/nope{suffix}"
        async with running.session.request(method, url) as resp:
            assert resp.status == 404, (method, suffix)
            error = error_of(await resp.json())
        assert (error["code"], error["param"], error["source"]) == (
            "model_not_found",
            "name",
            "activator",
        )
        assert error["message"] == (
            "model 'nope' does not exist; available: chat, demo-small, small"
        ), (method, suffix)


async def test_admin_401_names_the_admin_key_not_the_client_key(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {
            "server": {"api_keys": ["client-key"], "admin_api_key": "s3cret-adm"},
            "models": {"m": model_config(unique("admin-401"))},
        }
    )
    for headers in ({}, {"Authorization": "Bearer client-key"}):
        async with running.session.get(running.url + "/admin/models", headers=headers) as resp:
            assert resp.status == 401
            error = error_of(await resp.json())
        assert "admin key" in error["message"] and "admin_api_key" in error["message"]
        assert "s3cret" not in error["message"]  # the key itself is never shown
    async with running.session.post(running.url + "/v1/chat/completions", json={}) as resp:
        assert resp.status == 401
        client_error = error_of(await resp.json())
    assert "admin" not in client_error["message"]


async def test_admin_ha_on_a_single_replica_says_leader_election_is_off(
    activator: ActivatorFactory,
) -> None:
    running = await activator(
        {"server": {"admin_api_key": "adm"}, "models": {"m": model_config(unique("admin-ha"))}}
    )
    async with running.session.get(running.url + "/admin/ha") as resp:
        assert resp.status == 401  # as every /admin route
    headers = {"Authorization": "Bearer adm"}
    async with running.session.get(running.url + "/admin/ha", headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["leader_election"] is False
    assert (body["role"], body["deciding"]) == ("single", True)
    assert "leader election is off" in body["message"]


async def test_the_engine_log_tail_leaves_out_the_probes_lines(
    activator: ActivatorFactory,
) -> None:
    config = model_config(unique("admin-tail"))
    config["process"]["command"].remove("--disable-access-log")  # the access log is the point
    running = await activator({"models": {"m": config}})
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200
    engine = running.model("m").url
    assert engine is not None
    for _ in range(5):  # as the readiness probe asks, and Kubernetes' probes would
        async with running.session.get(engine + "/health") as resp:
            assert resp.status == 200
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200

    async def tail() -> list[str]:
        async with running.session.get(running.url + "/admin/models/m/logs") as resp:
            lines: list[str] = (await resp.json())["lines"]
            return lines

    async def both_posts() -> bool:
        # The engine prints an access line once it has answered: wait for the second's.
        return sum('"POST /v1/chat/completions' in line for line in await tail()) == 2

    await wait_for(both_posts, what="both requests' access lines")
    assert not [line for line in await tail() if "GET /health" in line]


@pytest.mark.parametrize(
    ("line", "probe"),
    [
        ('INFO:     127.0.0.1:40112 - "GET /health HTTP/1.1" 200 OK', True),  # vLLM
        ('127.0.0.1 "GET /health HTTP/1.1" 200 0 0.000151', True),  # the stand-in
        ('INFO:     127.0.0.1:40112 - "GET /v1/models HTTP/1.1" 200 OK', True),
        ('127.0.0.1 "GET /is_sleeping HTTP/1.1" 200 21 0.000151', True),
        ('INFO:     127.0.0.1:40112 - "GET /health HTTP/1.1" 503 Service Unavailable', False),
        ('INFO:     127.0.0.1:40112 - "POST /v1/chat/completions HTTP/1.1" 200 OK', False),
        ("INFO: loading weights took 12.3 s (GET /health)", False),
    ],
)
def test_probe_lines_are_told_from_the_rest(line: str, probe: bool) -> None:
    assert bool(probe_access_line("/health").search(line)) is probe
