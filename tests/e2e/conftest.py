"""Harness for the end-to-end tests: real activator process in front of real vLLM (CPU).

vLLM runs from its own virtualenv (tests/e2e/vllm_env.sh prepares it). Where it is
found: $VLLM_PYTHON, else $VLLM_VENV/bin/python, else <repo>/.vllm-venv/bin/python.
Without it the tests skip, unless ACTIVATOR_REQUIRE_VLLM=1 (CI), where they fail.

Each activator is started as `python -m activator serve --config FILE` from the
config template next to this file (tests/e2e/vllm.yaml), with the tiny model built
once per session. The template's `${VLLM_PYTHON}` and `${TINY_MODEL_DIR}` are filled
into the config file, not exported: activator's engines inherit its environment, and
vLLM warns about (or, validating strictly, refuses) VLLM_* variables it does not know.
Every engine it launches carries a unique tag in its environment, so the tests can find
all of the engine's processes (vLLM forks workers) in /proc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.tools import poll, stop_process, vllm_venv_python

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "vllm.yaml"
TAG_VARIABLE = "ACTIVATOR_E2E_TAG"
# Where the tests find vLLM and the model: the harness's business, never an engine's.
# Kept out of the environment activator (and so every engine) runs with.
HARNESS_VARIABLES = ("VLLM_PYTHON", "VLLM_VENV", "TINY_MODEL_DIR")

# Budgets, not expectations: vLLM on 2 CPU cores takes 20-45 s from spawn to /health,
# so every wait is several times that to stay robust on a slow CI machine.
ENGINE_START_BUDGET = 300.0
ACTIVATOR_READY_BUDGET = 60.0
SHUTDOWN_BUDGET = 90.0
MODEL_BUILD_BUDGET = 300.0


def http(
    method: str,
    url: str,
    *,
    body: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One plain HTTP request; returns (status, body) for any status, raises on no answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


def free_port() -> int:
    # The port is free now; activator binds it a moment later. Loopback only.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tagged_pids(tag: str) -> list[int]:
    """Pids of live processes whose environment carries `tag` (an engine and its workers)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours
        if state != "Z" and needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def engine_metric(engine_url: str, name: str) -> float:
    """Sum of a Prometheus gauge/counter over all its label sets on the engine."""
    status, body = http("GET", f"{engine_url}/metrics")
    assert status == 200, body
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass(frozen=True, kw_only=True)
class Activator:
    url: str
    log_path: Path
    engine_tags: Mapping[str, str]  # client-facing model name -> tag in its engine's env

    def client(self) -> openai.OpenAI:
        # No retries: a retry would hide a failed or slow wake. The timeout covers a cold
        # start, since the first request is held for all of it.
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=ENGINE_START_BUDGET,
        )

    def admin_models(self) -> list[dict[str, Any]]:
        status, body = http("GET", f"{self.url}/admin/models")
        assert status == 200, body
        document = json.loads(body)
        models = document.get("models", document) if isinstance(document, dict) else document
        if isinstance(models, dict):  # keyed by name
            return [{"name": name, **entry} for name, entry in models.items()]
        return list(models)

    def engine_url(self, model: str) -> str:
        """The URL activator forwards `model` to, as reported by the admin API."""
        for entry in self.admin_models():
            if entry.get("name") == model:
                for key in ("upstream_url", "upstream", "url", "base_url"):
                    value = entry.get(key)
                    if isinstance(value, str) and value.startswith("http"):
                        return value.rstrip("/")
                pytest.fail(f"admin API shows no upstream URL for {model}: {entry}")
        pytest.fail(f"admin API does not list {model}")

    def engine_pids(self, model: str) -> list[int]:
        return tagged_pids(self.engine_tags[model])

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def diagnostics(self) -> str:
        """activator's own log tail and each engine's, for reading after a failure."""
        parts = [f"--- activator log ({self.log_path}) ---", self.log_tail()]
        for model in self.engine_tags:
            try:
                status, body = http("GET", f"{self.url}/admin/models/{model}/logs", timeout=5)
                lines = json.loads(body).get("lines", []) if status == 200 else [f"HTTP {status}"]
            except (OSError, ValueError) as error:  # diagnostics must not mask the failure
                lines = [f"logs unavailable: {error!r}"]
            parts += [f"--- engine log of {model} ---", *map(str, lines[-40:])]
        return "\n".join(parts)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return vllm_venv_python(needs="vllm", label="vLLM python")


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny-model")
    subprocess.run(
        [vllm_python, HERE / "tiny_model.py", out_dir],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        check=True,
        capture_output=True,
        timeout=MODEL_BUILD_BUDGET,
    )
    return out_dir


def load_template() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text())
    return config


def model_config(
    template: Mapping[str, Any], *, served_name: str, tag: str, **overrides: Any
) -> dict[str, Any]:
    """A copy of the template's model entry serving `served_name`, tagged with `tag`."""
    (entry,) = template["models"].values()
    entry = json.loads(json.dumps(entry))  # deep copy
    entry["served_model_name"] = served_name
    command = entry["process"]["command"]
    command[command.index("--served-model-name") + 1] = served_name
    entry["process"]["env"] = {**entry["process"].get("env", {}), TAG_VARIABLE: tag}
    entry.update(overrides)
    return entry


def fill_in(config: Any, values: Mapping[str, str]) -> Any:
    """`config` with each `${NAME}` of `values` replaced, as activator would substitute it
    from its environment. A `$` in a value is written `$$`, so activator keeps it as is."""
    if isinstance(config, dict):
        return {key: fill_in(value, values) for key, value in config.items()}
    if isinstance(config, list):
        return [fill_in(value, values) for value in config]
    if isinstance(config, str):
        for name, value in values.items():
            config = config.replace("${" + name + "}", value.replace("$", "$$"))
    return config


def kill_leftovers(tags: Mapping[str, str]) -> list[int]:
    """SIGKILL any engine process still alive; returns their pids (should be none)."""
    left = [pid for tag in tags.values() for pid in tagged_pids(tag)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


ActivatorFactory = Callable[[dict[str, Any]], AbstractContextManager[Activator]]


@contextmanager
def launch_activator(
    config: dict[str, Any], *, workdir: Path, values: Mapping[str, str]
) -> Iterator[Activator]:
    """Run one activator process on `config` (the template's shape, `${NAME}`s filled in
    from `values`) until it is ready; see `activator_factory`."""
    port = free_port()
    config = fill_in({**config, "server": {**config.get("server", {}), "port": port}}, values)
    config_path = workdir / "activator.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "activator.log"
    env = {name: value for name, value in os.environ.items() if name not in HARNESS_VARIABLES}
    tags = {name: entry["process"]["env"][TAG_VARIABLE] for name, entry in config["models"].items()}
    activator = Activator(url=f"http://127.0.0.1:{port}", log_path=log_path, engine_tags=tags)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "activator", "serve", "--config", config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own group, so a hung one can be killed whole
        )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"activator exited ({process.returncode}):\n{activator.log_tail()}")
            try:
                return http("GET", f"{activator.url}/readyz", timeout=5)[0] == 200
            except OSError:
                return False  # not listening yet

        poll(ready, timeout=ACTIVATOR_READY_BUDGET, what="activator /readyz")
        yield activator
    finally:
        # Shown by pytest only when a test using this activator failed.
        print(activator.diagnostics())
        stop_process(process, grace=SHUTDOWN_BUDGET)  # it stops its engines first
        leftovers = kill_leftovers(tags)
    assert not leftovers, (
        f"engine processes {leftovers} outlived activator's shutdown:\n{activator.log_tail()}"
    )


@pytest.fixture(scope="session")
def activator_factory(
    vllm_python: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> ActivatorFactory:
    """`with activator_factory(config) as activator:` runs one activator process.

    `config` is a dict in the shape of the template. Entering waits for /readyz (which
    never wakes a model); leaving stops activator with SIGTERM and then checks that no
    process of its engines is left (and kills any, so one failure does not leak into
    the next test).
    """
    values = {"VLLM_PYTHON": str(vllm_python), "TINY_MODEL_DIR": str(tiny_model)}

    def run(config: dict[str, Any]) -> AbstractContextManager[Activator]:
        workdir = tmp_path_factory.mktemp("activator")
        return launch_activator(config, workdir=workdir, values=values)

    return run


def new_tag() -> str:
    return uuid.uuid4().hex
