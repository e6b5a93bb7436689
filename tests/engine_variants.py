"""The stand-in engine with test-only connection behaviours layered on as one middleware.

Run as ``python -m tests.engine_variants --variant NAME [fake_engine flags]``. Variants:

- ``echo``: every /v1 answer carries ``x-received-headers`` (the request headers the
  engine received, a JSON list of pairs).
- ``drop-reused``: a /v1 request arriving on a connection that already carried one is
  dropped, the connection closed with no answer: an engine whose keep-alive timeout fires
  just as a request arrives (the keep-alive race).
- ``drop-all``: every /v1 request is dropped that way, on any connection.
- ``cut-after-headers``: /v1 answers send their status line and headers, then close.

``GET /test/received`` answers the number of /v1 POSTs that reached the engine. With
``--received-log FILE`` each one also appends its X-Request-Id as a line to FILE, a record
that outlives the engine (a test reads it after activator stopped the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from weakref import WeakKeyDictionary

from aiohttp import web

from activator.testing import fake_engine
from activator.testing.engine_options import EngineOptions
from activator.testing.engine_routes import health

VARIANTS = ("echo", "drop-reused", "drop-all", "cut-after-headers")


def layer(variant: str, *, received_log: Path | None = None) -> fake_engine.Handler:
    per_connection: WeakKeyDictionary[object, int] = WeakKeyDictionary()
    received = 0

    @web.middleware
    async def middleware(request: web.Request, handler: fake_engine.Handler) -> web.StreamResponse:
        nonlocal received
        if request.path == "/test/received":
            return web.json_response({"received": received})
        if not (request.path.startswith("/v1/") and request.method == "POST"):
            return await handler(request)
        received += 1
        if received_log is not None:
            with received_log.open("a") as log:
                log.write(request.headers.get("X-Request-Id", "-") + "\n")
        transport = request.transport
        assert transport is not None
        earlier = per_connection.get(transport, 0)
        per_connection[transport] = earlier + 1
        if variant == "drop-all" or (variant == "drop-reused" and earlier):
            await request.read()
            transport.abort()
            await asyncio.Event().wait()  # cancelled: the connection is gone
        if variant == "cut-after-headers":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            transport.abort()
            await asyncio.Event().wait()
        response = await handler(request)
        if variant == "echo":
            response.headers["x-received-headers"] = json.dumps(list(request.headers.items()))
        return response

    return middleware  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--received-log", type=Path, default=None)
    known, rest = parser.parse_known_args(argv)
    plain = fake_engine.build_app

    def build_app(options: EngineOptions) -> web.Application:
        app = plain(options)
        app.middlewares.insert(0, layer(known.variant, received_log=known.received_log))
        app.router.add_get("/test/received", health)  # answered by the layer
        return app

    # serve() builds its app through the module's build_app: this process is the variant.
    fake_engine.build_app = build_app
    return fake_engine.main(rest)


if __name__ == "__main__":
    sys.exit(main())
