"""The REST surface of the fake Kubernetes API server (aiohttp).

Speaks the paths a scaler uses, with the apiserver's wire behaviour: List objects with a
collection resourceVersion, `watch=true` as a chunked stream of one JSON event per line,
410 Gone delivered as an ERROR event inside a 200 stream, BOOKMARK events when
`allowWatchBookmarks` is set, Status objects for errors, the scale subresource with
merge-patch, strategic-merge-patch and json-patch bodies, and bearer-token auth with one
token per client (so faults can single one client out). Reads cover workloads, pods,
events, services, endpoints, nodes, EndpointSlices and Leases; Lease writes live in
fakekube.writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakekube import writes
from tests.fakekube.faults import Faults
from tests.fakekube.resources import RESOURCES, resource
from tests.fakekube.store import ABORT, BOOKMARK, CLOSE, Change, Gone, Obj, Store
from tests.fakekube.wire import (
    PATCH_TYPES,
    conflict,
    json_patch,
    merge_patch,
    not_found,
    status,
    status_response,
    unsupported_media_type,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """What the fake saw: lets tests pin "only the scale subresource was patched"."""

    method: str
    verb: str
    resource: str
    name: str | None
    content_type: str | None
    body: Any
    client: str = ""  # whose token: see FakeKube.kubeconfig_for()


DEFAULT_CLIENT = "activator"


@dataclass
class ApiState:
    store: Store
    faults: Faults
    token: str
    # Called after a workload's spec changed through the API (resource, namespace, name).
    on_workload_change: Callable[[str, str, str], None]
    bookmark_interval: float = 1.0
    requests: list[RequestRecord] = field(default_factory=list)
    # Open watch streams (their requests) and whose they are: reset when their client is
    # partitioned with mode "refuse".
    streams: dict[int, tuple[str, web.Request]] = field(default_factory=dict)
    # Bearer token -> client name; `token` is the default client's.
    clients: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clients.setdefault(self.token, DEFAULT_CLIENT)


STATE = web.AppKey("fake_kube_state", ApiState)
FORCE_GONE = web.RequestKey("fake_kube_force_gone", bool)
CLIENT = web.RequestKey("fake_kube_client", str)


def reset_streams(state: ApiState, client: str) -> int:
    """Reset the open watch streams of `client` (a partition that refuses)."""
    count = 0
    for owner, request in list(state.streams.values()):
        if owner == client and request.transport is not None:
            request.transport.abort()
            count += 1
    return count


# -- selectors --------------------------------------------------------------------------


def _lookup(obj: Obj, dotted: str) -> str | None:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else str(node)


def selector(label_selector: str | None, field_selector: str | None) -> Callable[[Obj], bool]:
    """Equality-based label and field selectors (=, ==, !=, key, !key)."""
    tests: list[Callable[[Obj], bool]] = []
    for term in filter(None, (label_selector or "").split(",")):
        tests.append(_term(term.strip(), lambda o, k: o["metadata"].get("labels", {}).get(k)))
    for term in filter(None, (field_selector or "").split(",")):
        tests.append(_term(term.strip(), _lookup))
    return lambda obj: all(t(obj) for t in tests)


def _term(term: str, get: Callable[[Obj, str], str | None]) -> Callable[[Obj], bool]:
    if "!=" in term:
        key, value = term.split("!=", 1)
        return lambda o: get(o, key) != value
    if "=" in term:
        key, value = term.replace("==", "=").split("=", 1)
        return lambda o: get(o, key) == value
    if term.startswith("!"):
        return lambda o: get(o, term[1:]) is None
    return lambda o: get(o, term) is not None


def _flag(value: str | None) -> bool:
    # kubernetes_asyncio sends Python booleans as "True"; kubectl sends "true".
    return (value or "").lower() in ("true", "1")


# -- middleware: auth, record, faults ---------------------------------------------------


def classify(request: web.Request) -> tuple[str, str, str | None]:
    info = request.match_info
    resource = info.get("resource", request.path)
    name = info.get("name")
    if request.path.endswith("/scale"):
        resource += "/scale"
    method = request.method
    if method == "GET":
        verb = "get" if name else ("watch" if _flag(request.query.get("watch")) else "list")
    else:
        verb = {"PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}.get(
            method, method.lower()
        )
    return verb, resource, name


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    client = state.clients.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
    if client is None:
        return status_response(401, "Unauthorized", "Unauthorized")
    request[CLIENT] = client
    partition = state.faults.partitioned(client)
    if partition is not None:
        # The request never reaches the server: nothing is recorded or applied.
        if partition.mode == "hang":
            await state.faults.until_healed(partition)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)
    verb, resource, name = classify(request)
    body: Any = None
    if request.can_read_body:
        raw = await request.read()
        with contextlib.suppress(ValueError):
            body = json.loads(raw)
    state.requests.append(
        RequestRecord(
            method=request.method,
            verb=verb,
            resource=resource,
            name=name,
            content_type=request.headers.get("Content-Type"),
            body=body,
            client=client,
        )
    )
    rule = state.faults.take(verb, resource, client)
    if rule is not None:
        log.info("fake kube: fault %s for %s %s", rule.kind, verb, resource)
        if rule.kind == "hang":
            # Held until the client gives up (its timeout) or the fake shuts down.
            await state.faults.release.wait()
            return status_response(503, "ServiceUnavailable", "released")
        if rule.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if rule.kind == "status":
            ns = request.match_info.get("namespace", "")
            if rule.status == 403:
                known = RESOURCES.get(resource.split("/")[0])
                group = known.group if known is not None else ""
                qualified = known.qualified if known is not None else resource
                return status_response(
                    403,
                    "Forbidden",
                    f'{qualified} "{name or ""}" is forbidden: User '
                    f'"system:serviceaccount:activator:{client}" cannot {verb} resource '
                    f'"{resource}" in API group "{group}" in the namespace "{ns}"',
                    name=name or "",
                    group=group,
                    kind=resource.split("/")[0],
                )
            if rule.status == 409:
                return status_response(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try "
                    "again",
                )
            return status_response(rule.status, "InternalError", "injected fault")
        # "gone" applies to watches only and is handled by the watch handler.
        request[FORCE_GONE] = True
    return await handler(request)


# -- handlers ---------------------------------------------------------------------------


def _list_object(store: Store, plural: str, items: list[Obj]) -> Obj:
    known = resource(plural)
    return {
        "kind": f"{known.kind}List",
        "apiVersion": known.api_version,
        "metadata": {"resourceVersion": str(store.revision)},
        "items": items,
    }


async def collection(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    # Cluster-scoped resources (nodes) live under the namespace "".
    ns, plural = request.match_info.get("namespace", ""), request.match_info["resource"]
    match = selector(request.query.get("labelSelector"), request.query.get("fieldSelector"))
    if _flag(request.query.get("watch")):
        return await _watch(request, state, plural, ns, match)
    items = state.store.list(plural, ns, match)
    return web.json_response(_list_object(state.store, plural, items))


async def _watch(
    request: web.Request, state: ApiState, plural: str, ns: str, match: Callable[[Obj], bool]
) -> web.StreamResponse:
    rv_param = request.query.get("resourceVersion")
    since = int(rv_param) if rv_param not in (None, "", "0") else None
    timeout = float(request.query.get("timeoutSeconds") or 1800)
    bookmarks = _flag(request.query.get("allowWatchBookmarks"))
    known = resource(plural)
    client = request[CLIENT]
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()

    async def send(event_type: str, obj: Obj) -> None:
        partition = state.faults.partitioned(client)
        if partition is not None:
            if partition.mode == "hang":
                await state.faults.until_healed(partition)  # the stream stalls
            elif request.transport is not None:
                request.transport.abort()
        await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    try:
        if request.get(FORCE_GONE):
            raise Gone(since or 0, state.store.revision)
        watcher = state.store.watch(plural, ns, since=since, match=match)
    except Gone as gone:
        await response.prepare(request)
        await send("ERROR", status(410, "Expired", str(gone)))
        await response.write_eof()
        return response

    await response.prepare(request)
    state.streams[id(request)] = (client, request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def bookmark() -> Obj:
        return {
            "kind": known.kind,
            "apiVersion": known.api_version,
            "metadata": {"resourceVersion": str(state.store.revision)},
        }

    try:
        while (remaining := deadline - loop.time()) > 0:
            wait = min(remaining, state.bookmark_interval) if bookmarks else remaining
            try:
                item: Change | str = await asyncio.wait_for(watcher.queue.get(), wait)
            except TimeoutError:
                # An idle interval: a real apiserver sends a bookmark about once a minute.
                if bookmarks and deadline - loop.time() > 0:
                    await send("BOOKMARK", bookmark())
                continue
            if item == CLOSE:
                break
            if item == ABORT:
                if request.transport is not None:
                    request.transport.abort()
                return response
            if item == BOOKMARK:
                if bookmarks:
                    await send("BOOKMARK", bookmark())
                continue
            assert isinstance(item, Change)
            await send(item.type, item.obj)
            if watcher.overflowed and watcher.queue.empty():
                break
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        log.debug("fake kube: watch client went away")
    finally:
        state.store.unwatch(watcher)
        state.streams.pop(id(request), None)
    return response


async def item(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    info = request.match_info
    obj = state.store.get(info["resource"], info.get("namespace", ""), info["name"])
    if obj is None:
        return not_found(info["resource"], info["name"])
    return web.json_response(obj)


def scale_view(workload: Obj) -> Obj:
    meta = workload["metadata"]
    labels = workload["spec"]["selector"].get("matchLabels", {})
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": workload["spec"].get("replicas", 0)},
        "status": {
            "replicas": workload.get("status", {}).get("replicas", 0),
            "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        },
    }


async def get_scale(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    info = request.match_info
    obj = state.store.get(info["resource"], info["namespace"], info["name"])
    if obj is None:
        return not_found(info["resource"], info["name"])
    return web.json_response(scale_view(obj))


async def patch_scale(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    info = request.match_info
    resource, ns, name = info["resource"], info["namespace"], info["name"]
    obj = state.store.get(resource, ns, name)
    if obj is None:
        return not_found(resource, name)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in PATCH_TYPES:
        return unsupported_media_type(PATCH_TYPES)
    try:
        body = json.loads(await request.read())
        current = scale_view(obj)
        if content_type == "application/json-patch+json":
            patched = json_patch(current, body)
        else:
            # For a Scale (no lists) strategic merge behaves as a JSON merge patch.
            patched = merge_patch(current, body)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return status_response(422, "Invalid", f"invalid patch: {exc}")
    wanted_rv = (
        (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
    )
    if wanted_rv is not None and wanted_rv != obj["metadata"]["resourceVersion"]:
        return conflict(resource, name)
    replicas = patched.get("spec", {}).get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        return status_response(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
    updated = set_replicas(state.store, resource, ns, name, replicas)
    state.on_workload_change(resource, ns, name)
    return web.json_response(scale_view(updated))


async def patch_pod(request: web.Request) -> web.StreamResponse:
    """PATCH of a pod's metadata.labels and metadata.annotations (what activator writes:
    controller.kubernetes.io/pod-deletion-cost before a scale-down): merge and strategic
    merge patches, as the apiserver applies them to these maps. Other fields are
    rejected (the fake simulates no pod spec updates)."""
    state = request.app[STATE]
    info = request.match_info
    ns, name = info["namespace"], info["name"]
    if state.store.get("pods", ns, name) is None:
        return not_found("pods", name)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    allowed = ("application/merge-patch+json", "application/strategic-merge-patch+json")
    if content_type not in allowed:
        return unsupported_media_type(allowed)
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        return status_response(400, "BadRequest", f"json parse error: {exc}")
    meta = body.get("metadata") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) - {"metadata"} or not isinstance(meta, dict):
        return status_response(422, "Invalid", "the fake patches metadata only")
    if set(meta) - {"labels", "annotations"} or not all(
        isinstance(meta.get(k, {}), dict) for k in ("labels", "annotations")
    ):
        return status_response(422, "Invalid", "the fake patches labels and annotations only")
    for key, values in meta.items():
        if not all(isinstance(v, str) or v is None for v in values.values()):
            return status_response(422, "Invalid", f"metadata.{key}: values must be strings")

    def mutate(obj: Obj) -> None:
        for key, values in meta.items():
            merged = merge_patch(obj["metadata"].get(key) or {}, values)
            obj["metadata"][key] = merged

    return web.json_response(state.store.update("pods", ns, name, mutate))


def set_replicas(store: Store, resource: str, ns: str, name: str, replicas: int) -> Obj:
    current = store.get(resource, ns, name)
    assert current is not None
    if current["spec"].get("replicas") == replicas:
        return current

    def mutate(obj: Obj) -> None:
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1

    return store.update(resource, ns, name, mutate)


async def version(request: web.Request) -> web.StreamResponse:
    return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})


def build_app(state: ApiState) -> web.Application:
    app = web.Application(middlewares=[middleware])
    app[STATE] = state
    workloads = "{resource:deployments|statefulsets}"
    core = "{resource:pods|events|services|endpoints}"
    app.router.add_get("/version", version)
    app.router.add_get(f"/apis/apps/v1/namespaces/{{namespace}}/{workloads}", collection)
    app.router.add_get(f"/apis/apps/v1/namespaces/{{namespace}}/{workloads}/{{name}}", item)
    app.router.add_get(
        f"/apis/apps/v1/namespaces/{{namespace}}/{workloads}/{{name}}/scale", get_scale
    )
    app.router.add_patch(
        f"/apis/apps/v1/namespaces/{{namespace}}/{workloads}/{{name}}/scale", patch_scale
    )
    app.router.add_get(f"/api/v1/namespaces/{{namespace}}/{core}", collection)
    app.router.add_get(f"/api/v1/namespaces/{{namespace}}/{core}/{{name}}", item)
    app.router.add_patch("/api/v1/namespaces/{namespace}/{resource:pods}/{name}", patch_pod)
    app.router.add_get("/api/v1/{resource:nodes}", collection)
    app.router.add_get("/api/v1/{resource:nodes}/{name}", item)
    for plural in ("endpointslices", "leases"):
        path = f"{RESOURCES[plural].prefix}/namespaces/{{namespace}}/{{resource:{plural}}}"
        app.router.add_get(path, collection)
        app.router.add_get(f"{path}/{{name}}", item)
    writes.add_routes(app, "leases", state.store)
    return app
