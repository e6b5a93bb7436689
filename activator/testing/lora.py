"""The stand-in engine's LoRA adapters: vLLM's runtime adapter API, as its source has it.

vLLM (vllm/entrypoints/openai/serving_models.py, api_server.py) serves
POST /v1/load_lora_adapter {lora_name, lora_path} and POST /v1/unload_lora_adapter
{lora_name} only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is 1 or true (otherwise the routes
do not exist: 404). A load answers 200 with the text "Success: LoRA adapter 'x' added
successfully."; an error is vLLM's envelope: 400 InvalidUserInput when a field is
missing or the name is loaded already, 404 NotFoundError when the path holds no adapter
("No adapter found for ..."), 400 BadRequestError for anything else the engine refuses
(a rank above --max-lora-rank, LoRA not enabled). An unload of a name not loaded is 404
NotFoundError. /v1/models lists each loaded adapter with `parent` (the base) and `root`
(its path); a request whose `model` is a loaded adapter is served by it (its answers
carry the adapter's name as `model`, and here the first token names it too, so that
tests can check routing), any other name is the usual 404.

--max-loras is not a limit on loaded adapters in vLLM: it is how many one batch may use
(GPU slots); --max-cpu-loras (default: --max-loras) is an LRU cache of adapter weights
in host memory, refilled from lora_path on demand. The API registers any number of
adapters, and so does the stand-in; it exposes, in /metrics, how many are registered
now and at most, its loads per adapter, and unloads that hit an adapter while a request
was using it, so that tests observe an activator's bookkeeping from outside.
--lora-load-delay stretches each load (the engine reading the weights).

Owns the registered adapters (`LoraState`) and the two routes (the options are
`lora_options`); `fake_engine` registers them, `engine_routes` asks which adapter serves
a request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from activator.testing.engine_options import EngineError, JsonObject
from activator.testing.lora_options import LoraOptions


@dataclass(slots=True)
class LoraState:
    """The adapters registered with this engine, and what tests read of them."""

    options: LoraOptions
    loaded: dict[str, str] = field(default_factory=dict)  # name -> path
    in_use: dict[str, int] = field(default_factory=dict)  # name -> requests running
    loads: dict[str, int] = field(default_factory=dict)  # name -> successful loads
    peak: int = 0  # the most registered at once
    unloads_in_use: int = 0  # unloads of an adapter a request was using

    @contextmanager
    def serving(self, adapter: str | None) -> Iterator[None]:
        if adapter is None:
            yield
            return
        self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
        try:
            yield
        finally:
            self.in_use[adapter] -= 1

    def cards(self, *, parent: str) -> list[JsonObject]:
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "vllm", "root": path,
             "parent": parent, "max_model_len": None}
            for name, path in self.loaded.items()
        ]  # fmt: skip

    def metric_lines(self, labels: str) -> list[str]:
        return [
            "# TYPE fake_engine_lora_adapters gauge",
            f"fake_engine_lora_adapters{{{labels}}} {float(len(self.loaded))}",
            "# TYPE fake_engine_lora_adapters_peak gauge",
            f"fake_engine_lora_adapters_peak{{{labels}}} {float(self.peak)}",
            "# TYPE fake_engine_lora_unloads_in_use_total counter",
            f"fake_engine_lora_unloads_in_use_total{{{labels}}} {float(self.unloads_in_use)}",
            "# TYPE fake_engine_lora_loads_total counter",
            *(
                f'fake_engine_lora_loads_total{{{labels},adapter="{name}"}} {float(n)}'
                for name, n in sorted(self.loads.items())
            ),
        ]


LORA = web.AppKey("lora", LoraState)


def add_lora_routes(app: web.Application, options: LoraOptions) -> None:
    app[LORA] = LoraState(options)
    if options.runtime_updating:  # vLLM defines the routes only then
        app.router.add_post("/v1/load_lora_adapter", load_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_adapter)


def invalid(message: str) -> EngineError:
    return EngineError(message, status=400, type_="InvalidUserInput")


async def _fields(request: web.Request) -> JsonObject:
    try:
        body = await request.json()
    except ValueError as exc:
        raise EngineError(f"Invalid JSON body: {exc}", status=400, type_="BadRequestError") from exc
    if not isinstance(body, dict):
        raise EngineError("The request body must be a JSON object.", status=400,
                          type_="BadRequestError")  # fmt: skip
    return body


def _rank_of(name: str, path: str) -> int:
    """The adapter's rank from its adapter_config.json, raising vLLM's errors."""
    config = Path(path) / "adapter_config.json"
    try:
        data = json.loads(config.read_text())
    except FileNotFoundError:
        raise EngineError(
            f"Loading lora {name} failed: No adapter found for {path}",
            status=404,
            type_="NotFoundError",
        ) from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"Loading lora {name} failed: {exc}", status=400,
                          type_="BadRequestError") from None  # fmt: skip
    rank = data.get("r") if isinstance(data, dict) else None
    return rank if isinstance(rank, int) else 8


async def load_adapter(request: web.Request) -> web.Response:
    state = request.app[LORA]
    body = await _fields(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not name or not path or not isinstance(name, str) or not isinstance(path, str):
        raise invalid("Both 'lora_name' and 'lora_path' must be provided.")
    if name in state.loaded:
        raise invalid(f"The lora adapter '{name}' has already been loaded.")
    if not state.options.enable_lora:
        raise EngineError("LoRA is not enabled. Use --enable-lora to enable LoRA.", status=400,
                          type_="BadRequestError")  # fmt: skip
    await asyncio.sleep(state.options.lora_load_delay)  # the engine reading the weights
    rank = _rank_of(name, path)
    if rank > state.options.max_lora_rank:
        raise EngineError(
            f"LoRA rank {rank} is greater than max_lora_rank {state.options.max_lora_rank}.",
            status=400,
            type_="BadRequestError",
        )
    state.loaded[name] = path
    state.loads[name] = state.loads.get(name, 0) + 1
    state.peak = max(state.peak, len(state.loaded))
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(request: web.Request) -> web.Response:
    state = request.app[LORA]
    body = await _fields(request)
    name = body.get("lora_name")
    if not name and not body.get("lora_int_id"):
        raise invalid("either 'lora_name' and 'lora_int_id' needs to be provided.")
    if name not in state.loaded:
        raise EngineError(f"The lora adapter '{name}' cannot be found.", status=404,
                          type_="NotFoundError")  # fmt: skip
    if state.in_use.get(name):
        state.unloads_in_use += 1
    del state.loaded[name]
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
