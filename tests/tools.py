"""Programs the tests need from outside the project's venv (the real-vLLM venv, LiteLLM's
venv, chromium, prometheus): where each is found, and what a test does without one. It
skips; where the run must have the program (CI, or the variable that asks for it), it
fails, so that such a run cannot pass by skipping. And, for such a program run as a
process of its own, a bounded poll of its state and a bounded stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
# vLLM's import alone takes seconds, and more on a loaded machine: the probe is bounded.
PROBE_BUDGET_S = 60


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def unavailable(reason: str, *, required: bool, fail_reason: str | None = None) -> NoReturn:
    """Skip the calling test for `reason`, or fail it (with `fail_reason`, if given) where
    the program is `required`."""
    __tracebackhide__ = True  # the report names the caller's line, not this one
    if required:
        pytest.fail(reason if fail_reason is None else fail_reason)
    pytest.skip(reason)


def vllm_venv_python(*, needs: str, label: str = "python") -> Path:
    """The real-vLLM venv's python, able to import `needs`: $VLLM_PYTHON, else
    $VLLM_VENV/bin/python, else <repo>/.vllm-venv/bin/python. Without it the test skips,
    unless ACTIVATOR_REQUIRE_VLLM=1 (CI), where it fails. `label` names the python in
    the skip message."""
    __tracebackhide__ = True
    explicit = os.environ.get("VLLM_PYTHON")
    venv = Path(os.environ.get("VLLM_VENV", REPO / ".vllm-venv"))
    python = Path(explicit) if explicit else venv / "bin" / "python"
    missing = None
    if not python.exists():
        missing = f"no {label} at {python}"
    else:
        # find_spec, not import: importing vllm (or torch) takes seconds.
        probe = subprocess.run(
            [python, "-c", f"import importlib.util as u; assert u.find_spec({needs!r})"],
            capture_output=True,
            timeout=PROBE_BUDGET_S,
            check=False,
        )
        if probe.returncode != 0:
            missing = f"{python} cannot import {needs}"
    if missing:
        reason = f"{missing}; prepare it with tests/e2e/vllm_env.sh (or set VLLM_PYTHON)"
        unavailable(
            reason,
            required=os.environ.get("ACTIVATOR_REQUIRE_VLLM") == "1",
            fail_reason=f"ACTIVATOR_REQUIRE_VLLM=1 but {reason}",
        )
    return python


def on_path(program: str, *, hint: str) -> str:
    """`program`'s path; without it on PATH the test skips, or fails in CI. `hint` says
    where to get it."""
    __tracebackhide__ = True
    found = shutil.which(program)
    if found is None:
        unavailable(f"{program} is not on PATH ({hint})", required=in_ci())
    return found


def poll(condition: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str) -> Any:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds.

    For states that have no event to wait on from outside the process (an engine's
    metrics, /proc, a server's health). Returns the truthy value.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM, up to `grace` seconds for the process to exit, then SIGKILL to its process
    group (started with start_new_session, so its children go too)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
