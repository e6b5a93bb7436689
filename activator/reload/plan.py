"""What a reload changes: a pure function of the settings in force and the new ones.

`plan` compares the two and says, model by model and pool by pool, what is added,
removed or changed, which changed keys apply at once and which need a new engine, and
whether the reload must be refused as a whole (a new listener, a new Kubernetes
connection: a reload is all or nothing). It touches no model, pool or socket;
`activator.reload.reloader` carries the plan out. docs/reload.md is the same rules as a
table, and tests/test_reload_plan.py tests them as one.

A key is named by its path in the file (`process.command`, `sleep.timeout`). Values are
never part of a plan's description: some are secrets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from activator.config.settings import ModelSettings, PoolSettings, ServerSettings, Settings

S = TypeVar("S", bound=BaseModel)

# Model keys the engine is started with: a change waits until the engine that runs is
# gone (at once if none runs). The engine serves its old name and holds its old GPUs,
# in its old pool, until then: counting it anywhere else would let the pool start a
# model onto GPUs that are still in use.
ENGINE_SECTIONS = frozenset({"process", "kubernetes"})
# replicas.max too: whether requests go through the Service (1) or to the pods directly
# (more) is set up with the engine, and a running model's GPUs are counted with it.
ENGINE_KEYS = frozenset(
    {
        "served_model_name",
        "pool",
        "gpus",
        "sleep",
        "sleep.level",
        "sleep.host_memory",
        "replicas.max",
        # A running engine keeps the GPU memory it took: the pool counts its old
        # footprint until its next start (memory packing).
        "gpu_memory",
        "memory_fraction",
        "residue_fraction",
        "sleep.gpu_residue",
    }
)
# Server keys that need a new listening socket: refused (restart activator instead).
LISTENER_KEYS = ("host", "port")


def changed_keys(old: BaseModel | None, new: BaseModel | None, prefix: str = "") -> list[str]:
    """Paths of the keys whose values differ, into sections both sides have; a section
    present on one side only (or of another type) is one path."""
    if old is None or new is None or type(old) is not type(new):
        return [] if old == new else [prefix.rstrip(".")]
    keys: list[str] = []
    for field in type(new).model_fields:
        before, after = getattr(old, field), getattr(new, field)
        if isinstance(before, BaseModel) or isinstance(after, BaseModel):
            keys += changed_keys(before, after, f"{prefix}{field}.")
        elif _plain(before) != _plain(after):
            keys.append(f"{prefix}{field}")
    return keys


def _plain(value: object) -> object:
    return dict(value) if isinstance(value, Mapping) else value


def needs_new_engine(key: str, *, backend: str) -> bool:
    """Whether a change of this model key waits for the model's next start. The engine's
    API key is part of how a local engine was started (its command or environment); a
    Kubernetes engine's key is managed with the workload, so it follows at once."""
    if key.split(".", 1)[0] in ENGINE_SECTIONS or key in ENGINE_KEYS:
        return True
    return key == "upstream_api_key" and backend == "process"


def keep(new: S, old: S, keys: Sequence[str]) -> S:
    """`new`, with the values at `keys` (paths) taken from `old`."""
    update: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for key in keys:
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, []).append(rest)
        else:
            update[head] = getattr(old, head)
    for head, rests in nested.items():
        if head not in update:  # the whole section is kept already
            update[head] = keep(getattr(new, head), getattr(old, head), rests)
    return new.model_copy(update=update)


@dataclass(frozen=True)
class ModelChange:
    name: str
    live: tuple[str, ...]  # keys this reload changed that apply at once
    engine: tuple[str, ...]  # keys this reload changed that need the model's next start
    # Every engine key that differs from the engine in force (this reload's, and an
    # earlier one's still pending): what waits for the next start.
    waiting: tuple[str, ...]
    now: ModelSettings  # in force at once: the new settings less the waiting keys
    new: ModelSettings  # in force once no engine runs
    revived: bool = False  # it was being removed by an earlier reload, and is back


@dataclass(frozen=True)
class PoolChange:
    name: str
    before: PoolSettings | None  # None: a new pool
    after: PoolSettings | None  # None: removed (it goes once its models have left)


@dataclass(frozen=True)
class Plan:
    settings: Settings  # the new settings
    added: tuple[ModelSettings, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[ModelChange, ...] = ()
    pools: tuple[PoolChange, ...] = ()
    server: tuple[str, ...] = ()  # server keys that changed; all apply at once
    refused: tuple[str, ...] = ()  # why the reload cannot apply; then nothing does

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.pools or self.server)


def plan(
    current: Settings,
    new: Settings,
    *,
    running: Mapping[str, ModelSettings] | None = None,
    retiring: frozenset[str] = frozenset(),
    kubernetes: bool = True,
) -> Plan:
    """The reload from `current` (the config in force, its models as configured) to
    `new`. `running`: each model's settings in force, whose engine keys are those its
    engine runs with (they differ from the configured ones while an earlier reload's
    engine change waits for the next start); default: as configured. `retiring`: models
    an earlier reload removed that still drain. `kubernetes`: whether activator has a
    Kubernetes API connection (made at start, only when a model needed one)."""
    running = current.models if running is None else running
    refused = [
        f"server.{key}: a new address needs a restart (activator keeps listening on "
        f"{_address(current.server.host, current.server.port)}); nothing was reloaded"
        for key in LISTENER_KEYS
        if getattr(current.server, key) != getattr(new.server, key)
    ]
    refused += [
        f"kubernetes.{key}: the Kubernetes connection is made at start and needs a restart; "
        "nothing was reloaded"
        for key in changed_keys(current.kubernetes, new.kubernetes)
    ]
    if not kubernetes:
        refused += [
            f"models.{name}.kubernetes: activator connected to no Kubernetes API at start "
            "(no model needed one); adding the first Kubernetes model needs a restart; "
            "nothing was reloaded"
            for name, model in new.models.items()
            if model.kubernetes is not None
            and (name not in current.models or current.models[name].kubernetes is None)
        ]
    added = tuple(m for name, m in new.models.items() if name not in current.models)
    removed = tuple(
        name for name in current.models if name not in new.models and name not in retiring
    )
    changed = []
    for name, after in new.models.items():
        before = current.models.get(name)
        if before is None:
            continue
        keys = changed_keys(before, after)
        if not keys and name not in retiring:
            continue
        engine = [k for k in keys if needs_new_engine(k, backend=before.backend_kind)]
        in_force = running.get(name, before)
        waiting = [
            k
            for k in changed_keys(in_force, after)
            if needs_new_engine(k, backend=in_force.backend_kind)
        ]
        changed.append(
            ModelChange(
                name=name,
                live=tuple(k for k in keys if k not in engine),
                engine=tuple(engine),
                waiting=tuple(waiting),
                now=keep(after, in_force, waiting),
                new=after,
                revived=name in retiring,
            )
        )
    pools = tuple(
        PoolChange(name, current.pools.get(name), new.pools.get(name))
        for name in sorted(set(current.pools) | set(new.pools))
        if current.pools.get(name) != new.pools.get(name)
    )
    return Plan(
        settings=new,
        added=added,
        removed=removed,
        changed=tuple(changed),
        pools=pools,
        server=tuple(changed_keys(current.server, new.server)),
        refused=tuple(refused),
    )


# What the watcher may not do on its own (docs/reload.md, "Watching the file"): a file read
# half-way through a write can be a valid prefix without the server block, and applying it
# would open the doors and stop the watching that would see the rest. SIGHUP and POST
# /admin/reload are someone's decision and apply these too.
WATCH_ONLY = "; the watcher does not apply this (send SIGHUP or POST /admin/reload to)"


def watch_refusals(current: ServerSettings, new: ServerSettings) -> tuple[str, ...]:
    """Why a reload triggered by the watcher must be refused whole: it would drop a key
    the server has (a client key of `api_keys`, or the `admin_api_key`; replacing one
    drops it too), or turn `watch_config` off. Names the kind of key, never a value."""
    refused = []
    if set(current.api_keys) - set(new.api_keys):
        refused.append("server.api_keys: the file drops a client API key in force" + WATCH_ONLY)
    if current.admin_api_key is not None and new.admin_api_key != current.admin_api_key:
        refused.append("server.admin_api_key: the file drops the admin key in force" + WATCH_ONLY)
    if current.watch_config and not new.watch_config:
        refused.append("server.watch_config: the watcher never turns itself off" + WATCH_ONLY)
    return tuple(refused)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- what a reload did, for its answer and its log line -----------------------------------


def summary(changes: Plan, *, pending: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The admin API's account of an applied plan. `pending`: per changed model, the
    engine keys that still wait for its next start (the others applied at once: no engine
    ran)."""
    models: dict[str, Any] = {}
    for change in changes.changed:
        waiting = list(pending.get(change.name, ()))
        models[change.name] = {
            "applied": [*change.live, *(k for k in change.engine if k not in waiting)],
            "on_next_start": waiting,
            **({"revived": True} if change.revived else {}),
        }
    pools: dict[str, Any] = {}
    for pool in changes.pools:
        if pool.before is None:
            pools[pool.name] = "added"
        elif pool.after is None:
            pools[pool.name] = "removed"
        else:
            pools[pool.name] = {
                key: [getattr(pool.before, key), getattr(pool.after, key)]
                for key in changed_keys(pool.before, pool.after)
            }
    return {
        "added": [m.name for m in changes.added],
        "removed": list(changes.removed),
        "changed": models,
        "pools": pools,
        "server": list(changes.server),
    }


def describe(done: Mapping[str, Any]) -> str:
    """One line for the log from a `summary`: names and keys, never values (secrets)."""
    parts = []
    if done["added"]:
        parts.append("added " + ", ".join(done["added"]))
    if done["removed"]:
        parts.append("removed " + ", ".join(done["removed"]))
    for name, change in done["changed"].items():
        what = []
        if change["applied"]:
            what.append("now: " + ", ".join(change["applied"]))
        if change["on_next_start"]:
            what.append("on next start: " + ", ".join(change["on_next_start"]))
        if change.get("revived"):
            what.insert(0, "kept (no longer removed)")
        parts.append(f"changed {name} ({'; '.join(what)})")
    for name, pool in done["pools"].items():
        if isinstance(pool, str):
            parts.append(f"pool {name} {pool}")
        else:
            moves = ", ".join(f"{key} {a} -> {b}" for key, (a, b) in pool.items())
            parts.append(f"pool {name} resized ({moves})")
    if done["server"]:
        parts.append("server: " + ", ".join(done["server"]))
    return "; ".join(parts) or "no changes"
