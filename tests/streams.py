"""A streaming chat request through activator, read as it arrives: for the tests that keep
several streams open at once and act on them (scale-out, several activator replicas)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Stream:
    """One streaming chat request, read as it arrives."""

    first: asyncio.Event = field(default_factory=asyncio.Event)  # a token arrived
    text: str = ""
    status: int = 0
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return "data: [DONE]" in self.text and '"error"' not in self.text

    @property
    def failed(self) -> bool:
        return '"error"' in self.text or self.status >= 400

    async def started(self) -> None:
        """Until a token arrived; AssertionError if the stream ended before one."""
        assert self.task is not None
        token = asyncio.ensure_future(self.first.wait())
        await asyncio.wait({token, self.task}, return_when=asyncio.FIRST_COMPLETED)
        token.cancel()
        assert self.first.is_set(), f"ended before a token: {self.status} {self.text[:300]}"

    async def finished(self) -> Stream:
        assert self.task is not None
        await self.task
        return self

    async def cancel(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def open_stream(session: aiohttp.ClientSession, url: str, model: str, *, tokens: int) -> Stream:
    """POST a streaming chat completion for `model` to `url` (activator's
    /v1/chat/completions) in a task of its own; the Stream follows it."""
    stream = Stream()
    body = {
        "model": model,
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }

    async def run() -> None:
        async with session.post(url, json=body) as resp:
            stream.status = resp.status
            async for chunk in resp.content.iter_any():
                stream.text += chunk.decode(errors="replace")
                if '"delta"' in stream.text:
                    stream.first.set()

    stream.task = asyncio.create_task(run())
    return stream
