"""The stand-in engine's options, counters and error: what its app and its routes share.

Owns `EngineOptions` (the parsed flags), `EngineStats` (the counters behind /metrics),
the app keys that carry them, and `EngineError` (an error answered in vLLM's envelope).
May import the sleep-mode options (activator.testing.sleepmode.options) and the LoRA
options (`lora_options`), and nothing else
of the engine: `generation`, `engine_routes` and `fake_engine` import it, never the
reverse.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from activator.testing.lora_options import LoraOptions
from activator.testing.sleepmode import SleepOptions

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    port: int
    host: str = "127.0.0.1"
    served_model_name: str = "fake-model"
    max_model_len: int = 2048
    startup_delay: float = 0.0
    crash_during_startup: bool = False
    never_ready: bool = False
    stream_delay: float = 0.0
    response_delay: float = 0.0
    chunks: int = 16  # tokens generated when a request sets no max_tokens
    api_key: str | None = None
    ignore_sigterm: bool = False
    exit_after: float | None = None
    disable_access_log: bool = False  # benchmarks: per-request log lines cost time
    # Generations at once; more wait their turn (before their headers), as requests do
    # on an engine whose batch is full. None: no limit. With --response-delay, a fixed
    # service time per request: the engine, not the proxy, is the bottleneck.
    max_concurrency: int | None = None
    # Paths answered as vLLM's FastAPI answers a route the model does not serve.
    disable_endpoint: tuple[str, ...] = ()
    sleep: SleepOptions = field(default_factory=SleepOptions)  # see the module docstring
    lora: LoraOptions = field(default_factory=LoraOptions)  # activator.testing.lora


@dataclass(slots=True)
class EngineStats:
    """Counters behind /metrics: one per app, changed only by `generation` (requests
    running and waiting are the sleep controller's)."""

    aborted: int = 0  # by the client going away
    success: dict[str, int] = field(default_factory=dict)  # by finished_reason
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # handlers generating now


OPTIONS = web.AppKey("options", EngineOptions)
STATS = web.AppKey("stats", EngineStats)
LIMIT = web.AppKey("limit", asyncio.Semaphore)


class EngineError(Exception):
    """An error answered in vLLM's envelope."""

    def __init__(self, message: str, *, status: int, type_: str, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type_, param

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        return web.json_response({"error": error}, status=self.status)


def bad_request(message: str, *, param: str | None = None) -> EngineError:
    return EngineError(message, status=400, type_="BadRequestError", param=param)
