"""Scripted API faults for the fake Kubernetes API server.

A rule matches requests by verb ("get", "list", "watch", "patch", ...), resource
("deployments", "deployments/scale", "pods", "events", "leases") and client (the name a
kubeconfig from FakeKube.kubeconfig_for() identifies); None matches any. Rules with a
count are used up by that many matching requests; forbids last until lifted.

A partition cuts one client off the API until healed, the way a network partition
between one replica and the control plane does, leaving every other client untouched:
"hang" holds its requests unanswered (they are never applied; the connection is reset
when the partition heals) and stalls its open watch streams (events queue and flow
again after the heal, like a TCP stream that survived a short partition); "refuse"
resets its connections at once, open watch streams included.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["status", "hang", "reset", "gone"]
PartitionMode = Literal["hang", "refuse"]


@dataclass
class Rule:
    kind: FaultKind
    verb: str | None
    resource: str | None
    count: int | None  # None = until removed
    status: int = 500
    client: str | None = None

    def matches(self, verb: str, resource: str, client: str) -> bool:
        return (
            (self.verb is None or self.verb == verb)
            and (self.resource is None or self.resource == resource)
            and (self.client is None or self.client == client)
        )


@dataclass
class Partition:
    mode: PartitionMode
    healed: asyncio.Event = field(default_factory=asyncio.Event)


class Faults:
    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._partitions: dict[str, Partition] = {}
        # Set when the fake shuts down or hangs are released: hung requests then end.
        self.release = asyncio.Event()

    def add(self, rule: Rule) -> None:
        self._rules.append(rule)

    def take(self, verb: str, resource: str, client: str = "") -> Rule | None:
        """The first rule matching this request, consuming one use of it."""
        for rule in self._rules:
            if rule.matches(verb, resource, client):
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                return rule
        return None

    def remove(
        self,
        *,
        kind: FaultKind,
        verb: str | None,
        resource: str | None,
        client: str | None = None,
    ) -> None:
        self._rules = [
            r
            for r in self._rules
            if not (
                r.kind == kind and r.verb == verb and r.resource == resource and r.client == client
            )
        ]

    def clear(self) -> None:
        self._rules.clear()

    def pending(self) -> int:
        return len(self._rules)

    # -- partitions ------------------------------------------------------------------

    def partition(self, client: str, mode: PartitionMode) -> None:
        current = self._partitions.get(client)
        if current is not None:
            current.mode = mode
        else:
            self._partitions[client] = Partition(mode)

    def heal(self, client: str) -> None:
        partition = self._partitions.pop(client, None)
        if partition is not None:
            partition.healed.set()

    def partitioned(self, client: str) -> Partition | None:
        return self._partitions.get(client)

    async def until_healed(self, partition: Partition) -> None:
        """Wait for the heal (or the fake's shutdown). Safe to cancel."""
        healed = asyncio.ensure_future(partition.healed.wait())
        released = asyncio.ensure_future(self.release.wait())
        try:
            await asyncio.wait({healed, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            healed.cancel()
            released.cancel()
