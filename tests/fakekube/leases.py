"""coordination.k8s.io/v1 Leases: the decoding and validation the apiserver applies to
them, and a log of every write for tests that measure failover.

The apiserver never expires a Lease: "expired" is each candidate's own judgement (client-go
and kubernetes_asyncio time it from when *they* last saw the record change, not from
renewTime). So the fake stores what clients write, with the real API's rules:

- acquireTime and renewTime are MicroTime: RFC 3339 with exactly six fractional digits
  (Go parses layout "2006-01-02T15:04:05.000000Z07:00"); anything else is 400 BadRequest.
  Stored and served back in UTC as "....ssssssZ".
- leaseDurationSeconds > 0, leaseTransitions >= 0, preferredHolder only with strategy
  (pkg/apis/coordination/validation), else 422 Invalid.
- Fields the type lacks are dropped with a "Warning: 299" header (fieldValidation=Warn,
  the default since Kubernetes 1.27); null fields are omitted, as Go's omitempty does.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tests.fakekube.store import Change, Obj, Store

MICRO_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"
_MICRO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})\Z")
_INT32 = 2**31

# LeaseSpec's fields and their JSON types ("micro" = MicroTime).
SPEC_FIELDS: dict[str, str] = {
    "holderIdentity": "string",
    "leaseDurationSeconds": "int32",
    "acquireTime": "micro",
    "renewTime": "micro",
    "leaseTransitions": "int32",
    "strategy": "string",
    "preferredHolder": "string",
}


class Undecodable(ValueError):
    """The body cannot be decoded into the type (HTTP 400 from the apiserver)."""


FieldError = tuple[str, str, str]  # (field path, value as Go prints it, detail)


def parse_micro_time(text: Any) -> datetime:
    if not isinstance(text, str):
        raise Undecodable(f"json: cannot unmarshal {_json_type(text)} into Go value of type string")
    if _MICRO.match(text) is None:
        raise Undecodable(f'parsing time "{text}" as "{MICRO_LAYOUT}": cannot parse it')
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Undecodable(f'parsing time "{text}": {exc}') from None


def format_micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def decode_spec(spec: Any) -> tuple[Obj, list[str]]:
    """The spec as the apiserver stores it, and the warnings for dropped fields.
    Raises Undecodable for a wrong type or a malformed MicroTime."""
    if spec is None:
        return {}, []
    if not isinstance(spec, dict):
        raise Undecodable(
            f"json: cannot unmarshal {_json_type(spec)} into Go struct field Lease.spec "
            "of type v1.LeaseSpec"
        )
    out: Obj = {}
    warnings: list[str] = []
    for key, value in spec.items():
        kind = SPEC_FIELDS.get(key)
        if kind is None:
            warnings.append(f'unknown field "spec.{key}"')
            continue
        if value is None:
            continue
        where = f"Go struct field LeaseSpec.spec.{key}"
        if kind == "micro":
            out[key] = format_micro_time(parse_micro_time(value))
        elif kind == "string":
            if not isinstance(value, str):
                raise Undecodable(
                    f"json: cannot unmarshal {_json_type(value)} into {where} of type string"
                )
            out[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= _INT32:
                raise Undecodable(
                    f"json: cannot unmarshal {_json_type(value)} into {where} of type int32"
                )
            out[key] = value
    return out, warnings


def validate_spec(spec: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and duration <= 0:
        errors.append(("spec.leaseDurationSeconds", str(duration), "must be greater than 0"))
    transitions = spec.get("leaseTransitions")
    if transitions is not None and transitions < 0:
        errors.append(
            ("spec.leaseTransitions", str(transitions), "must be greater than or equal to 0")
        )
    if spec.get("preferredHolder") and not spec.get("strategy"):
        errors.append(
            ("spec.preferredHolder", "", "may only be specified if `strategy` is defined")
        )
    return errors


# -- history ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """One committed write of a Lease, as the store saw it."""

    at: float  # time.monotonic() of the commit
    resource_version: int
    event: str  # ADDED, MODIFIED, DELETED
    holder: str | None
    acquire_time: str | None
    renew_time: str | None
    transitions: int | None
    duration: int | None


@dataclass(frozen=True)
class Takeover:
    """The holder changed: `holder` wrote the Lease at `at`; `previous` had last written
    it at `previous_write` (both time.monotonic()). at - previous_write bounds the time
    no one held a fresh lease, the failover gap."""

    previous: str | None
    holder: str | None
    at: float
    previous_write: float | None


class LeaseLog:
    """Every write of every Lease, in commit order, kept beyond the store's watch history
    (which compaction clears). Fed by a store observer; reads are copies."""

    def __init__(self, store: Store, *, limit: int = 100_000) -> None:
        self._records: dict[tuple[str, str], deque[LeaseRecord]] = {}
        self._limit = limit
        store.observe(self._observe)

    def _observe(self, change: Change) -> None:
        if change.resource != "leases":
            return
        meta, spec = change.obj["metadata"], change.obj.get("spec") or {}
        key = (meta.get("namespace", ""), meta["name"])
        self._records.setdefault(key, deque(maxlen=self._limit)).append(
            LeaseRecord(
                at=change.at,
                resource_version=change.rv,
                event=change.type,
                holder=spec.get("holderIdentity"),
                acquire_time=spec.get("acquireTime"),
                renew_time=spec.get("renewTime"),
                transitions=spec.get("leaseTransitions"),
                duration=spec.get("leaseDurationSeconds"),
            )
        )

    def history(self, name: str, *, namespace: str) -> list[LeaseRecord]:
        return list(self._records.get((namespace, name), ()))

    def holders(self, name: str, *, namespace: str) -> list[str | None]:
        """Who held the Lease, in order, each once per tenure."""
        tenures: list[str | None] = []
        for record in self.history(name, namespace=namespace):
            if record.event != "DELETED" and (not tenures or tenures[-1] != record.holder):
                tenures.append(record.holder)
        return tenures

    def takeovers(self, name: str, *, namespace: str) -> list[Takeover]:
        found: list[Takeover] = []
        last: LeaseRecord | None = None
        for record in self.history(name, namespace=namespace):
            if record.event == "DELETED":
                continue
            if last is not None and record.holder != last.holder:
                found.append(Takeover(last.holder, record.holder, record.at, last.at))
            last = record
        return found
