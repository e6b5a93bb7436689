"""The value types of the settings: what a config may write for a duration, a size, a port.

Each is an `Annotated` type whose validator turns what YAML gives into the settings' value,
or raises ValueError saying what is wrong (activator.config.load adds the key path and the
value). Numeric and boolean fields use these rather than plain int/float/bool, which
pydantic would coerce from text: a YAML string "8080" is a mistake worth reporting. Text
from an environment variable (`EnvStr`) is the exception: variables are always text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, PlainValidator, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class _Secret:
    def __repr__(self) -> str:
        return "SECRET"


# Marks a secret field (an API key, an engine's environment): `Annotated[Text, SECRET]`.
# Its value is never shown in a config problem, nor in the repr() of its settings.
SECRET = _Secret()


class EnvStr(str):
    """A string produced by `${VAR}` substitution. Environment variables are always
    text, so numeric and boolean settings accept these when they spell a number or
    true/false, e.g. `port: ${PORT:-8080}`; YAML-typed values stay strict. Its value is
    never shown in a problem: it may be a secret."""


def _from_env(value: object) -> object:
    if not isinstance(value, EnvStr):
        return value
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), value)


def kind_of(value: object) -> str:
    """What a value is, for messages that may not show the value itself."""
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "a mapping"), (type(None), "null")]  # fmt: skip
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


class WrongType(ValueError):
    """A value of another YAML type than expected (`expected` reads "an integer")."""

    def __init__(self, expected: str, value: object) -> None:
        super().__init__(f"expected {expected}, got {kind_of(value)}")
        self.expected = expected


def problem_at(key: str | tuple[str, ...], message: str, value: object) -> ValidationError:
    """For a validator of a whole object: a problem of one of its keys, or of a key of one
    of its sections (a plain ValueError would be reported at the object's path)."""
    error = PydanticCustomError("invalid", message)
    details = [
        InitErrorDetails(type=error, loc=(key,) if isinstance(key, str) else key, input=value)
    ]
    return ValidationError.from_exception_data("settings", details)


# --- durations and sizes (also public: activator.config.load re-exports them) ---------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# Ki/Mi/Gi/Ti are Kubernetes' spellings of KiB..TiB (a pod's memory: 64Gi).
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip
_SIZE = re.compile(
    r"(\d+(?:\.\d+)?)\s*(" + "|".join(sorted(_SIZE_UNITS, key=len, reverse=True)) + ")"
)


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
    raise ValueError("expected a duration like 10m, 30s, 1h30m, 250ms or 2d")


def parse_size(value: object) -> int:
    """Bytes from an int or `512KiB`, `32MiB`, `1GiB`, `64Gi`, `10MB` (KB/MB/GB/TB are
    powers of 1000; KiB..TiB and Kubernetes' Ki..Ti powers of 1024)."""
    value = _from_env(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError("expected a size in bytes or like 32MiB, 512KiB, 1GiB, 64Gi or 10MB")


def format_size(size: int) -> str:
    """A size as a config would write it: 36GiB, 1536MiB, or bytes when no unit divides it."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size} bytes"


# --- GPU memory: a share of each GPU, or a size -----------------------------------------


@dataclass(frozen=True)
class GpuMemory:
    """Memory on each GPU: a share of the GPU (`fraction`, in (0, 1]) or a size in bytes
    (`size`); exactly one is set. A share needs nothing else; a size becomes a share once
    the pool's gpu_memory (the bytes of each GPU) is known."""

    fraction: float | None = None
    size: int | None = None

    def share(self, gpu_bytes: int | None) -> float | None:
        """The share of a GPU of `gpu_bytes`; None for a size when gpu_bytes is unknown."""
        if self.fraction is not None:
            return self.fraction
        assert self.size is not None
        return None if gpu_bytes is None else self.size / gpu_bytes

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:g}"
        assert self.size is not None
        return format_size(self.size)


_GPU_MEMORY = "a share of each GPU like 0.45, or a size like 36GiB"


def parse_share(value: object) -> float:
    """A share of a GPU, in (0, 1] (vLLM's --gpu-memory-utilization)."""
    value = _from_env(value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongType("a share of the GPU like 0.45", value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a share of the GPU greater than 0")
    if value > 1:
        raise ValueError("is more than a GPU: a share must be 1 or less")
    return float(value)


def _gpu_memory(value: object) -> GpuMemory:
    if isinstance(value, GpuMemory):  # settings built in code
        return value
    value = _from_env(value)
    if isinstance(value, str):
        try:
            size = _positive(parse_size)(value)
        except ValueError:
            raise ValueError(f"expected {_GPU_MEMORY}") from None
        return GpuMemory(size=size)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongType(_GPU_MEMORY, value)
    if isinstance(value, int) and value > 1:  # bytes without a unit, most likely
        raise ValueError(
            "expected a share of each GPU in (0, 1], or a size with its unit like 36GiB"
        )
    return GpuMemory(fraction=parse_share(value))


def _share_or_zero(value: object) -> float:
    return 0.0 if value == 0 and not isinstance(value, bool) else parse_share(value)


# --- validators: YAML value -> settings value, or ValueError ----------------------------

_Number = TypeVar("_Number", int, float)
_V = TypeVar("_V")


def _positive(parse: Callable[[object], _Number]) -> Callable[[object], _Number]:
    def convert(value: object) -> _Number:
        if (number := parse(value)) <= 0:
            raise ValueError("must be greater than 0")
        return number

    return convert


def _integer(*, minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        value = _from_env(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise WrongType("an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f"..{maximum}" if maximum is not None else " or more"
            raise ValueError(f"must be {minimum}{upper}")
        return value

    return convert


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise WrongType("a string", value)
    if not value.strip():
        raise ValueError("must not be empty")
    return str(value)  # a plain str, not the EnvStr marker


def _none_is(empty: Any) -> Callable[[object], object]:
    """`aliases:` or `env:` left blank in YAML is null: the same as empty."""
    return lambda value: empty if value is None else value


def _not_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("must not be empty")
    return value


def _keepalive(value: object) -> object:
    # Unquoted `off` is the boolean false in YAML 1.1, so both spellings mean off.
    if value is None or value is False or value == "off":
        return None
    return _positive(parse_duration)(value)


def _number(value: object) -> float:
    value = _from_env(value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongType("a number", value)
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _price(value: object) -> float:
    value = _from_env(value)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongType("a number", value)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number, 0 or more")
    return float(value)


def _in_cluster(value: object) -> bool | None:
    value = _from_env(value)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise ValueError("expected auto, true or false")


def _flag(value: object) -> bool:
    value = _from_env(value)
    if not isinstance(value, bool):
        raise WrongType("a boolean", value)
    return value


def _health_path(value: object) -> str:
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


def _env_value(value: object) -> str:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return str(value)  # numbers are stringified: environment values are text
    raise WrongType("a string or number", value)


def _frozen(value: Mapping[str, _V]) -> Mapping[str, _V]:
    return MappingProxyType(dict(value))


# --- the types ---------------------------------------------------------------------------

Text = Annotated[str, BeforeValidator(_text)]  # a non-empty string
TextList = Annotated[tuple[Text, ...], BeforeValidator(_none_is(()))]
Command = Annotated[tuple[Text, ...], BeforeValidator(_none_is(())), AfterValidator(_not_empty)]
Port = Annotated[int, BeforeValidator(_integer(minimum=0, maximum=65535))]
Count = Annotated[int, BeforeValidator(_integer(minimum=1))]
Duration = Annotated[float, BeforeValidator(_positive(parse_duration))]
DurationOrZero = Annotated[float, BeforeValidator(parse_duration)]
Keepalive = Annotated[float | None, BeforeValidator(_keepalive)]  # a duration, or null/off
Size = Annotated[int, BeforeValidator(_positive(parse_size))]
Positive = Annotated[float, BeforeValidator(_positive(_number))]  # a number > 0
# Memory on each GPU: a number is a share of the GPU in (0, 1], text a size (36GiB).
PerGpu = Annotated[GpuMemory, PlainValidator(_gpu_memory)]
Share = Annotated[float, BeforeValidator(parse_share)]  # a share of a GPU, in (0, 1]
ShareOrZero = Annotated[float, BeforeValidator(_share_or_zero)]  # a share of a GPU, or 0
Price = Annotated[float, BeforeValidator(_price)]  # an amount of money, >= 0
InCluster = Annotated[bool | None, BeforeValidator(_in_cluster)]  # auto (None), true, false
Flag = Annotated[bool, BeforeValidator(_flag)]  # true or false (YAML's, or a variable's text)
HealthPath = Annotated[str, BeforeValidator(_health_path)]
Url = Annotated[str, BeforeValidator(_url)]  # http(s)://host[:port], no path
EnvMap = Annotated[
    Mapping[str, Annotated[str, BeforeValidator(_env_value)]],
    BeforeValidator(_none_is({})),
    AfterValidator(_frozen),
]
FrozenMap = AfterValidator(_frozen)  # a read-only Mapping field
# For a Literal that includes "off": YAML 1.1 reads an unquoted `off` as false.
UNQUOTED_OFF = BeforeValidator(lambda value: "off" if value is False else value)
