"""Admin API (JSON), health endpoints and /metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from activator.core.errors import ConfigInvalid, Conflict, ReloadRefused
from activator.fleet.registry import ModelRegistry
from activator.model.lifecycle import Model
from activator.observability.metrics import Metrics
from activator.reload import ReloadResult

ADMIN_MODELS_PATH = "/admin/models"
# /admin/ha of an activator that runs alone: answered (not a 404), so that a script or a
# person asking "who decides here" learns that this one does, and why.
SINGLE_REPLICA: dict[str, Any] = {
    "leader_election": False,
    "role": "single",
    "deciding": True,
    "message": "leader election is off (leader_election.enabled: false): this activator "
    "runs alone and decides every start, stop and swap itself",
}


class ReplicaStatus(Protocol):
    """Several replicas (activator.ha.wiring): the cluster-wide view and the election."""

    def describe(self) -> dict[str, Any]: ...

    def describe_model(self, model: Model) -> dict[str, Any]: ...

    async def decide_or_forward(
        self, request: web.Request, *, what: str
    ) -> web.StreamResponse | None:
        """None on the replica that decides (act here); elsewhere the leader's answer,
        forwarded, or an error (409: the leader is unknown; 503: it cannot be reached)."""


def model_view(model: Model, *, replicas: ReplicaStatus | None) -> dict[str, Any]:
    """One model as /admin/models shows it: its own fields, `replicas` when it is scaled
    out (pods, their load, the last decisions), `cluster` with several replicas."""
    body = model.describe()
    if model.scale is not None:
        body["replicas"] = model.scale.describe()
    if replicas is not None:
        body["cluster"] = replicas.describe_model(model)
    return body


def admin_routes(
    *,
    registry: ModelRegistry,
    metrics: Metrics,
    is_ready: ReadyFlag,
    reload: Callable[..., Awaitable[ReloadResult]],
    replicas: ReplicaStatus | None = None,
) -> list[web.RouteDef]:
    def model_of(request: web.Request) -> Model:
        # By name or alias, as clients send it; an unknown one is the same 404 they get.
        return registry.resolve(request.match_info["name"], param="name")

    def described(model: Model) -> dict[str, Any]:
        return model_view(model, replicas=replicas)

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"models": [described(m) for m in registry]})

    async def get_model(request: web.Request) -> web.Response:
        return web.json_response(described(model_of(request)))

    async def get_logs(request: web.Request) -> web.Response:
        model = model_of(request)
        return web.json_response({"model": model.name, "lines": model.backend.log_tail()})

    async def elsewhere(request: web.Request, what: str) -> web.StreamResponse | None:
        # A decision (stop, sleep) is the leader's: a follower forwards it. A wake is
        # demand, which every replica shares: it is taken anywhere. A reload is each
        # replica's own config file: never forwarded.
        if replicas is None:
            return None
        return await replicas.decide_or_forward(request, what=what)

    async def wake(request: web.Request) -> web.Response:
        model = model_of(request)
        model.request_wake()
        return web.json_response(model.describe(), status=202)

    async def stop(request: web.Request) -> web.StreamResponse:
        model = model_of(request)
        if (answer := await elsewhere(request, "a stop")) is not None:
            return answer
        stopping = model.begin_stop(reason="admin")
        body = model.describe()
        body["stopping"] = stopping
        return web.json_response(body, status=202)

    async def sleep(request: web.Request) -> web.StreamResponse:
        model = model_of(request)
        if (answer := await elsewhere(request, "a sleep")) is not None:
            return answer
        refused = registry.scheduler_of(model).sleep_by_hand(model)
        if refused is not None:
            raise Conflict(refused, param="name")
        return web.json_response(model.describe(), status=202)

    async def reload_config(request: web.Request) -> web.Response:
        # 200 with what changed; 400 with the problems check-config prints; 409 when the
        # file is valid but needs a restart. Either way the answer comes after the
        # reload: a removed model's drain goes on behind it.
        result = await reload(trigger="admin")
        extra = {"problems": list(result.problems), "config_hash": result.digest}
        if result.outcome == "invalid":
            raise ConfigInvalid(f"config not reloaded: {result.message}", extra=extra)
        if result.outcome != "ok":
            raise ReloadRefused(f"config not reloaded: {result.message}", extra=extra)
        return web.json_response(result.body())

    async def pools(request: web.Request) -> web.Response:
        return web.json_response({"pools": [p.describe() for p in registry.pools()]})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if not is_ready.value:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_view(request: web.Request) -> web.Response:
        resp = web.Response(body=await metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def ha(request: web.Request) -> web.Response:
        if replicas is None:
            return web.json_response(SINGLE_REPLICA)
        return web.json_response({"leader_election": True, **replicas.describe()})

    routes = [
        web.get(ADMIN_MODELS_PATH, list_models),
        web.get(ADMIN_MODELS_PATH + "/{name}", get_model),
        web.get(ADMIN_MODELS_PATH + "/{name}/logs", get_logs),
        web.post(ADMIN_MODELS_PATH + "/{name}/wake", wake),
        web.post(ADMIN_MODELS_PATH + "/{name}/stop", stop),
        web.post(ADMIN_MODELS_PATH + "/{name}/sleep", sleep),
        web.get("/admin/pools", pools),
        web.post("/admin/reload", reload_config),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics_view),
    ]
    routes.append(web.get("/admin/ha", ha))
    return routes


class ReadyFlag:
    """Ready once start-up reconciliation is done, until shutdown begins."""

    def __init__(self) -> None:
        self.value = False
