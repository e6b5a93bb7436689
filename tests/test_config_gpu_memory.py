"""GPU memory keys (packing several models on one GPU): a model's footprint as a share or
a size, read from the engine's --gpu-memory-utilization, its sleep residue, and a
problem line naming the key for each mistake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config.gpu_memory import DEFAULT_GPU_RESIDUE, DEFAULT_GPU_RESIDUE_SHARE
from activator.config.load import ConfigError, parse_config
from activator.config.settings import ModelSettings, ProcessTarget
from activator.config.types import GpuMemory
from tests.serve_process import run_cli

GIB = 2**30
COMMAND = ["python", "-m", "activator.testing.fake_engine", "--port", "{port}"]
SLEEP = {"level": 1, "host_memory": "8GiB"}


def config(*, pool: dict[str, Any] | None = None, **model: Any) -> dict[str, Any]:
    """One pool `h100` (1 GPU, 80GiB unless `pool` says otherwise) and one model `m` in
    it; `extra` (a list) is appended to the model's command."""
    command = [*COMMAND, *model.pop("extra", [])]
    return {
        "pools": {"h100": pool if pool is not None else {"gpus": 1, "gpu_memory": "80GiB"}},
        "models": {"m": {"pool": "h100", "process": {"command": command}, **model}},
    }


def model_of(data: dict[str, Any]) -> ModelSettings:
    return parse_config(data, environ={}).models["m"]


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ={})
    return caught.value.problems


def only_problem(data: dict[str, Any], key: str) -> str:
    """The one problem of `data`, which must be at `key`; its message."""
    problems = problems_of(data)
    assert len(problems) == 1, problems
    where, message = problems[0].split(": ", 1)
    assert where == key, problems
    return message


# --- the footprint ----------------------------------------------------------------------


def test_a_model_with_no_gpu_memory_takes_its_gpus_whole() -> None:
    model = model_of(config())
    assert (model.gpu_memory, model.memory_fraction, model.residue_fraction) == (None, None, 0.0)


@pytest.mark.parametrize(("value", "share"), [(0.45, 0.45), (1, 1.0), ("36GiB", 0.45)])
def test_gpu_memory_is_a_share_of_each_gpu_or_a_size(value: object, share: float) -> None:
    model = model_of(config(gpu_memory=value))
    assert model.memory_fraction == pytest.approx(share)


def test_a_size_is_kept_as_declared() -> None:
    model = model_of(config(gpu_memory="36GiB"))
    assert model.gpu_memory == GpuMemory(size=36 * GIB)
    assert str(model.gpu_memory) == "36GiB"


@pytest.mark.parametrize(
    "extra",
    [
        ["--gpu-memory-utilization", "0.45"],
        ["--gpu-memory-utilization=0.45"],
        ["--gpu_memory_utilization", "0.45"],  # vLLM reads _ as -
        ["--gpu-memory-utilization", "0.9", "--gpu-memory-utilization", "0.45"],  # last wins
    ],
)
def test_the_share_is_read_from_the_engine_flag(extra: list[str]) -> None:
    assert model_of(config(extra=extra)).memory_fraction == 0.45


def test_the_flag_is_read_inside_a_shell_command() -> None:
    command = ["sh", "-c", "exec vllm serve m --port {port} --gpu-memory-utilization '0.3'"]
    assert ProcessTarget(command=tuple(command)).gpu_memory_utilization == 0.3


@pytest.mark.parametrize(
    ("value", "extra"),
    [
        (0.45, ["--gpu-memory-utilization", "0.45"]),
        (0.452, ["--gpu-memory-utilization=0.45"]),  # within 0.005
        ("36GiB", ["--gpu-memory-utilization", "0.45"]),  # 36 of 80 GiB
    ],
)
def test_a_gpu_memory_that_agrees_with_the_flag_is_accepted(
    value: object, extra: list[str]
) -> None:
    assert model_of(config(gpu_memory=value, extra=extra)).memory_fraction == 0.45


def test_a_share_that_disagrees_with_the_flag_names_both() -> None:
    message = only_problem(
        config(gpu_memory=0.5, extra=["--gpu-memory-utilization", "0.45"]),
        "models.m.gpu_memory",
    )
    assert "0.5 disagrees with --gpu-memory-utilization 0.45 in process.command" in message


def test_a_size_that_disagrees_with_the_flag_names_both_and_its_share() -> None:
    message = only_problem(
        config(gpu_memory="40GiB", extra=["--gpu-memory-utilization=0.45"]),
        "models.m.gpu_memory",
    )
    assert "40GiB (0.5 of pools.h100.gpu_memory) disagrees" in message
    assert "--gpu-memory-utilization 0.45" in message


@pytest.mark.parametrize("extra", [[], ["--gpu-memory-utilization", "0.45"]])
def test_a_size_needs_the_pools_gpu_memory(extra: list[str]) -> None:
    data = config(pool={"gpus": 1}, gpu_memory="36GiB", extra=extra)
    message = only_problem(data, "models.m.gpu_memory")
    assert "needs pools.h100.gpu_memory" in message


def test_a_size_needs_a_pool() -> None:
    data = config(gpu_memory="36GiB")
    del data["models"]["m"]["pool"]
    assert "needs a pool with gpu_memory" in only_problem(data, "models.m.gpu_memory")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (1.5, "more than a GPU"),
        (2, "a size with its unit"),
        (0, "greater than 0"),
        (-0.2, "greater than 0"),
        ("lots", "a share of each GPU like 0.45, or a size like 36GiB"),
        (True, "a share of each GPU like 0.45, or a size like 36GiB"),
        ("0GiB", "a share of each GPU like 0.45, or a size like 36GiB"),
    ],
)
def test_a_bad_gpu_memory_names_the_key(value: object, words: str) -> None:
    assert words in only_problem(config(gpu_memory=value), "models.m.gpu_memory")


def test_a_size_larger_than_a_gpu_names_the_key_and_the_pools_size() -> None:
    message = only_problem(config(gpu_memory="96GiB"), "models.m.gpu_memory")
    assert message == "96GiB is more than a GPU (pools.h100.gpu_memory is 80GiB)"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--gpu-memory-utilization", "1.2"], "--gpu-memory-utilization 1.2: is more than a GPU"),
        (["--gpu-memory-utilization=most"], "--gpu-memory-utilization most: expected a share"),
        (["--gpu-memory-utilization"], "--gpu-memory-utilization has no value"),
    ],
)
def test_a_bad_engine_flag_names_the_command(extra: list[str], words: str) -> None:
    assert words in only_problem(config(extra=extra), "models.m.process.command")


def test_gpu_memory_is_set_per_model_not_in_defaults() -> None:
    data = {**config(), "defaults": {"gpu_memory": 0.5}}
    assert problems_of(data) == ["defaults.gpu_memory: not allowed in defaults: set it per model"]


def test_a_kubernetes_model_declares_its_gpu_memory() -> None:
    data = config(gpu_memory=0.3)
    target = {"namespace": "serving", "deployment": "m", "url": "http://m.serving.svc:8000"}
    data["models"]["m"] = {"pool": "h100", "gpu_memory": 0.3, "kubernetes": target}
    assert model_of(data).memory_fraction == 0.3


# --- the sleep residue ------------------------------------------------------------------


def sleeping(*, pool: dict[str, Any] | None = None, **sleep: Any) -> dict[str, Any]:
    data = config(pool=pool, gpu_memory=0.45, sleep={**SLEEP, **sleep})
    data["pools"]["h100"]["host_memory"] = "16GiB"
    return data


def test_a_sleeper_keeps_the_default_residue_of_its_pools_gpu() -> None:
    model = model_of(sleeping())
    assert model.residue_fraction == DEFAULT_GPU_RESIDUE / (80 * GIB)


def test_without_the_pools_gpu_memory_the_default_residue_is_a_share() -> None:
    model = model_of(sleeping(pool={"gpus": 1}))
    assert model.residue_fraction == DEFAULT_GPU_RESIDUE_SHARE


@pytest.mark.parametrize(("value", "share"), [("4GiB", 0.05), (0.1, 0.1)])
def test_gpu_residue_is_a_size_or_a_share(value: object, share: float) -> None:
    assert model_of(sleeping(gpu_residue=value)).residue_fraction == pytest.approx(share)


def test_the_default_residue_is_at_most_the_footprint() -> None:
    data = sleeping(pool={"gpus": 1})
    data["models"]["m"]["gpu_memory"] = 0.02
    assert model_of(data).residue_fraction == 0.02


def test_a_model_that_never_sleeps_keeps_no_residue() -> None:
    assert model_of(config(gpu_memory=0.45)).residue_fraction == 0.0


def test_a_residue_larger_than_the_footprint_names_the_key() -> None:
    message = only_problem(sleeping(gpu_residue=0.5), "models.m.sleep.gpu_residue")
    assert message == "0.5 exceeds the model's gpu_memory (0.45)"


def test_a_size_residue_needs_the_pools_gpu_memory() -> None:
    message = only_problem(
        sleeping(pool={"gpus": 1}, gpu_residue="1GiB"), "models.m.sleep.gpu_residue"
    )
    assert "needs pools.h100.gpu_memory" in message


def test_a_residue_for_a_model_that_takes_its_gpus_whole_names_the_key() -> None:
    data = sleeping(gpu_residue="1GiB")
    del data["models"]["m"]["gpu_memory"]
    message = only_problem(data, "models.m.sleep.gpu_residue")
    assert message.startswith("counts only for a model with gpu_memory")


# --- unknown keys and check-config -------------------------------------------------------


def test_unknown_keys_near_the_new_ones_are_still_reported() -> None:
    data = sleeping(gpu_resdue="1GiB")
    data["pools"]["h100"]["gpu_memry"] = "80GiB"
    data["models"]["m"]["memory_fraction"] = 0.3  # resolved by activator, not a file key
    assert sorted(problems_of(data)) == [
        "models.m.memory_fraction: unknown key",
        "models.m.sleep.gpu_resdue: unknown key (did you mean gpu_residue?)",
        "pools.h100.gpu_memry: unknown key (did you mean gpu_memory?)",
    ]


def test_settings_built_in_code_take_a_gpu_memory_value() -> None:
    model = ModelSettings(
        name="m", served_model_name="m", process=ProcessTarget(command=tuple(COMMAND)),
        gpu_memory=GpuMemory(fraction=0.3), memory_fraction=0.3,
    )  # fmt: skip
    assert (model.gpu_memory, model.memory_fraction) == (GpuMemory(fraction=0.3), 0.3)


async def test_check_config_prints_a_line_naming_each_gpu_memory_key(tmp_path: Path) -> None:
    data = copy.deepcopy(config(gpu_memory=0.5, extra=["--gpu-memory-utilization", "0.45"]))
    data["models"]["big"] = {"pool": "h100", "gpu_memory": "96GiB",
                             "process": {"command": COMMAND}}  # fmt: skip
    data["models"]["fim"] = {"pool": "h100", "gpu_memory": 0.3,
                             "sleep": {**SLEEP, "gpu_residue": 0.4},
                             "process": {"command": COMMAND}}  # fmt: skip
    data["pools"]["h100"]["host_memory"] = "16GiB"
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = await run_cli("check-config", str(path))
    assert (code, out) == (1, ""), err
    keys = sorted(line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in err.splitlines())
    assert keys == ["models.big.gpu_memory", "models.fim.sleep.gpu_residue", "models.m.gpu_memory"]
    assert "--gpu-memory-utilization 0.45" in err


async def test_check_config_accepts_packed_models(tmp_path: Path) -> None:
    data = config(gpu_memory="36GiB")
    command = [*COMMAND, "--gpu-memory-utilization=0.45"]
    data["models"]["fim"] = {"pool": "h100", "process": {"command": command}}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = await run_cli("check-config", str(path))
    assert (code, err) == (0, "")
    assert out.strip() == f"{path}: ok (2 models, 1 pool)"
