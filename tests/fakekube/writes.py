"""Create, replace, patch and delete for the objects clients write (Leases), with the
generic registry's semantics (k8s.io/apiserver/pkg/registry/generic/registry/store.go):

- POST: 201; an existing name is 409 AlreadyExists; a body carrying
  metadata.resourceVersion is 500 "resourceVersion should not be set on objects to be
  created"; generateName gets a 5-character suffix.
- PUT: optimistic concurrency. No metadata.resourceVersion is 422 Invalid "must be
  specified for an update" (Lease's strategy has AllowUnconditionalUpdate false); a stale
  one is 409 Conflict with the optimistic-lock message; a PUT to a missing Lease creates
  it (AllowCreateOnUpdate true, 201). A write that changes nothing is not committed and
  keeps its resourceVersion, like the apiserver's no-op detection.
- PATCH: merge, strategic-merge (same as merge for a Lease: no lists) and JSON patch; a
  resourceVersion in the patched result must still match (409 otherwise).
- DELETE: 200 with a Success Status; DeleteOptions.preconditions (uid, resourceVersion)
  are checked (409).
- dryRun=All validates and answers without writing.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.fakekube import leases
from tests.fakekube.leases import FieldError, Undecodable
from tests.fakekube.resources import RESOURCES, Resource
from tests.fakekube.store import Obj, Store
from tests.fakekube.wire import (
    JSON_PATCH,
    PATCH_TYPES,
    already_exists,
    bad_request,
    conflict,
    invalid,
    json_patch,
    merge_patch,
    not_found,
    status_response,
    unsupported_media_type,
)

META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
)
# Set by the server only: a client's values are replaced (create) or kept (update).
SYSTEM_FIELDS = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")


@dataclass(frozen=True)
class Strategy:
    decode_spec: Callable[[Any], tuple[Obj, list[str]]]
    validate_spec: Callable[[Obj], list[FieldError]]
    allow_create_on_update: bool


STRATEGIES: dict[str, Strategy] = {
    "leases": Strategy(leases.decode_spec, leases.validate_spec, allow_create_on_update=True),
}


class Rejected(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def add_routes(app: web.Application, plural: str, store: Store) -> None:
    writes = ObjectWrites(store, RESOURCES[plural], STRATEGIES[plural])
    path = f"{writes.known.prefix}/namespaces/{{namespace}}/{{resource:{plural}}}"
    app.router.add_post(path, writes.create)
    app.router.add_put(f"{path}/{{name}}", writes.replace)
    app.router.add_patch(f"{path}/{{name}}", writes.patch)
    app.router.add_delete(f"{path}/{{name}}", writes.delete)


def _respond(obj: Obj, *, status: int, warnings: list[str]) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict()
    for warning in warnings:
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return web.json_response(obj, status=status, headers=headers)


def _without_version(obj: Obj) -> Obj:
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


class ObjectWrites:
    def __init__(self, store: Store, known: Resource, strategy: Strategy) -> None:
        self.store = store
        self.known = known
        self.strategy = strategy

    # -- decoding ------------------------------------------------------------------------

    async def _json(self, request: web.Request, *, allowed: tuple[str, ...]) -> Any:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in allowed:
            raise Rejected(unsupported_media_type(allowed))
        try:
            return json.loads(await request.read())
        except ValueError as exc:
            raise Rejected(bad_request(f"json parse error: {exc}")) from None

    def _decode(self, body: Any, namespace: str) -> tuple[Obj, list[str]]:
        """The object as the server would store it; Rejected with 400 if it cannot be."""
        known = self.known
        if not isinstance(body, dict):
            raise Rejected(bad_request(f"the body is not a {known.kind} object"))
        for key, expected in (("apiVersion", known.api_version), ("kind", known.kind)):
            given = body.get(key)
            if given not in (None, "", expected):
                raise Rejected(
                    bad_request(
                        f"the {key} in the data ({given}) does not match the expected "
                        f"{key} ({expected})"
                    )
                )
        meta = body.get("metadata") or {}
        if not isinstance(meta, dict):
            raise Rejected(bad_request("metadata is not an object"))
        if meta.get("namespace") not in (None, "", namespace):
            raise Rejected(
                bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            )
        warnings = [f'unknown field "metadata.{k}"' for k in meta if k not in META_FIELDS]
        warnings += [
            f'unknown field "{k}"'
            for k in body
            if k not in ("apiVersion", "kind", "metadata", "spec")
        ]
        try:
            spec, spec_warnings = self.strategy.decode_spec(body.get("spec"))
        except Undecodable as exc:
            raise Rejected(
                bad_request(
                    f'{known.kind} in version "{known.version}" cannot be handled as a '
                    f"{known.kind}: {exc}"
                )
            ) from None
        out_meta = {k: meta[k] for k in META_FIELDS if meta.get(k) is not None}
        out_meta["namespace"] = namespace
        obj = {
            "apiVersion": known.api_version,
            "kind": known.kind,
            "metadata": out_meta,
            "spec": spec,
        }
        return obj, warnings + spec_warnings

    def _validate(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        errors: list[FieldError] = []
        if len(name) > 253 or _DNS_SUBDOMAIN.match(name) is None:
            errors.append(
                (
                    "metadata.name",
                    json.dumps(name),
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric "
                    "character",
                )
            )
        errors += self.strategy.validate_spec(obj["spec"])
        if errors:
            raise Rejected(invalid(self.known.plural, name, errors))

    # -- handlers ------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json(request, allowed=("application/json",))
            obj, warnings = self._decode(body, request.match_info["namespace"])
            return self._create(obj, warnings, dry_run=_dry_run(request))
        except Rejected as rejected:
            return rejected.response

    def _create(self, obj: Obj, warnings: list[str], *, dry_run: bool) -> web.Response:
        meta = obj["metadata"]
        if meta.pop("resourceVersion", None):
            return status_response(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        if not meta.get("name"):
            prefix = meta.pop("generateName", "")
            if not prefix:
                raise Rejected(
                    invalid(
                        self.known.plural,
                        "",
                        [("metadata.name", "", "Required value: name or generateName is required")],
                    )
                )
            alphabet = string.ascii_lowercase + string.digits
            meta["name"] = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
        for key in SYSTEM_FIELDS:
            meta.pop(key, None)
        self._validate(obj)
        if self.store.get(self.known.plural, meta["namespace"], meta["name"]) is not None:
            return already_exists(self.known.plural, meta["name"])
        if dry_run:
            return _respond(obj, status=201, warnings=warnings)
        return _respond(self.store.create(self.known.plural, obj), status=201, warnings=warnings)

    async def replace(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        try:
            body = await self._json(request, allowed=("application/json",))
            obj, warnings = self._decode(body, ns)
            given = obj["metadata"].get("name", "")
            if given != name:
                return bad_request(
                    f"the name of the object ({given}) does not match the name on the URL ({name})"
                )
            existing = self.store.get(self.known.plural, ns, name)
            if existing is None:
                if not self.strategy.allow_create_on_update:
                    return not_found(self.known.plural, name)
                obj["metadata"].pop("resourceVersion", None)
                return self._create(obj, warnings, dry_run=_dry_run(request))
            version = obj["metadata"].get("resourceVersion")
            if not version:
                # The generic store names the resource, not the kind, here.
                return invalid(
                    self.known.plural,
                    name,
                    [("metadata.resourceVersion", "0x0", "must be specified for an update")],
                    kind=self.known.qualified,
                )
            if version != existing["metadata"]["resourceVersion"]:
                return conflict(self.known.plural, name)
            return self._update(existing, obj, warnings, dry_run=_dry_run(request))
        except Rejected as rejected:
            return rejected.response

    def _update(
        self, existing: Obj, obj: Obj, warnings: list[str], *, dry_run: bool
    ) -> web.Response:
        meta, old = obj["metadata"], existing["metadata"]
        if meta.get("uid") not in (None, old["uid"]):
            return conflict(
                self.known.plural,
                old["name"],
                f"Precondition failed: UID in precondition: {meta['uid']}, "
                f"UID in object meta: {old['uid']}",
            )
        for key in SYSTEM_FIELDS:
            if key in old:
                meta[key] = old[key]
            else:
                meta.pop(key, None)
        self._validate(obj)
        if _without_version(obj) == _without_version(existing):
            return _respond(existing, status=200, warnings=warnings)  # no-op: not written
        if dry_run:
            return _respond(obj, status=200, warnings=warnings)

        def write(stored: Obj) -> None:
            stored.clear()
            stored.update(obj)

        updated = self.store.update(self.known.plural, old["namespace"], old["name"], write)
        return _respond(updated, status=200, warnings=warnings)

    async def patch(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        try:
            body = await self._json(request, allowed=PATCH_TYPES)
            existing = self.store.get(self.known.plural, ns, name)
            if existing is None:
                return not_found(self.known.plural, name)
            content_type = request.headers["Content-Type"].split(";")[0].strip()
            try:
                if content_type == JSON_PATCH:
                    patched = json_patch(existing, body)
                else:
                    if not isinstance(body, dict):
                        raise TypeError("a merge patch must be an object")
                    patched = merge_patch(existing, body)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                return status_response(422, "Invalid", f"the patch does not apply: {exc}")
            obj, warnings = self._decode(patched, ns)
            if obj["metadata"].get("name") != name:
                return invalid(
                    self.known.plural,
                    name,
                    [
                        (
                            "metadata.name",
                            json.dumps(obj["metadata"].get("name")),
                            "field is immutable",
                        )
                    ],
                )
            if obj["metadata"].get("resourceVersion") != existing["metadata"]["resourceVersion"]:
                return conflict(self.known.plural, name)
            return self._update(existing, obj, warnings, dry_run=_dry_run(request))
        except Rejected as rejected:
            return rejected.response

    async def delete(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._delete(request)
        except Rejected as rejected:
            return rejected.response

    async def _delete(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        dry_run = _dry_run(request)
        existing = self.store.get(self.known.plural, ns, name)
        if existing is None:
            return not_found(self.known.plural, name)
        options: Any = None
        if request.body_exists:  # read already by the middleware: cached
            try:
                options = json.loads(await request.read() or b"null")
            except ValueError as exc:
                return bad_request(f"json parse error: {exc}")
        preconditions: Any = options.get("preconditions") if isinstance(options, dict) else None
        if not isinstance(preconditions, dict):
            preconditions = {}
        meta = existing["metadata"]
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(key)
            if wanted is not None and wanted != meta[key]:
                return conflict(
                    self.known.plural,
                    name,
                    f"Precondition failed: {label} in precondition: {wanted}, "
                    f"{label} in object meta: {meta[key]}",
                )
        if not dry_run:
            self.store.delete(self.known.plural, ns, name)
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": self.known.group,
                    "kind": self.known.plural,
                    "uid": meta["uid"],
                },
            }
        )


def _dry_run(request: web.Request) -> bool:
    values = request.query.getall("dryRun", [])
    if any(v != "All" for v in values):
        raise Rejected(bad_request(f"Invalid dry run value: {values}"))
    return bool(values)
