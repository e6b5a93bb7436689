"""Load a YAML config into the frozen settings of `activator.config.settings`.

pydantic checks every value against the settings classes; this module adds what belongs
to a file: `${VAR}` substitution, the places where a file's shape differs from the
settings (a model's name is its key, `defaults:` apply under every model, a workload is
`deployment:` or `statefulset:`), the checks between sections (pools, names), and problems
worded for a person: one line `key.path: problem (got value)` each, all in one pass. A
value is never shown when it is a secret or came from an environment variable.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from activator.config.gpu_memory import resolve
from activator.config.settings import (
    AdapterSettings,
    KubernetesTarget,
    ModelDefaults,
    ModelSettings,
    PoolSettings,
    Settings,
    WorkloadKind,
)
from activator.config.types import (
    SECRET,
    EnvStr,
    WrongType,
    kind_of,
    parse_duration,
    parse_size,
)

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "load_config", "parse_config", "parse_duration", "parse_size"]

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `key.path: problem` line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- the file's shape, where it differs from the settings ------------------------------

# Fields that a file gives by its structure (a model's name is its key under `models:`),
# or that are resolved from other keys (activator.config.gpu_memory)...
FROM_STRUCTURE: Mapping[type[BaseModel], frozenset[str]] = {
    ModelSettings: frozenset({"name", "memory_fraction", "residue_fraction"}),
    PoolSettings: frozenset({"name"}),
    KubernetesTarget: frozenset({"name", "kind"}),
}
WORKLOADS: Mapping[str, WorkloadKind] = {"deployment": "Deployment", "statefulset": "StatefulSet"}
TARGETS = ("process", "kubernetes")
# Sections of `defaults:` that a model's own section completes key by key (a gpu_hour for
# every model, token prices per model; a target_concurrency for all, a max per model).
MERGED_SECTIONS = ("cost", "replicas")
# ...and file keys that are not fields (parse_config reshapes them).
FILE_ONLY: Mapping[type[BaseModel], tuple[str, ...]] = {
    Settings: ("defaults",),
    KubernetesTarget: tuple(WORKLOADS),
}


def file_keys(section: type[BaseModel]) -> list[str]:
    """The keys a config file may write in a section of this type, in order."""
    hidden = FROM_STRUCTURE.get(section, frozenset())
    return [k for k in section.model_fields if k not in hidden] + [*FILE_ONLY.get(section, ())]


# --- problems --------------------------------------------------------------------------


class _Unresolved:
    """Stands for a value whose `${VAR}` could not be substituted (already reported)."""


class _Problems:
    """The problems of one config, collected while its sections are validated."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.renames: dict[Loc, Loc] = {}  # settings field -> the file key that gave it

    def add(self, loc: Loc, message: str) -> None:
        loc = self.renames.get(loc, loc)
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
        self.lines.append(f"{path.lstrip('.')}: {message}")

    def entries(self, data: object, loc: Loc) -> dict[Any, Any]:
        """A section of entries named by the user (`models:`, `pools:`)."""
        if isinstance(data, dict):
            return data
        if data is not None and not isinstance(data, _Unresolved):
            self.add(loc, f"expected a mapping, got {kind_of(data)}")
        return {}

    def structural(
        self, section: type[BaseModel], data: dict[Any, Any], loc: Loc
    ) -> dict[Any, Any]:
        """`data` less the keys its place in the file gives (reported as unknown keys)."""
        given = FROM_STRUCTURE.get(section, frozenset())
        for key in [key for key in data if key in given]:  # in file order
            self.add((*loc, key), "unknown key" + _hint(key, file_keys(section)))
        return {key: value for key, value in data.items() if key not in given}

    def validate(self, cls: type[M], data: object, loc: Loc, *, partial: bool = False) -> M | None:
        """`cls` from `data`, or None after reporting each problem under `loc`. With
        `partial`, a failed object is still made from its valid keys alone (defaults stand
        in for the others) so the checks between sections see those; None if even that
        fails. Either way the config as a whole fails."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            details = error.errors()
        for detail in details:
            if not isinstance(detail["input"], _Unresolved):  # reported by substitution
                self.add((*loc, *detail["loc"]), _message(cls, detail))
        if not partial or not isinstance(data, dict) or not all(d["loc"] for d in details):
            return None
        bad = {detail["loc"][0] for detail in details}
        try:
            return cls.model_validate({k: v for k, v in data.items() if k not in bad})
        except ValidationError:
            return None


# pydantic's own type errors (our validators raise WrongType): what was expected.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "bool_type": "a boolean", "bool_parsing": "a boolean",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "mapping_type": "a mapping", "model_type": "a mapping",
}  # fmt: skip


def _message(cls: type[BaseModel], detail: ErrorDetails) -> str:
    """Our wording of one pydantic error, with the value when it may be shown."""
    kind, value, loc = detail["type"], detail["input"], detail["loc"]
    section, secret = _walk(cls, loc)
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key" + _hint(loc[-1], file_keys(section) if section else [])
    ctx = detail.get("ctx", {})
    problem: ValueError
    if kind in _EXPECTED:
        problem = WrongType(_EXPECTED[kind], value)
    elif kind == "literal_error":
        # pydantic's ctx reads "'text', 'json' or 'off'" (or "1 or 2" for numbers).
        choices = re.split(r",\s*|\s+or\s+", ctx["expected"])
        problem = ValueError("expected one of " + ", ".join(c.strip("'") for c in choices))
    else:  # our validators' ValueErrors, and pydantic's others as pydantic words them
        problem = ctx["error"] if kind == "value_error" else ValueError(detail["msg"])
    shown = None if secret else _shown(value)
    if shown is None:
        return str(problem)
    if isinstance(problem, WrongType):
        return f"expected {problem.expected} (got {shown})"
    return f"{problem} (got {shown})"


def _walk(cls: type[BaseModel], loc: Loc) -> tuple[type[BaseModel] | None, bool]:
    """The section that holds the last key of `loc`, and whether a secret is on the way."""
    section: type[BaseModel] | None = cls
    holder: type[BaseModel] | None = cls
    secret = False
    for part in loc:
        holder = section
        field = section.model_fields.get(str(part)) if section is not None else None
        if field is None:  # a list item, a mapping's key, an unknown key
            section = None
            continue
        secret |= SECRET in field.metadata
        types = (field.annotation, *get_args(field.annotation))  # a section, or one | None
        section = next((t for t in types if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return holder, secret


def _shown(value: object) -> str | None:
    """A scalar as a problem may show it (cut short), or None when it is not shown."""
    if isinstance(value, EnvStr):
        return None  # from the environment: may be a secret
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:50]) + "..."
    return None


def _hint(key: object, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- ${VAR} substitution ---------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _substitute(
    data: object, loc: Loc, *, environ: Mapping[str, str], problems: _Problems
) -> object:
    """Replace `${VAR}` / `${VAR:-default}` in every string value; `$$` is a literal `$`."""
    if isinstance(data, dict):
        return {k: _substitute(v, (*loc, k), environ=environ, problems=problems)
                for k, v in data.items()}  # fmt: skip
    if isinstance(data, list):
        return [_substitute(v, (*loc, i), environ=environ, problems=problems)
                for i, v in enumerate(data)]  # fmt: skip
    if not isinstance(data, str) or "$" not in data:
        return data
    unset: list[str] = []

    def replace(match: re.Match[str]) -> str:
        whole, name, default = match.group(0, 1, 2)
        if whole == "$$":
            return "$"
        if name is None:
            unset.append("malformed ${...} reference (expected ${VAR} or ${VAR:-default})")
        elif name in environ:
            return environ[name]
        elif default is not None:
            return default
        else:
            unset.append(f"environment variable {name} is not set (use ${{{name}:-default}})")
        return ""

    result = _REFERENCE.sub(replace, data)
    for problem in unset:
        problems.add(loc, problem)
    if unset:
        return _Unresolved()
    return EnvStr(result) if result != data else result


# --- sections --------------------------------------------------------------------------


def parse_config(
    data: object, *, environ: Mapping[str, str] | None = None, source: str | None = None
) -> Settings:
    """Settings from already-parsed YAML data; raises ConfigError listing every problem,
    each line starting with `source` (a file name) when one is given."""
    problems = _Problems()
    if data is not None and not isinstance(data, dict):
        raise _error([f"expected a mapping at the top level, got {kind_of(data)}"], source)
    env = os.environ if environ is None else environ
    top = _substitute(data or {}, (), environ=env, problems=problems)
    assert isinstance(top, dict)
    sections = {key: top.pop(key, None) for key in ("pools", "defaults", "models")}
    settings = problems.validate(Settings, top, ())
    pools = _pools(sections["pools"], problems)
    models = _models(sections["models"], _defaults(sections["defaults"], problems), problems)
    _scan_adapter_dirs(models, problems)
    _check_names(models, problems)
    _check_pools(models, pools, problems)
    _resolve_gpu_memory(models, pools, problems)
    if settings is not None:
        _check_replicas(settings, models, problems)
    if problems.lines or settings is None:
        raise _error(problems.lines, source)
    valid = {name: model for name, model in models.items() if model is not None}
    frozen = {"pools": MappingProxyType(dict(pools)), "models": MappingProxyType(valid)}
    return settings.model_copy(update=frozen)


def _error(lines: Sequence[str], source: str | None) -> ConfigError:
    return ConfigError([f"{source}: {line}" if source else line for line in lines])


def _pools(data: object, problems: _Problems) -> dict[str, PoolSettings | None]:
    pools: dict[str, PoolSettings | None] = {}
    for key, body in problems.entries(data, ("pools",)).items():
        name, body = str(key), {} if body is None else body
        if isinstance(body, dict):
            body = {**problems.structural(PoolSettings, body, ("pools", name)), "name": name}
        pools[name] = problems.validate(PoolSettings, body, ("pools", name), partial=True)
    return pools


def _defaults(data: object, problems: _Problems) -> dict[str, Any]:
    """The valid `defaults:` (a bad one is reported here once, not under every model)."""
    model_only = set(file_keys(ModelSettings)) - set(ModelDefaults.model_fields)
    valid: dict[str, Any] = {}
    for key, value in problems.entries(data, ("defaults",)).items():
        if key in model_only:
            problems.add(("defaults", key), "not allowed in defaults: set it per model")
        elif problems.validate(ModelDefaults, {key: value}, ("defaults",)) is not None:
            valid[key] = value
    return valid


def _models(
    data: object, defaults: Mapping[str, Any], problems: _Problems
) -> dict[str, ModelSettings | None]:
    if not data:
        problems.add(("models",), "required: define at least one model")
    models: dict[str, ModelSettings | None] = {}
    for name, body in problems.entries(data, ("models",)).items():
        if isinstance(name, str) and name and not re.search(r"\s", name):
            models[name] = _model(name, body, defaults, problems)
        else:
            problems.add(("models", str(name)), "model name must be a string without spaces")
    return models


def _model(
    name: str, body: object, defaults: Mapping[str, Any], problems: _Problems
) -> ModelSettings | None:
    loc = ("models", name)
    body = {} if body is None else body  # `name:` alone still needs a target
    if isinstance(body, dict):
        body = problems.structural(ModelSettings, body, loc)
        if len([key for key in TARGETS if key in body]) != 1:
            problems.add(loc, f"needs exactly one of {' or '.join(TARGETS)}")
        if isinstance(target := body.get("kubernetes"), dict):
            body["kubernetes"] = _workload(target, (*loc, "kubernetes"), problems)
        for section in MERGED_SECTIONS:  # a model's keys win key by key
            if isinstance(own := body.get(section), dict) and isinstance(
                defaults.get(section), dict
            ):
                body[section] = {**defaults[section], **own}
        body = {"served_model_name": name, **defaults, **body, "name": name}
    return problems.validate(ModelSettings, body, loc, partial=True)


def _workload(target: dict[Any, Any], loc: Loc, problems: _Problems) -> dict[Any, Any]:
    """`deployment: x` or `statefulset: x` -> the target's name and kind."""
    target = problems.structural(KubernetesTarget, target, loc)
    present = [key for key in WORKLOADS if key in target]
    rest = {key: value for key, value in target.items() if key not in WORKLOADS}
    if len(present) != 1:
        problems.add(loc, f"needs exactly one of {' or '.join(WORKLOADS)}")
        return {**rest, "name": "-"}  # a stand-in, so the other keys are still checked
    problems.renames[(*loc, "name")] = (*loc, present[0])
    return {**rest, "name": target[present[0]], "kind": WORKLOADS[present[0]]}


# What marks a folder of adapter_dir as a LoRA adapter (PEFT's file, which vLLM reads).
ADAPTER_CONFIG = "adapter_config.json"


def _scan_adapter_dirs(models: dict[str, ModelSettings | None], problems: _Problems) -> None:
    """Each model's adapter_dir read now: every sub-folder with an adapter_config.json is
    an adapter named after the folder, unless `adapters:` names it already (in place).
    A folder that does not exist gives none (a volume not mounted yet: logged); one that
    cannot be read is a problem."""
    for name, model in models.items():
        if model is None or model.adapter_dir is None:
            continue
        folder = Path(model.adapter_dir)
        if not folder.exists():  # not mounted (yet): no adapters from it until a reload
            logger.warning("models.%s.adapter_dir: %s does not exist", name, folder)
            continue
        try:
            found = sorted(p for p in folder.iterdir() if (p / ADAPTER_CONFIG).is_file())
        except OSError as exc:
            problems.add(("models", name, "adapter_dir"), f"cannot read: {exc.strerror or exc}")
            continue
        adapters = dict(model.adapters)
        for path in found:
            if re.search(r"\s", path.name):
                problems.add(
                    ("models", name, "adapter_dir"),
                    f"folder {path.name!r}: an adapter name must have no spaces",
                )
            else:
                adapters.setdefault(path.name, AdapterSettings(path=str(path)))
        models[name] = model.model_copy(update={"adapters": MappingProxyType(adapters)})


def _check_names(models: Mapping[str, ModelSettings | None], problems: _Problems) -> None:
    """Every name a client may send (a model's name, alias or served name, an adapter's
    name or alias) means one model or adapter."""
    # name -> (its model, as what, the adapter it names or None for the model itself)
    owners: dict[str, tuple[str, str, str | None]] = {
        name: (name, "the name", None) for name in models
    }
    served = "the served_model_name"
    for name, model in models.items():
        claims: list[tuple[Loc, str, str, str | None]] = [
            (("aliases", index), alias, "an alias", None)
            for index, alias in enumerate(model.aliases if model else ())
        ]
        if model is not None and model.served_model_name != name:
            claims.append((("served_model_name",), model.served_model_name, served, None))
        for adapter, settings in (model.adapters if model else {}).items():
            claims.append((("adapters", adapter), adapter, f"adapter {adapter}", adapter))
            claims += [
                (("adapters", adapter, "aliases", index), alias, f"an alias of adapter {adapter}",
                 adapter)
                for index, alias in enumerate(settings.aliases)
            ]  # fmt: skip
        for key, claimed, role, thing in claims:
            owner, owned_as, owned_thing = owners.setdefault(claimed, (name, role, thing))
            if claimed == name and thing is None:
                problems.add(("models", name, *key), "repeats the model's own name")
            elif owner != name or owned_thing != thing:
                message = f"{claimed} is already {owned_as} of model {owner}"
                if served in (role, owned_as):
                    message += " (a served_model_name is accepted as a model name too)"
                problems.add(("models", name, *key), message)


def _check_pools(
    models: Mapping[str, ModelSettings | None],
    pools: Mapping[str, PoolSettings | None],
    problems: _Problems,
) -> None:
    """Each model's pool exists and can hold its GPUs (an invalid pool is reported once)."""
    for name, model in models.items():
        if model is None or model.pool is None:
            continue
        if model.pool not in pools:
            known = ", ".join(pools) or "none defined"
            problems.add(("models", name, "pool"), f"unknown pool {model.pool} (pools: {known})")
        elif (pool := pools[model.pool]) is not None:
            if model.gpus > pool.gpus:
                message = f"{model.gpus} exceeds pool {pool.name} capacity of {pool.gpus}"
                problems.add(("models", name, "gpus"), message)
            elif model.replicas.max * model.gpus > pool.gpus:
                message = (
                    f"{model.replicas.max} replicas x {model.gpus} GPUs exceed pool "
                    f"{pool.name} capacity of {pool.gpus}: at most "
                    f"{pool.gpus // model.gpus} could ever run"
                )
                problems.add(("models", name, "replicas", "max"), message)
            _check_sleep(name, model, pool, problems)


def _resolve_gpu_memory(
    models: dict[str, ModelSettings | None],
    pools: Mapping[str, PoolSettings | None],
    problems: _Problems,
) -> None:
    """Each model's shares of its GPUs, now that its pool is known (in place)."""
    for name, model in models.items():
        if model is None or (model.pool is not None and pools.get(model.pool) is None):
            continue  # an invalid model or pool: reported already
        resolved, found = resolve(model, pools[model.pool] if model.pool is not None else None)
        for key, message in found:
            problems.add(("models", name, *key), message)
        update = {"memory_fraction": resolved.memory_fraction,
                  "residue_fraction": resolved.residue_fraction}  # fmt: skip
        models[name] = model.model_copy(update=update)


def _check_replicas(
    settings: Settings, models: Mapping[str, ModelSettings | None], problems: _Problems
) -> None:
    """Several replicas share Kubernetes workloads; a local process is one replica's own."""
    if not settings.kubernetes.leader_election.enabled:
        return
    for name, model in models.items():
        if model is not None and model.process is not None:
            problems.add(
                ("models", name, "process"),
                "not with kubernetes.leader_election enabled: a local engine belongs to one "
                "activator (use a kubernetes target)",
            )


def _check_sleep(name: str, model: ModelSettings, pool: PoolSettings, problems: _Problems) -> None:
    """A pool's host memory bounds its sleeping models: it must be set, and hold each."""
    held = model.sleep.host_bytes if model.sleep is not None else 0
    if not held:
        return
    where = ("models", name, "sleep", "host_memory")
    if pool.host_memory is None:
        problems.add(where, f"needs pools.{pool.name}.host_memory (what sleeping models may hold)")
    elif held > pool.host_memory:
        problems.add(
            where, f"{held} bytes exceed pool {pool.name}'s host_memory ({pool.host_memory})"
        )


# --- files -----------------------------------------------------------------------------


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
    """Read, parse and validate a YAML config file; raises ConfigError, each problem
    prefixed with the file's path."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as stream:
            content = stream.read()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror or exc}"]) from None
    return load_config_bytes(content, source=source, environ=environ)


def load_config_bytes(
    content: bytes, *, source: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """Parse and validate a config file's content, read already (a reload parses exactly
    the bytes whose digest it compared); raises ConfigError, each problem prefixed with
    `source`."""
    try:
        data = yaml.load(content.decode("utf-8"), Loader=_Loader)
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
