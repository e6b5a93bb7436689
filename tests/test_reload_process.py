"""Reload triggers of a real `activator serve` process: SIGHUP, and `server.watch_config`
following the file through each way it gets replaced (a Kubernetes ConfigMap's symlink
swap, an editor's rename over it, a write in place)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.harness import engine_pids, model_config, wait_for
from tests.serve_process import Served, free_port, serving_file


def serve(
    config_path: Path, config: dict[str, Any], *, log: Path, engines: list[str]
) -> contextlib.AbstractAsyncContextManager[Served]:
    """`activator serve --config config_path` (which holds `config`) until ready."""
    url = f"http://127.0.0.1:{config['server']['port']}"
    return serving_file(config_path, url=url, log=log, engines=engines)


async def get(served: Served, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(served.url + path) as resp:
        assert resp.status == 200, path
        return await (resp.json() if path.startswith("/admin") else resp.text())


async def model_names(served: Served) -> list[str]:
    return [m["name"] for m in (await get(served, "/admin/models"))["models"]]


async def sample(served: Served, line_start: str) -> float:
    text = await get(served, "/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def base_config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": free_port(), **server},
        "models": {"a": model_config(f"reload-{uuid.uuid4().hex[:10]}")},
    }


def with_model(config: dict[str, Any], name: str) -> dict[str, Any]:
    models = {**config["models"], name: model_config(f"reload-{uuid.uuid4().hex[:10]}")}
    return {**config, "models": models}


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


async def test_sighup_reloads_and_the_running_engine_is_untouched(tmp_path: Path) -> None:
    config = base_config()
    marker = config["models"]["a"]["served_model_name"]
    path = tmp_path / "activator.yaml"
    path.write_text(yaml.safe_dump(config))
    async with serve(path, config, log=tmp_path / "activator.log", engines=[marker]) as served:
        async with aiohttp.ClientSession() as session:
            body = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(served.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        (pid,) = engine_pids(marker)
        path.write_text(yaml.safe_dump(with_model(config, "b")))
        served.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: _has(served, "b"), what="model b added on SIGHUP")
        assert engine_pids(marker) == [pid]
        assert await sample(served, 'activator_config_reloads_total{outcome="ok"}') == 1
        assert await sample(served, f'activator_config_info{{hash="{short_hash(path)}"}}') == 1
        # An invalid file: logged as check-config words it, and nothing changes.
        path.write_text(yaml.safe_dump({**config, "models": {"a": {"idle_timeout": "soon"}}}))
        served.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: _reloads(served, "invalid", 1), what="the invalid reload counted")
        assert served.process.returncode is None
        assert await model_names(served) == ["a", "b"]
        assert engine_pids(marker) == [pid]
    log = served.output()
    assert "config reload (sighup, " in log and "added b" in log
    assert f"{path}: models.a.idle_timeout: expected a duration like" in log
    assert f"{path}: models.a: needs exactly one of process or kubernetes" in log


async def _has(served: Served, name: str) -> bool:
    return name in await model_names(served)


async def _reloads(served: Served, outcome: str, count: int) -> bool:
    return await sample(served, f'activator_config_reloads_total{{outcome="{outcome}"}}') == count


# ----- the watcher: each way a file gets replaced -----------------------------------------


class ConfigMapVolume:
    """A Kubernetes ConfigMap volume as the kubelet lays it out: `config.yaml` ->
    `..data/config.yaml`, `..data` -> `..<timestamp>/`; an update writes a new timestamped
    directory, points a new symlink at it and renames that over `..data` (atomic), then
    deletes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        self.path = root / "config.yaml"

    def write(self, config: dict[str, Any]) -> None:
        self.version += 1
        new = self.root / f"..2024_01_01_00_00_0{self.version}"
        new.mkdir()
        (new / "config.yaml").write_text(yaml.safe_dump(config))
        data = self.root / "..data"
        old = data.resolve() if data.exists() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(new.name)
        os.replace(tmp, data)
        if old is not None:
            shutil.rmtree(old)
        if not self.path.is_symlink():
            self.path.symlink_to(Path("..data") / "config.yaml")


def rename_over(path: Path) -> Callable[[dict[str, Any]], None]:
    """An editor's save: a new file, renamed over the old one."""

    def write(config: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.swp")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, path)

    return write


def in_place(path: Path) -> Callable[[dict[str, Any]], None]:
    """`cat new > config.yaml`: the same inode, truncated and written."""

    def write(config: dict[str, Any]) -> None:
        with path.open("r+") as stream:
            stream.truncate(0)
            stream.write(yaml.safe_dump(config))

    return write


WAYS = ["configmap_symlink_swap", "rename_over", "in_place"]


@pytest.mark.parametrize("way", WAYS)
async def test_watch_config_follows_the_file_however_it_is_replaced(
    tmp_path: Path, way: str
) -> None:
    config = base_config(watch_config=True, watch_interval="50ms")
    if way == "configmap_symlink_swap":
        volume = ConfigMapVolume(tmp_path)
        path, write = volume.path, volume.write
    else:
        path = tmp_path / "config.yaml"
        path.write_text("")
        write = rename_over(path) if way == "rename_over" else in_place(path)
    write(config)
    async with serve(path, config, log=tmp_path / "activator.log", engines=[]) as served:
        if way != "in_place":
            write(config)  # the same content, replaced: not a change
        # Two changes in turn: the watcher keeps following after the first replacement.
        write(with_model(config, "b"))
        await wait_for(lambda: _has(served, "b"), what=f"model b seen after a {way}")
        if way != "in_place":
            assert await _reloads(served, "ok", 1)
        write(with_model(with_model(config, "b"), "c"))
        await wait_for(lambda: _has(served, "c"), what=f"model c seen after a second {way}")
        await wait_for(
            lambda: sample(served, f'activator_config_info{{hash="{short_hash(path)}"}}'),
            what="the config hash of the last content",
        )
        assert await model_names(served) == ["a", "b", "c"]


async def test_watch_config_turned_on_by_a_reload(tmp_path: Path) -> None:
    config = base_config()
    path = tmp_path / "activator.yaml"
    path.write_text(yaml.safe_dump(config))
    async with serve(path, config, log=tmp_path / "activator.log", engines=[]) as served:
        watching = {**config, "server": {**config["server"], "watch_config": True}}
        watching["server"]["watch_interval"] = "50ms"
        path.write_text(yaml.safe_dump(watching))
        served.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: _reloads(served, "ok", 1), what="the SIGHUP reload")
        path.write_text(yaml.safe_dump(with_model(watching, "b")))
        await wait_for(lambda: _has(served, "b"), what="the watcher, on since the reload")
