"""Load and validate the YAML config into the frozen objects of `activator.settings`.

Validation collects every problem before failing, and reports each as one line
`key.path: problem`, so a person fixes a config in one pass. Messages never echo
values: a value may have come from `${ENV}` and be a secret.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from activator.settings import (
    KubernetesSettings,
    KubernetesTarget,
    ModelSettings,
    PoolSettings,
    ProcessTarget,
    ServerSettings,
    Settings,
    WorkloadKind,
)

__all__ = ["ConfigError", "load_config", "parse_config", "parse_duration", "parse_size"]


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `key.path: problem` line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- scalars ---------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)")


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `10m`, `1h30m`, `250ms` or a plain int/float of seconds.

    Accepts 0 (callers decide whether zero is meaningful); rejects negatives and bools.
    """
    value = _from_env(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value) and value >= 0:
            return float(value)
        raise ValueError("expected a duration like 10m, not a negative or infinite number")
    if isinstance(value, str):
        text = value.strip()
        parts = list(_DURATION_PART.finditer(text))
        if parts and "".join(p.group(0) for p in parts) == text:
            return sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    raise ValueError("expected a duration like 10m (units: ms, s, m, h, d; e.g. 1h30m)")


def parse_size(value: object) -> int:
    """Bytes from an int or `512KiB`, `32MiB`, `1GiB`, `10MB` (KB/MB/GB are powers of 1000)."""
    value = _from_env(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError("expected a size in bytes or like 32MiB (units: B, KB, MB, GB, KiB, MiB, GiB)")


class _EnvStr(str):
    """A string produced by `${VAR}` substitution. Environment variables are always
    text, so numeric and boolean settings accept these when they spell a number or
    true/false, e.g. `port: ${PORT:-8080}`; YAML-typed values stay strict."""


def _from_env(value: object) -> object:
    if not isinstance(value, _EnvStr):
        return value
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), value)


# --- converters: value -> typed value, raising ValueError with the problem -------------

Converter = Callable[[object], Any]
_Number = TypeVar("_Number", int, float)


class _Invalid(ValueError):
    """Problems below the value being converted (list items, map entries)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in items))
        self.items = items


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return str(value)  # a plain str, not the _EnvStr marker


def _integer(*, minimum: int, maximum: int | None = None) -> Converter:
    def convert(value: object) -> int:
        value = _from_env(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f"..{maximum}" if maximum is not None else " or more"
            raise ValueError(f"must be {minimum}{upper}")
        return value

    return convert


def _positive(parse: Callable[[object], _Number]) -> Callable[[object], _Number]:
    def convert(value: object) -> _Number:
        if (number := parse(value)) <= 0:
            raise ValueError("must be greater than 0")
        return number

    return convert


_duration, _size = _positive(parse_duration), _positive(parse_size)


def _duration_or_zero(value: object) -> float:
    if (number := parse_duration(value)) < 0:
        raise ValueError("must not be negative")
    return number


def _optional(convert: Converter) -> Converter:
    return lambda value: None if value is None else convert(value)


def _keepalive(value: object) -> float | None:
    # Unquoted `off` is the boolean false in YAML 1.1, so both spellings mean off.
    if value is None or value is False or value == "off":
        return None
    return _duration(value)


def _access_log(value: object) -> str:
    value = "off" if value is False else value  # unquoted `off` again
    if value not in ("text", "json", "off"):
        raise ValueError("expected one of text, json, off")
    return str(value)


def _one_of(*choices: str) -> Converter:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return convert


def _in_cluster(value: object) -> bool | None:
    value = _from_env(value)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise ValueError("expected auto, true or false")


def _path(value: object) -> str:
    if not _text(value).startswith("/"):
        raise ValueError("must start with /")
    return str(value)


def _url(value: object) -> str:
    url = _text(value).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("expected http(s)://host[:port]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        raise ValueError("expected http(s)://host[:port]")
    if parts.path or parts.query or parts.fragment:
        raise ValueError("must be http(s)://host[:port] with no path (paths come from requests)")
    return url


def _list_of(convert: Converter) -> Converter:
    def convert_list(value: object) -> tuple[Any, ...]:
        if value is None:
            return ()  # `aliases:` left empty
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_kind(value)}")
        items, problems = [], []
        for index, item in enumerate(value):
            if isinstance(item, _Unresolved):
                continue  # already reported by substitution
            try:
                items.append(convert(item))
            except ValueError as exc:
                problems.append((f"[{index}]", str(exc)))
        if problems:
            raise _Invalid(problems)
        return tuple(items)

    return convert_list


def _command(value: object) -> tuple[str, ...]:
    command: tuple[str, ...] = _list_of(_text)(value)
    if not command:
        raise ValueError("must not be empty")
    return command


def _env_map(value: object) -> Mapping[str, str]:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {_kind(value)}")
    env, problems = {}, []
    for key, item in value.items():
        if isinstance(item, _Unresolved):
            continue  # already reported by substitution
        if isinstance(item, int | float | str) and not isinstance(item, bool):
            env[str(key)] = str(item)  # numbers are stringified: env values are text
        else:
            problems.append((f".{key}", f"expected a string or number, got {_kind(item)}"))
    if problems:
        raise _Invalid(problems)
    return MappingProxyType(env)


def _kind(value: object) -> str:
    """What a value is, for messages (never the value itself: it may be a secret)."""
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "a mapping"), (type(None), "null")]  # fmt: skip
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


# --- schema ----------------------------------------------------------------------------

SERVER_KEYS: Mapping[str, Converter] = {
    "host": _text,
    "port": _integer(minimum=0, maximum=65535),
    "api_keys": _list_of(_text),
    "admin_api_key": _optional(_text),
    "max_body_bytes": _size,
    "max_queued_total": _integer(minimum=1),
    "shutdown_grace": _duration,
    "body_timeout": _duration,
    "access_log": _access_log,
}
KUBERNETES_KEYS: Mapping[str, Converter] = {
    "kubeconfig": _optional(_text),
    "in_cluster": _in_cluster,
    "context": _optional(_text),
    "request_timeout": _duration,
    "watch_timeout": _duration,
    "scheduling_grace": _duration,
    "stop_timeout": _duration,
    "revert_limit": _integer(minimum=1),
    "on_shutdown": _one_of("keep", "stop"),
}
POOL_KEYS: Mapping[str, Converter] = {"gpus": _integer(minimum=1)}
# Per-model keys that `defaults:` may also set.
DEFAULTABLE_KEYS: Mapping[str, Converter] = {
    "idle_timeout": _duration,
    "startup_timeout": _duration,
    "max_queued": _integer(minimum=1),
    "health_path": _path,
    "stream_keepalive": _keepalive,
    "upstream_read_timeout": _duration,
    "min_residency": _duration_or_zero,  # 0: a running model has no protected time
    "drain_timeout": _duration,
    "max_wait": _duration,
    "upstream_api_key": _optional(_text),
}
MODEL_KEYS: Mapping[str, Converter] = {
    **DEFAULTABLE_KEYS,
    "aliases": _list_of(_text),
    "served_model_name": _text,
    "pool": _text,
    "gpus": _integer(minimum=1),
    "process": lambda value: value,  # sections: validated by _process / _kubernetes_target
    "kubernetes": lambda value: value,
}
PROCESS_KEYS: Mapping[str, Converter] = {
    "command": _command,
    "port": _integer(minimum=0, maximum=65535),
    "host": _text,
    "env": _env_map,
    "cwd": _optional(_text),
    "stop_grace": _duration,
    "log_lines": _integer(minimum=1),
}
KUBERNETES_TARGET_KEYS: Mapping[str, Converter] = {
    "namespace": _text,
    "deployment": _text,
    "statefulset": _text,
    "url": _url,
}
TOP_LEVEL_KEYS = frozenset({"server", "kubernetes", "pools", "defaults", "models"})


# --- reading ---------------------------------------------------------------------------


class _Reader:
    """Collects problems while sections are converted; one per config being parsed."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(
        self, data: object, path: str, *, allowed: Mapping[str, object] | None
    ) -> dict[Any, Any]:
        """The raw entries of a section, after reporting a non-mapping and unknown keys
        (`allowed=None`: the keys are names the user chooses, as under `models:`)."""
        if data is None or isinstance(data, _Unresolved):
            return {}
        if not isinstance(data, dict):
            self.add(path, f"expected a mapping, got {_kind(data)}")
            return {}
        if allowed is None:
            return data
        for key in (key for key in data if key not in allowed):  # in file order
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.add(_join(path, key), f"unknown key{hint}")
        return {key: value for key, value in data.items() if key in allowed}

    def convert(self, data: object, path: str, keys: Mapping[str, Converter]) -> dict[str, Any]:
        """Typed values of the keys present in the section; bad ones are reported and left
        out, so the dataclass default stands in and parsing goes on."""
        converted: dict[str, Any] = {}
        for key, raw in self.mapping(data, path, allowed=keys).items():
            if isinstance(raw, _Unresolved):
                continue  # already reported by substitution
            try:
                converted[key] = keys[key](raw)
            except _Invalid as exc:
                for suffix, message in exc.items:
                    self.add(_join(path, key) + suffix, message)
            except ValueError as exc:
                self.add(_join(path, key), str(exc))
        return converted


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Unresolved:
    """Stands for a value whose `${VAR}` could not be substituted (already reported)."""


_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _substitute(data: object, path: str, *, environ: Mapping[str, str], reader: _Reader) -> object:
    """Replace `${VAR}` / `${VAR:-default}` in every string value; `$$` is a literal `$`."""
    if isinstance(data, dict):
        return {k: _substitute(v, _join(path, k), environ=environ, reader=reader)
                for k, v in data.items()}  # fmt: skip
    if isinstance(data, list):
        return [_substitute(v, f"{path}[{i}]", environ=environ, reader=reader)
                for i, v in enumerate(data)]  # fmt: skip
    if not isinstance(data, str) or "$" not in data:
        return data
    problems: list[str] = []

    def replace(match: re.Match[str]) -> str:
        whole, name, default = match.group(0, 1, 2)
        if whole == "$$":
            return "$"
        if name is None:
            problems.append("malformed ${...} reference (expected ${VAR} or ${VAR:-default})")
        elif name in environ:
            return environ[name]
        elif default is not None:
            return default
        else:
            problems.append(f"environment variable {name} is not set (use ${{{name}:-default}})")
        return ""

    result = _REFERENCE.sub(replace, data)
    for problem in problems:
        reader.add(path, problem)
    if problems:
        return _Unresolved()
    return _EnvStr(result) if result != data else result


# --- sections --------------------------------------------------------------------------


def _lacks(data: object, key: str) -> bool:
    """True when a required key is absent (a non-mapping section is reported elsewhere)."""
    return data is None or (isinstance(data, dict) and key not in data)


def _exactly_one(data: object, keys: Sequence[str], path: str, reader: _Reader) -> str | None:
    """The one of `keys` a section sets, or None (reported) when it sets none or several."""
    present = [key for key in keys if isinstance(data, dict) and key in data]
    if isinstance(data, dict) and len(present) != 1:
        reader.add(path, f"needs exactly one of {' or '.join(keys)}")
    return present[0] if len(present) == 1 else None


def _pools(data: object, reader: _Reader) -> dict[str, PoolSettings]:
    pools: dict[str, PoolSettings] = {}
    for name, body in reader.mapping(data, "pools", allowed=None).items():
        path = _join("pools", name)
        values = reader.convert(body, path, POOL_KEYS)
        if "gpus" in values:
            pools[str(name)] = PoolSettings(name=str(name), gpus=values["gpus"])
        elif _lacks(body, "gpus"):
            reader.add(_join(path, "gpus"), "required")
    return pools


def _process(data: object, path: str, reader: _Reader) -> ProcessTarget | None:
    values = reader.convert(data, path, PROCESS_KEYS)
    if _lacks(data, "command"):
        reader.add(_join(path, "command"), "required")
    if "command" not in values:
        return None
    if values.get("port", 0) == 0 and not any("{port}" in arg for arg in values["command"]):
        reader.add(_join(path, "command"), "must contain {port} when port is 0")
    return ProcessTarget(**values)


def _kubernetes_target(data: object, path: str, reader: _Reader) -> KubernetesTarget | None:
    values = reader.convert(data, path, KUBERNETES_TARGET_KEYS)
    for key in ("namespace", "url"):
        if _lacks(data, key):
            reader.add(_join(path, key), "required")
    kinds: dict[str, WorkloadKind] = {"deployment": "Deployment", "statefulset": "StatefulSet"}
    workload = _exactly_one(data, list(kinds), path, reader)
    if workload is None or not {workload, "namespace", "url"} <= values.keys():
        return None
    return KubernetesTarget(name=values.pop(workload), kind=kinds[workload], **values)


def _defaults(data: object, reader: _Reader) -> dict[str, Any]:
    entries = reader.mapping(data, "defaults", allowed=MODEL_KEYS)
    for key in entries.keys() - DEFAULTABLE_KEYS.keys():
        reader.add(_join("defaults", key), "not allowed in defaults: set it per model")
    usable = {key: value for key, value in entries.items() if key in DEFAULTABLE_KEYS}
    return reader.convert(usable, "defaults", DEFAULTABLE_KEYS)


def _model(
    name: str,
    data: object,
    *,
    defaults: Mapping[str, Any],
    pools: Mapping[str, PoolSettings],
    reader: _Reader,
) -> tuple[tuple[str, ...], ModelSettings | None]:
    """The model's aliases (even when the model is invalid, for collision checks) and the model."""
    path = _join("models", name)
    data = {} if data is None else data  # `name:` alone still needs a target
    values = reader.convert(data, path, MODEL_KEYS)
    target = _exactly_one(data, ["process", "kubernetes"], path, reader)
    if "process" in values:
        values["process"] = _process(values["process"], _join(path, "process"), reader)
    if "kubernetes" in values:
        values["kubernetes"] = _kubernetes_target(
            values["kubernetes"], _join(path, "kubernetes"), reader
        )
    pool, gpus = values.get("pool"), values.get("gpus", 1)
    if pool is not None and pool not in pools:
        known = ", ".join(pools) or "none defined"
        reader.add(_join(path, "pool"), f"unknown pool {pool} (pools: {known})")
    elif pool is not None and gpus > pools[pool].gpus:
        reader.add(
            _join(path, "gpus"), f"{gpus} exceeds pool {pool} capacity of {pools[pool].gpus}"
        )
    aliases: tuple[str, ...] = values.get("aliases", ())
    if target is None or values.get(target) is None:
        return aliases, None
    values.setdefault("served_model_name", name)
    return aliases, ModelSettings(name=name, **{**defaults, **values})


def _models(
    data: object,
    *,
    defaults: Mapping[str, Any],
    pools: Mapping[str, PoolSettings],
    reader: _Reader,
) -> dict[str, ModelSettings]:
    if not data:
        reader.add("models", "required: define at least one model")
        return {}
    entries: dict[str, object] = {}
    for name, body in reader.mapping(data, "models", allowed=None).items():
        if isinstance(name, str) and name and not re.search(r"\s", name):
            entries[name] = body
        else:
            reader.add(_join("models", name), "model name must be a string without spaces")
    # Every client-facing name or alias -> the model that owns it. Names are mapping keys,
    # so they are unique already; aliases must not collide with any of them.
    owners = {name: name for name in entries}
    models: dict[str, ModelSettings] = {}
    for name, body in entries.items():
        aliases, model = _model(name, body, defaults=defaults, pools=pools, reader=reader)
        for index, alias in enumerate(aliases):
            owner = owners.setdefault(alias, name)
            where = f"{_join('models', name)}.aliases[{index}]"
            if alias == name:
                reader.add(where, "repeats the model's own name")
            elif owner != name:
                what = "the name" if owner == alias else "an alias"
                reader.add(where, f"{alias} is already {what} of model {owner}")
        if model is not None:
            models[name] = model
    return models


def parse_config(
    data: object, *, environ: Mapping[str, str] | None = None, source: str = "<config>"
) -> Settings:
    """Settings from already-parsed YAML data; raises ConfigError listing every problem."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping at the top level, got {_kind(data)}"])
    reader = _Reader()
    env = os.environ if environ is None else environ
    data = _substitute(data or {}, "", environ=env, reader=reader)
    top = reader.mapping(data, "", allowed=dict.fromkeys(TOP_LEVEL_KEYS))
    server = ServerSettings(**reader.convert(top.get("server"), "server", SERVER_KEYS))
    kubernetes = KubernetesSettings(
        **reader.convert(top.get("kubernetes"), "kubernetes", KUBERNETES_KEYS)
    )
    pools = _pools(top.get("pools"), reader)
    defaults = _defaults(top.get("defaults"), reader)
    models = _models(top.get("models"), defaults=defaults, pools=pools, reader=reader)
    if reader.problems:
        raise ConfigError(reader.problems)
    return Settings(
        server=server,
        kubernetes=kubernetes,
        pools=MappingProxyType(pools),
        models=MappingProxyType(models),
    )


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently lets the last win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, parse and validate a YAML config file; raises ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_Loader)
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: cannot read config: not UTF-8 text"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = (exc.problem or "syntax error") + (f" ({exc.context})" if exc.context else "")
        raise ConfigError([f"{where}: invalid YAML: {' '.join(what.split())}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {' '.join(str(exc).split())}"]) from None
    return parse_config(data, environ=environ, source=source)
