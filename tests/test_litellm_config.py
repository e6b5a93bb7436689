"""`activator litellm-config`: the LiteLLM model_list written from activator's config.

What LiteLLM does with it is tests/test_litellm.py (a real LiteLLM proxy); here, the
config itself: names, the key reference, timeouts against activator's own hold.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config.load import parse_config
from activator.litellm_config import litellm_config, render, server_url
from tests.conftest import ActivatorFactory
from tests.harness import model_config
from tests.serve_process import PROCESS_WAIT_S, run_cli

ROOT = Path(__file__).resolve().parent.parent
URL = "http://activator.serving:8080"
# What config/example.yaml substitutes; their values never reach LiteLLM's config.
EXAMPLE_VARIABLES = ("ACTIVATOR_API_KEY", "ACTIVATOR_ADMIN_KEY", "VLLM_API_KEY")


def generate(config: dict[str, Any], **options: Any) -> dict[str, Any]:
    return litellm_config(parse_config(config, environ={}), url=URL, **options)


def params(config: dict[str, Any], model_name: str) -> dict[str, Any]:
    (entry,) = [e for e in config["model_list"] if e["model_name"] == model_name]
    litellm_params: dict[str, Any] = entry["litellm_params"]
    return litellm_params


def test_every_name_and_alias_is_a_model_name_routed_to_the_activator_model() -> None:
    config = generate(
        {
            "models": {
                "coder": model_config("qwen2.5-coder-7b", aliases=["code", "c"]),
                "chat": model_config(),
            }
        }
    )
    names = [(e["model_name"], e["litellm_params"]["model"]) for e in config["model_list"]]
    # activator's own name, never served_model_name: activator resolves and rewrites it.
    assert names == [
        ("coder", "openai/coder"),
        ("code", "openai/coder"),
        ("c", "openai/coder"),
        ("chat", "openai/chat"),
    ]
    assert {e["litellm_params"]["api_base"] for e in config["model_list"]} == {URL + "/v1"}


def test_the_api_key_is_a_reference_to_the_environment_never_the_key() -> None:
    keyed = {"server": {"api_keys": ["s3cret-key"]}, "models": {"m": model_config()}}
    assert params(generate(keyed), "m")["api_key"] == "os.environ/ACTIVATOR_API_KEY"
    other = generate(keyed, key_env="LITELLM_TO_ACTIVATOR")
    assert params(other, "m")["api_key"] == "os.environ/LITELLM_TO_ACTIVATOR"
    assert "s3cret-key" not in render(other)
    # No api_keys: activator checks none, but LiteLLM's client wants one.
    assert params(generate({"models": {"m": model_config()}}), "m")["api_key"] == "none"


def test_no_litellm_retries_cooldowns_or_health_checks() -> None:
    config = generate({"models": {"m": model_config(aliases=["a"])}})
    for entry in config["model_list"]:
        assert entry["litellm_params"]["num_retries"] == 0
        assert entry["litellm_params"]["cooldown_time"] == 0
        assert entry["model_info"] == {"disable_background_health_check": True}


async def test_timeouts_outlast_what_activator_may_hold_a_request(
    activator: ActivatorFactory,
) -> None:
    """Against the running models' own hold_timeout, so the two cannot drift apart."""
    config: dict[str, Any] = {
        "pools": {"gpu": {"gpus": 1}},
        "models": {
            "plain": model_config(startup_timeout="20m"),
            "pooled": model_config(
                startup_timeout="20m", pool="gpu", max_wait="7m", drain_timeout="3m"
            ),
            "patient": model_config(upstream_read_timeout="45m"),
        },
    }
    running = await activator(config)
    generated = litellm_config(parse_config(config, environ={}), url=running.url)
    for name in config["models"]:
        model = running.model(name)
        longest = model.hold_timeout + model.settings.upstream_read_timeout
        for key in ("timeout", "stream_timeout"):
            assert params(generated, name)[key] > longest, (name, key)
    # A pooled request may be held behind a swap: the pool's wait and drain count.
    pooled, plain = params(generated, "pooled")["timeout"], params(generated, "plain")["timeout"]
    assert pooled - plain == (7 + 3) * 60


def test_per_token_costs_come_from_the_models_prices_per_million() -> None:
    config = generate(
        {
            "defaults": {"cost": {"gpu_hour": 2.48}},
            "models": {
                "priced": model_config(
                    aliases=["p"], cost={"input_per_million": 0.1, "output_per_million": 0.4}
                ),
                "input-only": model_config(cost={"input_per_million": 0.15}),
                "gpu-only": model_config(),
            },
        }
    )
    for name in ("priced", "p"):
        assert params(config, name)["input_cost_per_token"] == 1e-07
        assert params(config, name)["output_cost_per_token"] == 4e-07
    assert params(config, "input-only")["input_cost_per_token"] == 1.5e-07
    assert "output_cost_per_token" not in params(config, "input-only")
    # A GPU-hour has no per-token twin: LiteLLM never sees the GPU idle.
    assert not {k for k in params(config, "gpu-only") if "cost" in k}
    assert "1.0e-07" in render(config)  # not 1.0000000000000001e-07


@pytest.mark.parametrize(
    ("host", "url", "warns"),
    [
        ("127.0.0.1", "http://127.0.0.1:9000", False),
        ("activator.internal", "http://activator.internal:9000", False),
        ("::1", "http://[::1]:9000", False),
        ("0.0.0.0", "http://127.0.0.1:9000", True),
        ("::", "http://127.0.0.1:9000", True),
    ],
)
def test_default_url_is_the_servers_own_address(host: str, url: str, warns: bool) -> None:
    settings = parse_config(
        {"server": {"host": host, "port": 9000}, "models": {"m": model_config()}}
    )
    found, warning = server_url(settings)
    assert found == url
    assert (warning is not None) == warns
    if warning:
        assert "--url" in warning


async def test_cli_prints_the_demo_config_for_litellm() -> None:
    code, out, err = await run_cli("litellm-config")
    assert (code, err) == (0, "")
    assert out.startswith("# LiteLLM proxy config for activator's models")
    config = yaml.safe_load(out)
    assert [e["model_name"] for e in config["model_list"]] == [
        "demo-small",
        "small",
        "demo-chat",
        "chat",
    ]
    assert params(config, "chat")["api_base"] == "http://127.0.0.1:8080/v1"


async def test_cli_takes_url_and_key_variable_and_warns_about_a_wildcard_host(
    tmp_path: Path,
) -> None:
    path = tmp_path / "activator.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "0.0.0.0", "api_keys": ["${ACTIVATOR_API_KEY:-k3y-value}"]},
                "models": {"m": model_config()},
            }
        )
    )
    code, out, err = await run_cli("litellm-config", "--config", str(path))
    assert code == 0
    assert "server.host is 0.0.0.0" in err and "--url" in err
    assert params(yaml.safe_load(out), "m")["api_base"] == "http://127.0.0.1:8080/v1"
    assert "k3y-value" not in out

    code, out, err = await run_cli(
        "litellm-config", "--config", str(path), "--url", URL + "/", "--key-env", "KEY_VAR"
    )
    assert (code, err) == (0, "")
    assert params(yaml.safe_load(out), "m")["api_base"] == URL + "/v1"
    assert params(yaml.safe_load(out), "m")["api_key"] == "os.environ/KEY_VAR"


async def test_cli_reports_a_bad_config_by_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    idle_timeout: soon\n")
    code, out, err = await run_cli("litellm-config", "--config", str(path))
    assert code == 2
    assert out == ""
    assert "models.m.idle_timeout" in err


async def test_the_docs_show_what_the_cli_prints_for_the_example_config() -> None:
    """docs/litellm.md's config is the CLI's output, so it cannot go stale."""
    docs = (ROOT / "docs" / "litellm.md").read_text()
    match = re.search(r"```yaml\n(# LiteLLM proxy config for activator's models.*?)```", docs, re.S)
    assert match, "docs/litellm.md lacks the generated config block"
    command = ["litellm-config", "--config", str(ROOT / "config" / "example.yaml")]
    command += ["--url", "http://activator.serving.svc.cluster.local:8080"]
    environ = {**os.environ, **dict.fromkeys(EXAMPLE_VARIABLES, "set")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "activator",
        *command,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PROCESS_WAIT_S):
        out, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")
    assert match.group(1) == out.decode(), f"regenerate it: activator {' '.join(command)}"
