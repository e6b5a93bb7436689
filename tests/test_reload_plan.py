"""The reload rules as a table: `activator.reload.plan` is a pure function of the config
in force and the new one, so each rule is one row (docs/reload.md is the same table)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from activator.config.load import parse_config
from activator.config.settings import Settings
from activator.fleet.pool import over_host_memory
from activator.placement.policy import ModelView
from activator.reload.plan import Plan, describe, plan, summary, watch_refusals

ENGINE = ["python", "-m", "engine", "--port", "{port}"]
KUBE = {"namespace": "ml", "deployment": "k", "url": "http://k.ml:8000"}
BASE: dict[str, Any] = {
    "server": {"api_keys": ["client-secret-1"], "admin_api_key": "admin-secret-1"},
    "pools": {"gpu": {"gpus": 2, "host_memory": "20GiB"}},
    "models": {
        "a": {"process": {"command": ENGINE}, "aliases": ["alpha"]},
        "b": {"process": {"command": ENGINE}, "pool": "gpu"},
        "s": {
            "process": {"command": ENGINE},
            "pool": "gpu",
            "sleep": {"level": 1, "host_memory": "8GiB"},
        },
        "k": {"kubernetes": KUBE, "upstream_api_key": "engine-secret-1"},
        "p": {"process": {"command": ENGINE}, "upstream_api_key": "engine-secret-1"},
    },
}


def settings(data: dict[str, Any]) -> Settings:
    return parse_config(data, environ={})


def edited(path: str, value: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """BASE (or `data`) with the value at a dotted path set; None deletes the key."""
    data = copy.deepcopy(BASE if data is None else data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return data


def plan_for(path: str, value: Any, **kwargs: Any) -> Plan:
    return plan(settings(BASE), settings(edited(path, value)), **kwargs)


def test_the_same_config_changes_nothing() -> None:
    changes = plan(settings(BASE), settings(BASE))
    assert changes.empty and not changes.refused
    assert describe(summary(changes, pending={})) == "no changes"


# (path in the file, new value, model, keys applied at once, keys on the next start)
MODEL_ROWS = [
    ("models.a.idle_timeout", "1s", "a", ["idle_timeout"], []),
    ("models.a.startup_timeout", "5m", "a", ["startup_timeout"], []),
    ("models.a.max_queued", 3, "a", ["max_queued"], []),
    ("models.a.aliases", ["alpha", "first"], "a", ["aliases"], []),
    ("models.a.health_path", "/ready", "a", ["health_path"], []),
    ("models.a.upstream_read_timeout", "30s", "a", ["upstream_read_timeout"], []),
    ("models.a.stream_keepalive", "15s", "a", ["stream_keepalive"], []),
    ("models.b.min_residency", "1m", "b", ["min_residency"], []),
    ("models.b.drain_timeout", "10s", "b", ["drain_timeout"], []),
    ("models.b.max_wait", "1m", "b", ["max_wait"], []),
    ("models.s.sleep.timeout", "10s", "s", ["sleep.timeout"], []),
    ("models.k.upstream_api_key", "engine-secret-2", "k", ["upstream_api_key"], []),
    # What the engine is started with.
    ("models.a.process.command", [*ENGINE, "--x"], "a", [], ["process.command"]),
    ("models.a.process.env", {"CUDA_VISIBLE_DEVICES": "1"}, "a", [], ["process.env"]),
    ("models.a.process.port", 9000, "a", [], ["process.port"]),
    ("models.a.process.host", "::1", "a", [], ["process.host"]),
    ("models.a.process.cwd", "/srv", "a", [], ["process.cwd"]),
    ("models.a.process.stop_grace", "5s", "a", [], ["process.stop_grace"]),
    ("models.a.served_model_name", "a-v2", "a", [], ["served_model_name"]),
    ("models.p.upstream_api_key", "engine-secret-2", "p", [], ["upstream_api_key"]),
    ("models.k.kubernetes.url", "http://k2.ml:8000", "k", [], ["kubernetes.url"]),
    ("models.k.kubernetes.deployment", "k2", "k", [], ["kubernetes.name"]),
    ("models.s.sleep.level", 2, "s", [], ["sleep.level"]),
    ("models.s.sleep.host_memory", "9GiB", "s", [], ["sleep.host_memory"]),
    ("models.b.sleep", {"level": 2}, "b", [], ["sleep"]),
    # The pool counts an engine where it was started, with the GPUs it was started with.
    ("models.b.gpus", 2, "b", [], ["gpus"]),
    ("models.b.pool", None, "b", [], ["pool"]),
    ("models.a.pool", "gpu", "a", [], ["pool"]),
]


@pytest.mark.parametrize(("path", "value", "model", "live", "engine"), MODEL_ROWS)
def test_model_key_applies_now_or_on_next_start(
    path: str, value: Any, model: str, live: list[str], engine: list[str]
) -> None:
    changes = plan_for(path, value)
    assert not changes.refused
    assert [c.name for c in changes.changed] == [model]
    change = changes.changed[0]
    assert (list(change.live), list(change.engine), list(change.waiting)) == (live, engine, engine)
    new = settings(edited(path, value)).models[model]
    assert change.new == new
    # In force at once: everything new but the engine keys, which stay as they run.
    old = settings(BASE).models[model]
    for key in engine:
        head, _, rest = key.partition(".")
        now_value, old_value = getattr(change.now, head), getattr(old, head)
        if rest:
            now_value, old_value = getattr(now_value, rest), getattr(old_value, rest)
        assert now_value == old_value, key
    if not engine:
        assert change.now == new


def test_sleep_timeout_applies_while_its_level_waits() -> None:
    data = edited("models.s.sleep", {"level": 2, "host_memory": "8GiB", "timeout": "10s"})
    change = plan(settings(BASE), settings(data)).changed[0]
    assert (change.live, change.engine) == (("sleep.timeout",), ("sleep.level",))
    assert change.now.sleep is not None
    assert (change.now.sleep.level, change.now.sleep.timeout) == (1, 10.0)


def test_switching_a_model_to_kubernetes_waits_for_its_next_start() -> None:
    data = edited("models.a.process", None)
    data["models"]["a"]["kubernetes"] = KUBE
    change = plan(settings(BASE), settings(data)).changed[0]
    assert change.engine == ("process", "kubernetes")
    assert change.now.process is not None and change.now.kubernetes is None


def test_defaults_change_every_model_that_does_not_override_them() -> None:
    data = edited("defaults", {"idle_timeout": "2m"})
    data["models"]["b"]["idle_timeout"] = "10m"  # its own, same as the old default
    changes = plan(settings(BASE), settings(data))
    assert sorted(c.name for c in changes.changed) == ["a", "k", "p", "s"]
    assert {c.live for c in changes.changed} == {("idle_timeout",)}


def test_models_added_and_removed() -> None:
    data = edited("models.a", None)
    data["models"]["c"] = {"process": {"command": ENGINE}}
    changes = plan(settings(BASE), settings(data))
    assert [m.name for m in changes.added] == ["c"]
    assert changes.removed == ("a",)
    assert changes.changed == ()


def test_a_model_still_draining_is_not_removed_twice_and_may_come_back() -> None:
    current = settings(BASE)
    gone = settings(edited("models.a", None))
    assert plan(current, gone, retiring=frozenset({"a"})).removed == ()
    back = plan(current, current, retiring=frozenset({"a"}))
    assert [(c.name, c.revived, c.live) for c in back.changed] == [("a", True, ())]


def test_an_engine_change_still_pending_stays_pending_through_a_live_change() -> None:
    # An earlier reload changed a's command; its engine still runs the old one.
    old = settings(BASE)
    configured = settings(edited("models.a.process.command", [*ENGINE, "--x"]))
    running = {**configured.models, "a": old.models["a"]}
    data = edited(
        "models.a.idle_timeout", "1m", edited("models.a.process.command", [*ENGINE, "--x"])
    )
    change = plan(configured, settings(data), running=running).changed[0]
    assert (change.live, change.engine, change.waiting) == (
        ("idle_timeout",),
        (),
        ("process.command",),
    )
    assert change.now.process == old.models["a"].process
    assert change.now.idle_timeout == 60.0
    # The command put back as it runs: nothing waits any more.
    back = plan(configured, old, running=running).changed[0]
    assert (back.engine, back.waiting) == (("process.command",), ())
    assert back.now == old.models["a"]


POOL_ROWS = [
    ("pools.gpu.gpus", 1, {"gpu": {"gpus": [2, 1]}}),
    ("pools.gpu.host_memory", "10GiB", {"gpu": {"host_memory": [20 * 2**30, 10 * 2**30]}}),
    ("pools.new", {"gpus": 4}, {"new": "added"}),
]


@pytest.mark.parametrize(("path", "value", "pools"), POOL_ROWS)
def test_pools_added_and_resized(path: str, value: Any, pools: dict[str, Any]) -> None:
    changes = plan_for(path, value)
    assert summary(changes, pending={})["pools"] == pools


def test_a_pool_removed_with_its_models() -> None:
    data = edited("pools.gpu", None)
    for name in ("b", "s"):
        del data["models"][name]
    changes = plan(settings(BASE), settings(data))
    assert summary(changes, pending={})["pools"] == {"gpu": "removed"}
    assert set(changes.removed) == {"b", "s"}


SERVER_ROWS = [
    ("server.api_keys", ["client-secret-2"]),
    ("server.admin_api_key", "admin-secret-2"),
    ("server.max_queued_total", 10),
    ("server.body_timeout", "5s"),
    ("server.shutdown_grace", "5s"),
    ("server.access_log", "json"),
    ("server.max_body_bytes", "1MiB"),
    ("server.watch_config", True),
    ("server.watch_interval", "10s"),
]


@pytest.mark.parametrize(("path", "value"), SERVER_ROWS)
def test_server_keys_apply_at_once(path: str, value: Any) -> None:
    changes = plan_for(path, value)
    assert changes.server == (path.split(".", 1)[1],) and not changes.refused


REFUSED_ROWS = [
    ("server.port", 9999, "server.port: a new address needs a restart"),
    ("server.host", "0.0.0.0", "server.host: a new address needs a restart"),
    ("kubernetes.context", "other", "kubernetes.context: the Kubernetes connection"),
    ("kubernetes.stop_timeout", "1m", "kubernetes.stop_timeout: the Kubernetes connection"),
]


@pytest.mark.parametrize(("path", "value", "refusal"), REFUSED_ROWS)
def test_what_needs_a_restart_refuses_the_whole_reload(path: str, value: Any, refusal: str) -> None:
    data = edited("models.a.idle_timeout", "1s", edited(path, value))
    changes = plan(settings(BASE), settings(data))
    assert len(changes.refused) == 1 and changes.refused[0].startswith(refusal)
    assert changes.refused[0].endswith("nothing was reloaded")


WATCHED = edited("server.watch_config", True)
# (key, its new value (None: deleted), what the watcher refuses: the kinds named).
WATCH_ROWS = [
    ("server.api_keys", None, ["server.api_keys"]),
    ("server.api_keys", ["client-secret-2"], ["server.api_keys"]),  # replaced: dropped
    ("server.api_keys", ["client-secret-1", "client-secret-2"], []),  # added: fine
    ("server.admin_api_key", None, ["server.admin_api_key"]),
    ("server.admin_api_key", "admin-secret-2", ["server.admin_api_key"]),
    ("server.watch_config", False, ["server.watch_config"]),
    ("server.watch_config", None, ["server.watch_config"]),  # the default: off
    ("server.watch_interval", "10s", []),
    ("server", None, ["server.api_keys", "server.admin_api_key", "server.watch_config"]),
]


@pytest.mark.parametrize(("path", "value", "kinds"), WATCH_ROWS)
def test_the_watcher_never_drops_a_key_nor_turns_itself_off(
    path: str, value: Any, kinds: list[str]
) -> None:
    refused = watch_refusals(
        settings(WATCHED).server, settings(edited(path, value, WATCHED)).server
    )
    assert [r.split(":")[0] for r in refused] == kinds
    assert not any("secret" in r for r in refused)  # the kind of key, never the key


def test_a_server_without_keys_has_none_to_drop() -> None:
    open_server = edited("server.admin_api_key", None, edited("server.api_keys", None, WATCHED))
    for new in (open_server, WATCHED):  # staying open, or getting keys
        assert watch_refusals(settings(open_server).server, settings(new).server) == ()


def test_the_first_kubernetes_model_needs_a_restart() -> None:
    without = edited("models.k", None)
    with_k = settings(BASE)
    refused = plan(settings(without), with_k, kubernetes=False).refused
    assert [r.split(":")[0] for r in refused] == ["models.k.kubernetes"]
    assert plan(settings(without), with_k, kubernetes=True).refused == ()


def test_the_description_names_keys_never_values() -> None:
    data = edited("server.api_keys", ["client-secret-2"])
    data = edited("models.p.upstream_api_key", "engine-secret-2", data)
    data = edited("models.a.process.env", {"TOKEN": "env-secret"}, data)
    changes = plan(settings(BASE), settings(data))
    line = describe(summary(changes, pending={"p": ("upstream_api_key",), "a": ()}))
    assert "secret" not in line
    assert line == (
        "changed a (now: process.env); changed p (on next start: upstream_api_key); "
        "server: api_keys"
    )


# (host memory, sleepers as (name, last activity, bytes held)) -> stopped, in order
HOST_ROWS = [
    (None, [("x", 1.0, 8)], []),
    (16, [("x", 1.0, 8), ("y", 2.0, 8)], []),
    (10, [("x", 1.0, 8), ("y", 2.0, 8)], ["x"]),
    (10, [("y", 2.0, 8), ("x", 1.0, 8)], ["x"]),  # least recently used first
    (4, [("x", 1.0, 8), ("y", 2.0, 8)], ["x", "y"]),
    (8, [("x", 1.0, 8), ("ready", 0.0, 8)], ["x"]),  # an awake engine that slept before
]


@pytest.mark.parametrize(("host_memory", "models", "stopped"), HOST_ROWS)
def test_a_smaller_host_memory_stops_sleepers_least_recently_used_first(
    host_memory: int | None, models: list[tuple[str, float, int]], stopped: list[str]
) -> None:
    views = [
        ModelView(
            name=name,
            state="ready" if name == "ready" else "sleeping",
            last_activity=last,
            host_held=held,
            sleep_level=1,
        )
        for name, last, held in models
    ]
    assert over_host_memory(views, host_memory) == stopped
