"""The config loader: shipped configs load, every problem names its key path, and the
example config documents every key the settings have."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, get_args

import openai
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from activator.config import settings as settings_module
from activator.config.load import (
    ConfigError,
    file_keys,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from activator.config.settings import (
    AdapterSettings,
    CostSettings,
    KubernetesSettings,
    KubernetesTarget,
    LeaderElectionSettings,
    ModelDefaults,
    ModelSettings,
    PoolSettings,
    ProcessTarget,
    ReplicasSettings,
    Section,
    ServerSettings,
    Settings,
    SleepSettings,
)
from tests.conftest import ActivatorFactory
from tests.harness import model_config, unique
from tests.serve_process import run_cli

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLE_ENV = {
    "ACTIVATOR_API_KEY": "client-secret-1",
    "ACTIVATOR_ADMIN_KEY": "admin-secret-2",
    "VLLM_API_KEY": "engine-secret-3",
}
COMMAND = ["python", "-m", "activator.testing.fake_engine", "--port", "{port}"]


def base() -> dict[str, Any]:
    """A minimal valid config; error cases patch one thing into a copy of it."""
    return {
        "pools": {"l4": {"gpus": 1}},
        "models": {
            "a": {"aliases": ["alpha"], "process": {"command": list(COMMAND)}},
            "b": {
                "kubernetes": {
                    "namespace": "serving",
                    "deployment": "b",
                    "url": "http://b.serving.svc:8000",
                }
            },
        },
    }


def patched(path: str, value: Any) -> dict[str, Any]:
    """base() with the dotted `path` set to `value` (`...` deletes the key)."""
    data = copy.deepcopy(base())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def problems_of(data: object, *, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ=environ or {})
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- shipped configs -------------------------------------------------------------------


def test_local_config_loads_with_no_environment() -> None:
    settings = load_config(CONFIG_DIR / "local.yaml", environ={})

    assert len(settings.models) == 2
    assert not settings.pools
    assert any(m.served_model_name != m.name for m in settings.models.values())
    assert any(m.stream_keepalive is not None for m in settings.models.values())
    for model in settings.models.values():
        assert model.aliases
        assert model.idle_timeout <= 120
        assert model.process is not None
        assert model.process.command[:3] == ("python", "-m", "activator.testing.fake_engine")
        assert "{port}" in model.process.command
        served = model.process.command[model.process.command.index("--served-model-name") + 1]
        assert served == model.served_model_name


def test_example_config_loads_with_an_empty_environment() -> None:
    # `activator check-config config/example.yaml` passes as shipped: its secrets are
    # commented ${VAR} lines (see example_with_secrets).
    settings = load_config(CONFIG_DIR / "example.yaml", environ={})

    assert settings.server.api_keys == ()
    assert settings.server.admin_api_key is None
    assert settings.server.access_log == "json"
    assert settings.kubernetes.in_cluster is None
    assert settings.pools["a100x8"] == PoolSettings(name="a100x8", gpus=8)
    chat = settings.models["coder-chat"]
    assert chat.kubernetes == KubernetesTarget(
        namespace="serving",
        name="coder-chat",
        url="http://coder-chat.serving.svc.cluster.local:8000",
        kind="Deployment",
    )
    assert chat.upstream_api_key is None
    assert chat.idle_timeout == 900.0  # its own
    assert chat.startup_timeout == 1200.0  # from defaults
    assert settings.models["gpt-oss-120b"].kubernetes is not None
    assert settings.models["gpt-oss-120b"].kubernetes.kind == "StatefulSet"
    small = settings.models["local-small"]
    assert small.process is not None
    assert small.process.env == {"HF_HUB_OFFLINE": "1"}


async def test_check_config_accepts_the_shipped_example() -> None:
    code, out, err = await run_cli("check-config", str(CONFIG_DIR / "example.yaml"))
    assert (code, err) == (0, "")
    assert out.startswith(f"{CONFIG_DIR / 'example.yaml'}: ok")


def example_with_secrets(tmp_path: Path) -> Path:
    """example.yaml with each commented `#   key: ${VAR}` line in force, replacing the
    line under it that sets the same key, so the commented examples cannot go stale."""
    lines = (CONFIG_DIR / "example.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if match := re.fullmatch(r"(\s*)#\s+(\w+): (.*\$\{.*)", line):
            indent, key, value = match.groups()
            lines[index] = f"{indent}{key}: {value}"
            if lines[index + 1].startswith(f"{indent}{key}:"):
                lines[index + 1] = ""
    path = tmp_path / "example.yaml"
    path.write_text("\n".join(lines))
    return path


def test_example_secrets_come_from_the_environment(tmp_path: Path) -> None:
    settings = load_config(example_with_secrets(tmp_path), environ=EXAMPLE_ENV)

    assert settings.server.api_keys == ("client-secret-1",)
    assert settings.server.admin_api_key == "admin-secret-2"
    assert settings.models["coder-chat"].upstream_api_key == "engine-secret-3"
    assert settings.models["local-small"].upstream_api_key is None


def test_example_secrets_name_missing_variables(tmp_path: Path) -> None:
    path = example_with_secrets(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [
        f"{path}: server.api_keys[0]: environment variable ACTIVATOR_API_KEY is not set"
        " (use ${ACTIVATOR_API_KEY:-default})",
        f"{path}: server.admin_api_key: environment variable ACTIVATOR_ADMIN_KEY is not set"
        " (use ${ACTIVATOR_ADMIN_KEY:-default})",
        f"{path}: models.coder-chat.upstream_api_key: environment variable VLLM_API_KEY is not"
        " set (use ${VLLM_API_KEY:-default})",
    ]


SECTIONS = {
    "top": Settings,
    "server": ServerSettings,
    "kubernetes": KubernetesSettings,
    "leader_election": LeaderElectionSettings,
    "pools": PoolSettings,
    "defaults": ModelDefaults,
    "models": ModelSettings,
    "process": ProcessTarget,
    "target": KubernetesTarget,
    "sleep": SleepSettings,
    "cost": CostSettings,
    "replicas": ReplicasSettings,
    "adapters": AdapterSettings,
}


def sections_of_example() -> dict[str, set[str]]:
    """Keys used in each section of the example, over all its pools and models."""
    data = yaml.safe_load((CONFIG_DIR / "example.yaml").read_text())
    models = data["models"].values()
    return {
        "top": set(data),
        "server": set(data["server"]),
        "kubernetes": set(data["kubernetes"]),
        "leader_election": set(data["kubernetes"]["leader_election"]),
        "pools": set().union(*map(set, data["pools"].values())),
        "defaults": set(data["defaults"]),
        "models": set().union(*map(set, models)),
        "process": set().union(*(set(m["process"]) for m in models if "process" in m)),
        "target": set().union(*(set(m["kubernetes"]) for m in models if "kubernetes" in m)),
        "sleep": set().union(*(set(m["sleep"]) for m in models if "sleep" in m)),
        "cost": set().union(*(set(m["cost"]) for m in models if m.get("cost"))),
        "replicas": set(data["defaults"]["replicas"]),
        "adapters": set().union(
            *(set(a) for m in models for a in (m.get("adapters") or {}).values())
        ),
    }


@pytest.mark.parametrize("section", SECTIONS)
def test_example_config_uses_every_key(section: str) -> None:
    used = sections_of_example()[section]
    keys = set(file_keys(SECTIONS[section]))
    if section == "models":  # models may leave the defaultable keys to `defaults:`
        used |= set(ModelDefaults.model_fields)
    assert used == keys


def test_every_settings_class_is_a_section_checked_against_the_example() -> None:
    # A new section class must be added to SECTIONS (and so documented in example.yaml).
    assert set(settings_classes()) - {Section} == set(SECTIONS.values())


def test_example_config_comments_every_key() -> None:
    lines = (CONFIG_DIR / "example.yaml").read_text().splitlines()
    every_key = set().union(*(file_keys(section) for section in SECTIONS.values()))
    for key in sorted(every_key):
        first = next(i for i, line in enumerate(lines) if re.match(rf"\s*(# )?{key}:", line))
        commented = (
            "#" in lines[first].split(f"{key}:", 1)[1] or lines[first - 1].strip()[:1] == "#"
        )
        assert commented, f"example.yaml: {key} (line {first + 1}) has no comment"


# --- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2d", 172800.0),
        (" 5m ", 300.0),
        (45, 45.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "10", "10 m", "m", "1x", "-5s", "1h-30m", -1, True, None, [], float("inf")]
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like 10m"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("512KiB", 512 * 1024),
        ("32MiB", 32 * 1024**2),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("10KB", 10_000),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("64Gi", 64 * 2**30),  # Kubernetes' spelling, as in a pod's resources
        ("512Mi", 512 * 2**20),
        ("1TiB", 2**40),
    ],
)
def test_parse_size_accepts(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "32", "32mb", "32 M", "32gi", "-1", -1, True, 1.5, None])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


def test_minimal_config_gets_documented_defaults() -> None:
    settings = parse_config(base(), environ={})

    assert settings.server == ServerSettings()
    assert settings.kubernetes == KubernetesSettings()
    a = settings.models["a"]
    assert a == ModelSettings(
        name="a",
        served_model_name="a",
        aliases=("alpha",),
        process=ProcessTarget(command=tuple(COMMAND)),
    )
    assert a.names == ("a", "alpha")
    assert settings.models["b"].backend_kind == "kubernetes"


def test_defaults_apply_to_every_model_and_models_override_them() -> None:
    data = base()
    data["defaults"] = {"idle_timeout": "5m", "stream_keepalive": "10s", "max_queued": 7}
    data["models"]["a"]["idle_timeout"] = "1m"
    data["models"]["a"]["stream_keepalive"] = "off"

    models = parse_config(data, environ={}).models

    assert (models["a"].idle_timeout, models["b"].idle_timeout) == (60.0, 300.0)
    assert (models["a"].stream_keepalive, models["b"].stream_keepalive) == (None, 10.0)
    assert models["a"].max_queued == models["b"].max_queued == 7


def test_empty_lists_and_maps_may_be_left_blank() -> None:
    data = yaml.safe_load("server: {api_keys: }\nmodels:\n  a: {aliases: , process: {env: }}")
    data["models"]["a"]["process"]["command"] = COMMAND

    settings = parse_config(data, environ={})

    assert settings.server.api_keys == ()
    assert settings.models["a"].aliases == ()
    assert settings.models["a"].process == ProcessTarget(command=tuple(COMMAND))


def test_unresolved_section_is_reported_once() -> None:
    assert problems_of(patched("server", "${SERVER}")) == [
        "server: environment variable SERVER is not set (use ${SERVER:-default})"
    ]


def test_unquoted_off_means_off() -> None:
    # YAML 1.1 reads a bare `off` as the boolean false.
    data = yaml.safe_load("server: {access_log: off}\ndefaults: {stream_keepalive: off}")
    data["models"] = base()["models"]

    settings = parse_config(data, environ={})

    assert settings.server.access_log == "off"
    assert settings.models["a"].stream_keepalive is None


def test_settings_are_read_only() -> None:
    settings = parse_config(base(), environ={})
    with pytest.raises(TypeError):
        settings.models["c"] = settings.models["a"]  # type: ignore[index]
    with pytest.raises(ValidationError, match="frozen"):
        settings.server.port = 1


# --- environment substitution ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${KEY}", {"KEY": "s3cret"}, "s3cret"),
        ("Bearer-${KEY}-x", {"KEY": "s3cret"}, "Bearer-s3cret-x"),
        ("${KEY:-fallback}", {}, "fallback"),
        ("${KEY:-fallback}", {"KEY": "set"}, "set"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("cost$$5", {}, "cost$5"),
        ("plain $ sign", {}, "plain $ sign"),
    ],
)
def test_env_substitution(value: str, environ: dict[str, str], expected: str) -> None:
    data = patched("models.a.upstream_api_key", value)
    settings = parse_config(data, environ=environ)
    assert settings.models["a"].upstream_api_key == expected
    assert type(settings.models["a"].upstream_api_key) is str


def test_env_values_may_fill_numbers_and_booleans() -> None:
    data = base()
    data["server"] = {"port": "${PORT}", "max_body_bytes": "${BODY:-1024}"}
    data["kubernetes"] = {"in_cluster": "${IN_CLUSTER}"}
    data["defaults"] = {"idle_timeout": "${IDLE}"}

    settings = parse_config(data, environ={"PORT": "9090", "IN_CLUSTER": "false", "IDLE": "90"})

    assert settings.server.port == 9090
    assert settings.server.max_body_bytes == 1024
    assert settings.kubernetes.in_cluster is False
    assert settings.models["a"].idle_timeout == 90.0


def test_env_problems_name_key_and_variable_never_the_value() -> None:
    data = base()
    data["models"]["a"]["health_path"] = "${SECRET}"  # set, but not a path
    data["models"]["a"]["upstream_api_key"] = "${UNSET}"
    data["models"]["a"]["process"]["env"] = {"TOKEN": "${ALSO_UNSET}"}
    data["server"] = {"port": "${SECRET}"}

    problems = problems_of(data, environ={"SECRET": "hunter2"})

    assert "hunter2" not in "\n".join(problems)
    assert sorted(problems) == sorted(
        [
            "models.a.upstream_api_key: environment variable UNSET is not set"
            " (use ${UNSET:-default})",
            "models.a.process.env.TOKEN: environment variable ALSO_UNSET is not set"
            " (use ${ALSO_UNSET:-default})",
            "server.port: expected an integer, got a string",
            "models.a.health_path: must start with /",
        ]
    )


def test_malformed_reference_is_an_error() -> None:
    problems = problems_of(patched("models.a.upstream_api_key", "${NOT CLOSED"))
    assert problems == [
        "models.a.upstream_api_key: malformed ${...} reference (expected ${VAR} or ${VAR:-default})"
    ]


# --- errors: each names its key path ---------------------------------------------------

ERRORS = [
    # (dotted path to set, value, expected problem line)
    ("server.port", 70000, "server.port: must be 0..65535"),
    ("server.port", True, "server.port: expected an integer (got true)"),
    ("server.port", "8080", "server.port: expected an integer (got '8080')"),
    ("server.host", "", "server.host: must not be empty"),
    ("server.api_keys", "key", "server.api_keys: expected a list, got a string"),
    ("server.api_keys", ["ok", "", 3], "server.api_keys[1]: must not be empty"),
    ("server.api_keys", ["ok", "", 3], "server.api_keys[2]: expected a string, got an integer"),
    (
        "server.max_body_bytes",
        "lots",
        "server.max_body_bytes: expected a size in bytes or like 32MiB",
    ),
    ("server.max_body_bytes", 0, "server.max_body_bytes: must be greater than 0"),
    ("server.max_queued_total", 0, "server.max_queued_total: must be 1 or more"),
    ("server.shutdown_grace", "0s", "server.shutdown_grace: must be greater than 0"),
    ("server.access_log", "xml", "server.access_log: expected one of text, json, off"),
    ("server.acces_log", "text", "server.acces_log: unknown key (did you mean access_log?)"),
    ("server", [1], "server: expected a mapping, got a list"),
    ("kubernetes.in_cluster", "maybe", "kubernetes.in_cluster: expected auto, true or false"),
    ("kubernetes.watch_timeout", "soon", "kubernetes.watch_timeout: expected a duration like 10m"),
    ("kubernetes.namespace", "x", "kubernetes.namespace: unknown key"),
    ("pools.l4.gpus", 0, "pools.l4.gpus: must be 1 or more"),
    ("pools.l4", {}, "pools.l4.gpus: required"),
    ("pools.l4.gpu", 1, "pools.l4.gpu: unknown key (did you mean gpus?)"),
    ("defaults.idle_timeout", "10", "defaults.idle_timeout: expected a duration like 10m"),
    ("defaults.pool", "l4", "defaults.pool: not allowed in defaults: set it per model"),
    ("defaults.process", {}, "defaults.process: not allowed in defaults: set it per model"),
    ("defaults.idle", "1m", "defaults.idle: unknown key"),
    ("models", {}, "models: required: define at least one model"),
    ("models", ..., "models: required: define at least one model"),
    ("models.a.idle_timeout", "soon", "models.a.idle_timeout: expected a duration like 10m"),
    ("models.a.idle_timeout", 0, "models.a.idle_timeout: must be greater than 0"),
    ("models.a.startup_timeout", -5, "models.a.startup_timeout: expected a duration like 10m"),
    ("models.a.max_queued", 1.5, "models.a.max_queued: expected an integer (got 1.5)"),
    ("models.a.health_path", "health", "models.a.health_path: must start with /"),
    ("models.a.stream_keepalive", "on", "models.a.stream_keepalive: expected a duration like 10m"),
    ("models.a.upstream_api_key", "", "models.a.upstream_api_key: must not be empty"),
    ("models.a.aliases", "alpha", "models.a.aliases: expected a list (got 'alpha')"),
    (
        "models.a.served_model_name",
        7,
        "models.a.served_model_name: expected a string (got 7)",
    ),
    ("models.a.pool", "h100", "models.a.pool: unknown pool h100 (pools: l4)"),
    ("models.a.gpus", 0, "models.a.gpus: must be 1 or more"),
    (
        "models.a.idle_timout",
        "1m",
        "models.a.idle_timout: unknown key (did you mean idle_timeout?)",
    ),
    ("models.a", None, "models.a: needs exactly one of process or kubernetes"),
    ("models.a", "x", "models.a: expected a mapping (got 'x')"),
    (
        "models.b.process",
        {"command": COMMAND},
        "models.b: needs exactly one of process or kubernetes",
    ),
    (
        "models.a.process.comand",
        ["x"],
        "models.a.process.comand: unknown key (did you mean command?)",
    ),
    ("models.a.process.command", ..., "models.a.process.command: required"),
    ("models.a.process.command", [], "models.a.process.command: must not be empty"),
    (
        "models.a.process.command",
        "serve",
        "models.a.process.command: expected a list (got 'serve')",
    ),
    ("models.a.process.command", ["serve", 3], "models.a.process.command[1]: expected a string"),
    (
        "models.a.process.command",
        ["serve"],
        "models.a.process.command: must contain {port} when port is 0",
    ),
    ("models.a.process.port", -1, "models.a.process.port: must be 0..65535"),
    (
        "models.a.process.env",
        {"A": None},
        "models.a.process.env.A: expected a string or number, got null",
    ),
    ("models.a.process.env", {"A": True}, "models.a.process.env.A: expected a string or number"),
    ("models.a.process.env", ["A=1"], "models.a.process.env: expected a mapping, got a list"),
    ("models.a.process.stop_grace", "1 hour", "models.a.process.stop_grace: expected a duration"),
    ("models.a.process.log_lines", 0, "models.a.process.log_lines: must be 1 or more"),
    ("models.a.process", "python", "models.a.process: expected a mapping (got 'python')"),
    ("models.b.kubernetes.namespace", ..., "models.b.kubernetes.namespace: required"),
    ("models.b.kubernetes.url", ..., "models.b.kubernetes.url: required"),
    (
        "models.b.kubernetes.deployment",
        ...,
        "models.b.kubernetes: needs exactly one of deployment or statefulset",
    ),
    (
        "models.b.kubernetes.statefulset",
        "b",
        "models.b.kubernetes: needs exactly one of deployment or statefulset",
    ),
    (
        "models.b.kubernetes.url",
        "b.serving:8000",
        "models.b.kubernetes.url: expected http(s)://host[:port]",
    ),
    (
        "models.b.kubernetes.url",
        "ftp://b:21",
        "models.b.kubernetes.url: expected http(s)://host[:port]",
    ),
    (
        "models.b.kubernetes.url",
        "http://b:99999",
        "models.b.kubernetes.url: expected http(s)://host[:port]",
    ),
    (
        "models.b.kubernetes.url",
        "http://u:p@b:80",
        "models.b.kubernetes.url: expected http(s)://host[:port]",
    ),
    (
        "models.b.kubernetes.url",
        "http://b:8000/v1",
        "models.b.kubernetes.url: must be http(s)://host[:port] with no path",
    ),
    ("models.b.kubernetes.replicas", 1, "models.b.kubernetes.replicas: unknown key"),
    ("extra", 1, "extra: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "expected"), ERRORS, ids=[e[2] for e in ERRORS])
def test_problem_names_its_key_path(path: str, value: Any, expected: str) -> None:
    problems = problems_of(patched(path, value))
    assert any(line.startswith(expected) for line in problems), problems


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://b:8000", "http://b:8000"),
        ("https://b.example", "https://b.example"),
        ("http://b:8000/", "http://b:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_kubernetes_url_accepts(url: str, kept: str) -> None:
    target = (
        parse_config(patched("models.b.kubernetes.url", url), environ={}).models["b"].kubernetes
    )
    assert target is not None
    assert target.url == kept


def test_process_port_that_is_fixed_needs_no_placeholder() -> None:
    data = patched("models.a.process", {"command": ["engine", "--port", "9000"], "port": 9000})
    process = parse_config(data, environ={}).models["a"].process
    assert process is not None
    assert process.port == 9000


def test_all_problems_are_reported_at_once() -> None:
    data = base()
    data["server"] = {"port": "x", "access_log": "xml"}
    data["models"]["a"]["idle_timeout"] = "soon"
    data["models"]["b"]["kubernetes"]["url"] = "nowhere"

    problems = problems_of(data)

    assert [line.split(":")[0] for line in problems] == [
        "server.port",
        "server.access_log",
        "models.a.idle_timeout",
        "models.b.kubernetes.url",
    ]


def test_problem_shows_the_offending_value() -> None:
    problems = problems_of(patched("models.a.idle_timeout", "10 minutes"))
    assert problems == [
        "models.a.idle_timeout: expected a duration like 10m, 30s, 1h30m, 250ms or 2d"
        " (got '10 minutes')"
    ]


def test_long_values_are_cut_short() -> None:
    [line] = problems_of(patched("models.a.health_path", "x" * 5000))
    assert line.startswith("models.a.health_path: must start with / (got 'xxx")
    assert line.endswith("...)")
    assert len(line) < 120


SECRET_VALUE = 31415926535  # a numeric token written without quotes: not a string


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("server.api_keys", [SECRET_VALUE]),
        ("server.admin_api_key", SECRET_VALUE),
        ("defaults.upstream_api_key", SECRET_VALUE),
        ("models.a.upstream_api_key", SECRET_VALUE),
        ("models.a.process.env", {"TOKEN": True}),
    ],
)
def test_secret_values_are_never_shown(path: str, value: Any) -> None:
    [line] = problems_of(patched(path, value))
    assert line.startswith(path)
    assert str(SECRET_VALUE) not in line
    assert "(got" not in line


def test_secrets_are_hidden_in_repr() -> None:
    data = patched("server", {"api_keys": ["k-123"], "admin_api_key": "adm-456"})
    data["models"]["a"]["upstream_api_key"] = "up-789"
    data["models"]["a"]["process"]["env"] = {"TOKEN": "env-000"}

    text = repr(parse_config(data, environ={}))

    assert "api_keys='***'" in text
    assert "env='***'" in text
    assert not {"k-123", "adm-456", "up-789", "env-000"} & set(re.findall(r"[\w-]+", text))


def test_values_from_the_environment_are_never_shown() -> None:
    data = patched("models.a.idle_timeout", "${IDLE}")
    assert problems_of(data, environ={"IDLE": "hunter2"}) == [
        "models.a.idle_timeout: expected a duration like 10m, 30s, 1h30m, 250ms or 2d"
    ]


def test_a_bad_default_is_reported_once_not_under_every_model() -> None:
    data = patched("defaults", {"idle_timeout": "soon", "max_queued": 5})
    assert problems_of(data) == [
        "defaults.idle_timeout: expected a duration like 10m, 30s, 1h30m, 250ms or 2d (got 'soon')"
    ]


def test_problems_between_models_are_reported_with_the_models_own() -> None:
    data = base()
    data["models"]["b"].update(idle_timeout="soon", aliases=["alpha"], pool="h100")
    data["models"]["b"]["kubernetes"]["url"] = "nowhere"

    assert [line.split(":")[0] for line in problems_of(data)] == [
        "models.b.idle_timeout",
        "models.b.kubernetes.url",
        "models.b.aliases[0]",
        "models.b.pool",
    ]


def settings_classes() -> list[type[BaseModel]]:
    return [
        value
        for value in vars(settings_module).values()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and value.__module__ == settings_module.__name__
    ]


def scalar_fields(*types: type) -> list[Any]:
    """A param (class, field) for each settings field of one of these types (or | None)."""
    return [
        pytest.param(cls, key, id=f"{cls.__name__}.{key}")
        for cls in settings_classes()
        for key, field in cls.model_fields.items()
        if key in cls.__annotations__  # declared there, not inherited
        and (set(get_args(field.annotation)) or {field.annotation}) - {type(None)} <= set(types)
    ]


@pytest.mark.parametrize(("cls", "key"), scalar_fields(int, float, bool))
def test_numbers_and_booleans_are_not_read_from_yaml_strings(
    cls: type[BaseModel], key: str
) -> None:
    # pydantic's plain int/float/bool would turn "1" into a number; a YAML string in a
    # numeric field is a mistake worth reporting (activator.config.types).
    with pytest.raises(ValidationError) as caught:
        cls.model_validate({key: "1"})
    assert (key,) in [error["loc"] for error in caught.value.errors()]


# --- names, aliases and pools ----------------------------------------------------------


@pytest.mark.parametrize(
    ("aliases", "expected"),
    [
        (["a"], "models.b.aliases[0]: a is already the name of model a"),
        (["x", "alpha"], "models.b.aliases[1]: alpha is already an alias of model a"),
        (["b"], "models.b.aliases[0]: repeats the model's own name"),
    ],
)
def test_alias_collisions_are_errors(aliases: list[str], expected: str) -> None:
    assert problems_of(patched("models.b.aliases", aliases)) == [expected]


def test_alias_colliding_with_a_later_model_name_is_an_error() -> None:
    data = patched("models.a.aliases", ["b"])
    assert problems_of(data) == ["models.a.aliases[0]: b is already the name of model b"]


def test_served_model_name_is_also_a_name_clients_may_send() -> None:
    models = load_config(CONFIG_DIR / "local.yaml", environ={}).models
    assert models["demo-chat"].names == ("demo-chat", "chat", "tiny-chat-v1")
    assert models["demo-small"].names == ("demo-small", "small")  # served as its name


async def test_the_model_a_reply_names_can_be_sent_back(activator: ActivatorFactory) -> None:
    served = unique("sent-back")
    running = await activator({"models": {"m": model_config(served)}})
    messages: Any = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="-", max_retries=0) as client:
        first = await client.chat.completions.create(model="m", messages=messages, max_tokens=1)
        again = await client.chat.completions.create(
            model=first.model, messages=messages, max_tokens=1
        )
    assert first.model == again.model == served


@pytest.mark.parametrize(
    ("b", "expected"),
    [
        (
            {"served_model_name": "a"},
            "models.b.served_model_name: a is already the name of model a",
        ),
        (
            {"served_model_name": "alpha"},
            "models.b.served_model_name: alpha is already an alias of model a",
        ),
        (
            {"served_model_name": "engine-a"},
            "models.b.served_model_name: engine-a is already the served_model_name of model a",
        ),
        (
            {"aliases": ["engine-a"]},
            "models.b.aliases[0]: engine-a is already the served_model_name of model a",
        ),
    ],
)
def test_served_model_name_colliding_with_another_models_name_is_an_error(
    b: dict[str, Any], expected: str
) -> None:
    # Two models with one served name, even on two engines, would make a request for that
    # name ambiguous: it is an error too.
    data = patched("models.a.served_model_name", "engine-a")
    data["models"]["b"].update(b)
    [line] = problems_of(data)
    assert line == f"{expected} (a served_model_name is accepted as a model name too)"


def test_served_model_name_may_repeat_the_models_own_alias() -> None:
    data = patched("models.a.served_model_name", "alpha")
    assert parse_config(data, environ={}).models["a"].names == ("a", "alpha")


def test_model_name_with_spaces_is_an_error() -> None:
    data = base()
    data["models"]["my model"] = data["models"].pop("a")
    assert problems_of(data) == ["models.my model: model name must be a string without spaces"]


def test_pool_capacity_is_enforced() -> None:
    data = base()
    data["pools"]["a100x8"] = {"gpus": 8}
    data["models"]["a"].update(pool="l4", gpus=2)
    data["models"]["b"].update(pool="a100x8", gpus=8)

    assert problems_of(data) == ["models.a.gpus: 2 exceeds pool l4 capacity of 1"]


def test_pool_members_get_their_pool_and_gpus() -> None:
    data = base()
    data["models"]["a"]["pool"] = "l4"
    settings = parse_config(data, environ={})
    assert (settings.models["a"].pool, settings.models["a"].gpus) == ("l4", 1)
    assert (settings.models["b"].pool, settings.models["b"].gpus) == (None, 1)


def test_a_reference_to_an_invalid_pool_is_not_reported_again() -> None:
    data = patched("pools.l4.gpus", 0)
    data["models"]["a"]["pool"] = "l4"
    assert problems_of(data) == ["pools.l4.gpus: must be 1 or more (got 0)"]


def test_pool_reference_without_pools_says_none_are_defined() -> None:
    data = patched("models.a.pool", "l4")
    del data["pools"]
    assert problems_of(data) == ["models.a.pool: unknown pool l4 (pools: none defined)"]


# --- replicas (scale-out) --------------------------------------------------------------


def test_replicas_default_to_one_engine_and_defaults_merge_key_by_key() -> None:
    data = base()
    data["defaults"] = {"replicas": {"target_concurrency": 4, "scale_down_delay": "30s"}}
    data["models"]["b"]["replicas"] = {"max": 3, "target_concurrency": 8}
    settings = parse_config(data, environ={})
    a, b = settings.models["a"].replicas, settings.models["b"].replicas
    assert (a.max, a.target_concurrency, a.scale_down_delay) == (1, 4.0, 30.0)
    assert (b.max, b.target_concurrency, b.scale_down_delay, b.burst_factor) == (3, 8, 30, 2)


@pytest.mark.parametrize(
    ("url", "service", "expected"),
    [
        ("http://b.serving.svc:8000", None, "b"),
        ("http://b-chat.serving.svc.cluster.local:8000", None, "b-chat"),
        ("http://b:8000", None, "b"),
        ("http://10.0.0.7:8000", "b-svc", "b-svc"),
        ("http://10.0.0.7:8000", None, None),
        ("http://[fd00::7]:8000", None, None),
        ("http://localhost:8000", None, None),
    ],
)
def test_the_service_defaults_to_the_first_label_of_the_urls_host(
    url: str, service: str | None, expected: str | None
) -> None:
    target = KubernetesTarget(namespace="serving", name="b", url=url, service=service)
    assert target.service_name == expected


@pytest.mark.parametrize(
    ("model", "replicas", "expected"),
    [
        ("a", {"max": 2}, "models.a.replicas: max above 1 needs a kubernetes target"),
        ("b", {"burst_factor": 0.5}, "models.b.replicas.burst_factor: must be 1 or more"),
        ("b", {"target_concurrency": 0}, "models.b.replicas.target_concurrency: must be greater"),
        ("b", {"max": 0}, "models.b.replicas.max: must be 1 or more"),
        ("b", {"scale_down_delay": "soon"}, "models.b.replicas.scale_down_delay: expected a"),
    ],
)
def test_replicas_problems_name_their_key(
    model: str, replicas: dict[str, Any], expected: str
) -> None:
    data = patched(f"models.{model}.replicas", replicas)
    (problem,) = problems_of(data)
    assert problem.startswith(expected), problem


def test_several_replicas_need_a_service_name_and_no_sleep() -> None:
    data = patched("models.b.replicas", {"max": 2})
    data["models"]["b"]["kubernetes"]["url"] = "http://10.0.0.7:8000"
    (problem,) = problems_of(data)
    assert problem.startswith("models.b.kubernetes: needs service: with replicas.max above 1")
    data["models"]["b"]["kubernetes"]["service"] = "b"
    target = parse_config(data, environ={}).models["b"].kubernetes
    assert target is not None and target.service_name == "b"
    data["models"]["b"]["sleep"] = {"level": 2}
    (problem,) = problems_of(data)
    assert problem.startswith("models.b.replicas: max above 1 cannot be combined with sleep")


def test_every_replica_must_fit_in_the_pool() -> None:
    data = patched("models.b.replicas", {"max": 3})
    data["pools"]["l4"]["gpus"] = 4
    data["models"]["b"].update(pool="l4", gpus=2)
    assert problems_of(data) == [
        "models.b.replicas.max: 3 replicas x 2 GPUs exceed pool l4 capacity of 4: at most 2 "
        "could ever run"
    ]
    data["models"]["b"]["replicas"]["max"] = 2
    assert parse_config(data, environ={}).models["b"].replicas.max == 2


# --- files -----------------------------------------------------------------------------


def test_yaml_syntax_error_is_one_line_with_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  a: {process: [unclosed\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    [line] = caught.value.problems
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML: .+", line), line


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("models:\n  a: {}\n  a: {}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    assert caught.value.problems == [f"{path}:3:3: invalid YAML: duplicate key a"]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "models:\n"
        "  a: &engine {idle_timeout: 1m, process: {command: [e, '{port}']}}\n"
        "  b: {<<: *engine, idle_timeout: 2m}\n"
    )
    models = load_config(path, environ={}).models
    assert (models["a"].idle_timeout, models["b"].idle_timeout) == (60.0, 120.0)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [f"{path}: cannot read config: No such file or directory"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "<file>: models: required: define at least one model"),
        ("- a\n- b\n", "<file>: expected a mapping at the top level, got a list"),
    ],
)
def test_empty_or_non_mapping_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.problems == [expected.replace("<file>", str(path))]


def test_min_residency_may_be_zero_but_not_negative() -> None:
    base = {"models": {"a": {"process": {"command": ["x", "{port}"]}}}}
    settings = parse_config({**base, "defaults": {"min_residency": "0s"}}, environ={})
    assert settings.models["a"].min_residency == 0.0
    with pytest.raises(ConfigError, match=r"models\.a\.min_residency"):
        parse_config(
            {"models": {"a": {"min_residency": -1, "process": {"command": ["x", "{port}"]}}}},
            environ={},
        )


async def test_kubernetes_limits_reach_the_backend_tuning(tmp_path: Path) -> None:
    from activator.backends.kube.cluster import KubeCluster

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    settings = parse_config(
        {
            "kubernetes": {
                "kubeconfig": str(kubeconfig),
                "scheduling_grace": "10s",
                "stop_timeout": "2m",
                "revert_limit": 5,
            },
            "models": {"a": {"process": {"command": ["x", "{port}"]}}},
        },
        environ={},
    )
    cluster = await KubeCluster.connect(settings.kubernetes)
    try:
        assert cluster.tuning.scheduling_grace == 10.0
        assert cluster.tuning.stop_timeout == 120.0
        assert cluster.tuning.revert_limit == 5
    finally:
        await cluster.aclose()
