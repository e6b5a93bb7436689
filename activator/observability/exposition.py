"""The /metrics body, rendered on the event loop in slices that never stall proxying.

A render costs CPU in proportion to the number of series (about 10 us each with
prometheus_client's generate_latest, 2 us here), tens to hundreds of milliseconds with
many models. Run in one go on the event loop, that is a stall of every proxied request.
Run in a worker thread, it still holds the GIL against the loop, and uvloop takes the
GIL back for each callback, so every callback of a proxied request waits out the
interpreter's switch interval (5 ms): with 1000 models, warm requests' p99 went from
26 ms to 546 ms during 1 s scrapes (bench/metrics_scale.py, on a busy machine). So the
render runs on the loop as background work: SLICE of rendering, then PAUSE in which the loop serves
requests alone. A proxied request waits at most one slice for a scrape, and while a
render runs it takes at most half of the loop's time; a scrape takes twice its CPU time
to answer, which Prometheus (a 10 s scrape timeout by default) does not mind.

Consistency: everything runs on the loop thread, and a series' samples (a histogram's
buckets, sum and count) are read together, between two updates; only different series
of one scrape may be read a few slices apart, as in any scrape that is not atomic. A
series removed after its family's snapshot was taken is skipped, so a model never shows
two states in one scrape.

prometheus_client has no public way to visit a metric's children one at a time (its
collect() materialises a whole family), so this reads `_metrics`, `_lock` and
`_child_samples()`: private, but stable over years of releases, and
tests/test_metrics.py checks the output against generate_latest's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

# Go's float formatting, as generate_latest writes values ("+Inf", "1e+06"); untyped there.
_go_float: Callable[[float], str] = floatToGoString

# Rendering done between two pauses: the most a proxied request waits for a scrape, and
# small against a warm request's own time. The pause gives the loop to requests alone; 1 ms
# is also the resolution of uvloop's timers (a shorter sleep is no pause at all).
SLICE = 0.001
PAUSE = 0.001

# How generate_latest (text format 0.0.4) names and types each kind of family.
_EXPOSED = {"counter": ("_total", "counter"), "info": ("_info", "gauge")}


class Exposition:
    """Renders a fixed set of metrics. Renders requested while one runs share it."""

    def __init__(
        self,
        metrics: Sequence[MetricWrapperBase],
        *,
        slice_s: float = SLICE,
        pause_s: float = PAUSE,
    ) -> None:
        self._families = [_Family(m) for m in metrics]
        self._slice = slice_s
        self._pause = pause_s
        self._task: asyncio.Task[bytes] | None = None
        self._waiters = 0
        self.renders = 0  # renders started, for tests and curiosity

    async def render(self) -> bytes:
        """The exposition, in the Prometheus text format, without `_created` series.

        Safe to cancel: the render goes on while another caller waits for it, and is
        cancelled when the last one leaves."""
        task = self._task
        if task is None:
            task = asyncio.create_task(self._render(), name="metrics-render")
            task.add_done_callback(self._rendered)
            self._task = task
            self.renders += 1
        self._waiters += 1
        try:
            return await asyncio.shield(task)
        finally:
            self._waiters -= 1
            if not self._waiters and not task.done():
                task.cancel()

    def _rendered(self, task: asyncio.Task[bytes]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved: its callers saw it, or all had gone

    async def _render(self) -> bytes:
        out: list[str] = []
        deadline = time.perf_counter() + self._slice
        for family in self._families:
            out.append(family.header)
            for text in family.series():
                out.append(text)
                if time.perf_counter() >= deadline:
                    await asyncio.sleep(self._pause)
                    deadline = time.perf_counter() + self._slice
        return "".join(out).encode()


class _Family:
    """One metric: its header, and the text of each of its series, label strings cached."""

    def __init__(self, metric: MetricWrapperBase) -> None:
        (described,) = metric.describe()
        suffix, kind = _EXPOSED.get(described.type, ("", described.type))
        name = described.name + suffix
        doc = described.documentation.replace("\\", r"\\").replace("\n", r"\n")
        self.header = f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"
        self._metric: Any = metric  # its private parts are read below
        self._name = described.name
        self._labelled = bool(self._metric._labelnames)
        # (label values, sample suffix, le) -> 'name_suffix{labels} '
        self._prefixes: dict[tuple[tuple[str, ...], str, str | None], str] = {}

    def series(self) -> Iterator[str]:
        """The text of each series in turn (a histogram's is several lines)."""
        metric = self._metric
        if not self._labelled:
            yield self._text((), metric)
            return
        with metric._lock:
            children = list(metric._metrics.items())
        for values, child in children:
            if metric._metrics.get(values) is child:  # not removed since the snapshot
                yield self._text(values, child)

    def _text(self, values: tuple[str, ...], child: Any) -> str:
        lines = []
        for sample in child._child_samples():
            suffix = sample.name
            if suffix == "_created":
                continue
            key = (values, suffix, sample.labels.get("le"))
            prefix = self._prefixes.get(key)
            if prefix is None or suffix == "_info":  # an Info's labels are its value
                prefix = self._prefix(values, suffix, sample.labels)
                self._prefixes[key] = prefix
            value = sample.value
            lines.append(prefix + ("0.0" if value == 0 else _go_float(value)) + "\n")
        return "".join(lines)

    def _prefix(self, values: tuple[str, ...], suffix: str, extra: dict[str, str]) -> str:
        labels = dict(zip(self._metric._labelnames, values, strict=True))
        labels.update(extra)
        if not labels:
            return f"{self._name}{suffix} "
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        return f"{self._name}{suffix}{{{text}}} "


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
