"""A minimal, fast OpenAI-compatible upstream for the overhead benchmark.

Why not the stand-in engine (activator.testing.fake_engine)? It is an aiohttp app that
builds every answer: on a 2-core machine it, not the proxy in front of it, would be the
bottleneck, and the benchmark would compare proxies by how they queue in front of a slow
server. This one is a bare asyncio Protocol on uvloop with precomputed answers.

  python bench/upstream.py --port P [--served-model-name NAME] [--chunk-interval S]

- GET /health -> 200 (empty); GET /v1/models -> the served name (activator's readiness).
- POST /v1/chat/completions (and /v1/completions): a fixed small JSON answer, or with
  `"stream": true` an SSE stream of `max_tokens` chunks (default 16) then `data: [DONE]`,
  each chunk one HTTP chunk. Each chunk's content is the CLOCK_MONOTONIC time in ns at
  which it was written, so a client on this machine can tell how long it took to arrive.
  With --chunk-interval the chunks are paced (a decode loop's rhythm); else back to back.
Prints `READY port=<port>` once listening. HTTP/1.1 keep-alive; no pipelining needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

HEALTH = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
DONE = b"data: [DONE]\n\n"


def json_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    def __init__(self, served: str, interval: float) -> None:
        self.interval = interval
        models = {"object": "list", "data": [{"id": served, "object": "model"}]}
        self.models = json_response(json.dumps(models).encode())
        message = {"role": "assistant", "content": "Hello from the bench upstream."}
        answer = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": served,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        }
        self.answer = json_response(json.dumps(answer).encode())
        # The chunk around the timestamp, split once here so a chunk costs one format.
        head = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": served,
            "choices": [{"index": 0, "delta": {"content": "@@"}, "finish_reason": None}],
        }
        before, after = json.dumps(head, separators=(",", ":")).split("@@")
        self.chunk_before = b"data: " + before.encode()
        self.chunk_after = after.encode() + b"\n\n"

    def chunk(self) -> bytes:
        return http_chunk(self.chunk_before + str(time.monotonic_ns()).encode() + self.chunk_after)


class Upstream(asyncio.Protocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.streaming is None:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        """Answer every complete request in the buffer, in order; a stream pauses this."""
        while self.transport is not None and self.streaming is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head.split(" ", 2)
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path in ("/health", "/ping"):
            self.transport.write(HEALTH)
        elif method == "GET" and path == "/v1/models":
            self.transport.write(self.answers.models)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            request = json.loads(body or b"{}")
            if request.get("stream") is True:
                count = int(request.get("max_tokens") or 16)
                self.streaming = asyncio.ensure_future(self.stream(count))
            else:
                self.transport.write(self.answers.answer)
        else:
            self.transport.write(NOT_FOUND)

    async def stream(self, count: int) -> None:
        transport = self.transport
        assert transport is not None
        try:
            transport.write(SSE_HEAD)
            for index in range(count):
                if index and self.answers.interval:
                    await asyncio.sleep(self.answers.interval)
                transport.write(self.answers.chunk())
            transport.write(http_chunk(DONE) + b"0\r\n\r\n")
        finally:
            self.streaming = None
        self.serve_buffered()


async def serve(*, host: str, port: int, answers: Answers) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(answers), host, port, backlog=4096)
    print(f"READY port={server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--chunk-interval", type=float, default=0.0)
    args = parser.parse_args()
    answers = Answers(args.served_model_name, args.chunk_interval)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host=args.host, port=args.port, answers=answers))
    else:
        uvloop.run(serve(host=args.host, port=args.port, answers=answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
