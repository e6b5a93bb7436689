"""The pods behind a Service, from its EndpointSlices (discovery.k8s.io/v1), watched once
per namespace and shared by every model in it.

Slices of a Service carry the label kubernetes.io/service-name=<service>; a Service's
endpoints may be spread over several slices, and during a move between slices one
address may be listed twice (consumers must merge, as kube-proxy does). Conditions
follow the API's rules: a missing `ready` or `serving` means true, a missing
`terminating` false. A Service with no endpoints has a placeholder slice whose
`endpoints` and `ports` are null (Kubernetes before 1.36): an empty list here.

`EndpointSliceWatch` is one per app, the KubeCluster's `endpoints`: it owns one informer
per namespace (activator.backends.kube.informer: list + watch, resumed, relisted on 410) and
tells each subscriber its Service's pods whenever they change, on the event loop. While
the API is unreachable the last known pods stay (the router's own probes and connect
errors cover a pod that went meanwhile).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from activator.backends.kube.calls import Obj
from activator.backends.kube.informer import Informer
from activator.core.errors import BackendError
from activator.placement.routing import PodEndpoint

log = logging.getLogger(__name__)

RESOURCE = "endpointslices"
SERVICE_NAME = "kubernetes.io/service-name"

Port = str | int | None
OnChange = Callable[[tuple[PodEndpoint, ...]], None]


class InformerSource(Protocol):
    """What a watch needs of the cluster: informers built with its tuning. The
    KubeCluster is one; it holds the app's watch, so this module cannot import it."""

    def new_informer(self, resource: str, namespace: str) -> Informer: ...


def _port_of(piece: Obj, port: Port) -> int | None:
    """The slice's port number for the wanted port: by name, by number, or (None) the
    slice's only port, else the one named "http"."""
    ports = [p for p in piece.get("ports") or [] if isinstance(p, dict) and p.get("port")]
    if isinstance(port, int):
        return port if any(p["port"] == port for p in ports) else None
    if isinstance(port, str):
        return next((int(p["port"]) for p in ports if p.get("name") == port), None)
    if len(ports) == 1:
        return int(ports[0]["port"])
    return next((int(p["port"]) for p in ports if p.get("name") == "http"), None)


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def pod_endpoints(
    slices: Iterable[Obj], *, port: Port = None, scheme: str = "http"
) -> tuple[PodEndpoint, ...]:
    """A Service's pods from its slices, merged by address, sorted by name.

    An address listed twice (a move between slices) is terminating if either copy says
    so and ready only if both do: no new request on the word of one stale copy."""
    merged: dict[str, PodEndpoint] = {}
    for piece in slices:
        if piece.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue  # FQDN slices name no pod
        number = _port_of(piece, port)
        if number is None:
            continue
        for endpoint in piece.get("endpoints") or []:
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            conditions = endpoint.get("conditions") or {}
            url = f"{scheme}://{_host(str(addresses[0]))}:{number}"
            target = endpoint.get("targetRef") or {}
            found = PodEndpoint(
                name=str(target.get("name") or url),
                url=url,
                ready=conditions.get("ready") is not False,
                serving=conditions.get("serving") is not False,
                terminating=conditions.get("terminating") is True,
            )
            other = merged.get(url)
            if other is not None:
                found = PodEndpoint(
                    name=found.name,
                    url=url,
                    ready=found.ready and other.ready,
                    serving=found.serving and other.serving,
                    terminating=found.terminating or other.terminating,
                )
            merged[url] = found
    return tuple(sorted(merged.values(), key=lambda e: (e.name, e.url)))


@dataclass(eq=False)
class _Subscription:
    service: str
    port: Port
    scheme: str
    on_change: OnChange
    last: tuple[PodEndpoint, ...] | None = None


@dataclass(eq=False)
class _Namespace:
    informer: Informer
    unsubscribe: Callable[[], None]
    # service -> slice name -> slice
    slices: dict[str, dict[str, Obj]] = field(default_factory=dict)
    subscriptions: list[_Subscription] = field(default_factory=list)
    # Services changed since the last flush: events of one loop step (a relist hands
    # every slice over at once) reach subscribers as one change.
    dirty: set[str] = field(default_factory=set)
    flush: asyncio.Handle | None = None


class EndpointSliceWatch:
    """Shared EndpointSlice watches: one informer per namespace, any number of Services."""

    def __init__(self, make_informer: Callable[[str], Informer]) -> None:
        """`make_informer(namespace)` builds an informer (not started); this object
        starts and owns it. `for_cluster` builds the usual one."""
        self._make_informer = make_informer
        self._namespaces: dict[str, _Namespace] = {}
        self._closed = False

    @classmethod
    def for_cluster(cls, cluster: InformerSource) -> EndpointSliceWatch:
        """A watch of its own on `cluster` (the app's is `cluster.endpoints`)."""
        return cls(lambda namespace: cluster.new_informer(RESOURCE, namespace))

    def subscribe(
        self,
        namespace: str,
        service: str,
        on_change: OnChange,
        *,
        port: Port = None,
        scheme: str = "http",
    ) -> Callable[[], None]:
        """Call `on_change(pods)` with the Service's pods now (if the namespace is
        listed already) and whenever they change; returns the unsubscribe function.
        `on_change` runs on the event loop and must not block."""
        if self._closed:
            raise BackendError("Kubernetes: endpoint watch is closed")
        ns = self._namespace(namespace)
        sub = _Subscription(service=service, port=port, scheme=scheme, on_change=on_change)
        ns.subscriptions.append(sub)
        if ns.informer.synced.is_set():
            self._tell(ns, sub)

        def unsubscribe() -> None:
            if sub in ns.subscriptions:
                ns.subscriptions.remove(sub)

        return unsubscribe

    def endpoints(
        self, namespace: str, service: str, *, port: Port = None, scheme: str = "http"
    ) -> tuple[PodEndpoint, ...]:
        """The Service's pods as last seen (empty before the first list)."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return ()
        return pod_endpoints(ns.slices.get(service, {}).values(), port=port, scheme=scheme)

    async def synced(self, namespace: str, *, timeout: float) -> None:  # noqa: ASYNC109
        """Until the namespace's slices are listed once. Lasting API errors (RBAC: the
        Role lacks list/watch on endpointslices in discovery.k8s.io) raise at once;
        BackendError after `timeout`."""
        informer = self._namespace(namespace).informer
        try:
            async with asyncio.timeout(timeout):
                await informer.wait_synced()
        except TimeoutError:
            raise BackendError(
                f"Kubernetes: cannot list endpointslices in namespace {namespace}: "
                f"{informer.last_error or 'the API did not answer'}"
            ) from None

    async def aclose(self) -> None:
        self._closed = True
        namespaces, self._namespaces = list(self._namespaces.values()), {}
        for ns in namespaces:
            if ns.flush is not None:
                ns.flush.cancel()
            ns.unsubscribe()
            ns.subscriptions.clear()
            await ns.informer.aclose()

    # ----- informer callbacks --------------------------------------------------------

    def _namespace(self, namespace: str) -> _Namespace:
        ns = self._namespaces.get(namespace)
        if ns is None:
            informer = self._make_informer(namespace)
            ns = _Namespace(informer=informer, unsubscribe=lambda: None)
            ns.unsubscribe = informer.subscribe(_Subscriber(self, ns))
            self._namespaces[namespace] = ns
            informer.start()
        return ns

    def _event(self, ns: _Namespace, event_type: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME)
        name = meta.get("name")
        if not service or not name:
            return
        pieces = ns.slices.setdefault(service, {})
        if event_type == "DELETED":
            pieces.pop(name, None)
            if not pieces:
                del ns.slices[service]
        else:
            pieces[name] = obj
        ns.dirty.add(service)
        if ns.flush is None:
            ns.flush = asyncio.get_running_loop().call_soon(self._flush, ns)

    def _flush(self, ns: _Namespace) -> None:
        ns.flush = None
        dirty, ns.dirty = ns.dirty, set()
        for sub in list(ns.subscriptions):
            if sub.service in dirty:
                self._tell(ns, sub)

    def _reachable(self, ns: _Namespace, reachable: bool) -> None:
        log.log(
            logging.INFO if reachable else logging.WARNING,
            "kubernetes: endpointslices in %s: %s",
            ns.informer.namespace,
            "watched again" if reachable else "API unreachable, routing on the last known pods",
        )
        if reachable:
            # A relist may have changed nothing per event but the first sync: catch up.
            for sub in list(ns.subscriptions):
                self._tell(ns, sub)

    def _tell(self, ns: _Namespace, sub: _Subscription) -> None:
        pods = pod_endpoints(
            ns.slices.get(sub.service, {}).values(), port=sub.port, scheme=sub.scheme
        )
        if pods == sub.last:
            return
        sub.last = pods
        try:
            sub.on_change(pods)
        except Exception:  # one broken subscriber must not stop the others
            log.exception("kubernetes: endpoints subscriber of %s failed", sub.service)


class _Subscriber:
    """The informer's view of one namespace of the watch."""

    def __init__(self, watch: EndpointSliceWatch, ns: _Namespace) -> None:
        self._watch = watch
        self._ns = ns

    def informer_event(self, resource: str, event_type: str, obj: Obj) -> None:
        self._watch._event(self._ns, event_type, obj)

    def informer_reachable(self, resource: str, reachable: bool) -> None:
        self._watch._reachable(self._ns, reachable)
