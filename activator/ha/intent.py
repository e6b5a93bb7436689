"""The leader's decisions, published for the followers: per model the state it decided
(ready, draining, stopping, stopped, sleeping, starting, waking...) and an epoch.

They live on the leader Lease itself, as the annotation `activator.dev/models`:

    {"chat":{"state":"ready","epoch":7,"by":"activator-7d9f-x2"},
     "coder":{"state":"failed","epoch":3,"by":"...","failures":1,"error":"ImagePullBackOff..."}}

so they are written only by the elector's fenced writes: only while leading, with the
resourceVersion it holds (a deposed leader's write fails with 409 and it steps down),
at most every write_interval, and carried over to the next leader, which continues the
epochs from what it read when it took the Lease (its takeover write carries that same
resourceVersion, so nothing newer can exist). A model's epoch grows by one at every
state change, so a follower that sees ready(7) after ready(5) knows the model went
through a restart it missed. `by` names the replica that decided the state (the leader
then), and `failures` counts the model's failed starts, with the last `error`: a
follower fails the requests it holds when the count grows, even if the `failed` state
itself was overwritten by the next start before it saw it.

Followers watch the leader Lease (IntentWatcher) and get `{model: ModelIntent}` with a
change notification.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from activator.backends.kube.calls import Obj
from activator.backends.kube.cluster import KubeCluster
from activator.backends.kube.informer import Informer
from activator.config.ha import HaSettings
from activator.ha.changes import Changes
from activator.ha.election import LeaderElector, Leadership
from activator.ha.leases import LeaseClient, annotations_of, holder_of, lease_informer, spec_of

log = logging.getLogger(__name__)

ANNOTATION = "activator.dev/models"
_STATE = re.compile(r"[a-z][a-z_]{0,31}\Z")
# A failed start's reason, as published: one line, bounded (annotations are small).
MAX_ERROR = 300


@dataclass(frozen=True)
class ModelIntent:
    state: str
    epoch: int
    by: str | None = field(default=None, compare=False)  # the replica that decided it
    failures: int = 0
    error: str | None = field(default=None, compare=False)


def _entry(intent: ModelIntent) -> dict[str, object]:
    entry: dict[str, object] = {"state": intent.state, "epoch": intent.epoch}
    if intent.by:
        entry["by"] = intent.by
    if intent.failures:
        entry["failures"] = intent.failures
    if intent.error:
        entry["error"] = intent.error
    return entry


def encode(models: Mapping[str, ModelIntent]) -> str:
    return json.dumps({m: _entry(i) for m, i in sorted(models.items())}, separators=(",", ":"))


def decode(text: str) -> dict[str, ModelIntent]:
    """ValueError when the value is unusable; malformed entries are skipped."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("intent is not a JSON object")
    out: dict[str, ModelIntent] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict):
            continue
        state, epoch = entry.get("state"), entry.get("epoch")
        if not isinstance(state, str) or _STATE.match(state) is None:
            continue
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            continue
        by, failures, error = entry.get("by"), entry.get("failures", 0), entry.get("error")
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            failures = 0
        out[str(model)] = ModelIntent(
            state,
            epoch,
            by=by if isinstance(by, str) else None,
            failures=failures,
            error=error[:MAX_ERROR] if isinstance(error, str) else None,
        )
    return out


class IntentPublisher:
    """The leader's side: `publish(model, state)` while leading. Owns the intent of its
    elector's terms; seeded from the Lease at every acquisition."""

    def __init__(self, elector: LeaderElector) -> None:
        self._elector = elector
        self._models: dict[str, ModelIntent] = {}
        self._term = 0
        elector.subscribe(self._leadership)

    @property
    def models(self) -> Mapping[str, ModelIntent]:
        return dict(self._models)

    def publish(self, model: str, state: str, *, error: str | None = None) -> ModelIntent | None:
        """Record the state decided for `model` (a new epoch if it changed) and schedule
        the write. Entering `failed` counts one more failure, with `error` as its reason.
        None, and nothing written, when not leading."""
        if _STATE.match(state) is None:
            raise ValueError(f"not a model state: {state!r}")
        if not self._elector.is_leader:
            return None
        current = self._models.get(model)
        if current is not None and current.state == state:
            return current
        failures = current.failures if current else 0
        reason = current.error if current else None
        if state == "failed":
            failures += 1
            reason = " ".join((error or "start failed").split())[:MAX_ERROR]
        intent = ModelIntent(
            state,
            (current.epoch if current else 0) + 1,
            by=self._elector.identity,
            failures=failures,
            error=reason,
        )
        self._models[model] = intent
        self._elector.set_annotation(ANNOTATION, encode(self._models))
        return intent

    def forget(self, model: str) -> bool:
        """Drop a model that left the config (while leading)."""
        if not self._elector.is_leader or model not in self._models:
            return False
        del self._models[model]
        self._elector.set_annotation(ANNOTATION, encode(self._models))
        return True

    def _leadership(self, event: Leadership) -> None:
        if not event.is_leader or event.term == self._term:
            return
        self._term = event.term
        text = self._elector.annotations().get(ANNOTATION)
        try:
            self._models = decode(text) if text is not None else {}
        except ValueError as exc:
            log.warning("intent: the previous leader's intent is unreadable: %s", exc)
            self._models = {}


class IntentWatcher:
    """A follower's view of the leader's intent (list+watch of the leader Lease).

    `models` is the latest intent; `changes` is notified when it or the leader changes;
    `fresh()` says whether the leader renewed within lease_duration by our clock (False
    also while our own watch is cut off). Start with `start()`; stop with `aclose()`."""

    def __init__(
        self,
        cluster: KubeCluster,
        *,
        settings: HaSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        leases = LeaseClient(cluster.api_client, namespace=settings.namespace)
        self.informer: Informer = lease_informer(
            cluster,
            leases,
            settings=settings,
            field_selector=f"metadata.name={settings.lease_name}",
        )
        self.changes = Changes()
        self.models: Mapping[str, ModelIntent] = {}
        self.leader: str | None = None
        self._renew_key: object = None
        self._renewed_at: float | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def synced(self) -> asyncio.Event:
        return self.informer.synced

    def fresh(self) -> bool:
        return (
            self._renewed_at is not None
            and self._clock() - self._renewed_at < self.settings.lease_duration
        )

    def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.informer.subscribe(self)
            self.informer.start()

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.informer.aclose()

    def informer_event(self, resource: str, event_type: str, obj: Obj) -> None:
        if obj.get("metadata", {}).get("name") != self.settings.lease_name:
            return
        before = (self.models, self.leader)
        if event_type == "DELETED":
            self.leader, self._renew_key, self._renewed_at = None, None, None
        else:
            renew_key = spec_of(obj).get("renewTime")
            if self._renew_key is not None and renew_key != self._renew_key:
                self._renewed_at = self._clock()
            self._renew_key = renew_key
            self.leader = holder_of(obj)
            text = annotations_of(obj).get(ANNOTATION)
            if text is not None:
                try:
                    self.models = decode(text)
                except ValueError as exc:
                    log.warning("intent: unreadable intent on the leader lease: %s", exc)
        if (self.models, self.leader) != before:
            self.changes.notify()

    def informer_reachable(self, resource: str, reachable: bool) -> None:
        log.info("intent: leader lease %s", "reachable" if reachable else "unreachable")


def intent_of(lease: Obj | None) -> dict[str, ModelIntent]:
    """The intent a Lease object carries (tests, /admin)."""
    text = annotations_of(lease).get(ANNOTATION)
    return decode(text) if text is not None else {}
