"""Wire pieces every handler of the fake API server shares: Status objects shaped as the
apiserver's (apimachinery's StatusError), and the three patch formats (RFC 7386 merge
patch, RFC 6902 JSON patch; strategic merge behaves as a merge patch for the objects the
fake accepts patches on, which hold no lists with merge keys)."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from tests.fakekube.resources import resource
from tests.fakekube.store import Obj

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (MERGE, STRATEGIC, JSON_PATCH)
# The apiserver's optimistic-lock message (storage.OptimisticLockErrorMsg).
OPTIMISTIC_LOCK = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


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


def status_response(
    code: int, reason: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
) -> web.Response:
    return web.json_response(status(code, reason, message, **details), status=code, headers=headers)


def not_found(plural: str, name: str) -> web.Response:
    known = resource(plural)
    return status_response(
        404,
        "NotFound",
        f'{known.qualified} "{name}" not found',
        name=name,
        group=known.group,
        kind=plural,
    )


def conflict(plural: str, name: str, why: str = OPTIMISTIC_LOCK) -> web.Response:
    known = resource(plural)
    return status_response(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {known.qualified} "{name}": {why}',
        name=name,
        group=known.group,
        kind=plural,
    )


def already_exists(plural: str, name: str) -> web.Response:
    known = resource(plural)
    return status_response(
        409,
        "AlreadyExists",
        f'{known.qualified} "{name}" already exists',
        name=name,
        group=known.group,
        kind=plural,
    )


def bad_request(message: str) -> web.Response:
    return status_response(400, "BadRequest", message)


def unsupported_media_type(accepted: tuple[str, ...]) -> web.Response:
    return status_response(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format "
        f"- accepted media types include: {', '.join(accepted)}",
    )


def invalid(
    plural: str, name: str, errors: list[tuple[str, str, str]], *, kind: str | None = None
) -> web.Response:
    """422 with one cause per (field, value as Go prints it, detail). `kind` overrides
    the qualified kind the message starts with."""
    known = resource(plural)
    lines = [f"{f}: Invalid value: {v}: {d}" if v else f"{f}: {d}" for f, v, d in errors]
    summary = lines[0] if len(lines) == 1 else f"[{', '.join(lines)}]"
    return status_response(
        422,
        "Invalid",
        f'{kind or known.qualified_kind} "{name}" is invalid: {summary}',
        name=name,
        group=known.group,
        kind=known.kind,
        causes=[
            {"reason": "FieldValueInvalid", "message": line.split(": ", 1)[1], "field": f}
            for (f, _, _), line in zip(errors, lines, strict=True)
        ],
    )


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


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _parent(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _get(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent, leaf = _parent(doc, parts), parts[-1]
    if isinstance(parent, list):
        index = len(parent) if leaf == "-" else int(leaf)
        if not 0 <= index <= len(parent):
            raise IndexError(f"index {leaf} out of range")
        parent.insert(index, value)
    else:
        parent[leaf] = value
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise ValueError("cannot remove the whole document")
    parent, leaf = _parent(doc, parts), parts[-1]
    if isinstance(parent, list):
        return parent.pop(int(leaf))
    return parent.pop(leaf)


def json_patch(target: Obj, ops: list[dict[str, Any]]) -> Obj:
    """RFC 6902: add, remove, replace, move, copy, test. Raises ValueError, KeyError,
    IndexError or TypeError for a patch that does not apply (the caller answers 422)."""
    if not isinstance(ops, list):
        raise TypeError("a JSON patch is a list of operations")
    doc: Any = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(op["path"])
        kind = op["op"]
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            _get(doc, parts)  # must exist
            if parts:
                _remove(doc, parts)
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = _pointer(op["from"])
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_get(doc, source))
            doc = _add(doc, parts, value)
        elif kind == "test":
            if _get(doc, parts) != op["value"]:
                raise ValueError(f"testing value {op['path']} failed")
        else:
            raise ValueError(f"Unexpected kind: {kind}")
    if not isinstance(doc, dict):
        raise TypeError("a patch must leave an object")
    return dict(doc)
