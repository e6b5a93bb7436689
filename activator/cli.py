"""Command line: `activator serve | check-config | status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from activator import __version__
from activator.config import ConfigError, load_config
from activator.settings import Settings

logger = logging.getLogger("activator")

DEFAULT_URL = "http://127.0.0.1:8080"
LISTEN_BACKLOG = 4096
# aiohttp's shutdown_timeout. Not the grace: server.shutdown_grace is spent in one place,
# the app's on_shutdown (activator.app), which ends every request still open when it is
# over. This only bounds the handlers' last writes of that error to slow clients (aiohttp
# waits up to it twice, then cancels them). As shutdown_timeout, the grace was spent
# twice (a stream ran 2 x the grace and was then dropped without an error event).
HANDLER_EXIT_TIMEOUT = 2.0


def embedded_config() -> Path:
    """The demo config shipped inside the package (a copy of config/local.yaml)."""
    return Path(str(resources.files("activator") / "data" / "local.yaml"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="activator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"activator {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy (the default command)")
    serve.add_argument("--config", help="YAML config (default: the embedded local demo)")
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    status = sub.add_parser("status", help="show models from a running activator")
    status.add_argument("--url", default=DEFAULT_URL)
    status.add_argument("--admin-key", default=None, help="admin_api_key, if one is set")
    status.add_argument("--json", action="store_true", help="print the admin API's JSON")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "status":
        return _status(args.url, args.admin_key, as_json=args.json)
    return _serve(getattr(args, "config", None), getattr(args, "log_level", "INFO"))


def _load(path: str) -> Settings | None:
    """The settings, or None after printing one line per problem."""
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return 1
    print(f"{path}: ok ({len(settings.models)} models, {len(settings.pools)} pools)")
    return 0


def _serve(config: str | None, log_level: str) -> int:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    path = config or str(embedded_config())
    settings = _load(path)
    if settings is None:
        return 2
    from aiohttp import web

    from activator.app import build_app

    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # uvloop is optional where it does not build
        loop = asyncio.new_event_loop()
    server = settings.server
    logger.info(
        "activator %s serving %d models on http://%s:%d (config %s)",
        __version__,
        len(settings.models),
        server.host,
        server.port,
        path,
    )
    web.run_app(
        build_app(settings),
        host=server.host,
        port=server.port,
        shutdown_timeout=HANDLER_EXIT_TIMEOUT,
        handler_cancellation=True,  # a client that disconnects cancels its held request
        # aiohttp's default of 128 pending connections overflows when thousands of clients
        # arrive at once for a cold model: the kernel drops their SYNs and they retry after
        # 1, 3, 7... s or fail. The kernel caps this at net.core.somaxconn.
        backlog=LISTEN_BACKLOG,
        access_log=None,  # we log one richer line per proxied request ourselves
        print=None,
        loop=loop,
    )
    return 0


def _status(url: str, admin_key: str | None, *, as_json: bool) -> int:
    request = urllib.request.Request(url.rstrip("/") + "/admin/models")
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body: dict[str, Any] = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot read {url}/admin/models: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [("MODEL", "STATE", "IN FLIGHT", "QUEUED", "LAST WAKE", "POOL", "LAST ERROR")]
    for m in body.get("models", []):
        wake = m.get("last_wake_seconds")
        rows.append(
            (
                str(m.get("name")),
                str(m.get("state")),
                str(m.get("in_flight")),
                str(m.get("queued")),
                "-" if wake is None else f"{wake:.2f}s",
                str(m.get("pool") or "-"),
                (m.get("last_error") or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0
