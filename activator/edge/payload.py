"""Parsing a request body: strict JSON, a top-level object with a `model`, and the byte
spans of that `model` so it can be rewritten without serialising the body again.

Why spans and not `json.dumps`: re-encoding a 32 MiB body costs as much as parsing it
(more for number arrays: 1.5 s for 16M integers), fails with a RecursionError of its own
on deep nesting, and changes the client's bytes (floats, escapes, key order) for no reason.
Only the top-level `model` value is replaced; every other byte goes to the engine as sent.

Where parsing runs: on the event loop for bodies up to OFFLOAD_BYTES, in one worker
process above. Parsing holds the GIL throughout (`json` is C code that never releases
it), so a thread does not help: measured on 32 MiB bodies, 0.09 s for one long string,
0.75 s for an array of integers, 3.4 s for nested empty arrays (with 800 MiB of objects),
all of it a stall of every other request on the loop. In a worker the loop stalls only
while the bytes are copied out; the worker's memory is bounded by one parse at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from activator.core.errors import BadRequest, InternalError

logger = logging.getLogger(__name__)

# 256 KiB parse in about 1 ms when they are one string and 25 ms in the worst shape
# (scaled from the figures above): cheap enough for the loop; long-context prompts and
# embedding batches above it go to the worker.
OFFLOAD_BYTES = 256 * 1024

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


@dataclass(frozen=True, slots=True)
class Payload:
    model: str
    stream: bool
    # Byte offsets (start, end) of every top-level "model" value, in body order.
    model_spans: tuple[tuple[int, int], ...]

    def with_model(self, body: bytes, name: str) -> bytes:
        """`body` with every top-level `model` value replaced by `name`."""
        if name == self.model and len(self.model_spans) == 1:
            return body
        value = json.dumps(name).encode()
        parts, end = [], 0
        for start, stop in self.model_spans:
            parts += [body[end:start], value]
            end = stop
        parts.append(body[end:])
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A body that is not usable, as the worker returns it (errors do not pickle well)."""

    message: str
    param: str | None = None


def parse(body: bytes) -> Payload:
    """Raises BadRequest for anything but a UTF-8 JSON object with a non-empty `model`."""
    result = parse_or_reject(body)
    if isinstance(result, Rejected):
        raise BadRequest(result.message, param=result.param)
    return result


def parse_or_reject(body: bytes) -> Payload | Rejected:
    try:
        text = body.decode("utf-8")
        fields, spans = _top_level(text)
    except RecursionError:
        return Rejected("request body is nested too deeply")
    except _NotAnObject:
        return Rejected("request body must be a JSON object")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError too
        return Rejected(f"request body is not valid JSON: {exc}")
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        return Rejected("missing required field 'model'", param="model")
    if not text.isascii():  # character offsets to byte offsets
        spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    return Payload(model=model, stream=fields.get("stream") is True, model_spans=tuple(spans))


class _NotAnObject(Exception):
    pass


def _top_level(text: str) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """The top-level object's fields, and the character spans of its `model` values.

    Walks the object member by member with the json module's own scanners, so it accepts
    what `json.loads` accepts, less NaN and Infinity (duplicate keys: the last wins)."""

    def skip(i: int) -> int:
        match = _WHITESPACE.match(text, i)
        assert match is not None  # `*` matches the empty string
        return match.end()

    i = skip(0)
    if text[i : i + 1] != "{":
        _DECODER.decode(text)  # raises if it is not JSON at all
        raise _NotAnObject
    fields: dict[str, Any] = {}
    spans: list[tuple[int, int]] = []
    i = skip(i + 1)
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise ValueError(f"expecting a property name at character {i}")
            key, i = scanstring(text, i + 1, True)
            i = skip(i)
            if text[i : i + 1] != ":":
                raise ValueError(f"expecting ':' at character {i}")
            start = skip(i + 1)
            fields[key], i = _DECODER.raw_decode(text, start)
            if key == "model":
                spans.append((start, i))
            i = skip(i)
            delimiter, i = text[i : i + 1], i + 1
            if delimiter == "}":
                break
            if delimiter != ",":
                raise ValueError(f"expecting ',' or '}}' at character {i - 1}")
            i = skip(i)
    if skip(i) != len(text):
        raise ValueError(f"extra data after the object at character {i}")
    return fields, spans


def _ignore_sigint() -> None:
    """In the worker: Ctrl-C reaches the whole process group, and stopping is activator's
    business (it shuts the worker down), not a traceback on the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PayloadParser:
    """`parse`, on the loop or in the worker by size. Owned by the proxy; `close` at the
    app's cleanup. The worker process starts with the first large body."""

    def __init__(self, *, offload_bytes: int = OFFLOAD_BYTES) -> None:
        self._offload_bytes = offload_bytes
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, body: bytes) -> Payload:
        if len(body) <= self._offload_bytes:
            return parse(body)
        if self._pool is None:
            # spawn: a fork of a process with threads and a running loop is unsafe. (As
            # with any spawn, a program that builds the app must guard its main module
            # with `if __name__ == "__main__":`; activator's entry points do.)
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_sigint,
            )
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._pool, parse_or_reject, body
            )
        except BrokenProcessPool as exc:  # the worker died (killed for memory?)
            self._pool = None
            logger.error("the body-parsing worker process died: %r", exc)
            raise InternalError("parsing the request body failed; see activator's log") from exc
        if isinstance(result, Rejected):
            raise BadRequest(result.message, param=result.param)
        return result

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Never waits for a parse in progress: at most one body's work is lost.
            pool.shutdown(wait=False, cancel_futures=True)
