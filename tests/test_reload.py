"""Config reload on a real activator (in-process, on a loopback port) with stand-in
engines as real processes: POST /admin/reload after the file was rewritten.

Engine processes are observed from outside activator (/proc), as in tests/test_pools.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from activator.app import build_app
from activator.config.load import load_config
from activator.reload import ConfigFile
from activator.ui import SESSION_COOKIE
from tests.fakekube.server import FakeKube
from tests.harness import (
    Running,
    chat,
    engine_pids,
    error_of,
    model_config,
    post,
    wait_for,
)
from tests.serve_process import run_cli

STREAMING = ("--stream-delay", "0.02")
# A stream far longer than any test (30 s at STREAMING's pace): open until the client
# closes it, so what a reload does to it is seen whatever the machine's speed.
ENDLESS = 1500


class Live:
    """A running activator and the config file it reloads."""

    def __init__(self, running: Running, path: Path, config: dict[str, Any]) -> None:
        self.running = running
        self.path = path
        self.config = config

    def edit(self) -> dict[str, Any]:
        """A copy of the config in the file, to change and `write`."""
        return copy.deepcopy(self.config)

    def write(self, config: dict[str, Any]) -> None:
        self.config = config
        self.path.write_text(yaml.safe_dump(config))

    async def reload(self) -> tuple[int, Any]:
        status, body, _ = await post(self.running, "/admin/reload", None)
        return status, body

    async def applied(self, config: dict[str, Any]) -> Any:
        """Write `config` and reload it; it must apply."""
        self.write(config)
        status, body = await self.reload()
        assert status == 200, body
        return body

    async def model(self, name: str) -> Any:
        return await self.running.admin(name)

    async def names(self) -> list[str]:
        return [m["name"] for m in (await self.running.admin())["models"]]


Start = Callable[[dict[str, Any]], Awaitable[Live]]


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Live] = []

    async def start(config: dict[str, Any]) -> Live:
        path = tmp_path / f"activator-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        app = build_app(load_config(path), config=ConfigFile(path))
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        running = Running(app=app, server=server, url=url, session=aiohttp.ClientSession())
        one = Live(running, path, config)
        started.append(one)

        async def ready() -> bool:
            async with running.session.get(url + "/readyz") as resp:
                return resp.status == 200

        await wait_for(ready, what="activator /readyz")
        return one

    yield start
    for one in reversed(started):
        await one.running.close()


def served() -> str:
    return f"reload-{uuid.uuid4().hex[:10]}"


async def ask(running: Running, model: str, **extra: Any) -> tuple[int, Any]:
    status, body, _ = await post(running, "/v1/chat/completions", chat(model, **extra))
    return status, body


async def more_events(resp: aiohttp.ClientResponse, count: int) -> None:
    """Read `count` more events of a stream: it goes on, and none is an error."""
    for _ in range(count):
        line = b""
        while not line.startswith(b"data: "):
            line = await resp.content.readline()
            assert line, "the stream ended"
        assert b'"error"' not in line and line != b"data: [DONE]\n", line


# ----- models: unchanged, added, changed ------------------------------------------------


async def test_unchanged_model_keeps_its_engine_and_open_stream_while_others_change(
    live: Start,
) -> None:
    a, b = served(), served()
    one = await live(
        {"models": {"a": model_config(a, *STREAMING), "b": model_config(b, idle_timeout="10m")}}
    )
    running = one.running
    assert (await ask(running, "a"))[0] == 200
    (pid,) = engine_pids(a)
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("a", stream=True, max_tokens=ENDLESS)
    ) as stream:
        await more_events(stream, 1)
        c = served()
        config = one.edit()
        config["models"]["b"]["idle_timeout"] = "5m"
        config["models"]["c"] = model_config(c)
        body = await one.applied(config)
        assert body["changes"]["added"] == ["c"]
        assert body["changes"]["changed"] == {
            "b": {"applied": ["idle_timeout"], "on_next_start": []}
        }
        await more_events(stream, 20)  # the same stream, not cut
    assert engine_pids(a) == [pid]
    assert (await one.model("a"))["state"] == "ready"
    # The new model serves, from zero.
    status, reply = await ask(running, "c")
    assert status == 200 and reply["model"] == c
    assert running.sample("activator_config_reloads_total", outcome="ok") == 1


async def test_changed_timeout_applies_at_once(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, idle_timeout="1h")}})
    assert (await ask(one.running, "a"))[0] == 200
    config = one.edit()
    config["models"]["a"]["idle_timeout"] = "200ms"
    await one.applied(config)
    # The model goes idle by the new timeout; with the old one it would run for an hour.
    await wait_for(lambda: state_is(one, "a", "stopped"), what="a stopped by the new idle_timeout")
    assert engine_pids(a) == []
    assert (await one.model("a"))["idle_timeout"] == 0.2


async def test_changed_aliases_and_queue_limit_apply_at_once(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, aliases=["old"])}})
    config = one.edit()
    config["models"]["a"]["aliases"] = ["new"]
    config["models"]["a"]["max_queued"] = 3
    await one.applied(config)
    assert (await ask(one.running, "new"))[0] == 200
    status, body = await ask(one.running, "old")
    assert status == 404 and error_of(body)["code"] == "model_not_found"
    assert one.running.sample("activator_queue_capacity", model="a") == 3


async def test_changed_command_waits_for_the_next_start(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a)}})
    assert (await ask(one.running, "a"))[0] == 200
    (old_pid,) = engine_pids(a)
    config = one.edit()
    config["models"]["a"]["process"]["command"] = [
        *config["models"]["a"]["process"]["command"],
        "--chunks",
        "7",
    ]
    body = await one.applied(config)
    assert body["changes"]["changed"]["a"] == {"applied": [], "on_next_start": ["process.command"]}
    described = await one.model("a")
    assert described["restart_pending"] is True
    assert described["restart_pending_keys"] == ["process.command"]
    # The engine that runs is not touched; it keeps serving.
    assert engine_pids(a) == [old_pid]
    assert (await ask(one.running, "a"))[0] == 200
    assert "--chunks" not in cmdline(old_pid)
    # Its next start uses the new command.
    status, _, _ = await post(one.running, "/admin/models/a/stop", None)
    assert status == 202
    await wait_for(lambda: state_is(one, "a", "stopped"), what="the old engine stopped")
    assert (await one.model("a"))["restart_pending"] is False
    assert (await ask(one.running, "a"))[0] == 200
    (new_pid,) = engine_pids(a)
    assert new_pid != old_pid and "--chunks" in cmdline(new_pid)


async def test_command_changed_while_stopped_applies_at_once(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a)}})
    config = one.edit()
    config["models"]["a"]["process"]["command"] = [
        *config["models"]["a"]["process"]["command"],
        "--chunks",
        "7",
    ]
    body = await one.applied(config)
    assert body["changes"]["changed"]["a"] == {"applied": ["process.command"], "on_next_start": []}
    assert (await one.model("a"))["restart_pending"] is False
    assert (await ask(one.running, "a"))[0] == 200
    (pid,) = engine_pids(a)
    assert "--chunks" in cmdline(pid)


async def state_is(one: Live, name: str, state: str) -> bool:
    return bool((await one.model(name))["state"] == state)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0")]


# ----- models removed -------------------------------------------------------------------


async def test_removed_model_serves_the_requests_held_for_its_starting_engine(
    live: Start,
) -> None:
    gone, stays = served(), served()
    one = await live(
        {
            "models": {
                "gone": model_config(gone, startup_delay=3.0),
                "stays": model_config(stays),
            }
        }
    )
    running = one.running
    held = asyncio.ensure_future(ask(running, "gone"))
    await wait_for(
        lambda: running.sample("activator_held_requests", model="gone") == 1,
        what="the request held for a starting engine",
    )
    config = one.edit()
    del config["models"]["gone"]
    body = await one.applied(config)
    assert body["changes"]["removed"] == ["gone"]
    # Accepted under the old config: answered by the engine that was coming up.
    status, reply = await held
    assert status == 200, reply
    # Then it is stopped and leaves; a new request is one for a model that is not there.
    await wait_for(lambda: not engine_pids(gone), what="the removed model's engine stopped")
    await wait_for(one.names, what="admin view")
    await wait_for(lambda: _lacks(one, "gone"), what="the removed model leaving the registry")
    status, body = await ask(running, "gone")
    assert status == 404 and error_of(body)["code"] == "model_not_found"
    assert running.sample("activator_model_state", model="gone") == 0  # its series went


async def _lacks(one: Live, name: str) -> bool:
    return name not in await one.names()


async def test_removed_model_held_for_a_gpu_gets_503_with_the_reason(live: Start) -> None:
    busy, waiting = served(), served()
    one = await live(
        {
            "pools": {"gpu": {"gpus": 1}},
            "models": {
                # Busy and inside its min_residency: nothing may evict it.
                "busy": model_config(
                    busy, *STREAMING, pool="gpu", min_residency="1h", max_wait="1h"
                ),
                "waiting": model_config(waiting, pool="gpu"),
            },
        }
    )
    running = one.running
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("busy", stream=True, max_tokens=ENDLESS)
    ) as stream:
        assert (await stream.content.readline()).startswith(b"data: ")
        held = asyncio.ensure_future(ask(running, "waiting"))
        await wait_for(
            lambda: (
                running.sample("activator_held_requests", model="waiting", reason="waiting_for_gpu")
                == 1
            ),
            what="a request held for the pool's GPU",
        )
        config = one.edit()
        del config["models"]["waiting"]
        await one.applied(config)
        status, body = await held
        assert status == 503
        error = error_of(body)
        assert error["code"] == "model_removed"
        assert "removed from activator's config" in error["message"]
        await more_events(stream, 5)  # the other model's stream goes on
    await wait_for(lambda: _lacks(one, "waiting"), what="the removed model leaving")
    assert engine_pids(waiting) == []


async def test_removed_ready_model_drains_its_stream_then_stops(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, *STREAMING), "b": model_config(served())}})
    running = one.running
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("a", stream=True, max_tokens=ENDLESS)
    ) as stream:
        await more_events(stream, 1)
        config = one.edit()
        del config["models"]["a"]
        await one.applied(config)
        # Draining: it takes no new request, and the one in flight goes on.
        (described,) = [m for m in (await running.admin())["models"] if m["name"] == "a"]
        assert (described["state"], described["removing"]) == ("draining", True)
        status, body = await ask(running, "a")
        assert status == 404 and error_of(body)["code"] == "model_not_found"
        await more_events(stream, 20)
        assert engine_pids(a) != []
    # The stream ends (its client closed it): nothing in flight, so the engine stops.
    await wait_for(lambda: not engine_pids(a), what="the removed model's engine stopped")
    await wait_for(lambda: _lacks(one, "a"), what="the removed model leaving")


async def test_model_removed_and_added_back_while_draining_is_kept(live: Start) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, *STREAMING), "b": model_config(served())}})
    running = one.running
    async with running.session.post(
        running.v1 + "/chat/completions", json=chat("a", stream=True, max_tokens=ENDLESS)
    ) as stream:
        await more_events(stream, 1)
        original = one.edit()
        config = one.edit()
        del config["models"]["a"]
        await one.applied(config)
        assert (await one.model("b"))["name"] == "b"
        body = await one.applied(original)
        assert body["changes"]["changed"]["a"]["revived"] is True
        await more_events(stream, 5)
    # Its drain completes once the stream ends; then requests start it again.
    assert (await ask(running, "a"))[0] == 200
    assert "a" in await one.names()


# ----- pools ----------------------------------------------------------------------------


class PidObserver:
    """Samples the pids of the stand-in engines alive together, from /proc, in a thread
    of its own (see tests/test_pools.py): what ran at once is a fact about processes."""

    def __init__(self, markers: set[str]) -> None:
        self._markers = markers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pid-observer", daemon=True)
        self.samples: list[frozenset[int]] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = frozenset(p for m in self._markers for p in engine_pids(m))
            if not self.samples or self.samples[-1] != alive:
                self.samples.append(alive)
            self._stop.wait(0.002)  # a sampling interval, not synchronisation

    def __enter__(self) -> PidObserver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


async def test_pool_shrunk_below_what_runs_evicts_and_never_exceeds_the_new_capacity(
    live: Start,
) -> None:
    markers = {name: served() for name in ("a", "b")}
    models = {
        name: model_config(marker, pool="gpu", min_residency="50ms", max_wait="200ms")
        for name, marker in markers.items()
    }
    one = await live({"pools": {"gpu": {"gpus": 2}}, "models": models})
    running = one.running
    for name in markers:
        assert (await ask(running, name))[0] == 200
    before = frozenset(p for m in markers.values() for p in engine_pids(m))
    assert len(before) == 2
    config = one.edit()
    config["pools"]["gpu"]["gpus"] = 1
    with PidObserver(set(markers.values())) as observer:
        await one.applied(config)
        await wait_for(
            lambda: len(observer.samples[-1]) == 1 if observer.samples else False,
            what="one engine evicted",
        )
        # Both models asked for again, over and over: they must now take turns.
        for _ in range(3):
            results = await asyncio.gather(*(ask(running, n) for n in markers))
            assert [status for status, _ in results] == [200, 200]
    samples = observer.samples
    over = [s for s in samples if len(s) > 1]
    # Over the new capacity only with the engines that ran at the reload, until one went;
    # from then on never over it.
    assert all(s <= before for s in over), samples
    last_over = max((i for i, s in enumerate(samples) if len(s) > 1), default=-1)
    assert all(len(s) <= 1 for s in samples[last_over + 1 :])
    assert all(s <= before for s in samples[: last_over + 1])
    assert running.sample("activator_pool_gpus", pool="gpu") == 1
    assert running.sample("activator_scale_events_total", direction="down", reason="capacity") == 1


async def test_running_model_moves_to_its_new_pool_when_its_engine_stops(live: Start) -> None:
    a = served()
    one = await live({"pools": {"gpu": {"gpus": 1}}, "models": {"a": model_config(a)}})
    running = one.running
    assert (await ask(running, "a"))[0] == 200
    config = one.edit()
    config["models"]["a"]["pool"] = "gpu"
    body = await one.applied(config)
    assert body["changes"]["changed"]["a"]["on_next_start"] == ["pool"]
    assert (await one.model("a"))["pool"] is None  # counted where its engine runs
    status, _, _ = await post(running, "/admin/models/a/stop", None)
    assert status == 202
    await wait_for(lambda: state_is(one, "a", "stopped"), what="the engine stopped")
    assert (await one.model("a"))["pool"] == "gpu"
    assert (await ask(running, "a"))[0] == 200
    async with running.session.get(running.url + "/admin/pools") as resp:
        (pool,) = (await resp.json())["pools"]
    assert pool["models"] == [{"name": "a", "state": "ready", "gpus": 1}]


async def test_new_pool_with_a_new_model_and_a_removed_pool(live: Start) -> None:
    a, b = served(), served()
    one = await live({"pools": {"old": {"gpus": 1}}, "models": {"a": model_config(a, pool="old")}})
    config = {"pools": {"new": {"gpus": 2}}, "models": {"b": model_config(b, pool="new")}}
    body = await one.applied(config)
    assert body["changes"]["pools"] == {"new": "added", "old": "removed"}
    assert (await ask(one.running, "b"))[0] == 200
    await wait_for(lambda: _lacks(one, "a"), what="a leaving")
    async with one.running.session.get(one.running.url + "/admin/pools") as resp:
        pools = (await resp.json())["pools"]
    assert [p["name"] for p in pools] == ["new"]
    assert one.running.sample("activator_pool_gpus", pool="old") == 0


# ----- server keys; what a reload refuses -------------------------------------------------


async def test_keys_change_at_once_and_the_status_page_follows(live: Start) -> None:
    a = served()
    server = {"api_keys": ["client-1"], "admin_api_key": "admin-1"}
    one = await live({"server": server, "models": {"a": model_config(a)}})
    running = one.running
    admin1 = {"Authorization": "Bearer admin-1"}
    # A status-page session of the first key.
    first = await login(running, "admin-1")
    assert first is not None and await page_status(running, first) == 200
    config = one.edit()
    config["server"] = {"api_keys": ["client-2"], "admin_api_key": "admin-2"}
    one.write(config)
    status, body, _ = await post(running, "/admin/reload", None, headers=admin1)
    assert status == 200 and body["changes"]["server"] == ["api_keys", "admin_api_key"]
    assert "admin-2" not in json.dumps(body)
    # The old keys are refused now; the new ones pass.
    for key, status in (("client-1", 401), ("client-2", 200)):
        got, _, _ = await post(
            running, "/v1/chat/completions", chat("a"), headers={"Authorization": f"Bearer {key}"}
        )
        assert got == status, key
    async with running.session.get(running.url + "/admin/models", headers=admin1) as resp:
        assert resp.status == 401
    async with running.session.get(
        running.url + "/admin/models", headers={"Authorization": "Bearer admin-2"}
    ) as resp:
        assert resp.status == 200
    # The page's session was for the old key: back to the login form, which takes the new.
    assert await page_status(running, first) == 303
    assert await login(running, "admin-1") is None
    second = await login(running, "admin-2")
    assert second is not None and await page_status(running, second) == 200


async def test_a_session_of_a_key_stays_ended_when_that_key_comes_back(live: Start) -> None:
    a = served()
    one = await live({"server": {"admin_api_key": "admin-1"}, "models": {"a": model_config(a)}})
    running = one.running
    first = await login(running, "admin-1")
    assert first is not None and await page_status(running, first) == 200
    for old, new in (("admin-1", "admin-2"), ("admin-2", "admin-1")):
        config = one.edit()
        config["server"] = {"admin_api_key": new}
        one.write(config)
        status, _, _ = await post(
            running, "/admin/reload", None, headers={"Authorization": f"Bearer {old}"}
        )
        assert status == 200
    # admin-1 is in force again, but the session opened with it before ended with it.
    assert await page_status(running, first) == 303
    again = await login(running, "admin-1")
    assert again is not None and await page_status(running, again) == 200


async def login(running: Running, key: str) -> str | None:
    """The status page's session cookie for `key`, or None if the login is refused."""
    async with running.session.post(
        running.url + "/ui/login", data={"key": key}, allow_redirects=False
    ) as resp:
        return resp.cookies[SESSION_COOKIE].value if resp.status == 303 else None


async def page_status(running: Running, cookie: str) -> int:
    async with running.session.get(
        running.url + "/ui",
        headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
        allow_redirects=False,
    ) as resp:
        return resp.status


async def test_invalid_file_changes_nothing_and_answers_the_check_config_problems(
    live: Start,
) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, idle_timeout="1h")}})
    running = one.running
    hash_before = config_hash(running)
    config = one.edit()
    config["models"]["a"]["idle_timeout"] = "soon"
    config["models"]["a"]["idle_timout"] = "1s"
    config["models"]["b"] = model_config(served())
    one.write(config)
    status, body = await one.reload()
    assert status == 400
    error = error_of(body)
    assert error["code"] == "invalid_config"
    code, _, err = await run_cli("check-config", str(one.path))
    assert code == 1
    assert error["problems"] == err.splitlines()
    assert len(error["problems"]) == 2
    # Nothing changed.
    assert await one.names() == ["a"]
    assert (await one.model("a"))["idle_timeout"] == 3600
    assert running.sample("activator_config_reloads_total", outcome="invalid") == 1
    assert running.sample("activator_config_reloads_total", outcome="ok") == 0
    assert config_hash(running) == hash_before
    # An unreadable file too.
    one.path.write_bytes(b"models: [\n")
    status, body = await one.reload()
    assert status == 400 and "invalid YAML" in error_of(body)["problems"][0]


def config_hash(running: Running) -> str:
    (sample,) = [
        s
        for family in running.metrics.registry.collect()
        for s in family.samples
        if s.name == "activator_config_info"
    ]
    return sample.labels["hash"]


@pytest.mark.parametrize(("key", "value"), [("port", 1), ("host", "127.0.0.2")])
async def test_a_new_listener_is_refused_and_nothing_else_applies(
    live: Start, key: str, value: Any
) -> None:
    a = served()
    one = await live({"models": {"a": model_config(a, idle_timeout="1h")}})
    config = one.edit()
    config["server"] = {key: value}
    config["models"]["a"]["idle_timeout"] = "1s"
    config["models"]["b"] = model_config(served())
    one.write(config)
    status, body = await one.reload()
    assert status == 409
    error = error_of(body)
    assert error["code"] == "reload_refused"
    (problem,) = error["problems"]
    assert problem.startswith(f"server.{key}: a new address needs a restart")
    assert await one.names() == ["a"]
    assert (await one.model("a"))["idle_timeout"] == 3600
    assert one.running.sample("activator_config_reloads_total", outcome="refused") == 1


async def test_an_app_built_without_a_file_refuses_reloads(live: Start) -> None:
    del live  # the harness's activator: settings from code
    from tests.harness import start_activator

    running = await start_activator({"models": {"a": model_config(served())}})
    try:
        status, body, _ = await post(running, "/admin/reload", None)
        assert status == 409
        assert "without a config file" in error_of(body)["message"]
    finally:
        await running.close()


# ----- Kubernetes -----------------------------------------------------------------------


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    """Requested before `live`: the cluster outlives the activator."""
    async with FakeKube(gpus=1) as fake:
        yield fake


async def test_kubernetes_target_changed_while_ready_moves_on_its_next_start(
    kube: FakeKube, live: Start
) -> None:
    def target(name: str) -> dict[str, Any]:
        workload = kube.add_workload(name, served_model_name="coder-served", gpu=True)
        return {"namespace": "serving", "deployment": name, "url": workload.url}

    model = {"kubernetes": target("coder"), "served_model_name": "coder-served"}
    one = await live(
        {
            "kubernetes": {"kubeconfig": kube.kubeconfig, "request_timeout": "5s"},
            "models": {"coder": {**model, "startup_timeout": "60s"}},
        }
    )
    assert (await ask(one.running, "coder"))[0] == 200
    assert kube.replicas("coder") == 1
    config = one.edit()
    config["models"]["coder"]["kubernetes"] = target("coder-v2")
    config["models"]["coder"]["upstream_api_key"] = "engine-key"
    body = await one.applied(config)
    assert body["changes"]["changed"]["coder"] == {
        "applied": ["upstream_api_key"],
        "on_next_start": ["kubernetes.name", "kubernetes.url"],
    }
    assert (await one.model("coder"))["restart_pending_keys"] == [
        "kubernetes.name",
        "kubernetes.url",
    ]
    assert kube.replicas("coder") == 1 and kube.replicas("coder-v2") == 0
    status, _, _ = await post(one.running, "/admin/models/coder/stop", None)
    assert status == 202
    await wait_for(lambda: state_is(one, "coder", "stopped"), what="the old Deployment stopped")
    assert kube.replicas("coder") == 0
    assert (await ask(one.running, "coder"))[0] == 200
    assert kube.replicas("coder-v2") == 1 and kube.replicas("coder") == 0
    assert (await one.model("coder"))["restart_pending"] is False


async def test_the_first_kubernetes_model_is_refused_without_a_connection(live: Start) -> None:
    one = await live({"models": {"a": model_config(served())}})
    config = one.edit()
    config["models"]["k"] = {
        "kubernetes": {"namespace": "ml", "deployment": "k", "url": "http://k.ml:8000"}
    }
    one.write(config)
    status, body = await one.reload()
    assert status == 409
    (problem,) = error_of(body)["problems"]
    assert problem.startswith("models.k.kubernetes: activator connected to no Kubernetes API")
    assert await one.names() == ["a"]
