"""The command line, run as real subprocesses: `serve`, `check-config` and `status`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml

from activator.cli import embedded_config, lock_path
from tests.conftest import USER_RUNTIME_DIR
from tests.harness import chat, model_config, unique, wait_for
from tests.serve_process import (
    PROCESS_WAIT_S,
    Served,
    free_port,
    run_cli,
    serving,
    serving_file,
    until_ready,
)
from tests.streams import open_stream

ADMIN_KEY_ENV = "ACTIVATOR_ADMIN_KEY"  # documented in the README: a contract, not a detail

GOOD_CONFIG = """\
server: {host: 127.0.0.1, port: 8080}
defaults: {idle_timeout: 10m}
models:
  qwen:
    aliases: [q]
    process:
      command: [python, -m, activator.testing.fake_engine, --port, "{port}"]
"""

# Five problems in five places; each must be reported on its own line, by key path.
BAD_CONFIG = """\
server: {host: 127.0.0.1, port: not-a-port}
defaults: {idle_timeout: 10m}
models:
  qwen:
    idle_timeout: soon
    aliases: [q]
    process:
      port: 0
  other:
    process:
      command: [python, -m, activator.testing.fake_engine, --port, "{port}"]
      stop_grac: 5s
surprise: true
"""


async def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_CONFIG)
    code, out, err = await run_cli("check-config", str(path))
    assert (code, err) == (0, "")
    assert out.strip() == f"{path}: ok (1 model, 0 pools)"


async def test_check_config_counts_in_words_that_agree(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    config = yaml.safe_load(GOOD_CONFIG)
    config["pools"] = {"l4": {"gpus": 1}}
    config["models"]["other"] = {**config["models"]["qwen"], "aliases": [], "pool": "l4"}
    path.write_text(yaml.safe_dump(config))
    code, out, err = await run_cli("check-config", str(path))
    assert (code, err) == (0, "")
    assert out.strip() == f"{path}: ok (2 models, 1 pool)"


async def test_check_config_prints_one_line_per_problem_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    code, out, err = await run_cli("check-config", str(path))
    assert code != 0
    assert out == ""
    lines = err.splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), err  # the file, then the key
    by_key = {line.removeprefix(f"{path}: ").split(": ", 1)[0]: line for line in lines}
    keys = sorted(by_key)
    assert keys == [
        "models.other.process.stop_grac",
        "models.qwen.idle_timeout",
        "models.qwen.process.command",
        "server.port",
        "surprise",
    ], err
    assert len(lines) == len(keys)
    assert "expected a duration like 10m" in by_key["models.qwen.idle_timeout"]
    assert "did you mean stop_grace" in by_key["models.other.process.stop_grac"]


async def test_check_config_reports_yaml_errors_with_their_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  qwen: [unclosed\n")
    code, _, err = await run_cli("check-config", str(path))
    assert code != 0
    [line] = err.splitlines()
    assert line.startswith(f"{path}:") and "invalid YAML" in line


async def test_status_prints_the_model_table_of_a_running_activator(tmp_path: Path) -> None:
    woken, cold = unique("status-a"), unique("status-b")
    config = {
        "server": {"admin_api_key": "adm"},
        "models": {
            "alpha": model_config(woken, startup_delay=0.1),
            "beta": model_config(cold, startup_delay=0.1),
        },
    }
    async with serving(config, workdir=tmp_path, engines=[woken, cold]) as served:
        async with (
            aiohttp.ClientSession() as session,
            session.post(served.url + "/v1/chat/completions", json=chat("alpha")) as resp,
        ):
            assert resp.status == 200
        code, out, err = await run_cli("status", "--url", served.url, "--admin-key", "adm")
        assert (code, err) == (0, "")
        header, *rows = out.splitlines()
        assert header.split() == ["MODEL", "STATE", "IN", "FLIGHT", "QUEUED", "LAST", "WAKE",
                                  "GPU-H", "COST", "POOL", "LAST", "ERROR"]  # fmt: skip
        table = {row.split()[0]: row.split()[1:] for row in rows}
        assert table["alpha"][:3] == ["ready", "0", "0"]
        assert table["alpha"][3].endswith("s")  # the last wake's duration
        assert float(table["alpha"][4]) > 0  # GPU-hours, not rounded to 0
        assert table["alpha"][5] == "-"  # no prices
        assert table["beta"] == ["stopped", "0", "0", "-", "0", "-", "-"]

        code, out, _ = await run_cli("status", "--url", served.url, "--admin-key", "adm", "--json")
        assert code == 0
        assert [m["name"] for m in json.loads(out)["models"]] == ["alpha", "beta"]


async def test_status_says_how_to_pass_the_admin_key_and_never_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    config = {
        "server": {"admin_api_key": "s3cret-adm"},
        "models": {"alpha": model_config(unique("status-key"))},
    }
    async with serving(config, workdir=tmp_path, engines=[]) as served:
        code, out, err = await run_cli("status", "--url", served.url)
        assert (code, out) == (1, "")
        [line] = err.splitlines()
        assert "HTTP Error" not in line
        assert "admin key" in line and "--admin-key" in line and ADMIN_KEY_ENV in line

        code, out, err = await run_cli("status", "--url", served.url, "--admin-key", "wrong-key")
        assert (code, out) == (1, "")
        [line] = err.splitlines()
        assert "--admin-key" in line and "does not match" in line
        assert "wrong-key" not in line and "s3cret" not in line

        monkeypatch.setenv(ADMIN_KEY_ENV, "s3cret-adm")  # the subprocess inherits it
        code, out, err = await run_cli("status", "--url", served.url)
        assert (code, err) == (0, "")
        assert out.splitlines()[1].split()[:2] == ["alpha", "stopped"]
    assert "s3cret" not in served.output()


async def test_status_shows_one_model_by_name_or_alias(tmp_path: Path) -> None:
    config = {
        "models": {
            "demo-small": {**model_config(unique("status-one")), "aliases": ["small"]},
            "chat": model_config(unique("status-one")),
        }
    }
    async with serving(config, workdir=tmp_path, engines=[]) as served:
        for name in ("demo-small", "small"):
            code, out, err = await run_cli("status", name, "--url", served.url)
            assert (code, err) == (0, ""), name
            header, *rows = out.splitlines()
            assert header.split()[:2] == ["MODEL", "STATE"]
            assert [row.split()[:2] for row in rows] == [["demo-small", "stopped"]], name

        code, out, _ = await run_cli("status", "small", "--url", served.url, "--json")
        assert (code, json.loads(out)["name"]) == (0, "demo-small")

        code, out, err = await run_cli("status", "nope", "--url", served.url)
        assert (code, out) == (1, "")
        [line] = err.splitlines()
        assert "404" in line and "available: chat, demo-small, small" in line


async def test_status_against_nothing_says_nothing_answers_there_in_one_line() -> None:
    code, out, err = await run_cli("status", "--url", "http://127.0.0.1:9")
    assert code != 0
    assert out == ""
    [line] = err.splitlines()
    assert line == (
        "activator status: nothing answers at http://127.0.0.1:9 (connection refused); "
        "is `activator serve` running there? (another address: --url URL)"
    )


async def test_status_shows_what_a_reload_left_pending_and_costs_under_a_cent(
    tmp_path: Path,
) -> None:
    """After a reload, `chat` (running) waits for its next start to take its new command,
    and `old` (removed) drains a stream before it goes: the table says both. A short
    run of a priced model costs less than a cent, and says so rather than $0.00."""
    chat_name, old_name = unique("status-chat"), unique("status-old")
    config = {
        "models": {
            "chat": model_config(chat_name, cost={"gpu_hour": 1.0}),
            "old": model_config(old_name, "--stream-delay", "0.1", drain_timeout="5m"),
        }
    }
    async with (
        serving(config, workdir=tmp_path, engines=[chat_name, old_name]) as served,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(served.url + "/v1/chat/completions", json=chat("chat")) as resp:
            assert resp.status == 200
        stream = open_stream(session, served.url + "/v1/chat/completions", "old", tokens=2000)
        try:
            await stream.started()
            path = tmp_path / "activator.yaml"
            changed = yaml.safe_load(path.read_text())
            changed["models"]["chat"]["process"]["command"].append("--disable-access-log")
            del changed["models"]["old"]
            path.write_text(yaml.safe_dump(changed))
            async with session.post(served.url + "/admin/reload") as resp:
                assert resp.status == 200, await resp.text()
            code, out, err = await run_cli("status", "--url", served.url)
        finally:
            await stream.cancel()
    assert (code, err) == (0, "")
    rows = {row.split()[0]: row for row in out.splitlines()[1:]}
    assert " ready (restart pending) " in rows["chat"]
    assert " (removing) " in rows["old"]
    assert " < $0.01 " in rows["chat"]


async def test_console_script_and_module_are_the_same_cli() -> None:
    script = Path(sys.executable).parent / "activator"
    assert script.exists(), "the package installs an `activator` console script"
    by_script = await run_cli("--version", program=[str(script)])
    by_module = await run_cli("--version")
    assert by_script == by_module
    assert by_module[0] == 0 and by_module[1].startswith("activator ")


@contextmanager
def port_in_use() -> Iterator[int]:
    """A loopback port another server listens on (as a first `activator serve` would)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port: int = taken.getsockname()[1]
        yield port


def serve_config(tmp_path: Path, *, host: str, port: int) -> Path:
    path = tmp_path / "local.yaml"
    config = {"server": {"host": host, "port": port}, "models": {"m": model_config(unique("p"))}}
    path.write_text(yaml.safe_dump(config))
    return path


async def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with port_in_use() as port:
        path = serve_config(tmp_path, host="127.0.0.1", port=port)
        code, out, err = await run_cli("serve", "--config", str(path))
    assert code != 0
    assert out == ""
    [line] = err.splitlines()  # no traceback, no "serving" line before it
    assert f"127.0.0.1:{port} is already in use" in line
    assert f"--port N or server.port in {path}" in line


@contextmanager
def demo_running(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The embedded demo's lock held where the user's own `activator serve` (the README's
    first command, left running) holds it; already held if such a demo runs now."""
    with monkeypatch.context() as patch:
        if USER_RUNTIME_DIR is None:
            patch.delenv("XDG_RUNTIME_DIR")
        else:
            patch.setenv("XDG_RUNTIME_DIR", USER_RUNTIME_DIR)
        path = lock_path(str(embedded_config()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with contextlib.suppress(BlockingIOError):  # a demo runs: it holds it already
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


async def test_serve_port_flag_on_a_port_in_use_says_so_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Beside a running demo: the suite's servers take their locks in its own runtime dir.
    with demo_running(monkeypatch), port_in_use() as port:
        code, out, err = await run_cli("serve", "--port", str(port))  # the embedded demo
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert f"127.0.0.1:{port} is already in use" in line and "--port N" in line


async def test_serve_host_and_port_flags_override_the_config(tmp_path: Path) -> None:
    port = free_port()
    with port_in_use() as taken:
        # The config's address is unusable: only the flags' address can serve.
        path = serve_config(tmp_path, host="127.0.0.2", port=taken)
        log = tmp_path / "serve.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "activator", "serve", "--config", str(path)),
                *("--host", "127.0.0.1", "--port", str(port)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        try:
            async with aiohttp.ClientSession() as session:

                async def ready() -> bool:
                    assert process.returncode is None, log.read_text()
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            return resp.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_for(ready, timeout=PROCESS_WAIT_S, what="serve --port /readyz")
            assert f"on http://127.0.0.1:{port} " in log.read_text()
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(PROCESS_WAIT_S):
                    code = await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
    assert code == 0, log.read_text()


async def test_serve_watch_flag_turns_on_watch_config(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "watch_interval": "50ms"},
        "models": {"a": model_config(unique("watch-a"))},
    }
    path = tmp_path / "activator.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    async with (
        serving_file(
            path, url=url, log=tmp_path / "serve.log", engines=[], args=["--watch"]
        ) as served,
        aiohttp.ClientSession() as session,
    ):
        # The file says nothing of watch_config: only the flag makes this reload happen.
        config["models"]["b"] = model_config(unique("watch-b"))
        path.write_text(yaml.safe_dump(config))

        async def has_b() -> bool:
            async with session.get(served.url + "/admin/models") as resp:
                return "b" in [m["name"] for m in (await resp.json())["models"]]

        await wait_for(has_b, timeout=PROCESS_WAIT_S, what="model b, by the watcher --watch set")
    assert "config reload (watch, " in served.output()


async def test_serve_says_the_embedded_demo_is_not_the_file_in_the_repository(
    tmp_path: Path,
) -> None:
    # `activator serve` with no --config (the README's first command, on another port).
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "activator", "serve", "--port", str(port)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    served = Served(process=process, url=f"http://127.0.0.1:{port}", log=log)
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, served, timeout=PROCESS_WAIT_S)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await served.exit_code()
    output = served.output()
    assert f"serving 2 models on http://127.0.0.1:{port} (config {embedded_config()})" in output
    assert "edits to config/local.yaml do not reach it" in output
    assert "activator serve --config config/local.yaml" in output


async def test_serve_counts_one_model_in_the_singular(tmp_path: Path) -> None:
    config = {"models": {"m": model_config(unique("one"))}}
    async with serving(config, workdir=tmp_path, engines=[]) as served:
        pass
    assert "serving 1 model on " in served.output()
    assert "embedded demo" not in served.output()  # a --config file is what it says


async def test_every_status_option_has_help() -> None:
    code, out, _ = await run_cli("status", "--help")
    assert code == 0
    assert "the running activator's address (default http://127.0.0.1:8080)" in " ".join(
        out.split()
    )
