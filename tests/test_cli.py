"""The command line, run as real subprocesses: `check-config` and `status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp

from tests.harness import chat, model_config, unique
from tests.serve_process import run_cli, serving

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
    assert out.strip() == f"{path}: ok (1 models, 0 pools)"


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
                                  "POOL", "LAST", "ERROR"]  # fmt: skip
        table = {row.split()[0]: row.split()[1:] for row in rows}
        assert table["alpha"][:3] == ["ready", "0", "0"]
        assert table["alpha"][3].endswith("s")  # the last wake's duration
        assert table["beta"] == ["stopped", "0", "0", "-", "-"]

        code, out, _ = await run_cli("status", "--url", served.url, "--admin-key", "adm", "--json")
        assert code == 0
        assert [m["name"] for m in json.loads(out)["models"]] == ["alpha", "beta"]

        code, _, err = await run_cli("status", "--url", served.url)  # no admin key
        assert code != 0
        assert "401" in err


async def test_status_against_nothing_fails_cleanly() -> None:
    code, out, err = await run_cli("status", "--url", "http://127.0.0.1:9")
    assert code != 0
    assert out == ""
    assert "cannot read http://127.0.0.1:9/admin/models" in err


async def test_console_script_and_module_are_the_same_cli() -> None:
    script = Path(sys.executable).parent / "activator"
    assert script.exists(), "the package installs an `activator` console script"
    by_script = await run_cli("--version", program=[str(script)])
    by_module = await run_cli("--version")
    assert by_script == by_module
    assert by_module[0] == 0 and by_module[1].startswith("activator ")
