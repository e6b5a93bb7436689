"""Local backend: the engine is a child process on this machine.

The process runs in its own process group (so stopping it also stops what it forked:
vLLM starts worker processes), its output is kept in a bounded ring for errors and the
admin API, and its exit is noticed at once by a waiter task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import sys

from activator.backends.base import BackendListener
from activator.config.settings import ModelSettings, ProcessTarget
from activator.core.errors import BackendError
from activator.core.tasks import TaskGroup

logger = logging.getLogger(__name__)

# Engines print long lines (tracebacks, JSON); a line past this is split, never buffered
# without bound.
MAX_LINE = 8192
# After an engine exits, how long to wait for asyncio to report its exit code and close
# its pipe (a few loop turns once the whole group is gone).
RETURNCODE_WAIT = 1.0
# Bound on the "is this fixed port already served?" connect before a spawn. A local port
# answers or refuses at once; a host that drops the SYN is taken as not serving.
PORT_CHECK_TIMEOUT = 1.0


def free_port(host: str) -> int:
    """A port that was free a moment ago. The engine binds it soon after; the window in
    which another process could take it is small, and a clash fails the start cleanly."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def build_command(target: ProcessTarget, *, port: int) -> list[str]:
    """Fill in `{port}`; a leading `python` means this interpreter (venvs need not be on
    PATH when activator is started by its full path)."""
    argv = [arg.replace("{port}", str(port)) for arg in target.command]
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def redacted(argv: list[str], secret: str | None) -> list[str]:
    """The command for logs: the engine's API key (upstream_api_key, often also passed as
    `--api-key`) is a secret and never written to a log."""
    if not secret:
        return argv
    return [arg.replace(secret, "***") for arg in argv]


async def accepts_connections(host: str, port: int) -> bool:
    """Whether something already listens on host:port (a connect succeeds)."""
    try:
        async with asyncio.timeout(PORT_CHECK_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ProcessBackend:
    kind = "process"
    keep_on_shutdown = False  # nothing could adopt a local engine: it is always stopped

    def __init__(self, model: ModelSettings, *, listener: BackendListener) -> None:
        assert model.process is not None
        self._model = model
        self._target: ProcessTarget = model.process
        self._listener = listener
        self._log: collections.deque[str] = collections.deque(maxlen=self._target.log_lines)
        self._gpus: tuple[int, ...] = ()  # set by place(): CUDA_VISIBLE_DEVICES
        self._probe_line = probe_access_line(model.health_path)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks = TaskGroup()
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def discover(self) -> str | None:
        # We only ever run engines we started: an engine left by an earlier activator
        # that was killed with SIGKILL lives in its own process group and is not ours to
        # guess at (see docs: run activator under a supervisor that kills the group).
        return None

    def place(self, gpus: tuple[int, ...]) -> None:
        """The next engine runs on these GPUs of the pool: CUDA_VISIBLE_DEVICES, unless the
        model's process.env sets it (then that wins, and the placement is the pool's
        accounting only)."""
        self._gpus = gpus

    async def start(self) -> str:
        if self._proc is not None and self._proc.returncode is None:
            return self._url
        port = self._target.port or free_port(self._target.host)
        if self._target.port and await accepts_connections(self._target.host, port):
            # The engine could not bind it, and whatever answers there is not ours: never
            # route clients (their prompts, their headers) to a server we did not start.
            raise BackendError(
                f"{_address(self._target.host, port)} already accepts connections: another "
                "process serves that port, and activator only routes to engines it started; "
                "stop that process, or set process.port to 0 (a free port for each start)"
            )
        argv = build_command(self._target, port=port)
        env = {**os.environ, **self._target.env}
        if self._gpus and "CUDA_VISIBLE_DEVICES" not in self._target.env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self._gpus)
        self._port = port
        self._stopping = False
        self._log.clear()
        logger.info(
            "model=%s spawning %s", self._model.name, redacted(argv, self._model.upstream_api_key)
        )
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=self._target.cwd,
            start_new_session=True,  # own process group: stop() signals the whole tree
        )
        self._listener.backend_phase("spawned")
        proc = self._proc
        reader = self._tasks.spawn(self._read_output(proc), name=f"engine-log:{self._model.name}")
        self._reader = reader
        self._tasks.spawn(self._watch_exit(proc, reader), name=f"engine-exit:{self._model.name}")
        return self._url

    @property
    def _url(self) -> str:
        return f"http://{_address(self._target.host, self._port)}"

    def serving(self) -> bool:
        """Our process is alive. Read from the kernel, not from `returncode` (set a few
        loop turns after the exit) nor from the exit watcher (which first collects the
        last output lines): readiness must never win a race against our engine's exit."""
        proc = self._proc
        return proc is not None and proc.returncode is None and not _has_exited(proc.pid)

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        pending = b""
        while chunk := await proc.stdout.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending)
                pending = b""
            for raw in lines:
                line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip()
                if not self._probe_line.search(line):
                    self._log.append(line)
                logger.debug("model=%s engine: %s", self._model.name, line)
            self._listener.backend_progress()
        if pending:
            self._log.append(pending[:MAX_LINE].decode("utf-8", "replace").rstrip())

    async def _watch_exit(
        self, proc: asyncio.subprocess.Process, reader: asyncio.Task[None]
    ) -> None:
        code = await _exited(proc)
        if not self._stopping:
            # Let the reader collect the last lines the engine printed (its pipe may be
            # held open by a grandchild, hence the bound).
            await asyncio.wait({reader}, timeout=0.5)
            how = "exited" if code is None else f"exited with code {code}"
            self._listener.backend_failed(f"engine process {how}")

    async def stop(self) -> None:
        proc, self._stopping = self._proc, True
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(_exited(proc), timeout=self._target.stop_grace)
            except TimeoutError:
                logger.warning(
                    "model=%s engine ignored SIGTERM for %.0fs; killing its process group",
                    self._model.name,
                    self._target.stop_grace,
                )
        # Children may outlive the leader; the group goes in any case.
        self._signal_group(proc.pid, signal.SIGKILL)
        await _exited(proc)
        # With the group gone the pipe closes too, so Process.wait() returns: it lets
        # asyncio finish the process transport (one dropped before that is reported as
        # leaked, or "still running" if the loop ends first). Bounded: something that left
        # the group could still hold the pipe.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=RETURNCODE_WAIT)
        # On Python 3.11 wait() returns at the exit, not at the pipe's end: let the reader
        # see EOF (bounded, as above) so the pipe's transport closes before the loop may.
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=RETURNCODE_WAIT)
            self._reader = None
        await self._tasks.aclose()
        self._proc = None
        logger.info("model=%s engine stopped (exit code %s)", self._model.name, proc.returncode)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def log_tail(self) -> list[str]:
        return list(self._log)

    async def aclose(self) -> None:
        await self._tasks.aclose()


def probe_access_line(health_path: str) -> re.Pattern[str]:
    """The engine's access-log lines of activator's own successful probes (its health
    path, /v1/models, /is_sleeping), as uvicorn (vLLM) and aiohttp write them: left out
    of the tail kept for /admin and error bodies, where they would push out the lines that
    say something (a probe that fails is kept). Still logged at DEBUG."""
    paths = "|".join(re.escape(p) for p in (health_path, "/v1/models", "/is_sleeping"))
    return re.compile(rf'"GET (?:{paths})(?:\?[^" ]*)? HTTP/[0-9.]+"\s+200\b')


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _has_exited(pid: int) -> bool:
    """Whether our child `pid` has exited, reaped or not (never reaps it: the child
    watcher owns that)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped: it exited
        return True
    except (AttributeError, OSError):  # no waitid here: `returncode` has to do
        return False
    return info is not None


async def _exited(proc: asyncio.subprocess.Process) -> int | None:
    """Wait until the engine process itself has exited; return its exit code if known.

    `Process.wait()` also waits for the output pipe to close, which never happens while a
    worker the engine forked still holds it (vLLM's engine core does). A pidfd becomes
    readable the moment the process exits: an event, not a poll.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the process is already gone
        return await proc.wait()
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await exited
        code = _peek_exit_code(pidfd)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    if code is None:
        # The loop's child watcher reaped it first and sets `returncode` from its own
        # callback, already scheduled or about to be. No event reports that callback
        # (Process.wait() would also wait for the pipe), hence a short bounded poll.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETURNCODE_WAIT):
                while proc.returncode is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
        code = proc.returncode
    return code


def _peek_exit_code(pidfd: int) -> int | None:
    """The exit code of an exited process that is not reaped yet, read without reaping
    it (the child watcher owns that). Negative for a signal, as in `returncode`."""
    try:
        info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except (AttributeError, ChildProcessError, OSError):  # already reaped by the watcher
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
