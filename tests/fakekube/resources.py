"""The resources the fake API server serves: kind, API group and version, scope, and the
URL prefix a client uses for each, so handlers and error messages name them as the real
apiserver does (`leases.coordination.k8s.io "x" not found`, `pods "x" not found`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    group: str  # "" for the core group
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        """The group-qualified resource, as Status messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


RESOURCES: dict[str, Resource] = {
    r.plural: r
    for r in (
        Resource("deployments", "Deployment", "apps"),
        Resource("statefulsets", "StatefulSet", "apps"),
        Resource("pods", "Pod", ""),
        Resource("events", "Event", ""),
        Resource("services", "Service", ""),
        Resource("endpoints", "Endpoints", ""),
        Resource("nodes", "Node", "", namespaced=False),
        Resource("endpointslices", "EndpointSlice", "discovery.k8s.io"),
        Resource("leases", "Lease", "coordination.k8s.io"),
    )
}


def resource(plural: str) -> Resource:
    """The resource for a plural name, or its subresource ("deployments/scale")."""
    return RESOURCES[plural.split("/")[0]]
