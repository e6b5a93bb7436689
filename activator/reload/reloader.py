"""The one owner of config changes while activator runs.

A reload (SIGHUP, POST /admin/reload, or the file's content changing with
`server.watch_config`) reads the file, validates it (an invalid file changes nothing),
plans the difference (activator.reload.plan: a pure function; a plan that needs a
restart is refused whole) and applies it in one synchronous step, so no request ever
sees half a reload:

- server keys go to the objects that read them (keys, limits, timeouts);
- pools are added or resized (a smaller pool frees GPUs through its own over-capacity
  eviction); a removed pool goes once its last model has left it;
- models: unchanged ones are not touched; changed ones get their new settings
  (`Model.update_settings`: what needs a new engine waits for the next start); removed
  ones are retired (`Model.retire`) and leave the registry once stopped; new ones are
  added at zero, each in its pool (or a pool of its own).

Reloads run one at a time (a lock); triggers that arrive meanwhile are coalesced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from activator.backends.base import Backend
from activator.config.load import ConfigError
from activator.config.settings import ModelSettings, ServerSettings, Settings
from activator.core.tasks import TaskGroup
from activator.fleet.pool import PoolScheduler
from activator.fleet.registry import ModelRegistry
from activator.model.lifecycle import Model
from activator.model.reload import PendingEngine
from activator.observability.metrics import Metrics
from activator.reload.plan import Plan, describe, plan, summary, watch_refusals
from activator.reload.source import SHOWN_DIGITS, ConfigFile, Snapshot, settings_digest

logger = logging.getLogger(__name__)

BackendFactory = Callable[[ModelSettings, Model], Backend]
REMOVED = "removed from the config by a reload"


@dataclass(frozen=True)
class ReloadResult:
    outcome: str  # ok, invalid, refused
    digest: str  # of the content read (shortened)
    message: str  # one line: what changed, or why nothing did
    problems: tuple[str, ...] = ()  # invalid: as check-config prints them; refused: why
    changes: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "config_hash": self.digest,
            "message": self.message,
            "changes": dict(self.changes),
        }


class Reloader:
    def __init__(
        self,
        settings: Settings,
        *,
        source: ConfigFile | None,
        registry: ModelRegistry,
        metrics: Metrics,
        tasks: TaskGroup,
        make_model: Callable[[ModelSettings], Model],
        apply_server: Callable[[ServerSettings], None],
    ) -> None:
        self.settings = settings  # the config in force (models: as configured)
        self._source = source
        self._registry = registry
        self._metrics = metrics
        self._tasks = tasks
        self._make_model = make_model
        self._apply_server = apply_server
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # a reload applied: the watcher re-reads its settings
        self._removals: dict[str, asyncio.Task[None]] = {}
        self._leaving_pools: set[str] = set()
        self._requested: str | None = None  # a trigger waiting for the running reload
        self._runner: asyncio.Task[None] | None = None
        # Set by start(), at the app's start: backends exist only while the app runs.
        self._make_backend: BackendFactory | None = None
        self._loops: TaskGroup | None = None
        self._kubernetes = False
        self.closing = False
        self.digest = source.digest() if source is not None else settings_digest(settings)
        metrics.show_config(self._shown(self.digest))

    def start(self, *, make_backend: BackendFactory, loops: TaskGroup, kubernetes: bool) -> None:
        """The app runs: reloads may apply (new models get backends, new pools loops)."""
        self._make_backend = make_backend
        self._loops = loops
        self._kubernetes = kubernetes
        if self._source is not None:
            self._tasks.spawn(self._watch(self._source), name="config-watch")

    # ----- triggers -------------------------------------------------------------------

    def request(self, trigger: str) -> None:
        """Reload soon, in the background (a signal handler's call: it must not block).
        Requests made while a reload runs are coalesced into one more."""
        self._requested = trigger
        if self._runner is None or self._runner.done():
            self._runner = self._tasks.spawn(self._run_requested(), name="config-reload")

    async def _run_requested(self) -> None:
        while self._requested is not None:
            trigger, self._requested = self._requested, None
            await self.reload(trigger=trigger)

    async def _watch(self, source: ConfigFile) -> None:
        """Poll the file's content while `server.watch_config` is on. No event says that a
        file changed everywhere it may live (a ConfigMap volume, a bind mount, an NFS
        share): reading it every watch_interval is the robust way (llama-swap came to the
        same after file-system watches missed ConfigMap updates).

        Nor does any event say that a write is complete: a file written in place is a
        prefix of itself while it is written, and a prefix can be a valid config. So new
        content applies only once two reads one watch_interval apart see the same digest
        (`_settle`); a writer that pauses longer than that is indistinguishable from one
        that is done, and what a prefix may then do is bounded by `watch_refusals`."""
        seen: str | None = None  # new content read once: it applies if the next read agrees
        while True:
            server = self.settings.server
            self._changed.clear()
            if not server.watch_config:
                await self._changed.wait()
                seen = None
                continue
            try:
                async with asyncio.timeout(server.watch_interval):
                    await self._changed.wait()  # new settings: look at them first
                seen = None
                continue
            except TimeoutError:
                pass
            if seen is None:
                digest = await asyncio.to_thread(source.digest)
                seen = digest if digest != self.digest else None
            else:
                seen = await self._settle(source, seen)

    async def _settle(self, source: ConfigFile, seen: str) -> str | None:
        """The second read of new content: apply it if it is still `seen` (and the file
        is still not what was read last). Returns the digest to confirm next time."""
        async with self._lock:
            snapshot = await asyncio.to_thread(source.read)
            if snapshot.digest == self.digest:
                return None  # back to the content in force, or read by another trigger
            if snapshot.digest != seen:
                return snapshot.digest  # still being written
            result = await self._reload("watch", snapshot)
        self._report("watch", result)
        return None

    # ----- a reload -------------------------------------------------------------------

    async def reload(self, *, trigger: str) -> ReloadResult:
        """Read, validate, plan and apply the config file at once (SIGHUP, POST
        /admin/reload: someone asked). Never raises for a bad file or a refused change:
        the result says what happened (and it is logged and counted)."""
        async with self._lock:
            snapshot = None
            if self._source is not None and self._cannot_reload() is None:
                snapshot = await asyncio.to_thread(self._source.read)
            result = await self._reload(trigger, snapshot)
        self._report(trigger, result)
        return result

    def _report(self, trigger: str, result: ReloadResult) -> None:
        self._metrics.config_reloads.labels(outcome=result.outcome).inc()
        if result.outcome == "ok":
            logger.info("config reload (%s, %s): %s", trigger, result.digest, result.message)
        else:
            for problem in result.problems:
                logger.error("config reload (%s): %s", trigger, problem)
            logger.warning("config reload (%s, %s): %s", trigger, result.digest, result.message)

    async def _reload(self, trigger: str, snapshot: Snapshot | None) -> ReloadResult:
        """Validate, plan and apply `snapshot` (None: nothing could be read). Runs under
        the lock."""
        refused = self._cannot_reload()
        if refused is not None or self._source is None or snapshot is None:
            why = refused or "activator was started without a config file: nothing to reload"
            return ReloadResult("refused", self._shown(self.digest), why, (why,))
        loaded = await asyncio.to_thread(self._source.parse, snapshot)
        self.digest = snapshot.digest  # seen: the watcher waits for the next change
        shown = self._shown(snapshot.digest)
        if isinstance(loaded, ConfigError):
            return ReloadResult(
                "invalid", shown, "the config is invalid; nothing changed", tuple(loaded.problems)
            )
        if (refused := self._cannot_reload()) is not None:  # shut down while it was read
            return ReloadResult("refused", shown, refused, (refused,))
        if trigger == "watch" and (why_not := watch_refusals(self.settings.server, loaded.server)):
            message = "the watcher does not apply this file on its own; nothing changed"
            return ReloadResult("refused", shown, message, why_not)
        current = self.settings.model_copy(
            update={"models": {m.name: m.configured for m in self._registry}}
        )
        running = {m.name: m.settings for m in self._registry}
        retiring = frozenset(m.name for m in self._registry if m.retiring is not None)
        changes = plan(
            current, loaded, running=running, retiring=retiring, kubernetes=self._kubernetes
        )
        if changes.refused:
            message = "the config needs a restart; nothing changed"
            return ReloadResult("refused", shown, message, changes.refused)
        done = self._apply(changes)
        self._metrics.show_config(shown)
        return ReloadResult("ok", shown, describe(done), changes=done)

    def _cannot_reload(self) -> str | None:
        if self.closing:
            return "activator is shutting down: nothing was reloaded"
        if self._make_backend is None:
            return "activator is starting: reload once it is ready"
        return None

    def _apply(self, changes: Plan) -> dict[str, Any]:
        """Carry out a plan. Synchronous from start to end: requests see the config before
        or after it, never a mix."""
        new = changes.settings
        self._apply_server(new.server)
        for pool in changes.pools:
            self._apply_pool(pool.name, new)
        for name in changes.removed:
            self._retire(self._registry.models[name])
        pending: dict[str, tuple[str, ...]] = {}
        for change in changes.changed:
            model = self._registry.models[change.name]
            if change.revived:
                self._removals.pop(model.name).cancel()
                model.revive()
            model.update_settings(
                change.now, pending=self._pending(model, settings=change.new, keys=change.waiting)
            )
            pending[model.name] = model.restart_pending
        for settings in changes.added:
            self._add(settings)
        self.settings = new
        self._registry.reindex()
        self._prune()
        self._changed.set()
        return summary(changes, pending=pending)

    def _pending(
        self, model: Model, *, settings: ModelSettings, keys: tuple[str, ...]
    ) -> PendingEngine | None:
        """The engine settings `model` takes once its running engine is gone: its backend
        made for it, then placed in its pool."""
        if not keys:
            return None
        make_backend = self._make_backend
        assert make_backend is not None
        return PendingEngine(
            settings,
            keys,
            backend=lambda new: make_backend(new, model),
            applied=functools.partial(self._place, model),
        )

    # ----- pools ----------------------------------------------------------------------

    def _apply_pool(self, name: str, new: Settings) -> None:
        after = new.pools.get(name)
        scheduler = self._registry.pool(name)
        if after is None:
            self._leaving_pools.add(name)  # it goes once its models have left it
            return
        self._leaving_pools.discard(name)
        if scheduler is None:
            self._add_scheduler(
                PoolScheduler(
                    name,
                    capacity=after.gpus,
                    host_memory=after.host_memory,
                    gpu_memory=after.gpu_memory,
                    models=[],
                    metrics=self._metrics,
                )
            )
        else:
            scheduler.resize(
                capacity=after.gpus, host_memory=after.host_memory, gpu_memory=after.gpu_memory
            )

    def _add_scheduler(self, scheduler: PoolScheduler) -> None:
        assert self._loops is not None
        self._registry.schedulers.append(scheduler)
        self._loops.spawn(scheduler.run(), name=f"pool:{scheduler.name}")

    def _drop_scheduler(self, scheduler: PoolScheduler) -> None:
        self._registry.schedulers.remove(scheduler)
        scheduler.close()
        if scheduler.capacity is not None:
            self._metrics.forget_pool(scheduler.name)
            logger.info("pool=%s removed (reload)", scheduler.name)

    def _place(self, model: Model) -> None:
        """Put the model in the pool its settings in force name (a pool of its own when
        none): at its addition, or once its engine has stopped after a move. It leaves its
        old pool in the same step: never two pools deciding for it."""
        wanted = model.settings.pool
        current = next((s for s in self._registry.schedulers if model in s.models), None)
        if wanted is not None:
            target = self._registry.pool(wanted)
        else:
            target = current if current is not None and current.capacity is None else None
        if target is not None and target is current:
            return
        if current is not None:
            current.remove(model)
            if current.capacity is None:
                self._drop_scheduler(current)
        if target is None:
            target = PoolScheduler(model.name, capacity=None, models=[], metrics=self._metrics)
            self._add_scheduler(target)
        target.add(model)
        self._prune()

    def _prune(self) -> None:
        for name in list(self._leaving_pools):
            scheduler = self._registry.pool(name)
            if scheduler is None or not scheduler.models:
                self._leaving_pools.discard(name)
                if scheduler is not None:
                    self._drop_scheduler(scheduler)

    # ----- models ---------------------------------------------------------------------

    def _add(self, settings: ModelSettings) -> None:
        assert self._make_backend is not None
        model = self._make_model(settings)
        model.attach_backend(self._make_backend(settings, model))
        self._registry.add(model)
        self._place(model)
        adopt = model.adopt_if_running(found="after a reload")
        self._tasks.spawn(adopt, name=f"discover:{model.name}")

    def _retire(self, model: Model) -> None:
        model.retire(REMOVED)
        self._removals[model.name] = self._tasks.spawn(
            self._remove_when_gone(model), name=f"remove:{model.name}"
        )

    async def _remove_when_gone(self, model: Model) -> None:
        """A retired model leaves once its engine is stopped and nothing is in flight."""
        await model.retired()
        del self._removals[model.name]
        scheduler = self._registry.scheduler_of(model)
        scheduler.remove(model)
        if scheduler.capacity is None:
            self._drop_scheduler(scheduler)
        self._registry.remove(model)
        self._prune()
        logger.info("model=%s removed (reload): its engine is stopped", model.name)
        await model.backend.aclose()
        if model.name not in self._registry.models:  # not added again meanwhile
            self._metrics.forget_model(model.name)

    # ----- the config hash ------------------------------------------------------------

    @staticmethod
    def _shown(digest: str) -> str:
        return digest if digest.startswith("unreadable") else digest[:SHOWN_DIGITS]
