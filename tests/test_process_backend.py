"""The local process backend, observed through activator and /proc: ports, process
groups, captured output, and stopping engines that do not want to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import pytest

from tests.conftest import ActivatorFactory
from tests.harness import (
    FAKE_ENGINE,
    Running,
    chat,
    engine_pids,
    model_config,
    post,
    unique,
    wait_for,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def logs(running: Running, model: str) -> list[str]:
    async with running.session.get(f"{running.url}/admin/models/{model}/logs") as resp:
        assert resp.status == 200
        lines: list[str] = (await resp.json())["lines"]
        return lines


async def wake(running: Running, model: str) -> None:
    status, body, _ = await post(running, "/v1/chat/completions", chat(model, max_tokens=1))
    assert status == 200, body


async def test_engine_gets_a_free_port_and_runs_in_its_own_process_group(
    activator: ActivatorFactory,
) -> None:
    served = unique("group")
    running = await activator({"models": {"m": model_config(served)}})
    await wake(running, "m")
    [pid] = engine_pids(served)
    assert os.getpgid(pid) == pid  # a group of its own: stop signals the whole tree
    url = (await running.admin("m"))["upstream_url"]
    port = int(url.rsplit(":", 1)[1])
    assert port != 0
    assert f"READY port={port}" in await logs(running, "m")  # "{port}" was filled in


async def test_fixed_port_is_used_as_configured(activator: ActivatorFactory) -> None:
    port = free_port()
    config = model_config(unique("fixed"))
    config["process"]["port"] = port
    running = await activator({"models": {"m": config}})
    await wake(running, "m")
    assert (await running.admin("m"))["upstream_url"] == f"http://127.0.0.1:{port}"


async def test_engine_output_is_kept_in_a_bounded_ring(activator: ActivatorFactory) -> None:
    config = model_config(unique("ring"))
    config["process"]["log_lines"] = 2
    running = await activator({"models": {"m": config}})
    await wake(running, "m")
    # The engine prints its three loading phases, READY and more: only the last two stay.
    await wait_for(lambda: running.model("m").backend.log_tail()[-1:] != [], what="output")
    lines = await logs(running, "m")
    assert len(lines) == 2
    assert not any("Initializing engine" in line for line in lines)


async def test_engine_ignoring_sigterm_is_killed_after_stop_grace(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    served = unique("deaf")
    config = model_config(served, "--ignore-sigterm")
    config["process"]["stop_grace"] = "0.5s"
    running = await activator({"models": {"m": config}})
    await wake(running, "m")
    assert len(engine_pids(served)) == 1
    with caplog.at_level(logging.WARNING, logger="activator.backends.process"):
        async with running.session.post(running.url + "/admin/models/m/stop") as resp:
            assert resp.status == 202
        await wait_for(lambda: running.model("m").state == "stopped", what="stopped")
    assert not engine_pids(served)
    assert any("ignored SIGTERM" in r.getMessage() for r in caplog.records)


def forking_engine(served: str, *flags: str) -> dict[str, Any]:
    """A model whose command is a shell that runs the engine as its child, as vLLM runs
    its workers: both share the process group and the output pipe."""
    engine: list[Any] = [sys.executable, "-m", FAKE_ENGINE, "--port", "{port}",
                         "--served-model-name", served, "--startup-delay", "0.1",
                         *flags]  # fmt: skip
    config = model_config(served)
    config["process"]["command"] = ["sh", "-c", '"$@" & wait', "sh", *engine]
    return config


def group_leader(served: str) -> int:
    """The shell leading the engine's group (both processes carry the engine's arguments)."""
    [leader] = [pid for pid in engine_pids(served) if os.getpgid(pid) == pid]
    assert [os.getpgid(pid) for pid in engine_pids(served)] == [leader, leader]
    return leader


async def test_stop_kills_the_whole_process_group_not_only_the_leader(
    activator: ActivatorFactory,
) -> None:
    # The leader dies on SIGTERM; its child ignores SIGTERM and must not outlive the stop.
    served = unique("forked")
    config = forking_engine(served, "--ignore-sigterm")
    config["process"]["stop_grace"] = "0.5s"
    running = await activator({"models": {"m": config}})
    await wake(running, "m")
    group_leader(served)
    async with running.session.post(running.url + "/admin/models/m/stop") as resp:
        assert resp.status == 202
    await wait_for(lambda: running.model("m").state == "stopped", what="stopped")
    assert not engine_pids(served)


async def test_leader_dying_is_noticed_while_a_forked_child_holds_its_output(
    activator: ActivatorFactory,
) -> None:
    served = unique("orphan")
    running = await activator({"models": {"m": forking_engine(served)}})
    await wake(running, "m")
    leader = group_leader(served)
    os.kill(leader, signal.SIGKILL)
    try:
        await wait_for(lambda: running.model("m").state == "failed", what="engine death noticed")
        assert (await running.admin("m"))["last_error"] == "engine process exited with code -9"
        # Cleaning up after a dead engine stops its whole group: the orphan is gone too.
        await wait_for(lambda: not engine_pids(served), what="orphan killed")
    finally:
        # Should the death go unnoticed, the orphan must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)
