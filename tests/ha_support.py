"""Helpers for the HA tests: replicas as API clients of their own on the fake API server,
a recorder of who led when, and the invariants every election test checks."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from activator.backends.kube.cluster import KubeCluster
from activator.config.ha import HaSettings
from activator.config.settings import KubernetesSettings
from activator.ha.election import LeaderElector, Leadership
from tests.fakekube.server import FakeKube

NS = "activator"
LEASE = "activator-leader"


async def connect(kube: FakeKube, client: str) -> KubeCluster:
    """A KubeCluster with its own identity on the fake (so it can be partitioned)."""
    return await KubeCluster.connect(
        KubernetesSettings(
            kubeconfig=kube.kubeconfig_for(client), in_cluster=False, request_timeout=5.0
        )
    )


@dataclass
class Recorder:
    """Every change of every elector's is_leader, with time.monotonic() (the fake's
    lease history uses the same clock)."""

    flips: list[tuple[float, str, bool, float | None]] = field(default_factory=list)
    _state: dict[str, bool] = field(default_factory=dict)

    def watch(self, elector: LeaderElector) -> None:
        def changed(event: Leadership) -> None:
            if self._state.get(event.identity, False) != event.is_leader:
                self._state[event.identity] = event.is_leader
                self.flips.append(
                    (time.monotonic(), event.identity, event.is_leader, elector.renewed_at)
                )

        elector.subscribe(changed)

    def intervals(self) -> list[tuple[float, float, str]]:
        """(start, end, identity) of every term; an open term ends at +inf."""
        open_terms: dict[str, float] = {}
        out: list[tuple[float, float, str]] = []
        for at, who, leading, _ in self.flips:
            if leading:
                open_terms[who] = at
            elif who in open_terms:
                out.append((open_terms.pop(who), at, who))
        out += [(start, float("inf"), who) for who, start in open_terms.items()]
        return sorted(out)

    def step_downs(self, identity: str) -> list[tuple[float, float | None]]:
        """(when is_leader turned False, start of the last renewal before it)."""
        return [
            (at, renewed)
            for at, who, leading, renewed in self.flips
            if who == identity and not leading
        ]


def assert_one_leader_at_a_time(kube: FakeKube, recorder: Recorder) -> None:
    """From the electors' side: no two terms overlap. From the API server's: whoever
    took the Lease from a live holder waited out that holder's lease after its last
    write, and the previous holder had stopped leading before the takeover."""
    terms = recorder.intervals()
    for (_, end, who), (start, _, next_who) in itertools.pairwise(terms):
        assert end <= start, f"{who} still led when {next_who} started leading"
    history = kube.lease_history(LEASE, namespace=NS)
    for takeover in kube.lease_takeovers(LEASE, namespace=NS):
        if not takeover.previous or not takeover.holder or takeover.previous_write is None:
            continue  # a release, or taking a released Lease: nothing to wait out
        record = next(r for r in history if r.at == takeover.previous_write)
        assert record.duration is not None
        assert takeover.at - takeover.previous_write >= record.duration, takeover
        for start, end, who in terms:
            if who == takeover.previous and start <= takeover.at:
                assert end < takeover.at, f"{who} led until after {takeover.holder} took over"


@asynccontextmanager
async def electors(
    kube: FakeKube,
    names: list[str],
    settings: HaSettings,
    recorder: Recorder,
    *,
    extra: Callable[[LeaderElector], None] | None = None,
) -> AsyncIterator[dict[str, LeaderElector]]:
    """Started electors, one API client each; all closed (released) at exit."""
    async with AsyncExitStack() as stack:
        found: dict[str, LeaderElector] = {}
        for name in names:
            cluster = await connect(kube, name)
            stack.push_async_callback(cluster.aclose)
            elector = LeaderElector(cluster, settings=settings, identity=name)
            recorder.watch(elector)
            if extra is not None:
                extra(elector)
            found[name] = elector
            stack.push_async_callback(elector.aclose)
        for elector in found.values():
            elector.start()
        yield found


def leaders(electors: dict[str, LeaderElector]) -> list[str]:
    return [name for name, e in electors.items() if e.is_leader]
