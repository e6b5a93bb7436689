"""The EndpointSlice, Endpoints and EndpointSlice-mirroring controllers.

For each Service with a selector the controller keeps EndpointSlices labelled
kubernetes.io/service-name=<service> (managed-by endpointslice-controller.k8s.io, owned by
the Service, one slice per distinct port set) and a legacy v1 Endpoints object of the
same name, as kube-controller-manager does (k8s.io/endpointslice podToEndpoint and
ShouldPodBeInEndpoints):

- a pod is listed once it has an IP, until it reaches a terminal phase; terminating pods
  stay in EndpointSlices (not in Endpoints);
- ready = pod Ready and not terminating (or the Service's publishNotReadyAddresses);
  serving = pod Ready, even while terminating; terminating = deletionTimestamp set;
- addresses [podIP], targetRef to the pod, nodeName, zone; ports resolved against the
  pod's containerPorts (a named targetPort looks the name up).
- a Service with no endpoints keeps one placeholder slice whose `endpoints` and `ports`
  are served as null, as Kubernetes before 1.36 serves them (kubernetes#135968): clients
  must accept a null list there.

Updates lag the pod changes by `delay` seconds (the controller's batching plus
kube-proxy's sync in a real cluster), so a test can see a pod Ready but not yet routable.

Services without a selector are the user's: FakeKube.set_endpoints() writes their v1
Endpoints, and the mirroring controller copies them into slices (managed-by
endpointslicemirroring-controller.k8s.io, owned by the Endpoints, conditions.ready only).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import string
from dataclasses import dataclass
from typing import Any

from tests.fakekube.replicaset import is_ready
from tests.fakekube.store import Change, Obj, Store, now_iso

log = logging.getLogger(__name__)

SERVICE_NAME = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER = "endpointslice-controller.k8s.io"
MIRRORING = "endpointslicemirroring-controller.k8s.io"
SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True)
class Address:
    """One endpoint a test sets for a Service without selector (FakeKube.set_endpoints):
    e.g. an activator replica at 127.0.0.1:<its port>. `pod` names it in targetRef."""

    ip: str
    port: int
    ready: bool = True
    pod: str | None = None


def _suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(5))


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_port(pod: Obj, target: Any) -> int | None:
    if isinstance(target, int):
        return target
    for container in pod["spec"].get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class EndpointsController:
    def __init__(self, store: Store, *, delay: float, zone: str | None) -> None:
        self._store = store
        self._delay = delay
        self._zone = zone
        self._pending: dict[tuple[str, str], asyncio.TimerHandle] = {}
        store.observe(self._observe)

    # -- triggers ------------------------------------------------------------------------

    def _observe(self, change: Change) -> None:
        meta = change.obj["metadata"]
        ns = meta.get("namespace", "")
        if change.resource == "services":
            self._schedule(ns, meta["name"])
        elif change.resource == "pods":
            labels = meta.get("labels", {})
            for service in self._store.list("services", ns):
                selector = service["spec"].get("selector")
                if selector and _matches(selector, labels):
                    self._schedule(ns, service["metadata"]["name"])

    def _schedule(self, namespace: str, service: str) -> None:
        """Sync the Service after the delay; changes meanwhile join that sync (batching).
        With no delay, at once: the endpoint changes with the pod, in the same step."""
        key = (namespace, service)
        if self._delay <= 0:
            self._fire(key)
            return
        if key in self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending[key] = loop.call_later(self._delay, self._fire, key)

    def _fire(self, key: tuple[str, str]) -> None:
        self._pending.pop(key, None)
        try:
            self.sync(*key)
        except Exception:
            log.exception("fake kube: endpoints sync of %s/%s failed", *key)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()

    # -- the controllers -----------------------------------------------------------------

    def sync(self, namespace: str, name: str) -> None:
        service = self._store.get("services", namespace, name)
        if service is None:
            # Garbage collection of what the Service owned.
            for piece in self._slices(namespace, name, CONTROLLER):
                self._store.delete("endpointslices", namespace, piece["metadata"]["name"])
            endpoints = self._store.get("endpoints", namespace, name)
            if endpoints is not None and SKIP_MIRROR in endpoints["metadata"].get("labels", {}):
                self._store.delete("endpoints", namespace, name)
            return
        selector = service["spec"].get("selector")
        if not selector:
            return  # the user's: see set_endpoints
        pods = [
            p
            for p in self._store.list("pods", namespace)
            if _matches(selector, p["metadata"].get("labels", {}))
            and p["status"].get("podIP")
            and p["status"].get("phase") not in ("Succeeded", "Failed")
        ]
        pods.sort(key=lambda p: p["metadata"]["name"])
        groups: dict[tuple[tuple[str, int], ...], list[Obj]] = {}
        for pod in pods:
            ports = tuple(
                (port.get("name", ""), number)
                for port in service["spec"].get("ports", [])
                if (number := _container_port(pod, port.get("targetPort", port["port"])))
                is not None
            )
            groups.setdefault(ports, []).append(pod)
        publish = bool(service["spec"].get("publishNotReadyAddresses"))
        desired = [
            (
                [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
                [self._endpoint(pod, publish=publish) for pod in members],
            )
            for ports, members in sorted(groups.items())
        ]
        self._reconcile_slices(service, desired, managed_by=CONTROLLER, owner=_owner(service))
        self._write_endpoints(service, groups, publish=publish)

    def _endpoint(self, pod: Obj, *, publish: bool) -> Obj:
        meta = pod["metadata"]
        serving = is_ready(pod)
        terminating = "deletionTimestamp" in meta
        endpoint: Obj = {
            "addresses": [pod["status"]["podIP"]],
            "conditions": {
                "ready": publish or (serving and not terminating),
                "serving": serving,
                "terminating": terminating,
            },
            "targetRef": {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if pod["spec"].get("nodeName"):
            endpoint["nodeName"] = pod["spec"]["nodeName"]
            if self._zone:
                endpoint["zone"] = self._zone
        return endpoint

    def _slices(self, namespace: str, service: str, managed_by: str) -> list[Obj]:
        return [
            s
            for s in self._store.list("endpointslices", namespace)
            if s["metadata"].get("labels", {}).get(SERVICE_NAME) == service
            and s["metadata"]["labels"].get(MANAGED_BY) == managed_by
        ]

    def _reconcile_slices(
        self,
        parent: Obj,
        desired: list[tuple[list[Obj], list[Obj]]],
        *,
        managed_by: str,
        owner: Obj,
    ) -> None:
        """Make the parent's slices hold `desired` (ports, endpoints) groups, reusing
        slices with the same ports, then any other, and keeping a placeholder when there
        is nothing to list."""
        meta = parent["metadata"]
        ns, name = meta["namespace"], meta["name"]
        existing = self._slices(ns, name, managed_by)
        if not desired:
            desired = [([], [])]  # the placeholder: endpoints and ports null
        labels = {
            **{k: v for k, v in meta.get("labels", {}).items() if k != SKIP_MIRROR},
            SERVICE_NAME: name,
            MANAGED_BY: managed_by,
        }
        unmatched = list(existing)
        plan: list[tuple[Obj | None, list[Obj], list[Obj]]] = []
        for ports, endpoints in desired:
            same = next((s for s in unmatched if (s.get("ports") or []) == ports), None)
            if same is not None:
                unmatched.remove(same)
            plan.append((same, ports, endpoints))
        for i, (slot, ports, endpoints) in enumerate(plan):
            if slot is None and unmatched:
                plan[i] = (unmatched.pop(0), ports, endpoints)
        for slot, ports, endpoints in plan:
            body = {"endpoints": endpoints or None, "ports": ports or None}
            if slot is None:
                self._store.create(
                    "endpointslices",
                    {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": f"{name}-{_suffix()}",
                            "generateName": f"{name}-",
                            "namespace": ns,
                            "generation": 1,
                            "labels": labels,
                            "annotations": {TRIGGER_TIME: now_iso()},
                            "ownerReferences": [owner],
                        },
                        "addressType": "IPv4",
                        **body,
                    },
                )
            elif {k: slot.get(k) for k in body} != body or slot["metadata"]["labels"] != labels:

                def update(stored: Obj, body: Obj = body) -> None:
                    stored.update(copy.deepcopy(body))
                    stored["metadata"]["labels"] = dict(labels)
                    stored["metadata"]["generation"] = stored["metadata"].get("generation", 1) + 1
                    stored["metadata"].setdefault("annotations", {})[TRIGGER_TIME] = now_iso()

                self._store.update("endpointslices", ns, slot["metadata"]["name"], update)
        for leftover in unmatched:
            self._store.delete("endpointslices", ns, leftover["metadata"]["name"])

    def _write_endpoints(
        self,
        service: Obj,
        groups: dict[tuple[tuple[str, int], ...], list[Obj]],
        *,
        publish: bool,
    ) -> None:
        """The legacy v1 Endpoints: terminating pods left out, not-ready ones apart."""
        meta = service["metadata"]
        subsets = []
        for ports, members in sorted(groups.items()):
            ready: list[Obj] = []
            not_ready: list[Obj] = []
            for pod in members:
                if "deletionTimestamp" in pod["metadata"] and not publish:
                    continue
                address = {
                    "ip": pod["status"]["podIP"],
                    "nodeName": pod["spec"].get("nodeName"),
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": pod["metadata"]["namespace"],
                        "name": pod["metadata"]["name"],
                        "uid": pod["metadata"]["uid"],
                    },
                }
                (ready if publish or is_ready(pod) else not_ready).append(address)
            subset: Obj = {"ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]}
            if ready:
                subset["addresses"] = ready
            if not_ready:
                subset["notReadyAddresses"] = not_ready
            if ready or not_ready:
                subsets.append(subset)
        labels = {**meta.get("labels", {}), SKIP_MIRROR: "true"}
        self._put_endpoints(meta["namespace"], meta["name"], subsets, labels)

    def _put_endpoints(self, ns: str, name: str, subsets: list[Obj], labels: dict[str, str]) -> Obj:
        existing = self._store.get("endpoints", ns, name)
        content: Obj = {"subsets": subsets} if subsets else {}
        if existing is None:
            return self._store.create(
                "endpoints",
                {
                    "apiVersion": "v1",
                    "kind": "Endpoints",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": labels,
                        "annotations": {TRIGGER_TIME: now_iso()},
                    },
                    **content,
                },
            )
        if existing.get("subsets") == content.get("subsets") and (
            existing["metadata"].get("labels") == labels
        ):
            return existing

        def update(stored: Obj) -> None:
            stored.pop("subsets", None)
            stored.update(copy.deepcopy(content))
            stored["metadata"]["labels"] = dict(labels)
            stored["metadata"].setdefault("annotations", {})[TRIGGER_TIME] = now_iso()

        return self._store.update("endpoints", ns, name, update)

    # -- Services without selector ----------------------------------------------------

    def set_endpoints(self, namespace: str, service: str, addresses: list[Address]) -> None:
        """Write the v1 Endpoints of a Service without selector, as its owner would, and
        mirror them into EndpointSlices. Each distinct port becomes one subset/slice."""
        svc = self._store.get("services", namespace, service)
        if svc is None:
            raise KeyError(f"no Service {namespace}/{service}")
        if svc["spec"].get("selector"):
            raise ValueError(
                f"Service {namespace}/{service} has a selector: its controller owns it"
            )
        port_name = (svc["spec"].get("ports") or [{}])[0].get("name", "")
        by_port: dict[int, list[Address]] = {}
        for address in addresses:
            by_port.setdefault(address.port, []).append(address)
        subsets = []
        for port, members in sorted(by_port.items()):
            subset: Obj = {"ports": [{"name": port_name, "port": port, "protocol": "TCP"}]}
            for key, ready in (("addresses", True), ("notReadyAddresses", False)):
                listed = [_address(a, namespace) for a in members if a.ready is ready]
                if listed:
                    subset[key] = listed
            subsets.append(subset)
        endpoints = self._put_endpoints(
            namespace, service, subsets, dict(svc["metadata"].get("labels", {}))
        )
        desired = [
            (
                subset["ports"],
                [
                    _mirrored(address, ready=key == "addresses")
                    for key in ("addresses", "notReadyAddresses")
                    for address in subset.get(key, [])
                ],
            )
            for subset in subsets
        ]
        self._reconcile_slices(endpoints, desired, managed_by=MIRRORING, owner=_owner(endpoints))


def _owner(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _address(address: Address, namespace: str) -> Obj:
    out: Obj = {"ip": address.ip}
    if address.pod is not None:
        out["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": address.pod}
    return out


def _mirrored(address: Obj, *, ready: bool) -> Obj:
    endpoint: Obj = {"addresses": [address["ip"]], "conditions": {"ready": ready}}
    if "targetRef" in address:
        endpoint["targetRef"] = address["targetRef"]
    return endpoint


def service_object(
    name: str,
    *,
    namespace: str,
    port: int,
    selector: dict[str, str] | None,
    port_name: str = "http",
    target_port: int | str = "http",
) -> Obj:
    """A ClusterIP Service. Every Service of the fake shares the cluster IP 127.0.0.1 and
    differs by port (a real cluster gives each its own IP), so `port` is its address."""
    spec: Obj = {
        "type": "ClusterIP",
        "clusterIP": "127.0.0.1",
        "clusterIPs": ["127.0.0.1"],
        "ports": [{"name": port_name, "port": port, "targetPort": target_port, "protocol": "TCP"}],
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
    }
    if selector:
        spec["selector"] = dict(selector)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
    }
