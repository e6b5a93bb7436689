"""The e2e harness itself, on the stand-in engine: runs everywhere, vLLM or not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tools import poll

from .conftest import (
    ENGINE_START_BUDGET,
    HARNESS_VARIABLES,
    http,
    launch_activator,
    load_template,
    model_config,
    new_tag,
)


def test_engines_see_the_templates_values_but_not_the_harness_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when a developer points the tests at vLLM: these are in the tests' environment.
    monkeypatch.setenv("VLLM_PYTHON", "/elsewhere/bin/python")
    monkeypatch.setenv("VLLM_VENV", "/elsewhere")
    template = load_template()
    model = model_config(template, served_name="harness-served", tag=new_tag())
    # The template's command, with the stand-in engine behind its ${VLLM_PYTHON}.
    model["process"]["command"] = [
        *("${VLLM_PYTHON}", "-m", "activator.testing.fake_engine", "--port", "{port}"),
        *("--served-model-name", "harness-served", "--disable-access-log"),
    ]
    values = {"VLLM_PYTHON": sys.executable, "TINY_MODEL_DIR": str(tmp_path / "model")}
    config = {**template, "models": {"tiny-chat": model}}
    with launch_activator(config, workdir=tmp_path, values=values) as activator:
        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
        status, body = http("POST", f"{activator.url}/v1/chat/completions", body=chat)
        assert status == 200, body  # the engine ran: ${VLLM_PYTHON} was filled in
        [pid] = poll(
            lambda: activator.engine_pids("tiny-chat"),
            timeout=ENGINE_START_BUDGET,
            what="the engine's process",
        )
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {entry.partition(b"=")[0].decode() for entry in environ}
    assert "HF_HUB_OFFLINE" in names  # the template's process.env does reach it
    assert not names & set(HARNESS_VARIABLES)
