"""The REST surface of the fake Kubernetes API server (aiohttp).

Speaks the paths a scaler uses, with the apiserver's wire behaviour: List objects with a
collection resourceVersion, `watch=true` as a chunked stream of one JSON event per line,
410 Gone delivered as an ERROR event inside a 200 stream, BOOKMARK events when
`allowWatchBookmarks` is set, Status objects for errors, the scale subresource with
merge-patch, strategic-merge-patch and json-patch bodies, and bearer-token auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from activator.testing.fakekube.faults import Faults
from activator.testing.fakekube.store import ABORT, BOOKMARK, CLOSE, Change, Gone, Obj, Store

log = logging.getLogger(__name__)

KINDS = {
    "deployments": ("Deployment", "apps/v1"),
    "statefulsets": ("StatefulSet", "apps/v1"),
    "pods": ("Pod", "v1"),
    "events": ("Event", "v1"),
}
PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
)


@dataclass(frozen=True)
class RequestRecord:
    """What the fake saw: lets tests pin "only the scale subresource was patched"."""

    method: str
    verb: str
    resource: str
    name: str | None
    content_type: str | None
    body: Any


@dataclass
class ApiState:
    store: Store
    faults: Faults
    token: str
    # Called after a workload's spec changed through the API (resource, namespace, name).
    on_workload_change: Callable[[str, str, str], None]
    bookmark_interval: float = 1.0
    requests: list[RequestRecord] = field(default_factory=list)
    # Open watch stream tasks, closed on shutdown so the runner never waits on them.
    streams: set[web.StreamResponse] = field(default_factory=set)


STATE = web.AppKey("fake_kube_state", ApiState)
FORCE_GONE = web.RequestKey("fake_kube_force_gone", bool)


def status(code: int, reason: str, message: str, **details: Any) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


def status_response(code: int, reason: str, message: str, **details: Any) -> web.Response:
    return web.json_response(status(code, reason, message, **details), status=code)


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
    if request.headers.get("Authorization") != f"Bearer {state.token}":
        return status_response(401, "Unauthorized", "Unauthorized")
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
        )
    )
    rule = state.faults.take(verb, resource)
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
                group = "apps" if resource.split("/")[0] in ("deployments", "statefulsets") else ""
                return status_response(
                    403,
                    "Forbidden",
                    f'{resource.split("/")[0]} "{name or ""}" is forbidden: User '
                    f'"system:serviceaccount:activator:activator" cannot {verb} resource '
                    f'"{resource}" in API group "{group}" in the namespace "{ns}"',
                    name=name or "",
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


def _list_object(store: Store, resource: str, items: list[Obj]) -> Obj:
    kind, api_version = KINDS[resource]
    return {
        "kind": f"{kind}List",
        "apiVersion": api_version,
        "metadata": {"resourceVersion": str(store.revision)},
        "items": items,
    }


async def collection(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ns, resource = request.match_info["namespace"], request.match_info["resource"]
    match = selector(request.query.get("labelSelector"), request.query.get("fieldSelector"))
    if _flag(request.query.get("watch")):
        return await _watch(request, state, resource, ns, match)
    items = state.store.list(resource, ns, match)
    return web.json_response(_list_object(state.store, resource, items))


async def _watch(
    request: web.Request, state: ApiState, resource: str, ns: str, match: Callable[[Obj], bool]
) -> web.StreamResponse:
    rv_param = request.query.get("resourceVersion")
    since = int(rv_param) if rv_param not in (None, "", "0") else None
    timeout = float(request.query.get("timeoutSeconds") or 1800)
    bookmarks = _flag(request.query.get("allowWatchBookmarks"))
    kind, api_version = KINDS[resource]
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()

    async def send(event_type: str, obj: Obj) -> None:
        await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    try:
        if request.get(FORCE_GONE):
            raise Gone(since or 0, state.store.revision)
        watcher = state.store.watch(resource, ns, since=since, match=match)
    except Gone as gone:
        await response.prepare(request)
        await send("ERROR", status(410, "Expired", str(gone)))
        await response.write_eof()
        return response

    await response.prepare(request)
    state.streams.add(response)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def bookmark() -> Obj:
        return {
            "kind": kind,
            "apiVersion": api_version,
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
        state.streams.discard(response)
    return response


async def item(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    info = request.match_info
    obj = state.store.get(info["resource"], info["namespace"], info["name"])
    if obj is None:
        return _not_found(info["resource"], info["name"])
    return web.json_response(obj)


def _not_found(resource: str, name: str) -> web.Response:
    group = ".apps" if resource in ("deployments", "statefulsets") else ""
    return status_response(
        404, "NotFound", f'{resource}{group} "{name}" not found', name=name, kind=resource
    )


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
        return _not_found(info["resource"], info["name"])
    return web.json_response(scale_view(obj))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Obj, ops: list[dict[str, Any]]) -> Obj:
    """RFC 6902 for the operations a scale patch uses (add, replace, remove, test)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[part]
        leaf = parts[-1]
        if op["op"] in ("add", "replace"):
            parent[leaf] = op["value"]
        elif op["op"] == "remove":
            del parent[leaf]
        elif op["op"] == "test":
            if parent.get(leaf) != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return doc


async def patch_scale(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    info = request.match_info
    resource, ns, name = info["resource"], info["namespace"], info["name"]
    obj = state.store.get(resource, ns, name)
    if obj is None:
        return _not_found(resource, name)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in PATCH_TYPES:
        return status_response(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format "
            f"- accepted media types include: {', '.join(PATCH_TYPES)}",
        )
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
        return status_response(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified',
        )
    replicas = patched.get("spec", {}).get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        return status_response(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
    updated = set_replicas(state.store, resource, ns, name, replicas)
    state.on_workload_change(resource, ns, name)
    return web.json_response(scale_view(updated))


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
    core = "{resource:pods|events}"
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
    return app
