"""Wiring: settings in, an aiohttp Application out. Lifetimes live in one cleanup context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from activator.backends.base import Backend
from activator.config.settings import ModelSettings, ServerSettings, Settings
from activator.core.errors import NotFound, Unauthorized
from activator.core.tasks import TaskGroup
from activator.edge.admin import ReadyFlag, admin_routes
from activator.edge.body import BodyReads, unread_bodies_middleware
from activator.edge.credentials import Credentials
from activator.edge.proxy import ENDPOINTS, Proxy
from activator.edge.rejections import ParserRejections
from activator.edge.responses import error_response, errors_middleware
from activator.engine.http_client import HttpClient
from activator.fleet.pool import PoolScheduler
from activator.fleet.registry import ModelRegistry
from activator.model.lease import HoldCounter
from activator.model.lifecycle import Model
from activator.observability.metrics import Metrics
from activator.reload import ConfigFile, Reloader
from activator.ui import EventStreams, ui_routes
from activator.ui.summary import snapshot

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)  # as at start; RELOADER.settings: as in force
RELOADER = web.AppKey("reloader", Reloader)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", ModelRegistry)
READY = web.AppKey("ready", ReadyFlag)
EVENT_STREAMS = web.AppKey("event_streams", EventStreams)  # the status page's streams
HTTP = web.AppKey("http", HttpClient)
BODY_READS = web.AppKey("body_reads", BodyReads)

# How long aiohttp reads on after an answer that closes the connection (413, 408, 429)
# while the client is still sending its body, so that the client reads the answer rather
# than a reset. Bodies no handler reads are drained within server.body_timeout by
# unread_bodies_middleware, so this applies only to refused bodies: long enough for a
# large upload on a LAN to finish, short enough that a refused client trickling its body
# does not hold its connection (aiohttp's default is 10 s).
LINGER_S = 1.0

BackendFactory = Callable[[ModelSettings, Model], Backend]


def build_app(
    settings: Settings, *, metrics: Metrics | None = None, config: ConfigFile | None = None
) -> web.Application:
    """The whole server. Engines and clients exist only while the app runs. `config`: the
    file the settings came from, which a reload reads again (none: reloads are refused)."""
    metrics = metrics or Metrics()
    http = HttpClient(
        retried=lambda model: metrics.upstream_retries.labels(
            model=model, reason="closed_connection"
        ).inc()
    )
    tasks = TaskGroup()
    holds = HoldCounter(settings.server.max_queued_total)

    def make_model(ms: ModelSettings) -> Model:
        return Model(ms, http=http, metrics=metrics, holds=holds, tasks=tasks)

    models = [make_model(ms) for ms in settings.models.values()]
    schedulers = [
        PoolScheduler(
            pool.name,
            capacity=pool.gpus,
            host_memory=pool.host_memory,
            gpu_memory=pool.gpu_memory,
            models=[m for m in models if m.settings.pool == pool.name],
            metrics=metrics,
        )
        for pool in settings.pools.values()
    ]
    schedulers += [
        PoolScheduler(m.name, capacity=None, models=[m], metrics=metrics)
        for m in models
        if m.settings.pool is None
    ]
    registry = ModelRegistry(models, schedulers)
    body_reads = BodyReads(
        body_timeout=settings.server.body_timeout,
        per_client=settings.server.max_body_reads_per_client,
    )
    rejections = ParserRejections(access_log=settings.server.access_log)
    proxy = Proxy(
        registry=registry,
        http=http,
        metrics=metrics,
        max_body_bytes=settings.server.max_body_bytes,
        body_reads=body_reads,
        strip_client_auth=bool(settings.server.api_keys),
        access_log=settings.server.access_log,
    )
    credentials = Credentials(settings.server)

    def apply_server(server: ServerSettings) -> None:
        credentials.update(server)
        holds.limit = server.max_queued_total
        proxy.configure(server)
        body_reads.configure(
            body_timeout=server.body_timeout, per_client=server.max_body_reads_per_client
        )
        rejections.access_log = server.access_log

    reloader = Reloader(
        settings,
        source=config,
        registry=registry,
        metrics=metrics,
        tasks=tasks,
        make_model=make_model,
        apply_server=apply_server,
    )
    ready = ReadyFlag()
    replica = _replica(
        settings, registry=registry, metrics=metrics, admin_key=lambda: credentials.admin_key
    )
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[
            unread_bodies_middleware(
                body_reads, limit=lambda: reloader.settings.server.max_body_bytes
            ),
            errors_middleware,
            _auth_middleware(credentials),
        ],
        # Bodies are decoded by activator.edge.body, where a bad one gets an answer;
        # requests the parser rejects are logged and answered by activator.edge.rejections.
        handler_args={
            "auto_decompress": False,
            "logger": rejections,
            "lingering_time": LINGER_S,
        },
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[REGISTRY] = registry
    app[READY] = ready
    app[HTTP] = http
    app[BODY_READS] = body_reads
    app[RELOADER] = reloader
    for path in ENDPOINTS:
        app.router.add_post(path, proxy.handle)
        app.router.add_route("*", path, proxy.method_not_allowed)  # 405, Allow: POST
    app.on_cleanup.append(lambda _: proxy.close())
    app.router.add_get("/v1/models", _list_models(registry))
    app.router.add_routes(
        admin_routes(
            registry=registry,
            metrics=metrics,
            is_ready=ready,
            reload=reloader.reload,
            replicas=replica,
        )
    )
    streams = app[EVENT_STREAMS] = EventStreams(
        lambda: snapshot(registry, metrics, replicas=replica)
    )
    app.router.add_routes(
        ui_routes(
            admin_key=lambda: credentials.admin_key,
            is_admin=credentials.is_admin,
            log_in=credentials.log_in,
            log_out=credentials.log_out,
            streams=streams,
            body_reads=body_reads,
            metrics=metrics,
        )
    )
    app.router.add_route("*", "/{tail:.*}", _not_found)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await http.open()
        make_backend, connect = default_backend_factory(settings)
        cluster = await connect()
        for m in models:
            m.attach_backend(make_backend(m.settings, m))
        if replica is not None:
            await replica.start(cluster, ready=ready)  # it reconciles, read-only
        loops = TaskGroup()
        for scheduler in schedulers:
            loops.spawn(scheduler.run(), name=f"pool:{scheduler.name}")
        reloader.start(make_backend=make_backend, loops=loops, kubernetes=cluster is not None)
        if replica is None:
            tasks.spawn(_reconcile(registry, ready), name="reconcile")
        try:
            yield
        finally:
            ready.value = False
            reloader.closing = True
            if replica is not None:
                await replica.step_down()
            await loops.aclose()
            running = list(registry)  # as reloads left them
            results = await asyncio.gather(*(m.shutdown() for m in running), return_exceptions=True)
            for model, result in zip(running, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("model=%s shutdown failed: %r", model.name, result)
            if replica is not None:
                await replica.aclose()
            await tasks.aclose()
            if cluster is not None:
                await cluster.aclose()
            await http.close()

    app.cleanup_ctx.append(lifetime)
    if replica is not None:
        app.on_shutdown.append(replica.on_shutdown)  # hand over before the grace is spent
    app.on_shutdown.append(streams.close)  # open status pages must not hold up shutdown
    app.on_shutdown.append(_spend_shutdown_grace)
    return app


def _replica(
    settings: Settings,
    *,
    registry: ModelRegistry,
    metrics: Metrics,
    admin_key: Callable[[], str | None],
) -> Any:
    """This activator as one of several replicas (activator.ha.wiring), or None when it
    runs alone. Kubernetes code is imported only then. ValueError (one line) when the
    replica cannot tell its namespace."""
    election = settings.kubernetes.leader_election
    if not election.enabled:
        return None
    from activator.ha.wiring import Replica

    return Replica(
        election,
        registry=registry,
        metrics=metrics,
        admin_port=settings.server.port,
        admin_key=admin_key,
    )


def _auth_middleware(credentials: Credentials) -> Any:
    # Each 401 names the key it wants: an admin sent a client key (or none) is told so.
    client_key_hint = "API key (Authorization: Bearer <key>)"
    admin_key_hint = "admin key (Authorization: Bearer <server.admin_api_key>, or log in at /ui)"

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The keys in force now (a reload may have changed them), in constant time.
        path = request.path
        if path.startswith("/v1/") and not credentials.is_client(request):
            raise Unauthorized(f"missing or invalid {client_key_hint}")
        if path.startswith("/admin/") and not credentials.is_admin(request):
            raise Unauthorized(f"missing or invalid {admin_key_hint}")
        response: web.StreamResponse = await handler(request)
        return response

    return auth


def default_backend_factory(settings: Settings) -> tuple[BackendFactory, Callable[[], Any]]:
    """Backends by target kind. Kubernetes code is imported only when a model uses it."""
    cluster: Any = None

    def make(model: ModelSettings, listener: Model) -> Backend:
        if model.kubernetes is not None:
            from activator.backends.kubernetes import KubernetesBackend

            return KubernetesBackend(model, cluster=cluster, listener=listener)
        from activator.backends.process import ProcessBackend

        return ProcessBackend(model, listener=listener)

    async def connect() -> Any:
        nonlocal cluster
        if any(m.kubernetes is not None for m in settings.models.values()):
            from activator.backends.kubernetes import KubeCluster

            cluster = await KubeCluster.connect(settings.kubernetes)
        return cluster

    return make, connect


async def _reconcile(registry: ModelRegistry, ready: ReadyFlag) -> None:
    """Adopt engines that already run (a restarted activator, a hand-scaled Deployment).

    Pool capacity is then enforced by the pool schedulers like any other decision."""

    await asyncio.gather(*(m.adopt_if_running(found="at start-up") for m in registry))
    ready.value = True


async def _spend_shutdown_grace(app: web.Application) -> None:
    """The one place `server.shutdown_grace` is spent. aiohttp runs this (on_shutdown) on
    SIGTERM once it has stopped listening and closed idle connections, and only then
    waits on request handlers, then runs the cleanup context (engines are stopped there).

    Held requests get a 503 now and starts under way are cancelled; requests in flight
    get the grace to finish; whatever is still open then ends with a shutting_down error
    (a stream: as its last event), so aiohttp's own wait (cli.HANDLER_EXIT_TIMEOUT) only
    lets the handlers write it, and never adds a second grace.
    """
    app[READY].value = False
    app[RELOADER].closing = True  # the models below are all there will be
    models = list(app[REGISTRY].models.values())
    grace = app[RELOADER].settings.server.shutdown_grace
    logger.info(
        "shutting down: held=%d in_flight=%d grace=%gs (held requests get 503 now)",
        sum(m.queued for m in models),
        sum(m.in_flight for m in models),
        grace,
    )
    for model in models:
        model.begin_shutdown()
    finished = True
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*(m.drained() for m in models))
    except TimeoutError:
        finished = False
    # From here on no request gets a lease, even one whose body was still arriving.
    reason = f"activator is shutting down: shutdown_grace ({grace:g}s) passed"
    cut = sum(await asyncio.gather(*(m.cut_in_flight(reason) for m in models)))
    if finished:
        logger.info("shutting down: every in-flight request finished within the grace")
    else:
        logger.warning(
            "shutting down: shutdown_grace %gs passed; %d requests still in flight end with "
            "a shutting_down error",
            grace,
            cut,
        )


def _list_models(registry: ModelRegistry) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(registry.openai_models())

    return handler


async def _not_found(request: web.Request) -> web.Response:
    return error_response(NotFound(f"no route for {request.method} {request.path}"))
