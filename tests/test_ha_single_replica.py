"""The local process backend is a single replica by design: a second `activator serve` of
the same config on the same host refuses to start, with one line, instead of fighting
the first over its engines. The lock (an flock, in the runtime dir) dies with the
process, SIGKILL included."""

from __future__ import annotations

import os
from pathlib import Path

from activator.cli import _single_activator, lock_path
from activator.config.load import parse_config
from tests.harness import model_config, unique
from tests.serve_process import free_port, run_cli, serving


async def test_a_second_activator_on_the_same_config_refuses_to_start(tmp_path: Path) -> None:
    served = unique("lock")
    config = {"models": {"m": model_config(served)}}
    async with serving(config, workdir=tmp_path, engines=[served]) as first:
        path = tmp_path / "activator.yaml"
        code, out, err = await run_cli("serve", "--config", str(path), "--port", str(free_port()))
        assert out == ""
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"activator: another activator (pid {first.process.pid})")
        assert str(path) in lines[0]
        assert "--config COPY --port N" in lines[0]  # how to run a second one (README)
        # Another spelling of the same file is the same config.
        alias = tmp_path / "alias.yaml"
        alias.symlink_to(path)
        code, _, err = await run_cli("serve", "--config", str(alias), "--port", str(free_port()))
        assert code == 1 and "another activator" in err
        # SIGKILL: no cleanup runs, and still the lock is gone with the process.
        first.process.kill()
        await first.process.wait()
    async with serving(config, workdir=tmp_path, engines=[served]) as second:
        assert second.process.returncode is None  # it started: /readyz answered


async def test_a_second_activator_on_a_copy_of_the_config_runs_beside_the_first(
    tmp_path: Path,
) -> None:
    # The README's way to run a second demo: its own copy of the file, another port. The
    # lock is per config file, not per port: the same file on another port would share
    # engines and GPUs with the first (the per-config test above).
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    one, two = unique("lock-one"), unique("lock-two")
    async with (
        serving({"models": {"m": model_config(one)}}, workdir=first_dir, engines=[one]) as first,
        serving({"models": {"m": model_config(two)}}, workdir=second_dir, engines=[two]) as second,
    ):
        assert first.process.returncode is None and second.process.returncode is None
        assert first.url != second.url


def test_kubernetes_models_take_no_lock_several_replicas_share_them(tmp_path: Path) -> None:
    settings = parse_config(
        {
            "models": {
                "k": {
                    "kubernetes": {
                        "namespace": "serving",
                        "deployment": "k",
                        "url": "http://k.serving.svc:8000",
                    }
                }
            }
        }
    )
    path = tmp_path / "k.yaml"
    assert _single_activator(settings, str(path)) == (None, None)
    assert not lock_path(str(path)).exists()


def test_the_lock_is_released_when_its_holder_closes_it(tmp_path: Path) -> None:
    settings = parse_config({"models": {"m": model_config("x")}})
    path = str(tmp_path / "x.yaml")
    fd, problem = _single_activator(settings, path)
    assert problem is None and fd is not None
    again, problem = _single_activator(settings, path)  # another open file: locked out
    assert again is None and problem is not None and f"pid {os.getpid()}" in problem
    os.close(fd)
    fd, problem = _single_activator(settings, path)
    assert problem is None and fd is not None
    os.close(fd)
