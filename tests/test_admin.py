"""Admin API: a model is named the way clients name it (name or alias), an unknown name
gets the clients' 404 envelope listing every name, and a 401 says which key it wants."""

from __future__ import annotations

from tests.conftest import ActivatorFactory
from tests.harness import engine_pids, error_of, model_config, unique, wait_for


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
