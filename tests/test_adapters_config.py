"""The config of LoRA adapters (docs/adapters.md): names shared with the models, the
folder scanned at load, the default of max_adapters, and problems naming their key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from activator.config.load import ConfigError, parse_config
from activator.model.lifecycle import loses_adapters

pytestmark = pytest.mark.timeout(30)


def model(*flags: str, **keys: Any) -> dict[str, Any]:
    return {"process": {"command": ["engine", "--port", "{port}", *flags]}, **keys}


def problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(config, environ={})
    return caught.value.problems


def test_adapter_names_and_aliases_share_the_models_namespace() -> None:
    config = {
        "models": {
            "base": model(adapters={"sql": {"path": "/a/sql", "aliases": ["other"]},
                                    "docs": {"path": "/a/docs", "aliases": ["sql"]}}),
            "other": model(aliases=["base2"]),
            "third": model(adapters={"base2": {"path": "/a/x"}}),
        }
    }  # fmt: skip
    assert sorted(problems(config)) == sorted(
        [
            "models.base.adapters.sql.aliases[0]: other is already the name of model other",
            "models.base.adapters.docs.aliases[0]: sql is already adapter sql of model base",
            "models.third.adapters.base2: base2 is already an alias of model other",
        ]
    )


def test_an_adapter_needs_a_path_and_the_problem_names_the_key() -> None:
    found = problems({"models": {"base": model(adapters={"sql": {"aliases": ["q"]}})}})
    assert found == ["models.base.adapters.sql.path: required"]


def test_adapter_dir_adds_each_folder_with_an_adapter_config(tmp_path: Path) -> None:
    for name in ("sql", "docs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (tmp_path / "not-an-adapter").mkdir()
    config = {
        "models": {
            "base": model(adapter_dir=str(tmp_path), adapters={"sql": {"path": "/elsewhere"}})
        }
    }
    settings = parse_config(config, environ={}).models["base"]
    assert {name: a.path for name, a in settings.adapters.items()} == {
        "sql": "/elsewhere",  # named in adapters: wins
        "docs": str(tmp_path / "docs"),
    }


def test_adapter_dir_names_clash_like_any_other(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "adapter_config.json").write_text("{}")
    config = {"models": {"base": model(adapter_dir=str(tmp_path)), "other": model()}}
    assert problems(config) == [
        "models.base.adapters.other: other is already the name of model other"
    ]


def test_max_adapters_defaults_to_the_engines_max_loras_else_eight() -> None:
    config = {
        "models": {
            "flag": model("--max-loras", "4"),
            "equals": model("--max-loras=3"),
            "none": model(),
            "own": model("--max-loras", "4", max_adapters=2),
        }
    }
    models = parse_config(config, environ={}).models
    limits = {name: m.adapter_limit for name, m in models.items()}
    assert limits == {"flag": 4, "equals": 3, "none": 8, "own": 2}


def test_an_adapters_idle_timeout_defaults_to_its_bases() -> None:
    config = {
        "models": {
            "base": model(idle_timeout="5m", adapters={"a": {"path": "/a"},
                                                       "b": {"path": "/b", "idle_timeout": "30s"}})
        }
    }  # fmt: skip
    settings = parse_config(config, environ={}).models["base"]
    assert settings.adapter_idle_timeout("a") == 300.0
    assert settings.adapter_idle_timeout("b") == 30.0


@pytest.mark.parametrize(
    ("state", "level", "loses"),
    [
        ("stopped", None, True),
        ("failed", None, True),
        ("starting", None, True),  # a new engine (or a lost one coming back)
        ("waking", 1, False),  # level 1 keeps the engine's adapters
        ("waking", 2, True),
        ("ready", None, False),
        ("draining", None, False),
        ("sleeping", 1, False),
    ],
)
def test_which_states_lose_the_engines_adapters(state: str, level: int | None, loses: bool) -> None:
    keys: dict[str, Any] = {}
    if level is not None:
        keys["sleep"] = {"level": level, "host_memory": "1Gi"} if level == 1 else {"level": 2}
    settings = parse_config({"models": {"m": model(**keys)}}, environ={}).models["m"]
    assert loses_adapters(state, settings) is loses
