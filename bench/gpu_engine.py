"""A GPU stand-in engine for the sleep-mode benchmark: real weights, real copies, vLLM's API.

    # once per size: a file of seeded random weights (GiB; generated on the GPU if any)
    python bench/gpu_engine.py --make-weights /data/w8.bin --weights-gib 8

    # serve it; the port opens once the weights are on the GPU, as vLLM's does
    VLLM_SERVER_DEV_MODE=1 python bench/gpu_engine.py --port 8001 \\
        --served-model-name coder-chat --weights /data/w8.bin --enable-sleep-mode \\
        --memory-report /tmp/engines

Options: --host H (127.0.0.1), --port P (0: any, see the READY line), --served-model-name,
--weights FILE (with --weights-gib X a missing file is made first, outside the timed start),
--device cuda|cuda:N|cpu, --dtype bf16|fp16, --hidden D (4096: the weights are L square
D x D matrices, L = size / (2 D^2)), --kv-cache-gib K (1), --gpu-residue-gib R (1, for the
report), --pin-host-memory first-sleep|start, --memory-report DIR, --max-model-len N,
--disable-access-log. With --device cpu and a tiny size it runs anywhere (the smoke test).

What it does, and why it is an honest stand-in for vLLM:
- Start: import torch, init CUDA, read the weights file into GPU memory (through two
  64 MiB pinned staging buffers, copies overlapped with reads), allocate the KV cache,
  run one token (cuBLAS warm-up), then open the port and print ``READY port=<port>``; it
  logs ``serving <name> on <host>:<port>`` as the CPU stand-in does. Each phase is timed.
- Every token runs a chain of matrix-vector products over all the weights (a real pass
  over every byte, memory-bound like decoding) and folds the result into a word:
  deterministic, so answers before and after a sleep can be compared.
- Sleep mode: vLLM's routes and semantics, shared with the CPU stand-in
  (activator/testing/sleepmode): only with VLLM_SERVER_DEV_MODE=1; with
  --enable-sleep-mode, level 1 copies the weights into a pinned host buffer and frees
  them (torch.cuda.empty_cache, so another process can use the memory); wake copies
  back; level 2 frees them and a wake maps zeroed memory (answers are "!") until
  collective_rpc reload_weights reads the file again. The KV cache is freed at both
  levels. Copies run on their own CUDA stream with non_blocking=True and are synchronised
  before the call answers.
- The pinned host buffer is allocated once (at the first level-1 sleep, or at start with
  --pin-host-memory start) with cudaHostRegister on a plain buffer of exactly the weights'
  size: PyTorch's pin_memory=True rounds every allocation up to a power of two (20 GiB
  would pin 32), and pinning costs 0.5-0.8 s per GB on the H200 machine, so it is never
  done per swap. The first level-1 sleep therefore includes it (reported as pin_host_s);
  warm up with one sleep/wake before measuring swaps, or pin at start (which then counts
  in the cold start).
- Timings: every control call and memory effect is logged and listed by
  GET /debug/timings (with the start phases and bytes moved); /sleep, /wake_up and
  /collective_rpc answer with an ``x-engine-seconds`` header, the engine's own time.

Runs from the repository (it imports activator/testing/sleepmode, which needs only
aiohttp); torch and aiohttp are its only dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout: the shared sleep mode
    sys.path.insert(0, str(REPO))

from activator.testing.sleepmode import CONTROLLER as SLEEP  # noqa: E402
from activator.testing.sleepmode import (  # noqa: E402
    Effect,
    SleepController,
    SleepOptions,
    add_arguments,
    add_sleep_routes,
    take_options,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("gpu_engine")

JsonObject = dict[str, Any]
GIB = 1 << 30
STAGING_BYTES = 64 << 20  # per pinned staging buffer for reading the file (two of them)
MAKE_CHUNK_BYTES = 256 << 20  # weights generated and written this much at a time
VOCAB = 256  # rows of the input embedding
# Word 0 is what all-zero weights give (the argmax of zeros), like token 0 of real
# vocabularies; the others are plain.
WORDS = ("!", *(f"w{i:02d}" for i in range(1, 64)))
DEFAULT_MAX_TOKENS = 16
KEPT_LOG = 1000  # effect records kept for /debug/timings
PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process
# Random D x D matrices scaled by 1/sqrt(D) keep a vector's norm in expectation; a
# renormalisation every few layers is enough (and a kernel launch saved per layer).
NORM_EVERY = 16


# ---- the model: weights, a KV cache, one token at a time ----


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    layers: int
    dtype_name: str  # "bf16" | "fp16"

    @property
    def element_size(self) -> int:
        return 2

    @property
    def layer_bytes(self) -> int:
        return self.hidden * self.hidden * self.element_size

    @property
    def nbytes(self) -> int:
        return self.layers * self.layer_bytes

    @classmethod
    def for_bytes(cls, nbytes: int, *, hidden: int, dtype_name: str) -> Shape:
        layer = hidden * hidden * 2
        return cls(hidden=hidden, layers=max(1, round(nbytes / layer)), dtype_name=dtype_name)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pin(buffer: torch.Tensor) -> bool:
    """Pins a CPU tensor in place (exact size, unlike pin_memory=True). False if refused."""
    import torch

    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), PORTABLE)
    code = int(getattr(error, "value", error))
    if code != 0:
        logger.warning("cudaHostRegister of %d bytes failed (error %d)", buffer.numel(), code)
    return code == 0


class Model:
    """Owns the tensors. Its methods block (CUDA synchronisation, file reads): the
    engine runs them in a worker thread, never two at once (the sleep controller
    serialises its effects), and never while a token is computed (a sleep pauses
    generation first)."""

    def __init__(self, shape: Shape, *, device: str, kv_bytes: int, path: Path) -> None:
        import torch

        self.torch = torch
        self.shape = shape
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.kv_bytes = kv_bytes
        self.path = path
        self.dtype = torch_dtype(shape.dtype_name)
        self.flat: torch.Tensor | None = None  # the weights, as bytes
        self.matrices: torch.Tensor | None = None  # the same memory, layers x D x D
        self.kv: torch.Tensor | None = None
        self.host: torch.Tensor | None = None  # the level-1 backup, allocated once
        self.host_pinned = False
        self.staging: list[torch.Tensor] = []
        self.stream: Any = None  # the copy stream, made in start() (it would init CUDA)
        self.embedding: torch.Tensor | None = None
        self.log: deque[JsonObject] = deque(maxlen=KEPT_LOG)

    def on_device(self, work: Callable[[], JsonObject]) -> JsonObject:
        """Runs `work` with this model's device current (worker threads start on 0)."""
        if not self.cuda:
            return work()
        with self.torch.cuda.device(self.device):
            return work()

    # -- start --

    def start(self, *, pin_at_start: bool) -> JsonObject:
        """Everything before the port opens; returns the phases' seconds."""
        torch = self.torch
        phases: JsonObject = {}
        began = time.perf_counter()
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.zeros(1, device=self.device)  # creates the context
            torch.cuda.synchronize(self.device)
            self.stream = torch.cuda.Stream(self.device)
        phases["cuda_init_s"] = time.perf_counter() - began
        began = time.perf_counter()
        self.staging = [self._cpu_buffer(STAGING_BYTES, pinned=self.cuda) for _ in range(2)]
        phases["staging_s"] = time.perf_counter() - began
        phases["load_weights"] = self.load()
        began = time.perf_counter()
        self.map_kv()
        phases["kv_cache_s"] = time.perf_counter() - began
        generator = torch.Generator().manual_seed(0)
        embedding = torch.randn(VOCAB, self.shape.hidden, generator=generator)
        self.embedding = embedding.to(self.device, self.dtype)
        if pin_at_start:
            phases["pin_host_s"] = self._ensure_host()
        began = time.perf_counter()
        self.token(0)  # first matmul: cuBLAS handles, kernels loaded
        phases["warmup_s"] = time.perf_counter() - began
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in phases.items()}

    def _cpu_buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        buffer = self.torch.empty(nbytes, dtype=self.torch.uint8)
        if pinned and not pin(buffer):
            raise RuntimeError(f"could not pin {nbytes} bytes of host memory")
        return buffer

    # -- weights --

    def _allocate(self) -> None:
        if self.flat is None:
            self.flat = self.torch.empty(
                self.shape.nbytes, dtype=self.torch.uint8, device=self.device
            )
        self._view()

    def _view(self) -> None:
        assert self.flat is not None
        hidden = self.shape.hidden
        weights = self.flat.view(self.dtype)
        self.matrices = weights.view(self.shape.layers, hidden, hidden)

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def load(self) -> JsonObject:
        """Reads the file into the (allocated) weights: the cold start's load and
        collective_rpc reload_weights."""
        began = time.perf_counter()
        self._allocate()
        assert self.flat is not None
        total = self.shape.nbytes
        with self.path.open("rb", buffering=0) as file:
            if not self.cuda:
                view = memoryview(self.flat.numpy())
                read = 0
                while read < total:
                    got = file.readinto(view[read : read + STAGING_BYTES])
                    if not got:
                        raise RuntimeError(f"{self.path}: shorter than {total} bytes")
                    read += got
            else:
                self._load_through_staging(file, total)
        seconds = time.perf_counter() - began
        return self._note("load_weights", total, seconds)

    def _load_through_staging(self, file: Any, total: int) -> None:
        """Double buffering: the file is read into one pinned buffer while the other is
        copied to the GPU on the copy stream."""
        torch = self.torch
        assert self.flat is not None and self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        done: list[Any] = [None, None]  # per staging buffer: the event of its last copy
        views = [memoryview(buffer.numpy()) for buffer in self.staging]
        offset = index = 0
        while offset < total:
            slot = index % 2
            if (event := done[slot]) is not None:
                event.synchronize()  # its previous copy has left the buffer
            got = file.readinto(views[slot][: min(STAGING_BYTES, total - offset)])
            if not got:
                raise RuntimeError(f"{self.path}: shorter than {total} bytes")
            with torch.cuda.stream(self.stream):
                self.flat[offset : offset + got].copy_(self.staging[slot][:got], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            done[slot] = event
            offset += got
            index += 1
        self._sync()

    def _ensure_host(self) -> float:
        """Allocates (and pins) the level-1 backup once; returns the seconds it took."""
        if self.host is not None:
            return 0.0
        began = time.perf_counter()
        self.host = self.torch.empty(self.shape.nbytes, dtype=self.torch.uint8)
        self.host_pinned = self.cuda and pin(self.host)
        if self.cuda and not self.host_pinned:
            logger.warning("level-1 backup is pageable: copies will be slower than PCIe allows")
        return time.perf_counter() - began

    def offload(self) -> JsonObject:
        pin_s = self._ensure_host()
        assert self.flat is not None and self.host is not None
        began = time.perf_counter()
        self._copy(self.host, self.flat)
        copied = time.perf_counter()
        self._drop_weights()
        return self._note(
            "offload_weights",
            self.shape.nbytes,
            time.perf_counter() - began,
            pin_host_s=round(pin_s, 6),
            copy_s=round(copied - began, 6),
        )

    def restore(self) -> JsonObject:
        assert self.host is not None
        began = time.perf_counter()
        self._allocate()
        assert self.flat is not None
        allocated = time.perf_counter()
        self._copy(self.flat, self.host)
        return self._note(
            "restore_weights",
            self.shape.nbytes,
            time.perf_counter() - began,
            alloc_s=round(allocated - began, 6),
        )

    def _copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        if self.stream is None:
            destination.copy_(source)
            return
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            destination.copy_(source, non_blocking=True)
        self._sync()

    def discard(self) -> JsonObject:
        began = time.perf_counter()
        self._drop_weights()
        return self._note("discard_weights", 0, time.perf_counter() - began)

    def map_fresh(self) -> JsonObject:
        """A level-2 wake of the weights: memory back, content not (zeroed, so the
        answers are deterministic garbage)."""
        began = time.perf_counter()
        self._allocate()
        assert self.flat is not None
        self.flat.zero_()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        return self._note("map_weights", 0, time.perf_counter() - began)

    def _drop_weights(self) -> None:
        self.flat = self.matrices = None
        self._empty_cache()

    def _empty_cache(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()  # back to the driver: another process can use it

    # -- KV cache --

    def map_kv(self) -> JsonObject:
        began = time.perf_counter()
        self.kv = self.torch.empty(self.kv_bytes, dtype=self.torch.uint8, device=self.device)
        return self._note("map_kv_cache", 0, time.perf_counter() - began)

    def discard_kv(self) -> JsonObject:
        began = time.perf_counter()
        self.kv = None
        self._empty_cache()
        return self._note("discard_kv_cache", 0, time.perf_counter() - began)

    # -- a token --

    def token(self, seed: int) -> int:
        """One decoding step over every weight: x <- rmsnorm(x @ W_i) for each layer,
        then the argmax. Blocks until the GPU is done (the result is read)."""
        torch = self.torch
        if self.matrices is None or self.embedding is None:
            return 0  # no weights mapped: what unmapped memory would give, garbage
        x = self.embedding[seed % VOCAB].unsqueeze(0)
        for index, layer in enumerate(self.matrices, 1):
            x = x @ layer
            if index % NORM_EVERY == 0:
                x = x * torch.rsqrt(x.float().pow(2).mean() + 1e-6).to(x.dtype)
        return int(torch.argmax(x))

    # -- reports --

    def _note(self, name: str, nbytes: int, seconds: float, **extra: Any) -> JsonObject:
        entry: JsonObject = {"effect": name, "bytes": nbytes, "seconds": round(seconds, 6)}
        if nbytes and seconds > 0:
            entry["gb_per_s"] = round(nbytes / seconds / 1e9, 3)
        entry.update(extra)
        self.log.append({**entry, "at": time.time()})
        logger.info("%s", " ".join(f"{k}={v}" for k, v in entry.items()))
        return entry

    def memory(self) -> JsonObject:
        measured: JsonObject = {
            "weights_resident": self.flat is not None,
            "kv_cache_resident": self.kv is not None,
            "host_backup_bytes": 0 if self.host is None else self.host.numel(),
            "host_backup_pinned": self.host_pinned,
        }
        if self.cuda:
            measured["cuda_allocated_bytes"] = self.torch.cuda.memory_allocated(self.device)
            measured["cuda_reserved_bytes"] = self.torch.cuda.memory_reserved(self.device)
        return measured


@dataclass(slots=True)
class GpuDevice:
    """The sleep controller's device: each effect is a Model method in a worker thread,
    so the event loop keeps answering /health meanwhile."""

    model: Model

    async def apply(self, effect: Effect) -> None:
        work = {
            "offload_weights": self.model.offload,
            "discard_weights": self.model.discard,
            "restore_weights": self.model.restore,
            "map_weights": self.model.map_fresh,
            "reload_weights": self.model.load,
            "discard_kv_cache": self.model.discard_kv,
            "map_kv_cache": self.model.map_kv,
        }[effect.name]
        await asyncio.to_thread(self.model.on_device, work)


# ---- HTTP ----


@dataclass(frozen=True, slots=True)
class EngineOptions:
    port: int
    host: str = "127.0.0.1"
    served_model_name: str = "gpu-model"
    weights: Path | None = None
    weights_gib: float | None = None
    device: str = "cuda"
    dtype: str = "bf16"
    hidden: int = 4096
    pin_host_memory: str = "first-sleep"
    max_model_len: int = 4096
    disable_access_log: bool = False
    make_weights: Path | None = None
    sleep: SleepOptions = field(default_factory=SleepOptions)


OPTIONS = web.AppKey("options", EngineOptions)
MODEL = web.AppKey("model", Model)
STARTUP = web.AppKey("startup", dict)


class RequestError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def response(self) -> web.Response:
        kind = "BadRequestError" if self.status == 400 else "NotFoundError"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.status}
        return web.json_response({"error": error}, status=self.status)


def prompt_of(body: Any, *, options: EngineOptions) -> tuple[str, int]:
    """The prompt text and max_tokens of a chat request, or RequestError."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != options.served_model_name:
        raise RequestError(f"The model `{model}` does not exist.", status=404, param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list.", param="messages")
    text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    limit = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    limit = DEFAULT_MAX_TOKENS if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit:
        raise RequestError(f"max_tokens must be at least 1, got {limit}.", param="max_tokens")
    if limit > options.max_model_len:
        raise RequestError(f"max_tokens is too large: {limit}.", param="max_tokens")
    return text, limit


def seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    options, model, controller = request.app[OPTIONS], request.app[MODEL], request.app[SLEEP]
    try:
        body = await request.json()
        text, limit = prompt_of(body, options=options)
    except ValueError as exc:
        return RequestError(f"Invalid JSON body: {exc}").response()
    except RequestError as exc:
        return exc.response()
    head = {
        "id": f"chatcmpl-{request.headers.get('X-Request-Id') or uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": options.served_model_name,
    }
    streamed = bool(body.get("stream"))
    response: web.StreamResponse | None = None
    if streamed:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

    async def send(delta: JsonObject, finish: str | None = None) -> None:
        assert response is not None
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        await response.write(b"data: " + web_json(chunk) + b"\n\n")

    words: list[str] = []
    finish = "abort"
    with controller.ticket() as ticket:
        if await ticket.admitted():  # hangs while the engine sleeps, as vLLM does
            if streamed:
                await send({"role": "assistant", "content": ""})
            prompt_seed, previous = seed_of(text), 0
            for index in range(limit):
                if not await ticket.step(0):
                    break  # a sleep aborted it
                # No await between the check above and the kernel: a sleep cannot free
                # the weights under it.
                previous = model.token(prompt_seed + 131 * index + previous)
                words.append(("" if index == 0 else " ") + WORDS[previous % len(WORDS)])
                if streamed:
                    await send({"content": words[-1]})
            else:
                finish = "length"
        elif streamed:
            await send({"role": "assistant", "content": ""})
    usage = {
        "prompt_tokens": len(text.split()),
        "completion_tokens": len(words),
        "total_tokens": len(text.split()) + len(words),
    }
    if response is None:
        message = {"role": "assistant", "content": "".join(words)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        answer = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        return web.json_response(answer)
    await send({}, finish)
    options_of_stream = body.get("stream_options")
    if isinstance(options_of_stream, dict) and options_of_stream.get("include_usage"):
        chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await response.write(b"data: " + web_json(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def web_json(value: JsonObject) -> bytes:
    import json

    return json.dumps(value, separators=(",", ":")).encode()


async def models(request: web.Request) -> web.Response:
    options = request.app[OPTIONS]
    card = {
        "id": options.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": options.served_model_name,
        "parent": None,
        "max_model_len": options.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    controller = request.app[SLEEP]
    labels = f'engine="0",model_name="{request.app[OPTIONS].served_model_name}"'
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{labels}}} {float(controller.running)}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {float(controller.waiting)}",
        *controller.metric_lines(labels),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def debug_timings(request: web.Request) -> web.Response:
    """The engine's own times: start phases, control calls, memory effects (not vLLM's)."""
    model, controller = request.app[MODEL], request.app[SLEEP]
    body = {
        "served_model_name": request.app[OPTIONS].served_model_name,
        "device": str(model.device),
        "weights_bytes": model.shape.nbytes,
        "startup": request.app[STARTUP],
        "calls": list(controller.timings),
        "effects": list(model.log),
        "memory": model.memory(),
    }
    return web.json_response(body)


def build_app(options: EngineOptions, *, model: Model, startup: JsonObject) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[OPTIONS], app[MODEL], app[STARTUP] = options, model, startup
    config = options.sleep.config(
        served_model_name=options.served_model_name, weights_bytes=model.shape.nbytes
    )
    add_sleep_routes(app, SleepController(config, device=GpuDevice(model)))
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/timings", debug_timings)
    return app


# ---- the weights file ----


def make_weights(path: Path, shape: Shape, *, device: str) -> float:
    """Writes `shape.nbytes` of seeded random weights to `path` (atomically); seconds."""
    import torch

    began = time.perf_counter()
    dtype = torch_dtype(shape.dtype_name)
    where = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    scale = shape.hidden**-0.5
    per_chunk = max(1, MAKE_CHUNK_BYTES // shape.element_size)
    elements = shape.nbytes // shape.element_size
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary.open("wb") as file:
        for index, start in enumerate(range(0, elements, per_chunk)):
            count = min(per_chunk, elements - start)
            generator = torch.Generator(where).manual_seed(index)
            chunk = torch.randn(count, generator=generator, device=where, dtype=torch.float32)
            data = (chunk * scale).to(dtype).view(torch.uint8).cpu()
            file.write(data.numpy().tobytes())
    os.replace(temporary, path)
    return time.perf_counter() - began


def shape_of_file(path: Path, options: EngineOptions) -> Shape:
    size = path.stat().st_size
    layer = options.hidden * options.hidden * 2
    if size < layer or size % layer:
        raise SystemExit(f"{path}: {size} bytes is not a whole number of {layer}-byte layers")
    return Shape(hidden=options.hidden, layers=size // layer, dtype_name=options.dtype)


# ---- process lifetime ----


async def serve(options: EngineOptions, *, model: Model, startup: JsonObject) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = build_app(options, model=model, startup=startup)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=0.1,
        access_log=None if options.disable_access_log else logger,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port).start()
        port = runner.addresses[0][1]
        app[SLEEP].open_report(port=port)
        print(f"READY port={port}", flush=True)
        logger.info("serving %s on %s:%d", options.served_model_name, options.host, port)
        await stop.wait()
        logger.info("shutting down")
        return 0
    finally:
        await runner.cleanup()
        app[SLEEP].close_report()


def parse_args(argv: Sequence[str] | None) -> EngineOptions:
    parser = argparse.ArgumentParser(prog="python bench/gpu_engine.py", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--make-weights", type=Path, default=None, metavar="FILE", help="write FILE and exit")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=None)
    add("--served-model-name", default="gpu-model")
    add("--weights", type=Path, default=None, metavar="FILE")
    add("--weights-gib", type=float, default=None)
    add("--device", default="cuda")
    add("--dtype", choices=("bf16", "fp16"), default="bf16")
    add("--hidden", type=int, default=4096)
    add("--pin-host-memory", choices=("first-sleep", "start"), default="first-sleep")
    add("--max-model-len", type=int, default=4096)
    add("--disable-access-log", action="store_true")
    add_arguments(parser, simulated=False)
    args = vars(parser.parse_args(argv))
    try:
        sleep = take_options(args, simulated=False)
    except ValueError as exc:
        parser.error(f"VLLM_SERVER_DEV_MODE: {exc}")
    if args["make_weights"] is None:
        if args["port"] is None or args["weights"] is None:
            parser.error("serving needs --port and --weights (or use --make-weights FILE)")
    elif args["weights_gib"] is None:
        parser.error("--make-weights needs --weights-gib")
    args["port"] = args["port"] or 0
    return EngineOptions(**args, sleep=sleep)


def main(argv: Sequence[str] | None = None) -> int:
    began = time.perf_counter()
    options = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(asctime)s [gpu-engine] %(message)s",
    )
    if options.make_weights is not None:
        assert options.weights_gib is not None
        shape = Shape.for_bytes(
            int(options.weights_gib * GIB), hidden=options.hidden, dtype_name=options.dtype
        )
        seconds = make_weights(options.make_weights, shape, device=options.device)
        logger.info("wrote %s: %d bytes in %.1f s", options.make_weights, shape.nbytes, seconds)
        return 0
    assert options.weights is not None
    if not options.weights.exists():
        if options.weights_gib is None:
            raise SystemExit(f"{options.weights} does not exist (give --weights-gib to make it)")
        shape = Shape.for_bytes(
            int(options.weights_gib * GIB), hidden=options.hidden, dtype_name=options.dtype
        )
        logger.info("making %s (%d bytes); not part of the start", options.weights, shape.nbytes)
        make_weights(options.weights, shape, device=options.device)
        began = time.perf_counter()
    # The cold start, timed: import torch, CUDA, weights from disk, KV cache, warm-up.
    imported = time.perf_counter()
    import torch  # noqa: F401  (its import is part of an engine's start)

    startup: JsonObject = {"import_torch_s": round(time.perf_counter() - imported, 6)}
    shape = shape_of_file(options.weights, options)
    model = Model(
        shape,
        device=options.device,
        kv_bytes=int(options.sleep.kv_cache_gib * GIB),
        path=options.weights,
    )
    startup.update(model.start(pin_at_start=options.pin_host_memory == "start"))
    startup["total_s"] = round(time.perf_counter() - began, 6)
    logger.info(
        "loaded %s: %d layers of %dx%d %s (%.2f GiB) on %s; start %s",
        options.served_model_name,
        shape.layers,
        shape.hidden,
        shape.hidden,
        shape.dtype_name,
        shape.nbytes / GIB,
        options.device,
        startup,
    )
    return asyncio.run(serve(options, model=model, startup=startup))


if __name__ == "__main__":
    sys.exit(main())
