"""`server.watch_config` against files read half-way through a write (issue: a valid
prefix without its `server:` block opened the doors and turned the watcher off; a slow
rewrite of the shipped layout removed and re-added a model). Real `activator serve`
processes, files written as people and tools write them."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.harness import engine_pids, model_config, wait_for
from tests.serve_process import Served, free_port, serving_file
from tests.test_reload_process import rename_over, sample, serve

# The shipped demo config: its layout (the server block first, then models of several
# lines each) decides which prefixes of it are valid configs.
SHIPPED = Path(__file__).resolve().parent.parent / "config" / "local.yaml"
WATCH_INTERVAL = 0.2  # the issue's: a slow writer's 0.1 s per line is two steps per read
WRITER_PACE = 0.1


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def status_of(served: Served, path: str, *, key: str | None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(served.url + path, headers=auth(key)) as resp,
    ):
        return resp.status


async def names(served: Served, *, key: str | None = None) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(served.url + "/admin/models", headers=auth(key)) as resp,
    ):
        assert resp.status == 200
        return [m["name"] for m in (await resp.json())["models"]]


def reloads(served: Served, outcome: str) -> Callable[[], Any]:
    async def count() -> float:
        return await sample(served, f'activator_config_reloads_total{{outcome="{outcome}"}}')

    return count


def reached(served: Served, outcome: str, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        return await reloads(served, outcome)() == count

    return check


# ----- defect 1: a valid prefix without the server block ----------------------------------


async def test_half_written_file_keeps_the_keys_and_the_watcher_and_the_whole_file_applies(
    tmp_path: Path,
) -> None:
    """The issue's reproduction: `server:` after `models:`, rewritten in place in two
    writes. The first write is a valid config with no keys and no watch_config (the
    address comes from the command line, so the prefix needs no restart either)."""
    client, admin = f"client-{uuid.uuid4().hex}", f"admin-{uuid.uuid4().hex}"
    a, b = f"reload-{uuid.uuid4().hex[:10]}", f"reload-{uuid.uuid4().hex[:10]}"
    port = free_port()
    server = {
        "api_keys": [client],
        "admin_api_key": admin,
        "watch_config": True,
        "watch_interval": "50ms",
    }

    def text(models: dict[str, Any]) -> str:
        return yaml.safe_dump({"models": models}) + yaml.safe_dump({"server": server})

    path = tmp_path / "activator.yaml"
    path.write_text(text({"a": model_config(a)}))
    async with serving_file(
        path,
        url=f"http://127.0.0.1:{port}",
        log=tmp_path / "activator.log",
        engines=[a, b],
        args=["--host", "127.0.0.1", "--port", str(port)],
    ) as served:
        whole = text({"a": model_config(a), "b": model_config(b)})
        models_part, server_part = whole.split("server:\n", 1)
        with path.open("r+") as stream:
            stream.truncate(0)
            stream.write(models_part)
            stream.flush()
            # The first half holds still: the watcher reads it (twice) and refuses it.
            await wait_for(reached(served, "refused", 1), what="the first half refused")
            assert await status_of(served, "/admin/models", key=None) == 401
            assert await status_of(served, "/v1/models", key=None) == 401
            assert await status_of(served, "/v1/models", key=admin) == 401
            assert await status_of(served, "/v1/models", key=client) == 200
            assert await names(served, key=admin) == ["a"]
            stream.write("server:\n" + server_part)
        # The watcher still watches: the finished file applies.
        await wait_for(
            lambda: _has(served, "b", key=admin), what="the finished file applied by the watcher"
        )
        assert await status_of(served, "/admin/models", key=None) == 401
        assert await status_of(served, "/v1/models", key=None) == 401
        assert await reloads(served, "ok")() == 1
    log = served.output()
    assert "server.api_keys: the file drops a client API key in force" in log
    assert "server.admin_api_key: the file drops the admin key in force" in log
    assert "server.watch_config: the watcher never turns itself off" in log
    assert client not in log and admin not in log


async def _has(served: Served, name: str, *, key: str | None = None) -> bool:
    return name in await names(served, key=key)


# ----- keys and watch_config: the watcher may not, SIGHUP and the admin API may -----------


async def test_watcher_refuses_to_drop_keys_that_sighup_and_admin_reload_drop(
    tmp_path: Path,
) -> None:
    old_client, kept_client = f"client-{uuid.uuid4().hex}", f"client-{uuid.uuid4().hex}"
    old_admin, new_admin = f"admin-{uuid.uuid4().hex}", f"admin-{uuid.uuid4().hex}"
    a = f"reload-{uuid.uuid4().hex[:10]}"
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": free_port(),
            "api_keys": [old_client, kept_client],
            "admin_api_key": old_admin,
            "watch_config": True,
            "watch_interval": "50ms",
        },
        "models": {"a": model_config(a)},
    }
    path = tmp_path / "activator.yaml"
    write = rename_over(path)  # whole files: only the rule under test is at work
    write(config)

    def with_server(**keys: Any) -> dict[str, Any]:
        nonlocal config
        config = {**config, "server": {**config["server"], **keys}}
        return config

    async with serve(path, config, log=tmp_path / "activator.log", engines=[a]) as served:
        # A client key dropped: refused from the watcher, applied by SIGHUP.
        write(with_server(api_keys=[kept_client]))
        await wait_for(reached(served, "refused", 1), what="the watcher's refusal")
        assert await status_of(served, "/v1/models", key=old_client) == 200
        served.process.send_signal(signal.SIGHUP)
        await wait_for(reached(served, "ok", 1), what="the SIGHUP reload")
        assert await status_of(served, "/v1/models", key=old_client) == 401
        assert await status_of(served, "/v1/models", key=kept_client) == 200
        # The admin key replaced: refused from the watcher, applied by POST /admin/reload.
        write(with_server(admin_api_key=new_admin))
        await wait_for(reached(served, "refused", 2), what="the watcher's second refusal")
        assert await status_of(served, "/admin/models", key=old_admin) == 200
        async with (
            aiohttp.ClientSession() as session,
            session.post(served.url + "/admin/reload", headers=auth(old_admin)) as resp,
        ):
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["changes"]["server"] == ["admin_api_key"]
        assert await status_of(served, "/admin/models", key=old_admin) == 401
        assert await status_of(served, "/admin/models", key=new_admin) == 200
        # Adding a key is no drop: the watcher applies it.
        added = f"client-{uuid.uuid4().hex}"
        write(with_server(api_keys=[kept_client, added]))
        await wait_for(reached(served, "ok", 3), what="the watcher adding a key")
        assert await status_of(served, "/v1/models", key=added) == 200
    log = served.output()
    assert "server.api_keys: the file drops a client API key in force" in log
    assert "server.admin_api_key: the file drops the admin key in force" in log
    for key in (old_client, kept_client, old_admin, new_admin, added):
        assert key not in log


async def test_watcher_never_turns_watch_config_off_and_keeps_watching(tmp_path: Path) -> None:
    a = f"reload-{uuid.uuid4().hex[:10]}"
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": free_port(),
            "watch_config": True,
            "watch_interval": "50ms",
        },
        "models": {"a": model_config(a)},
    }
    path = tmp_path / "activator.yaml"
    write = rename_over(path)
    write(config)

    def edited(*, watch: bool, model: str) -> dict[str, Any]:
        server = {**config["server"], "watch_config": watch}
        return {"server": server, "models": {**config["models"], model: model_config(model)}}

    async with serve(path, config, log=tmp_path / "activator.log", engines=[a]) as served:
        write(edited(watch=False, model="b"))
        await wait_for(reached(served, "refused", 1), what="the watcher's refusal")
        assert await names(served) == ["a"]
        # Still watching: the next change applies.
        write(edited(watch=True, model="c"))
        await wait_for(lambda: _has(served, "c"), what="model c, by the watcher still on")
        # SIGHUP may turn it off.
        write(edited(watch=False, model="c"))
        served.process.send_signal(signal.SIGHUP)
        await wait_for(reached(served, "ok", 2), what="the SIGHUP reload")
    assert "server.watch_config: the watcher never turns itself off" in served.output()


# ----- defect 2: slow writers and the shipped layout --------------------------------------


def shipped_layout(*, port: int, marker: str) -> tuple[str, str]:
    """config/local.yaml as shipped, watched, on `port`, its engines marked (for cleanup)
    and quick to start; and the same file with demo-chat's idle_timeout changed (the
    rewrite: its application is the event the test waits for)."""
    text = SHIPPED.read_text()
    replacements = [
        ("  port: 8080\n", f"  port: {port}\n  watch_config: true\n  watch_interval: 200ms\n"),
        ('--startup-delay, "3"]', f'--startup-delay, "0.2", --disable-endpoint, {marker}]'),
    ]
    for old, new in replacements:
        assert old in text, f"config/local.yaml changed: {old!r} not found"
        text = text.replace(old, new)
    assert text.count("idle_timeout: 2m\n") == 1
    return text, text.replace("idle_timeout: 2m\n", "idle_timeout: 3m\n")


def line_by_line(path: Path, text: str) -> float:
    """Rewrite in place, one line per WRITER_PACE (the file is truncated as it opens).
    Returns the longest any partial content stood."""
    with path.open("w") as stream:
        return _paced(stream.write, stream.flush, text.splitlines(keepends=True))


def truncate_then_write(path: Path, text: str) -> float:
    """`: > file` then a slow `cat`: emptied first, then small blocks that mostly end
    mid-line (20 bytes: a few of the prefixes in a row are valid configs without
    demo-chat, so the previous watcher could not miss them)."""
    data = text.encode()
    with path.open("r+b") as stream:
        stream.truncate(0)
        stream.flush()
        blocks = [b"", *(data[i : i + 20] for i in range(0, len(data), 20))]
        return _paced(stream.write, stream.flush, blocks)


def _paced(write: Callable[[Any], Any], flush: Callable[[], None], parts: list[Any]) -> float:
    longest, last = 0.0, time.monotonic()
    for part in parts:
        time.sleep(WRITER_PACE)  # the writer's pace, the scenario itself
        write(part)
        flush()
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest


WRITERS = {"line_by_line": line_by_line, "truncate_then_write": truncate_then_write}


@pytest.mark.parametrize("way", sorted(WRITERS))
async def test_slow_rewrite_of_the_shipped_layout_removes_nothing_and_restarts_nothing(
    tmp_path: Path, way: str
) -> None:
    marker = f"reload-{uuid.uuid4().hex[:10]}"
    port = free_port()
    before, after = shipped_layout(port=port, marker=marker)
    path = tmp_path / "local.yaml"
    path.write_text(before)
    config = {"server": {"port": port}}
    async with serve(path, config, log=tmp_path / "activator.log", engines=[marker]) as served:
        statuses: dict[str, list[int]] = {"demo-small": [], "chat": []}
        async with aiohttp.ClientSession() as session:

            async def ask(model: str) -> None:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                url = served.url + "/v1/chat/completions"
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    statuses[model].append(resp.status)

            for model in statuses:
                await ask(model)
            pids = sorted(engine_pids(marker))
            assert len(pids) == 2

            done = threading.Event()

            def rewrite() -> float:
                try:
                    return WRITERS[way](path, after)
                finally:
                    done.set()

            writer = asyncio.create_task(asyncio.to_thread(rewrite))
            while not done.is_set():  # requests all through the rewrite
                for model in statuses:
                    await ask(model)
            longest = await writer
            await wait_for(
                lambda: _idle_timeout(served, "demo-chat", 180.0),
                what="the finished file applied",
            )
            for model in statuses:
                await ask(model)
        log = served.output()
        applied = re.findall(r" INFO [\w.]+: config reload \(watch, \w+\): (.*)", log)
        if longest >= WATCH_INTERVAL and applied != ["changed demo-chat (now: idle_timeout)"]:
            pytest.skip(f"the writer stalled for {longest:.2f}s: a pause that long looks done")
        assert applied == ["changed demo-chat (now: idle_timeout)"], log
        assert all(s == 200 for s in statuses["demo-small"] + statuses["chat"]), statuses
        assert sorted(engine_pids(marker)) == pids
        assert await reloads(served, "ok")() == 1
    assert "removed demo" not in log and "added demo" not in log


async def _idle_timeout(served: Served, name: str, seconds: float) -> bool:
    async with aiohttp.ClientSession() as session, session.get(served.url + "/admin/models") as r:
        models = {m["name"]: m for m in (await r.json())["models"]}
    return name in models and models[name]["idle_timeout"] == seconds
