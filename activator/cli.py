"""Command line: `activator serve | check-config | status | litellm-config`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from activator import __version__
from activator.config.load import ConfigError, load_config
from activator.config.settings import Settings

logger = logging.getLogger("activator")

DEFAULT_URL = "http://127.0.0.1:8080"
LISTEN_BACKLOG = 4096
# `activator status` reads the admin key from here when --admin-key is not given; the same
# name config/example.yaml substitutes into server.admin_api_key.
ADMIN_KEY_ENV = "ACTIVATOR_ADMIN_KEY"
# An error body is read for its message only; a larger one is cut.
ERROR_BODY_BYTES = 64 * 1024
PICK_ANOTHER_PORT = "pick another port with --port N or server.port in the config"
# aiohttp's shutdown_timeout. Not the grace: server.shutdown_grace is spent in one place,
# the app's on_shutdown (activator.app), which ends every request still open when it is
# over. This only bounds the handlers' last writes of that error to slow clients (aiohttp
# waits up to it twice, then cancels them). As shutdown_timeout, the grace was spent
# twice (a stream ran 2 x the grace and was then dropped without an error event).
HANDLER_EXIT_TIMEOUT = 2.0


# Said at start-up when `serve` runs the embedded demo: editing config/local.yaml (the file
# a user sees in the repository) and reloading would otherwise change nothing, silently.
EMBEDDED_NOTE = (
    "this is the embedded demo config, a packaged copy of config/local.yaml: edits to "
    "config/local.yaml do not reach it; to serve a file you can edit and reload, run "
    "`activator serve --config config/local.yaml` (or a copy of it)"
)


def embedded_config() -> Path:
    """The demo config shipped inside the package (a copy of config/local.yaml)."""
    return Path(str(resources.files("activator") / "data" / "local.yaml"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="activator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"activator {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy (the default command)")
    serve.add_argument("--config", help="YAML config (default: the embedded local demo)")
    serve.add_argument("--host", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", type=_port, help="port to listen on (overrides server.port)")
    serve.add_argument(
        "--watch",
        action="store_true",
        help="reload the config whenever the file changes (sets server.watch_config)",
    )
    serve.add_argument("--log-level", default="INFO")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    status = sub.add_parser("status", help="show models from a running activator")
    status.add_argument("model", nargs="?", help="one model, by name or alias (default: all)")
    status.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the running activator's address (default {DEFAULT_URL})",
    )
    status.add_argument(
        "--admin-key",
        default=None,
        help=f"server.admin_api_key, if one is set (or ${ADMIN_KEY_ENV})",
    )
    status.add_argument("--json", action="store_true", help="print the admin API's JSON")
    lite = sub.add_parser("litellm-config", help="print a LiteLLM proxy config for the models")
    lite.add_argument("--config", help="YAML config (default: the embedded local demo)")
    lite.add_argument("--url", help="activator's URL as LiteLLM reaches it (default: server.*)")
    lite.add_argument("--key-env", default=None, help="variable LiteLLM reads the API key from")
    args = parser.parse_args(argv)
    if args.command == "litellm-config":
        return _litellm_config(args.config, url=args.url, key_env=args.key_env)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "status":
        return _status(args.url, args.model, args.admin_key, as_json=args.json)
    try:
        return _serve(
            getattr(args, "config", None),
            getattr(args, "log_level", "INFO"),
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
            watch=getattr(args, "watch", False),
        )
    except OSError as error:
        # _serve checks the address before it starts anything; this is the rare case of a
        # process taking the port between that check and the bind.
        if error.errno != errno.EADDRINUSE:
            raise
        print(f"activator: {error.strerror}; {PICK_ANOTHER_PORT}", file=sys.stderr)
        return 1


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


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
    models, pools = len(settings.models), len(settings.pools)
    print(f"{path}: ok ({_plural(models, 'model')}, {_plural(pools, 'pool')})")
    return 0


def _litellm_config(config: str | None, *, url: str | None, key_env: str | None) -> int:
    from activator import litellm_config as lite

    settings = _load(config or str(embedded_config()))
    if settings is None:
        return 2
    default_url, warning = lite.server_url(settings)
    if url is None and warning is not None:
        print(f"activator: {warning}", file=sys.stderr)
    config_ = lite.litellm_config(
        settings, url=url or default_url, key_env=key_env or lite.DEFAULT_KEY_ENV
    )
    print(lite.render(config_), end="")
    return 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _serve(
    config: str | None, log_level: str, *, host: str | None, port: int | None, watch: bool = False
) -> int:
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    path = config or str(embedded_config())
    settings = _load(path)
    if settings is None:
        return 2
    settings = _listen_on(settings, host=host, port=port, watch=watch)
    lock, problem = _single_activator(settings, path)
    if problem is None:
        problem = _cannot_listen(settings.server.host, settings.server.port, config=config)
    if problem is not None:
        print(f"activator: {problem}", file=sys.stderr)
        return 1
    from aiohttp import web

    from activator.app import build_app
    from activator.reload import ConfigFile

    try:
        app = build_app(settings)
    except ValueError as error:  # what only the environment tells (activator.ha.wiring)
        print(f"activator: {error}", file=sys.stderr)
        return 2

    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # uvloop is optional where it does not build
        loop = asyncio.new_event_loop()
    server = settings.server
    logger.info(
        "activator %s serving %s on http://%s:%d (config %s)",
        __version__,
        _plural(len(settings.models), "model"),
        server.host,
        server.port,
        path,
    )
    if config is None:
        logger.info("%s", EMBEDDED_NOTE)
    # The file is read again on a reload, with the same command-line overrides.
    config_file = ConfigFile(
        path, adjust=lambda new: _listen_on(new, host=host, port=port, watch=watch)
    )
    app = build_app(settings, config=config_file)
    app.on_startup.append(_reload_on_sighup)
    web.run_app(
        app,
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
    if lock is not None:
        os.close(lock)  # the kernel would release it at exit anyway, even on SIGKILL
    return 0


async def _reload_on_sighup(app: Any) -> None:
    """SIGHUP reloads the config, as daemons do (docs/reload.md): the reload runs in the
    background; its outcome is logged and counted. The handler stays until the loop
    closes: a SIGHUP during shutdown is refused, it does not kill activator."""
    from activator.app import RELOADER

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app[RELOADER].request, "sighup")


def runtime_dir() -> Path:
    """Where activator keeps per-host runtime files: $XDG_RUNTIME_DIR (per user, on a
    tmpfs, cleaned at logout), else a private directory under the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg)
    path = Path(tempfile.gettempdir()) / f"activator-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def lock_path(config: str) -> Path:
    """The lock of one config file: by its real path, so a symlink or another spelling of
    the same file is the same lock."""
    digest = hashlib.sha256(os.path.realpath(config).encode()).hexdigest()[:16]
    return runtime_dir() / f"activator-{digest}.lock"


def _single_activator(settings: Settings, config: str) -> tuple[int | None, str | None]:
    """Local process engines are one activator's children: a second `serve` of the same
    config on this host must not start, adopt or stop them. An flock on a file named
    after the config, held while activator runs; the kernel releases it when the process
    ends, however it ends (SIGKILL included), so a stale file never locks anyone out.
    Returns (the lock's descriptor, kept open, or None; a problem line, or None)."""
    if not any(model.process is not None for model in settings.models.values()):
        return None, None  # Kubernetes engines: several replicas may share them (HA)
    path = lock_path(config)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        return None, f"cannot open the lock file {path}: {error.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None, f"cannot lock {path}: {error.strerror}"
        pid = f" (pid {holder})" if holder.isdigit() else ""
        return None, (
            f"another activator{pid} already serves {config} on this host: its local "
            "engines belong to it; stop it first, or run the second one on its own copy of "
            "the file (--config COPY --port N; one activator per config file)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, None


def _listen_on(
    settings: Settings, *, host: str | None, port: int | None, watch: bool = False
) -> Settings:
    """The settings with --host/--port, where given, in place of server.host/server.port,
    and --watch, where given, as server.watch_config: true (a reload keeps all three)."""
    changes: dict[str, Any] = {}
    if watch:
        changes["watch_config"] = True
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if not changes:
        return settings
    return settings.model_copy(update={"server": settings.server.model_copy(update=changes)})


def _cannot_listen(host: str, port: int, *, config: str | None) -> str | None:
    """Why `serve` could not listen on host:port (one line), or None if it can.

    Checked before the app is built, so that an activator started twice by mistake starts,
    adopts and stops nothing. Binds each address the host resolves to the way aiohttp's
    server will (SO_REUSEADDR, IPv6 sockets v6-only), then lets go."""
    where = f"server.port in {config}" if config else "server.port in a --config file"
    how = f"pick another port with --port N or {where}"
    if port == 0:
        return None  # the kernel picks a free one
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return f"cannot listen on {host}: {error.strerror}; pick another address with --host"
    for family, kind, proto, _, address in addresses:
        shown = f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"{shown} is already in use (is another activator running?); {how}"
            return f"cannot listen on {shown}: {error.strerror}; pick another with --host/--port"
    return None


def _status(url: str, model: str | None, admin_key: str | None, *, as_json: bool) -> int:
    """Print the models' table (or one model's row) from a running activator's admin API."""
    key_source = "--admin-key" if admin_key else None  # said in errors; the key never is
    if admin_key is None and os.environ.get(ADMIN_KEY_ENV):
        admin_key, key_source = os.environ[ADMIN_KEY_ENV], ADMIN_KEY_ENV
    path = "/admin/models" + ("" if model is None else "/" + urllib.parse.quote(model, safe=""))
    endpoint = url.rstrip("/") + path
    request = urllib.request.Request(endpoint)
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as error:
        with error:
            message = _error_message(error.read(ERROR_BODY_BYTES))
        print(_admin_error(endpoint, error.code, message, key_source=key_source), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(_unreachable(url, exc), file=sys.stderr)
        return 1
    except ValueError as exc:  # not JSON: something else answers there
        print(f"cannot read {endpoint}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(body, indent=2))
        return 0
    models = [body] if model is not None else body.get("models", [])
    rows = [
        (
            "MODEL",
            "STATE",
            "IN FLIGHT",
            "QUEUED",
            "LAST WAKE",
            "GPU-H",
            "COST",
            "POOL",
            "LAST ERROR",
        )
    ]
    for m in models:
        wake = m.get("last_wake_seconds")
        cost = m.get("cost") or {}
        rows.append(
            (
                str(m.get("name")),
                _state_text(m),
                str(m.get("in_flight")),
                str(m.get("queued")),
                "-" if wake is None else f"{wake:.2f}s",
                _number_text(cost.get("gpu_hours")),
                _money_text(cost.get("dollars")),
                str(m.get("pool") or "-"),
                (m.get("last_error") or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _unreachable(url: str, error: BaseException) -> str:
    """One line for a server that does not answer: the URL, and the socket's reason."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        why = "no answer within 10 s"
    elif isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror.lower()
    else:
        why = str(reason)
    return (
        f"activator status: nothing answers at {url} ({why}); is `activator serve` "
        "running there? (another address: --url URL)"
    )


def _state_text(model: dict[str, Any]) -> str:
    """The state, and what a reload left pending: `ready (restart pending)` when changed
    keys wait for the next start, `(removing)` when the model drains to go."""
    notes = [
        note
        for note, on in (
            ("restart pending", model.get("restart_pending")),
            ("removing", model.get("removing")),
        )
        if on
    ]
    state = str(model.get("state"))
    return f"{state} ({', '.join(notes)})" if notes else state


def _number_text(value: object) -> str:
    """A figure as the admin API rounded it (0.01; below 0.1, two significant digits)."""
    return "-" if not isinstance(value, int | float) else f"{value:g}"


def _money_text(dollars: object) -> str:
    """Dollars to the cent; `< $0.01` for less than a cent but more than nothing (a
    short run would otherwise read as free); `-` for a model without prices."""
    if not isinstance(dollars, int | float):
        return "-"
    if 0 < dollars < 0.01:
        return "< $0.01"
    return f"${dollars:.2f}"


def _admin_error(endpoint: str, status: int, message: str | None, *, key_source: str | None) -> str:
    """One line for an admin API error; `key_source` is where the key came from, if any."""
    if status == 401 and key_source is None:
        return (
            f"{endpoint}: this activator has an admin key (server.admin_api_key); "
            f"pass it with --admin-key KEY or the {ADMIN_KEY_ENV} environment variable"
        )
    if status == 401:
        return f"{endpoint}: the admin key from {key_source} does not match server.admin_api_key"
    return f"{endpoint}: HTTP {status}: {message or 'no error message'}"


def _error_message(body: bytes) -> str | None:
    """The message of an OpenAI error envelope, or None for any other body."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None
