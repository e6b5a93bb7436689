"""The LoRA adapters loaded on one model's engine: which, in what order of use, which
are in use, and the one load of each at a time (docs/adapters.md).

Owned by the model (activator.model.lifecycle.Model), which owns its engine: the model
resets the loaded set whenever the engine that had it is gone (a stop, a failure, a new
start, a level-2 wake) and tells it when a request on an adapter ends. Everything here
runs on the event loop; no lock is needed because nothing checks and acts across an
`await` without checking again.

- `use(adapter, url=...)` is a request's claim on an adapter: it counts the request as
  using it at once (so it is never chosen to make room), then makes sure it is loaded:
  one load per adapter at a time (single-flight: later requests await the same load),
  bounded by the model's adapter_load_timeout. A failed load fails every request that
  awaited it with AdapterLoadFailed (vLLM's reason in it); the engine is left as it is.
- `done(adapter)` ends the claim; an adapter no request uses is unloaded after its
  idle_timeout, and at once if a reload removed it.
- Past the model's adapter_limit, a load first unloads the adapter least recently used
  among those no request uses, and waits for those unloads to be done; if every loaded
  adapter is in use, it waits for one to be free (within its timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import aiohttp

from activator.config.settings import ModelSettings
from activator.core.errors import AdapterLoadFailed
from activator.core.tasks import TaskGroup
from activator.engine.http_client import HttpClient
from activator.observability.metrics import Metrics

logger = logging.getLogger(__name__)

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
# vLLM answers a load of a name it has already with 400 and this text: it has the
# adapter (registered before activator knew, e.g. an adopted engine), which is the goal.
ALREADY_LOADED = "has already been loaded"
# An unload is a bookkeeping call on the engine; it must not hang a load behind it.
UNLOAD_TIMEOUT = 30.0


class EngineAdapters:
    """The adapters of one engine. `settings` gives the model's settings in force."""

    def __init__(
        self,
        model: str,
        *,
        settings: Callable[[], ModelSettings],
        http: HttpClient,
        metrics: Metrics,
        tasks: TaskGroup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model = model
        self._settings = settings
        self._http = http
        self._metrics = metrics
        self._tasks = tasks
        self._clock = clock
        self._loaded: OrderedDict[str, str] = OrderedDict()  # name -> url; oldest use first
        self._using: dict[str, int] = {}
        self._loads: dict[str, asyncio.Task[AdapterLoadFailed | None]] = {}  # one per adapter
        self._unloads: dict[str, asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Loads that have their room (a slot of adapter_limit) and are under way.
        self._reserved: set[str] = set()
        self._free = asyncio.Event()  # room may have appeared: waiting loads look again
        self._epoch = 0  # one per engine: a load of an engine gone since is not recorded

    @property
    def loaded(self) -> tuple[str, ...]:
        """Loaded now, least recently used first."""
        return tuple(self._loaded)

    def in_use(self, adapter: str) -> int:
        return self._using.get(adapter, 0)

    def reset(self, why: str) -> None:
        """The engine that had the loaded set is gone (or lost it): nothing is loaded."""
        self._epoch += 1
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._loaded:
            logger.info("model=%s adapters %s unloaded (%s)", self._model, list(self._loaded), why)
        self._loaded.clear()
        self._show()

    async def use(self, adapter: str, *, url: str) -> None:
        """Claim `adapter` for one request and make sure it is loaded on the engine at
        `url`. Raises AdapterLoadFailed; safe to cancel. Unless it raises, the caller
        calls `done(adapter)` once the request is over."""
        self._using[adapter] = self._using.get(adapter, 0) + 1
        timer = self._timers.pop(adapter, None)
        if timer is not None:
            timer.cancel()
        try:
            while adapter not in self._loaded:  # again if the engine changed meanwhile
                load = self._loads.get(adapter)
                if load is None:
                    load = self._tasks.spawn(
                        self._load(adapter, url=url), name=f"adapter-load:{self._model}:{adapter}"
                    )
                    self._loads[adapter] = load
                    load.add_done_callback(lambda _: self._loads.pop(adapter, None))
                failed = await asyncio.shield(load)
                if failed is not None:  # each request its own copy, as held requests get
                    raise AdapterLoadFailed(failed.message, retry_after=failed.retry_after)
        except BaseException:
            self.done(adapter)
            raise
        self._loaded.move_to_end(adapter)

    def done(self, adapter: str) -> None:
        """A request on `adapter` is over."""
        left = self._using.get(adapter, 0) - 1
        if left > 0:
            self._using[adapter] = left
            return
        self._using.pop(adapter, None)
        self._free.set()
        if adapter not in self._loaded:
            return
        settings = self._settings()
        if adapter not in settings.adapters:  # a reload removed it: its last request ended
            self._unload(adapter, reason="removed")
            return
        delay = settings.adapter_idle_timeout(adapter)
        self._timers[adapter] = asyncio.get_running_loop().call_later(
            delay, self._idle, adapter, self._epoch
        )

    def configure(self) -> None:
        """A reload: loaded adapters it removed and no request uses are unloaded now
        (those in use, once their last request ends)."""
        adapters = self._settings().adapters
        for name in [n for n in self._loaded if n not in adapters and not self._using.get(n)]:
            self._unload(name, reason="removed")

    # ----- the engine calls ----------------------------------------------------------

    def _idle(self, adapter: str, epoch: int) -> None:
        self._timers.pop(adapter, None)
        if epoch == self._epoch and adapter in self._loaded and not self._using.get(adapter):
            self._unload(adapter, reason="idle")

    def _unload(self, adapter: str, *, reason: str) -> None:
        """Forget `adapter` now and unload it from the engine in the background (a load
        of it waits for that to end)."""
        url = self._loaded.pop(adapter, None)
        timer = self._timers.pop(adapter, None)
        if timer is not None:
            timer.cancel()
        self._show()
        if url is None:
            return
        logger.info("model=%s adapter %s unloaded (%s)", self._model, adapter, reason)
        self._metrics.adapter_unloads.labels(
            model=self._model, adapter=adapter, reason=reason
        ).inc()
        task = self._tasks.spawn(
            self._call_unload(adapter, url=url), name=f"adapter-unload:{self._model}:{adapter}"
        )
        self._unloads[adapter] = task
        task.add_done_callback(lambda _: self._unloads.pop(adapter, None))

    async def _call_unload(self, adapter: str, *, url: str) -> None:
        try:
            async with asyncio.timeout(UNLOAD_TIMEOUT):
                status, text = await self._post(url + UNLOAD_PATH, {"lora_name": adapter})
        except (aiohttp.ClientError, TimeoutError) as exc:  # the engine went: nothing to undo
            logger.info("model=%s adapter %s unload failed: %r", self._model, adapter, exc)
            return
        if status != 200:
            logger.info("model=%s adapter %s unload: %s %s", self._model, adapter, status, text)

    async def _load(self, adapter: str, *, url: str) -> AdapterLoadFailed | None:
        """Load `adapter` (one task per adapter at a time); its failure is returned, not
        raised: it is the requests' to answer, not a task that died."""
        settings = self._settings()
        epoch, started = self._epoch, self._clock()
        timeout = settings.adapter_load_timeout
        where = f"adapter {adapter!r} of model {self._model!r}"
        outcome, failed = "failed", None
        try:
            async with asyncio.timeout(timeout):
                await self._make_room(adapter)
                if self._unloads:  # the engine never holds more than the limit, even briefly
                    await asyncio.wait(list(self._unloads.values()))
                body = {"lora_name": adapter, "lora_path": settings.adapters[adapter].path}
                status, text = await self._post(url + LOAD_PATH, body)
            if status == 200 or (status == 400 and ALREADY_LOADED in text):
                outcome = "loaded"
            else:
                reason = _reason(text)
                logger.warning("model=%s adapter %s load failed: %s %s", self._model, adapter,
                               status, reason)  # fmt: skip
                failed = AdapterLoadFailed(
                    f"{where} could not be loaded: the engine answered {status}: {reason}"
                )
        except TimeoutError:
            outcome = "timeout"
            message = f"{where} did not load within {timeout:g}s"
            failed = AdapterLoadFailed(message, retry_after=timeout)
        except aiohttp.ClientError as exc:
            message = f"{where} could not be loaded: the engine did not answer ({exc!r})"
            failed = AdapterLoadFailed(message, retry_after=5)
        finally:
            self._reserved.discard(adapter)
            self._free.set()
            self._metrics.adapter_loads.labels(
                model=self._model, adapter=adapter, outcome=outcome
            ).inc()
        if failed is not None:
            return failed
        seconds = self._clock() - started
        self._metrics.adapter_load_duration.labels(model=self._model).observe(seconds)
        if epoch == self._epoch:  # else loaded into an engine gone since: `use` loads again
            self._loaded[adapter] = url
            self._show()
            logger.info("model=%s adapter %s loaded in %.3fs", self._model, adapter, seconds)
        return None

    async def _make_room(self, adapter: str) -> None:
        """Reserve a slot for `adapter`: unload the least recently used adapters no
        request uses until loaded plus reserved leave room; while every one is in use,
        wait for room (a request ending, a load ending, an unload)."""
        while True:
            if len(self._loaded) + len(self._reserved) < self._settings().adapter_limit:
                self._reserved.add(adapter)
                return
            victim = next((n for n in self._loaded if not self._using.get(n)), None)
            if victim is not None:
                self._unload(victim, reason="lru")
                continue
            self._free.clear()
            await self._free.wait()

    async def _post(self, url: str, body: dict[str, str]) -> tuple[int, str]:
        key = self._settings().upstream_api_key
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        response = await self._http.post(
            self._model,
            url,
            data=json.dumps(body).encode(),
            headers=headers,
            timeouts=aiohttp.ClientTimeout(total=None, sock_connect=10),
            request_id=f"adapter-{body['lora_name']}",
        )
        async with response:
            return response.status, await response.text()

    def _show(self) -> None:
        self._metrics.adapters_loaded.labels(model=self._model).set(len(self._loaded))


def _reason(text: str) -> str:
    """vLLM's message from its error envelope (flat or under "error"), else the text."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return text.strip()[:500]
