"""A change counter that any number of readers can wait on without missing a change."""

from __future__ import annotations

import asyncio


class Changes:
    """Readers remember `count` when they read the state they act on, then
    `await changes.wait(seen)`: it returns at once if something changed since, else at
    the next `notify()`. Unlike a shared asyncio.Event nobody clears it, so a change
    between a read and the wait is never lost. Owned by the object whose state it
    announces; `notify()` is synchronous and cheap."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.count += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, seen: int) -> int:
        """The count once it differs from `seen`. Safe to cancel."""
        while self.count == seen:
            await self._event.wait()
        return self.count
