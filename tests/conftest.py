from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.harness import Running, start_activator

ActivatorFactory = Callable[[dict[str, Any]], Awaitable[Running]]


@pytest.fixture
async def activator() -> AsyncIterator[ActivatorFactory]:
    """Start activators from config dicts; all are shut down (engines stopped) after."""
    started: list[Running] = []

    async def start(config: dict[str, Any]) -> Running:
        running = await start_activator(config)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.close()
