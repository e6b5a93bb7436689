"""kube-proxy for the fake cluster: each Service's address (127.0.0.1:<port>) forwards
every new TCP connection to one of the Service's endpoints, read from its EndpointSlices.

As kube-proxy does (pkg/proxy/topology.go CategorizeEndpoints): an endpoint is usable if
ready; when none is, serving-and-terminating ones are (graceful termination); each
connection picks one at random, like iptables mode; existing connections are left alone
when endpoints change. With no usable endpoint the Service refuses connections
(kube-proxy's REJECT rule): the listener is open only while there is somewhere to send.

Deviation, inherent to a user-space proxy: the client's connect succeeds before the
endpoint is dialled, so an endpoint that refuses shows as a reset connection after
connect rather than a refused one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections import Counter

from tests.fakekube.endpoints import SERVICE_NAME
from tests.fakekube.store import Change, Obj, Store

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


def usable_endpoints(slices: list[Obj], port_name: str) -> list[tuple[str, int]]:
    """(ip, port) of the endpoints kube-proxy would send a new connection to."""
    ready: list[tuple[str, int]] = []
    terminating: list[tuple[str, int]] = []
    for piece in slices:
        port = next(
            (p["port"] for p in piece.get("ports") or [] if p.get("name") == port_name), None
        )
        if port is None:
            continue
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # nil ready and nil serving mean true; nil terminating means false.
            if conditions.get("ready", True) is not False:
                ready.append((endpoint["addresses"][0], port))
            elif conditions.get("serving", True) and conditions.get("terminating"):
                terminating.append((endpoint["addresses"][0], port))
    return ready or terminating


class ServiceProxy:
    """One Service's listener. `sync` runs synchronously from the store's observer, so
    the Service accepts connections (into the kernel's backlog) from the very write that
    gave it an endpoint, and refuses them from the write that took the last one away."""

    def __init__(self, store: Store, *, namespace: str, name: str, port: int) -> None:
        self._store = store
        self.namespace = namespace
        self.name = name
        self.port = port
        self._listener: socket.socket | None = None
        # The port, bound but not listening while the Service has no endpoint: no
        # ephemeral port (an outgoing connection, another server's bind(0)) can take it
        # before the Service first listens, or between two spells of listening.
        self._reserved: socket.socket | None = _reserve(port)
        self._closed = False
        self._serving: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections sent to each endpoint (ip, port): lets tests see the balancing.
        self.dialed: Counter[tuple[str, int]] = Counter()
        # Connections open to each endpoint now: a test can stop a backend once none is
        # (what a preStop pause gives a pod leaving a Service).
        self.open: Counter[tuple[str, int]] = Counter()

    def targets(self) -> list[tuple[str, int]]:
        service = self._store.get("services", self.namespace, self.name)
        if service is None:
            return []
        port_name = (service["spec"].get("ports") or [{}])[0].get("name", "")
        slices = [
            s
            for s in self._store.list("endpointslices", self.namespace)
            if s["metadata"].get("labels", {}).get(SERVICE_NAME) == self.name
        ]
        return usable_endpoints(slices, port_name)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def sync(self) -> None:
        wanted = bool(self.targets())
        if wanted and self._listener is None:
            try:
                self._listener = self._listen()
            except OSError:
                log.exception("fake kube: Service %s cannot listen on %d", self.name, self.port)
                return
            self._serving = asyncio.get_running_loop().create_task(
                self._serve(self._listener), name=f"fake-kube-proxy-{self.name}"
            )
        elif not wanted and self._listener is not None:
            self._stop()

    def _listen(self) -> socket.socket:
        reserved, self._reserved = self._reserved, None
        if reserved is None:
            return _listen(self.port)
        try:
            reserved.listen(128)
            reserved.setblocking(False)
        except OSError:
            reserved.close()
            raise
        return reserved

    def _stop(self) -> None:
        listener, serving = self._listener, self._serving
        self._listener = self._serving = None

        def closed() -> None:
            # Closing a closed socket is a no-op; the port is held again at once.
            if listener is not None:
                listener.close()
            if not self._closed and self._reserved is None and self._listener is None:
                self._reserved = _reserve(self.port)

        if serving is not None:
            serving.cancel()
            # The server closes the socket if it got to own it; if the task never ran,
            # this does.
            serving.add_done_callback(lambda _: closed())
        else:
            closed()

    async def _serve(self, listener: socket.socket) -> None:
        """Accept on the listener until cancelled; open connections outlive it, as
        conntrack keeps established flows when a rule goes."""
        server = await asyncio.start_server(self._accept, sock=listener, start_serving=False)
        try:
            await server.start_serving()
            await asyncio.Future()
        finally:
            server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._connections.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        targets = self.targets()
        if not targets:
            _reset(writer)
            return
        host, port = random.choice(targets)
        self.dialed[(host, port)] += 1
        self.open[(host, port)] += 1
        try:
            await self._relay(reader, writer, host, port)
        finally:
            self.open[(host, port)] -= 1

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            _reset(writer)
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(reader, up_writer))
                group.create_task(_pipe(up_reader, writer))
        except* OSError:
            _reset(writer)
            _reset(up_writer)
        finally:
            for side in (writer, up_writer):
                side.close()

    async def aclose(self) -> None:
        self._closed = True
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        serving = self._serving
        self._stop()
        for task in [*self._connections, *([serving] if serving else [])]:
            task.cancel()
        await asyncio.gather(
            *self._connections, *([serving] if serving else []), return_exceptions=True
        )


def _reserve(port: int) -> socket.socket | None:
    """127.0.0.1:port bound, not listening (connections to it are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        log.warning("fake kube: cannot hold port %d for its Service", port)
        return None
    return sock


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError):
            writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a refused or broken path looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class KubeProxy:
    """Every Service added gets a ServiceProxy, resynced by each change of its Service
    or EndpointSlices, synchronously (see ServiceProxy)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.services: dict[tuple[str, str], ServiceProxy] = {}
        store.observe(self._observe)

    def add(self, *, namespace: str, name: str, port: int) -> ServiceProxy:
        proxy = ServiceProxy(self._store, namespace=namespace, name=name, port=port)
        self.services[(namespace, name)] = proxy
        proxy.sync()
        return proxy

    def _observe(self, change: Change) -> None:
        meta = change.obj["metadata"]
        if change.resource == "endpointslices":
            key = (meta.get("namespace", ""), meta.get("labels", {}).get(SERVICE_NAME, ""))
        elif change.resource == "services":
            key = (meta.get("namespace", ""), meta["name"])
        else:
            return
        proxy = self.services.get(key)
        if proxy is not None:
            proxy.sync()

    async def aclose(self) -> None:
        for proxy in self.services.values():
            await proxy.aclose()
