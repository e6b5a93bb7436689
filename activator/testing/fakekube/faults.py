"""Scripted API faults for the fake Kubernetes API server.

A rule matches requests by verb ("get", "list", "watch", "patch", ...) and resource
("deployments", "deployments/scale", "pods", "events"); None matches any. Rules with a
count are used up by that many matching requests; forbids last until lifted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["status", "hang", "reset", "gone"]


@dataclass
class Rule:
    kind: FaultKind
    verb: str | None
    resource: str | None
    count: int | None  # None = until removed
    status: int = 500

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )


class Faults:
    def __init__(self) -> None:
        self._rules: list[Rule] = []
        # Set when the fake shuts down or hangs are released: hung requests then end.
        self.release = asyncio.Event()

    def add(self, rule: Rule) -> None:
        self._rules.append(rule)

    def take(self, verb: str, resource: str) -> Rule | None:
        """The first rule matching this request, consuming one use of it."""
        for rule in self._rules:
            if rule.matches(verb, resource):
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                return rule
        return None

    def remove(self, *, kind: FaultKind, verb: str | None, resource: str | None) -> None:
        self._rules = [
            r
            for r in self._rules
            if not (r.kind == kind and r.verb == verb and r.resource == resource)
        ]

    def clear(self) -> None:
        self._rules.clear()

    def pending(self) -> int:
        return len(self._rules)
