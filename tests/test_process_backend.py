"""The local process backend, observed through activator and /proc: ports, process
groups, captured output, and stopping engines that do not want to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ActivatorFactory
from tests.harness import (
    FAKE_ENGINE,
    Running,
    chat,
    engine_pids,
    error_of,
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


async def test_fixed_port_already_served_by_another_process_fails_the_start(
    activator: ActivatorFactory,
) -> None:
    """Something we did not start answers on the configured port as an engine of this
    model would: the start fails naming the address, and no client request reaches it."""
    served = unique("taken")
    reached: list[str] = []

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": served, "object": "model"}]})

    async def completion(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({"foreign": True})

    foreign = web.Application()
    foreign.router.add_get("/health", health)
    foreign.router.add_get("/v1/models", models)
    foreign.router.add_post("/v1/chat/completions", completion)
    server = TestServer(foreign, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        config = model_config(served)
        config["process"]["port"] = server.port
        running = await activator({"models": {"m": config}})
        status, body, _ = await post(running, "/v1/chat/completions", chat("m"))
        assert status == 503, body
        error = error_of(body)
        assert error["code"] == "model_start_failed"
        assert f"127.0.0.1:{server.port} already accepts connections" in error["message"]
        assert reached == []
        assert not engine_pids(served)  # refused before spawning
        assert running.model("m").state == "failed"
    finally:
        await server.close()


# Run as the engine command: the process activator starts exits at once, and a process it
# left behind, outside its group, serves the port as an engine of the model would (only
# once the first has exited). POSTs that reach it are recorded in PIDFILE.hits.
LEAVES_A_FOREIGN_SERVER = r"""
import http.server, json, os, select, sys
port, served, pidfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
started = os.getpid()
if os.fork():
    os._exit(0)
os.setsid()
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
try:
    select.select([os.pidfd_open(started)], [], [])
except ProcessLookupError:
    pass  # already exited and reaped

class Handler(http.server.BaseHTTPRequestHandler):
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": served, "object": "model"}]})

    def do_POST(self):
        with open(pidfile + ".hits", "a") as f:
            f.write(self.path + "\n")
        self._send({"foreign": True})

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


async def test_engine_that_exits_is_a_failure_even_when_its_port_answers(
    activator: ActivatorFactory, tmp_path: Path
) -> None:
    served = unique("exits")
    pidfile = tmp_path / "foreign.pid"
    config = model_config(served)
    config["process"]["command"] = [
        sys.executable, "-c", LEAVES_A_FOREIGN_SERVER, "{port}", served, str(pidfile)
    ]  # fmt: skip
    running = await activator({"models": {"m": config}})
    try:
        status, body, _ = await post(running, "/v1/chat/completions", chat("m"))
        assert status == 503, body
        error = error_of(body)
        assert error["code"] == "model_start_failed"
        assert "engine process exited with code 0" in error["message"]
        assert not (tmp_path / "foreign.pid.hits").exists()
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
