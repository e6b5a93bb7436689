"""Every state change of a model is one log line that says why: idle, evicted for X,
admin, reload, failed. A real activator (in-process) with stand-in engines, its log
captured (caplog); the causes themselves are a pure function, tested as a table."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from activator.app import build_app
from activator.config.load import load_config
from activator.model.transitions import EVENTS, cause_of
from activator.reload import ConfigFile
from tests.conftest import ActivatorFactory
from tests.harness import Running, chat, engine_pids, model_config, post, unique, wait_for

LOGGER = "activator.model.lifecycle"


def moves(caplog: pytest.LogCaptureFixture, model: str) -> list[str]:
    """`from -> to (cause)` of each of `model`'s transition lines, in order."""
    prefix = f"model={model} state "
    return [
        r.getMessage().removeprefix(prefix)
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().startswith(prefix)
    ]


async def test_an_idle_stop_says_idle_on_every_line(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    running = await activator(
        {"models": {"m": model_config(unique("log-idle"), idle_timeout="300ms")}}
    )
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200
    await wait_for(lambda: running.model("m").state == "stopped", what="stopped when idle")
    assert moves(caplog, "m") == [
        "stopped -> starting (request)",
        "starting -> ready (request)",
        "ready -> draining (idle)",
        "draining -> stopping (idle)",
        "stopping -> stopped (idle)",
    ]


async def test_a_swap_says_which_model_evicted_it(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    models = {m: model_config(unique(f"log-{m}"), pool="gpu") for m in ("a", "b")}
    running = await activator({"pools": {"gpu": {"gpus": 1}}, "models": models})
    assert (await post(running, "/v1/chat/completions", chat("a")))[0] == 200
    assert (await post(running, "/v1/chat/completions", chat("b")))[0] == 200
    assert moves(caplog, "a")[2:] == [
        "ready -> draining (evicted for b)",
        "draining -> stopping (evicted for b)",
        "stopping -> stopped (evicted for b)",
    ]


async def test_an_admin_stop_and_an_engine_failure_say_so(
    activator: ActivatorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    served = unique("log-admin")
    running = await activator({"models": {"m": model_config(served)}})
    model = running.model("m")
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200
    assert (await post(running, "/admin/models/m/stop", None))[0] == 202
    await wait_for(lambda: model.state == "stopped", what="stopped by the admin API")
    assert moves(caplog, "m")[2:] == [
        "ready -> draining (admin)",
        "draining -> stopping (admin)",
        "stopping -> stopped (admin)",
    ]
    caplog.clear()
    assert (await post(running, "/v1/chat/completions", chat("m")))[0] == 200
    (pid,) = engine_pids(served)
    os.killpg(pid, signal.SIGKILL)
    await wait_for(lambda: model.state == "failed", what="failed after its engine died")
    died, stopped = moves(caplog, "m")[2:]
    assert died.startswith("ready -> stopping (failed: ")
    assert stopped.startswith("stopping -> failed (failed: ")


async def test_a_model_removed_by_a_reload_says_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = {"models": {m: model_config(unique(f"log-reload-{m}")) for m in ("a", "b")}}
    path = tmp_path / "activator.yaml"
    path.write_text(yaml.safe_dump(config))
    app = build_app(load_config(path), config=ConfigFile(path))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    running = Running(app=app, server=server, url=url, session=aiohttp.ClientSession())
    try:
        assert (await post(running, "/v1/chat/completions", chat("b")))[0] == 200
        del config["models"]["b"]
        path.write_text(yaml.safe_dump(config))
        status, body, _ = await post(running, "/admin/reload", None)
        assert status == 200, body
        await wait_for(
            lambda: "stopping -> stopped (reload: removed from the config)" in moves(caplog, "b"),
            what="b stopped by the reload",
        )
        assert "ready -> draining (reload: removed from the config)" in moves(caplog, "b")
    finally:
        await running.close()


@pytest.mark.parametrize(
    ("event", "reason", "for_model", "said"),
    [
        ("stop", "idle", None, "idle"),
        ("stop", "swap", "coder", "evicted for coder"),
        ("sleep", "swap", "coder", "evicted for coder"),
        ("stop", "admin", None, "admin"),
        ("stop", "removed", None, "reload: removed from the config"),
        ("stop", "capacity", None, "over the pool's GPUs"),
        ("start", "request", None, "request"),
        ("died", "exit code 1", None, "failed: exit code 1"),
        ("start_failed", "timed out", None, "failed: timed out"),
        ("wake_failed", "", None, "failed: the engine did not wake"),
        ("lost", "pod evicted", None, "lost: pod evicted"),
        ("drained_for_stop", "", None, None),  # goes on with the stop's cause
        ("stopped", "", None, None),
    ],
)
def test_each_move_says_its_cause(
    event: str, reason: str, for_model: str | None, said: str | None
) -> None:
    assert cause_of(event, reason=reason, for_model=for_model) == said  # type: ignore[arg-type]


def test_every_event_that_begins_a_move_has_a_cause() -> None:
    # The events that only end a step under way keep the cause of the step.
    continuing = {"ready", "drained_for_stop", "drained_for_sleep", "asleep", "stopped",
                  "stopped_after_failure"}  # fmt: skip
    for event in EVENTS:
        assert (cause_of(event) is None) == (event in continuing), event
