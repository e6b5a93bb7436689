"""`activator serve` as a real subprocess on a free loopback port, for CLI and shutdown tests.

The in-process harness (tests/harness.py) covers behaviour; these tests need what only a
real process shows: signal handling, exit codes, the console entry points.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.harness import engine_pids, wait_for

# Bounds every wait on a process; a healthy run needs a small fraction of it.
PROCESS_WAIT_S = 30.0


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    process: asyncio.subprocess.Process
    url: str
    log: Path  # the server's stderr, for failure messages

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exit_code(self) -> int:
        async with asyncio.timeout(PROCESS_WAIT_S):
            return await self.process.wait()


async def run_cli(
    *args: str, program: Sequence[str] = (sys.executable, "-m", "activator")
) -> tuple[int, str, str]:
    """Run `python -m activator ARGS` to completion: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *program,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PROCESS_WAIT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(
    config: dict[str, Any], *, workdir: Path, engines: Sequence[str]
) -> AsyncIterator[Served]:
    """Run `activator serve` with `config` (its server.port is filled in) until ready.

    On the way out the server is stopped with SIGTERM if it still runs, and, should a
    test have failed half-way, engines it left (found by their served names) are killed
    so they cannot leak into other tests.
    """
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    path = workdir / "activator.yaml"
    path.write_text(yaml.safe_dump(config))
    async with serving_file(
        path, url=f"http://127.0.0.1:{port}", log=workdir / "activator.log", engines=engines
    ) as served:
        yield served


async def spawn_serve(
    path: Path, *, log: Path, env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> asyncio.subprocess.Process:
    """`activator serve --config path [args]`, its output into `log`; not waited for."""
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "activator",
            "serve",
            "--config",
            str(path),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=env,
        )


async def until_ready(
    session: aiohttp.ClientSession,
    served: Served,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for polling, not for one await
    name: str = "activator",
) -> None:
    """Until the server's /readyz answers 200; AssertionError with its output if the
    process exits first."""

    async def ready() -> bool:
        if served.process.returncode is not None:
            raise AssertionError(f"{name} exited early:\n{served.output()}")
        try:
            async with session.get(served.url + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await wait_for(ready, timeout=timeout, what=f"{name} /readyz", interval=0.1)


@contextlib.asynccontextmanager
async def serving_file(
    path: Path, *, url: str, log: Path, engines: Sequence[str], args: Sequence[str] = ()
) -> AsyncIterator[Served]:
    """`activator serve --config path [args]` (a config that listens at `url`) until ready,
    as `serving` does; for tests that own the file (reloads rewrite it)."""
    process = await spawn_serve(path, log=log, args=args)
    served = Served(process=process, url=url, log=log)
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, served, timeout=PROCESS_WAIT_S)
        yield served
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await served.exit_code()
            except TimeoutError:
                process.kill()
                await process.wait()
        for name in engines:
            for pid in engine_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
