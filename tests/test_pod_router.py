"""Routing to a model's pods (activator.placement.routing.PodRouter), fed by the shared
EndpointSlice watch (activator.backends.kube.endpoints) of the fake cluster, whose pods run real
stand-in engines on their own loopback IPs: least in-flight first; unready, terminating
and not-yet-probed pods get no new request; a pod that dies loses only its own requests;
a refused connection is retried on another pod; requests wait in activator, not on a
busy engine, when every pod is at its limit.

Requests are sent by the small `forward` below (acquire, POST, retry on a connection
refused before any byte went out, release): the proxy's part until the router is wired
into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from activator.backends.kube.calls import LastingApiError, RetryPolicy
from activator.backends.kube.cluster import KubeCluster, KubeTuning
from activator.backends.kube.endpoints import EndpointSliceWatch, pod_endpoints
from activator.config.settings import KubernetesSettings
from activator.engine.readiness import wait_ready
from activator.placement.routing import (
    PodEndpoint,
    PodLease,
    PodRouter,
    Probe,
    RouterClosed,
    RouterSettings,
    sent_nothing,
)
from activator.testing.engine_options import STATS, EngineOptions
from activator.testing.fake_engine import build_app
from tests.fakekube.server import FakeKube, PodPlan
from tests.harness import wait_for

FAST = KubeTuning(
    retry=RetryPolicy(attempts=4, initial=0.01, max_wait=0.05, total=10.0),
    watch_backoff_initial=0.01,
    watch_backoff_max=0.05,
)
SERVED = "coder-served"
BODY = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# ----- pure: EndpointSlices -> pods ---------------------------------------------------


def slice_(*endpoints: dict[str, Any], ports: Any = None, kind: str = "IPv4") -> dict[str, Any]:
    return {
        "addressType": kind,
        "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "coder"}},
        "ports": [{"name": "http", "port": 8000}] if ports is None else ports,
        "endpoints": list(endpoints),
    }


def ep(ip: str, pod: str | None = None, **conditions: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod}
    return out


def test_missing_conditions_take_the_apis_defaults_and_targets_name_the_pod() -> None:
    (pod,) = pod_endpoints([slice_(ep("10.0.0.7", "coder-a"))])
    assert pod == PodEndpoint(
        name="coder-a", url="http://10.0.0.7:8000", ready=True, serving=True, terminating=False
    )
    (anonymous,) = pod_endpoints([slice_({"addresses": ["10.0.0.8"]})])
    assert anonymous.name == "http://10.0.0.8:8000" and anonymous.ready


def test_a_placeholder_slice_with_null_lists_has_no_pods() -> None:
    placeholder = slice_()
    placeholder["endpoints"] = None
    placeholder["ports"] = None
    assert pod_endpoints([placeholder]) == ()


def test_an_address_listed_twice_is_merged_and_ready_only_if_both_say_so() -> None:
    a = slice_(ep("10.0.0.7", "coder-a", ready=True))
    b = slice_(ep("10.0.0.7", "coder-a", ready=False, terminating=True))
    (pod,) = pod_endpoints([a, b])
    assert (pod.ready, pod.terminating) == (False, True)


def test_port_by_name_number_or_the_only_one_and_ipv6_in_brackets() -> None:
    two = [{"name": "metrics", "port": 9090}, {"name": "api", "port": 8000}]
    assert pod_endpoints([slice_(ep("10.0.0.7"), ports=two)], port="api")[0].url.endswith(":8000")
    assert pod_endpoints([slice_(ep("10.0.0.7"), ports=two)], port=9090)[0].url.endswith(":9090")
    assert pod_endpoints([slice_(ep("10.0.0.7"), ports=two)]) == ()  # ambiguous, no "http"
    v6 = pod_endpoints([slice_(ep("fd00::7"), kind="IPv6")], scheme="https")
    assert v6[0].url == "https://[fd00::7]:8000"
    assert pod_endpoints([slice_(ep("coder.example"), kind="FQDN")]) == ()


# ----- the fake cluster ----------------------------------------------------------------


@dataclass
class Changes:
    """The router's on_change as an event to wait on."""

    count: int = 0
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self) -> None:
        self.count += 1
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], *, within: float = 60.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                await self._event.wait()


@dataclass
class Setup:
    kube: FakeKube
    watch: EndpointSliceWatch
    session: aiohttp.ClientSession
    router: PodRouter
    changes: Changes
    unsubscribe: Callable[[], None]
    # (pod, clock time the request went out, outcome) for every forwarded request
    sent: list[tuple[str, float, str]] = field(default_factory=list)

    def pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.router.describe() if p["name"] == name)

    def routable(self) -> set[str]:
        return {p["name"] for p in self.router.describe() if p["routable"]}

    async def scale(self, replicas: int) -> None:
        self.kube.scale("coder", replicas)
        await self.changes.until(lambda: len(self.routable()) == replicas)


def probe_with(session: aiohttp.ClientSession) -> Probe:
    """activator's readiness probe of one pod, as for a wake."""

    async def probe(url: str, nudge: asyncio.Event) -> None:
        await wait_ready(
            session,
            url=url,
            health_path="/health",
            served_model_name=SERVED,
            api_key=None,
            nudge=nudge,
        )

    return probe


@contextlib.asynccontextmanager
async def start(
    *,
    engine: tuple[str, ...] = (),
    target: float = 1.0,
    burst: float = 2.0,
    probe: Callable[[aiohttp.ClientSession], Probe] = probe_with,
) -> AsyncIterator[Setup]:
    """The fake cluster with workload "coder" at 0 replicas (engines with `engine`
    flags), activator's EndpointSlice watch, and a router subscribed to it."""
    async with FakeKube() as kube:
        kube.add_workload(
            "coder",
            served_model_name=SERVED,
            plan=PodPlan(engine_args=("--disable-access-log", *engine), termination_grace=5),
        )
        settings = KubernetesSettings(kubeconfig=kube.kubeconfig, request_timeout=5.0)
        cluster = await KubeCluster.connect(settings, tuning=FAST)
        watch = EndpointSliceWatch.for_cluster(cluster)
        session = aiohttp.ClientSession()
        changes = Changes()
        router = PodRouter(
            "coder",
            settings=RouterSettings(target_concurrency=target, burst_factor=burst),
            probe=probe(session),
            on_change=changes,
        )
        try:
            unsubscribe = watch.subscribe("serving", "coder", router.update)
            await watch.synced("serving", timeout=10)
            yield Setup(kube, watch, session, router, changes, unsubscribe)
        finally:
            await router.aclose()
            await watch.aclose()
            await cluster.aclose()
            await session.close()


@pytest.fixture
async def two() -> AsyncIterator[Setup]:
    """Two ready pods, their engines holding each request 0.3 s."""
    async with start(engine=("--response-delay", "0.3")) as setup:
        await setup.scale(2)
        yield setup


async def forward(setup: Setup, *, attempts: int = 3) -> tuple[int, str]:
    """One request through the router, as the proxy will send it."""
    tried: set[str] = set()
    for _ in range(attempts):
        lease = await setup.router.acquire(exclude=tried)
        try:
            sent = time.monotonic()
            async with setup.session.post(lease.url + "/v1/chat/completions", json=BODY) as r:
                await r.read()
                setup.sent.append((lease.pod, sent, str(r.status)))
                return r.status, lease.pod
        except aiohttp.ClientError as exc:
            setup.sent.append((lease.pod, sent, type(exc).__name__))
            if not sent_nothing(exc):
                raise
            lease.connect_failed()
            tried.add(lease.pod)
        finally:
            lease.release()
    raise AssertionError(f"no pod answered in {attempts} attempts")


def by_pod(leases: list[PodLease]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lease in leases:
        counts[lease.pod] = counts.get(lease.pod, 0) + 1
    return counts


# ----- routing ------------------------------------------------------------------------


async def test_each_request_goes_to_the_pod_with_the_fewest_in_flight() -> None:
    async with start(target=4) as setup:
        await setup.scale(3)
        router = setup.router
        leases = [router.try_acquire() for _ in range(6)]
        assert all(leases)
        held = [lease for lease in leases if lease is not None]
        assert sorted(by_pod(held).values()) == [2, 2, 2]
        emptied = held[0].pod
        for lease in [x for x in held if x.pod == emptied]:
            lease.release()
        nxt = [router.try_acquire(), router.try_acquire()]
        assert [lease.pod for lease in nxt if lease is not None] == [emptied, emptied]
        assert router.deletion_costs() == {p: 2 for p in router.deletion_costs()}


async def test_requests_are_answered_by_every_pod_through_real_connections(two: Setup) -> None:
    results = await asyncio.gather(*(forward(two) for _ in range(8)))
    assert [status for status, _ in results] == [200] * 8
    assert {pod for _, pod in results} == two.routable() and len(two.routable()) == 2


async def test_a_pod_that_turns_unready_gets_no_new_request_and_keeps_its_own(two: Setup) -> None:
    router = two.router
    first = router.try_acquire()
    assert first is not None
    two.kube.set_pod_ready(first.pod, False)
    await two.changes.until(lambda: not two.pod(first.pod)["ready"])
    leases = [await router.acquire() for _ in range(2)]
    assert all(lease.pod != first.pod for lease in leases)
    assert router.try_acquire() is None  # the other pod is at its limit of 2: wait
    assert two.pod(first.pod)["in_flight"] == 1 and first.cut_reason is None
    two.kube.set_pod_ready(first.pod, True)
    await two.changes.until(lambda: two.pod(first.pod)["routable"])
    again = router.try_acquire()
    assert again is not None and again.pod == first.pod


async def test_a_terminating_pod_gets_no_new_request_and_its_requests_end_with_it(
    two: Setup,
) -> None:
    router = two.router
    on_victim = router.try_acquire()
    on_survivor = router.try_acquire()
    assert on_victim is not None and on_survivor is not None
    cut: list[str] = []
    on_victim.on_cut(lambda: cut.append("victim"))
    on_survivor.on_cut(lambda: cut.append("survivor"))
    two.kube.delete_pod(on_victim.pod)
    await two.changes.until(lambda: two.pod(on_victim.pod)["terminating"])
    lease = router.try_acquire()
    assert lease is not None and lease.pod == on_survivor.pod
    assert router.try_acquire() is None  # the survivor is full; the terminating pod is out
    # The pod goes (its engine exited); its replacement comes up.
    await two.changes.until(
        lambda: on_victim.pod not in {p["name"] for p in router.describe()} and router.routable == 2
    )
    assert cut == ["victim"] and on_victim.cut_reason == f"pod {on_victim.pod} is gone"
    assert on_survivor.cut_reason is None
    on_victim.release()  # a no-op on a pod that is gone
    assert router.in_flight == 2


async def test_a_new_pod_takes_traffic_only_once_ready_and_past_activators_probe() -> None:
    gate = asyncio.Event()

    def gated(session: aiohttp.ClientSession) -> Probe:
        real = probe_with(session)
        first = True

        async def probe(url: str, nudge: asyncio.Event) -> None:
            nonlocal first
            if not first:  # the first pod passes at once; later ones wait for the gate
                await gate.wait()
            first = False
            await real(url, nudge)

        return probe

    async with start(probe=gated, target=4) as setup:
        await setup.scale(1)
        (old,) = setup.routable()
        setup.kube.scale("coder", 2)
        (new,) = set(setup.kube.workload("coder").pods) - {old}
        # Its readiness probe (the kubelet's) fails at first: the engine runs, the pod
        # is not Ready; activator's own probe is held back by the gate.
        setup.kube.set_pod_ready(new, False)
        await setup.changes.until(lambda: new in {p["name"] for p in setup.router.describe()})
        await wait_for(
            lambda: setup.kube.workload("coder").pods[new].engine_ready, what="engine up"
        )
        assert not setup.pod(new)["probed"]
        assert {lease.pod for lease in take(setup.router, 4)} == {old}
        gate.set()
        await setup.changes.until(lambda: setup.pod(new)["probed"])
        assert not setup.pod(new)["ready"]  # passed activator's probe, not the kubelet's
        assert {lease.pod for lease in take(setup.router, 2)} == {old}
        setup.kube.set_pod_ready(new, True)
        await setup.changes.until(lambda: setup.pod(new)["routable"])
        (lease,) = take(setup.router, 1)
        assert lease.pod == new  # the fewest in flight: it takes the next request


def take(router: PodRouter, count: int) -> list[PodLease]:
    leases = [router.try_acquire() for _ in range(count)]
    assert all(leases), "a pod had no room"
    return [lease for lease in leases if lease is not None]


async def test_a_pod_killed_mid_load_loses_only_its_own_in_flight_requests() -> None:
    async with start(engine=("--response-delay", "10")) as setup:
        await setup.scale(2)
        victim, survivor = sorted(setup.routable())
        tasks = [asyncio.create_task(forward(setup)) for _ in range(4)]
        urls = setup.kube.pod_urls("coder")

        async def two_running(pod: str) -> bool:
            async with setup.session.get(urls[pod] + "/metrics") as r:
                text = await r.text()
            line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running"))
            return float(line.rsplit(" ", 1)[1]) == 2.0

        # Every request reached its engine before the kill (the engines count them).
        for pod in (victim, survivor):
            await wait_for(lambda pod=pod: two_running(pod), what=f"2 requests on {pod}")
        setup.kube.kill_engine("coder", pod=victim)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        lost = [r for r in results if isinstance(r, BaseException)]
        answered = [r for r in results if not isinstance(r, BaseException)]
        assert len(lost) == 2 and all(isinstance(e, aiohttp.ClientError) for e in lost)
        assert answered == [(200, survivor), (200, survivor)]
        assert [outcome for pod, _, outcome in setup.sent if pod == survivor] == ["200", "200"]
        await setup.changes.until(lambda: not setup.pod(victim)["routable"])
        assert [lease.pod for lease in take(setup.router, 2)] == [survivor, survivor]


async def test_a_connection_refused_before_any_byte_is_retried_on_another_pod(
    two: Setup,
) -> None:
    # The watch lags: the router still sees both pods Ready after one engine died.
    two.unsubscribe()
    victim = sorted(two.routable())[0]
    two.kube.kill_engine("coder", pod=victim)
    await two.kube.wait_until(
        lambda: (
            not any(
                c["type"] == "Ready" and c["status"] == "True"
                for p in two.kube.pods("coder")
                if p["metadata"]["name"] == victim
                for c in p["status"]["conditions"]
            )
        )
    )
    results = [await forward(two) for _ in range(4)]
    assert all(status == 200 and pod != victim for status, pod in results)
    refused = [s for s in two.sent if s[0] == victim]
    assert len(refused) == 1 and refused[0][2] == "ClientConnectorError"
    assert not two.pod(victim)["probed"]  # out of rotation until it passes its probe


async def test_a_pod_briefly_in_no_slice_keeps_its_requests_and_is_cut_only_once_gone() -> None:
    """The EndpointSlice controller moves an endpoint between slices in two writes: in
    between, the pod is in neither. It takes no new request then, and keeps its own."""
    engines = [TestServer(build_app(EngineOptions(port=0, served_model_name=SERVED)))]
    engines.append(TestServer(build_app(EngineOptions(port=0, served_model_name=SERVED))))
    for engine in engines:
        await engine.start_server()
    changes = Changes()
    try:
        async with aiohttp.ClientSession() as session:
            router = PodRouter(
                "coder",
                settings=RouterSettings(target_concurrency=4, gone_grace=0.2),
                probe=probe_with(session),
                on_change=changes,
            )
            a, b = (
                PodEndpoint(name=name, url=str(e.make_url("")).rstrip("/"))
                for name, e in zip(("a", "b"), engines, strict=True)
            )
            router.update([a, b])
            await changes.until(lambda: router.routable == 2)
            on_a = next(lease for lease in take(router, 2) if lease.pod == "a")
            router.update([b])  # a left its slice...
            assert {lease.pod for lease in take(router, 3)} == {"b"}
            router.update([a, b])  # ...and is in the other one now
            assert on_a.cut_reason is None and router.routable == 2
            router.update([b])  # gone for good
            await changes.until(lambda: on_a.cut_reason is not None)
            assert on_a.cut_reason == "pod a is gone"
            assert [p["name"] for p in router.describe()] == ["b"]
            await router.aclose()
    finally:
        for engine in engines:
            await engine.close()


# ----- holding when every pod is full ---------------------------------------------------


async def test_requests_wait_in_activator_when_every_pod_is_at_its_limit(two: Setup) -> None:
    router = two.router
    assert router.limit == 2
    full = [router.try_acquire() for _ in range(4)]
    assert all(full) and router.saturated and router.try_acquire() is None
    waiter = asyncio.create_task(router.acquire())
    second = asyncio.create_task(router.acquire())
    await two.changes.until(lambda: router.waiting == 2)
    # A new pod takes the queue as soon as it passes its probe.
    two.kube.scale("coder", 3)
    first_lease, second_lease = await asyncio.gather(waiter, second)
    new = (set(two.routable()) - {lease.pod for lease in full if lease is not None}).pop()
    assert first_lease.pod == second_lease.pod == new
    assert router.saturated
    # A release hands its room to the next waiter.
    third = asyncio.create_task(router.acquire())
    await two.changes.until(lambda: router.waiting == 1)
    freed = full[0]
    assert freed is not None
    freed.release()
    assert (await third).pod == freed.pod


async def test_a_cancelled_waiter_leaves_the_queue_and_close_fails_the_rest(two: Setup) -> None:
    router = two.router
    for _ in range(4):
        router.try_acquire()
    cancelled = asyncio.create_task(router.acquire())
    left = asyncio.create_task(router.acquire())
    await two.changes.until(lambda: router.waiting == 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert router.waiting == 1
    await router.aclose()
    with pytest.raises(RouterClosed):
        await left


# ----- the watch and the engine ---------------------------------------------------------


async def test_the_watch_follows_scaling_through_dropped_watches() -> None:
    async with start() as setup:
        seen: list[tuple[PodEndpoint, ...]] = []
        other: list[tuple[PodEndpoint, ...]] = []
        setup.watch.subscribe("serving", "coder", seen.append)
        setup.watch.subscribe("serving", "no-such-service", other.append)
        await setup.scale(1)
        setup.kube.drop_watches(abrupt=True)
        await setup.scale(2)
        assert len(seen[-1]) == 2 and all(p.ready for p in seen[-1])
        assert setup.watch.endpoints("serving", "coder") == seen[-1]
        setup.kube.scale("coder", 0)
        await setup.changes.until(lambda: not setup.router.describe())
        assert seen[-1] == ()  # the placeholder slice: endpoints null
        assert other == [()]  # told at once on subscribing: no such Service, no pods


async def test_a_role_without_endpointslices_fails_the_sync_naming_rbac() -> None:
    async with FakeKube() as kube:
        kube.forbid("list", "endpointslices")
        settings = KubernetesSettings(kubeconfig=kube.kubeconfig, request_timeout=5.0)
        cluster = await KubeCluster.connect(settings, tuning=FAST)
        watch = EndpointSliceWatch.for_cluster(cluster)
        try:
            # At once, with the API group the Role needs: a 403 is a lasting error, so
            # the wait does not run to its bound (which would raise a plain
            # BackendError saying the API did not answer in time).
            with pytest.raises(LastingApiError, match="RBAC: cannot list endpointslices") as e:
                await watch.synced("serving", timeout=60)
            assert "API group 'discovery.k8s.io'" in str(e.value)
        finally:
            await watch.aclose()
            await cluster.aclose()


async def test_the_stand_in_engine_with_max_concurrency_one_runs_one_request_at_a_time() -> None:
    app = build_app(
        EngineOptions(port=0, response_delay=600, max_concurrency=1, served_model_name=SERVED)
    )
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/v1/chat/completions"))
            posts = [asyncio.create_task(session.post(url, json=BODY)) for _ in range(3)]
            # All three are inside the engine's generation, one of them running.
            await wait_for(lambda: len(app[STATS].tasks) == 3, what="3 requests in")
            async with session.get(str(server.make_url("/metrics"))) as r:
                text = await r.text()
            assert 'vllm:num_requests_running{engine="0",model_name="coder-served"} 1.0' in text
            for post in posts:
                post.cancel()
            await asyncio.gather(*posts, return_exceptions=True)
    finally:
        await server.close()
