"""Polling another component's state with a deadline, for tests and benchmarks: for
conditions no event reports (another process's state, the fake cluster's, activator's
admin API); never a substitute for an event we own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def poll(
    condition: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for polling, not for one await
    what: str,
    interval: float = 0.02,
) -> Any:
    """Call `condition` (sync or async) until it is truthy and return that value; raise
    TimeoutError naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
