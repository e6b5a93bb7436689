"""Scaling a model out (replicas.max > 1) end to end: a real activator on loopback, the fake
API server with several pods per Deployment and their EndpointSlices, each pod a real
stand-in engine on its own loopback IP, and real clients.

Which pod answered a request is read from activator's access log (its `pod` key); the
replica counts from the API server's own record of the Deployment (every write to it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests import streams
from tests.conftest import ActivatorFactory
from tests.fakekube.server import FakeKube, PodPlan
from tests.fakekube.store import Change
from tests.harness import Running, wait_for
from tests.streams import Stream

ACCESS = "activator.access"
LONG = 2000  # tokens: 200 s of stream at the engines' 0.1 s a token, for "until cancelled"


@dataclass
class Replicas:
    """The API server's record of each Deployment's spec.replicas, every change in order."""

    kube: FakeKube
    seen: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def observe(change: Change) -> None:
            if change.resource == "deployments" and change.type != "DELETED":
                name = change.obj["metadata"]["name"]
                replicas = int(change.obj.get("spec", {}).get("replicas") or 0)
                history = self.seen.setdefault(name, [0])
                if history[-1] != replicas:
                    history.append(replicas)

        self.kube.store.observe(observe)

    def of(self, name: str) -> list[int]:
        return self.seen.get(name, [0])


def scaled(
    kube: FakeKube,
    name: str,
    *,
    most: int,
    target: float,
    burst: float = 1,
    delay: str = "10m",
    gpu: bool = False,
    running: int = 0,
    **keys: Any,
) -> dict[str, Any]:
    """A Deployment of stand-in engines (a token every 0.1 s when streaming), at `running`
    replicas, and its model's config block, scaled out up to `most` replicas."""
    workload = kube.add_workload(
        name,
        served_model_name=f"{name}-served",
        replicas=running,
        gpu=gpu,
        plan=PodPlan(
            engine_args=("--disable-access-log", "--stream-delay", "0.1"), termination_grace=5
        ),
    )
    return {
        "served_model_name": f"{name}-served",
        "startup_timeout": "60s",
        "replicas": {
            "max": most,
            "target_concurrency": target,
            "burst_factor": burst,
            "scale_down_delay": delay,
        },
        "kubernetes": {
            "namespace": "serving",
            "deployment": name,
            "url": workload.url,
            "service": name,
        },
        **keys,
    }


async def start(
    activator: ActivatorFactory, kube: FakeKube, models: dict[str, Any], **top: Any
) -> Running:
    return await activator(
        {
            "server": {"access_log": "json"},
            "kubernetes": {
                "kubeconfig": kube.kubeconfig,
                "request_timeout": "5s",
                "scheduling_grace": "30s",
            },
            "models": models,
            **top,
        }
    )


def open_stream(
    session: aiohttp.ClientSession, running: Running, model: str, *, tokens: int
) -> Stream:
    return streams.open_stream(session, running.v1 + "/chat/completions", model, tokens=tokens)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def served_by(caplog: pytest.LogCaptureFixture, model: str) -> list[tuple[str | None, int]]:
    """(pod, status) of each request to `model` that ended, in the order they ended."""
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS]
    return [(r["pod"], r["status"]) for r in records if r["model"] == model]


async def pods(running: Running, model: str) -> list[dict[str, Any]]:
    described = await running.admin(model)
    listed: list[dict[str, Any]] = described["replicas"]["pods"]
    return listed


async def routable(running: Running, model: str) -> set[str]:
    return {p["name"] for p in await pods(running, model) if p["routable"]}


async def two_pods(
    kube: FakeKube, activator: ActivatorFactory, session: aiohttp.ClientSession
) -> tuple[Running, list[str]]:
    """`coder` scaled to 2 pods by two concurrent streams (target 1), both routable, by
    name."""
    running = await start(activator, kube, {"coder": scaled(kube, "coder", most=2, target=1)})
    streams = [open_stream(session, running, "coder", tokens=10) for _ in range(2)]
    for stream in streams:
        assert (await stream.finished()).done
    both = await routable(running, "coder")
    assert len(both) == 2
    return running, sorted(both)


@pytest.fixture(autouse=True)
def access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)


# ----- load: up in one step sized to the demand, down after the delay -------------------


@pytest.mark.timeout(180)
async def test_200_streams_scale_the_model_1_to_4_in_one_write_and_back_after_the_delay(
    kube: FakeKube,
    activator: ActivatorFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 streams reach a model at 0 replicas at once: it starts (0 -> 1), and its
    first decision once ready sees them all (32 in flight on its pod, the rest held):
    ceil(200 / 16) = 13 replicas, capped at 4, in one write. Once the streams end it
    goes back to 1 after scale_down_delay (not to 0: that is the idle timeout's)."""
    replicas = Replicas(kube)
    running = await start(
        activator,
        kube,
        {"coder": scaled(kube, "coder", most=4, target=16, burst=2, delay="3s")},
    )
    streams = [open_stream(session, running, "coder", tokens=20) for _ in range(200)]
    done = await asyncio.gather(*(s.finished() for s in streams))
    assert all(s.status == 200 and s.done for s in done)
    assert replicas.of("coder")[:3] == [0, 1, 4]
    assert kube.replicas("coder") == 4  # no replica went while the streams lasted
    answered = served_by(caplog, "coder")
    assert len(answered) == 200 and {status for _, status in answered} == {200}
    assert len({pod for pod, _ in answered}) == 4  # every pod took its share
    assert (
        running.sample(
            "activator_scale_decisions_total", model="coder", direction="up", reason="max"
        )
        == 1
    )
    await kube.wait_until(lambda: kube.replicas("coder") == 1, within=60)
    history = replicas.of("coder")
    down = history[history.index(4) :]
    assert down == sorted(down, reverse=True) and down[-1] == 1


async def test_a_model_adopted_at_3_replicas_keeps_them_for_the_scale_down_delay(
    kube: FakeKube, activator: ActivatorFactory
) -> None:
    """An activator (re)starting beside a scaled-out model adopts it as it is; nothing
    asks for its replicas yet, but whoever decided before wanted them until now: they go
    once demand stayed lower for scale_down_delay, not at the first decision."""
    model = scaled(kube, "coder", most=4, target=1, delay="10m", running=3)
    running = await start(activator, kube, {"coder": model})

    async def decided() -> dict[str, Any] | None:
        decision: dict[str, Any] | None = (await running.admin("coder"))["replicas"][
            "last_decision"
        ]
        return decision

    decision = await wait_for(decided, what="a first decision")
    assert decision == {"desired": 3, "reason": "delay", "demand": 0}
    assert kube.replicas("coder") == 3
    assert running.sample("activator_scale_decisions_total", model="coder") == 0


# ----- pods failing: only their own requests are lost; unready pods get none --------------


async def test_a_pod_that_dies_mid_load_loses_only_its_own_in_flight_requests(
    kube: FakeKube,
    activator: ActivatorFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await start(activator, kube, {"coder": scaled(kube, "coder", most=2, target=1)})
    # Two long streams fill the first pod (1 request per pod at target 1, burst 1)...
    first = open_stream(session, running, "coder", tokens=LONG)
    await first.started()
    (victim,) = await routable(running, "coder")
    # ...the second is held until the second pod is up: demand 2, one write.
    second = open_stream(session, running, "coder", tokens=30)
    await second.started()
    (survivor,) = await routable(running, "coder") - {victim}
    kube.kill_engine("coder", pod=victim)
    lost, kept = await first.finished(), await second.finished()
    assert lost.failed and not lost.done
    assert kept.done
    assert served_by(caplog, "coder") == [(victim, 502), (survivor, 200)]
    # The model keeps serving on the survivor; the dead pod gets nothing new.
    await wait_for(lambda: running.model("coder").scale.router.routable == 1, what="1 pod")  # type: ignore[union-attr]
    for _ in range(3):
        again = await open_stream(session, running, "coder", tokens=2).finished()
        assert again.done
    assert [pod for pod, _ in served_by(caplog, "coder")[2:]] == [survivor] * 3
    assert running.model("coder").state == "ready"


async def test_a_pod_that_turns_unready_gets_no_new_requests(
    kube: FakeKube,
    activator: ActivatorFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, (unready, other) = await two_pods(kube, activator, session)
    kube.set_pod_ready(unready, False)
    await wait_for(lambda: _pod_ready(running, unready, False), what=f"{unready} seen not Ready")
    for _ in range(4):
        assert (await open_stream(session, running, "coder", tokens=2).finished()).done
    assert [pod for pod, _ in served_by(caplog, "coder")[2:]] == [other] * 4
    kube.set_pod_ready(unready, True)
    await wait_for(lambda: _pod_routable(running, unready), what=f"{unready} routable again")
    assert (await open_stream(session, running, "coder", tokens=2).finished()).done
    assert served_by(caplog, "coder")[-1][0] == unready  # the least recently used of two


async def test_a_pod_that_refuses_the_connection_sends_the_request_to_another_pod(
    kube: FakeKube,
    activator: ActivatorFactory,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pod's engine is gone but activator has not heard (its API watch stalls, as in a
    network partition; on a cluster, the moments before the EndpointSlice changes): the
    request that meets the refused connection goes to the other pod, and the dead pod
    takes no more."""
    running, (victim, survivor) = await two_pods(kube, activator, session)
    kube.partition("activator")  # activator's watches stall: it hears of nothing now
    url = kube.pod_urls("coder")[victim]
    kube.kill_engine("coder", pod=victim)
    await wait_for(lambda: _refuses(session, url), what=f"{victim} refusing connections")
    for _ in range(3):
        assert (await open_stream(session, running, "coder", tokens=2).finished()).done
    assert [pod for pod, _ in served_by(caplog, "coder")[2:]] == [survivor] * 3
    retried = running.sample(
        "activator_upstream_retries_total", model="coder", reason="another_pod"
    )
    assert retried == 1
    assert await routable(running, "coder") == {survivor}
    kube.heal("activator")


async def _refuses(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/health"):
            return False
    except aiohttp.ClientConnectorError:
        return True


async def _pod_ready(running: Running, pod: str, ready: bool) -> bool:
    return any(p["name"] == pod and p["ready"] is ready for p in await pods(running, "coder"))


async def _pod_routable(running: Running, pod: str) -> bool:
    return pod in await routable(running, "coder")


async def test_a_scale_down_keeps_the_busy_pod_and_its_request(
    kube: FakeKube, activator: ActivatorFactory, session: aiohttp.ClientSession
) -> None:
    """The ReplicaSet would delete the newest pod; activator's deletion costs (requests
    in flight) make it delete the idle one, and the stream on the busy one goes on."""
    running = await start(
        activator, kube, {"coder": scaled(kube, "coder", most=2, target=1, delay="1s")}
    )
    first = open_stream(session, running, "coder", tokens=LONG)  # until cancelled
    await first.started()
    (older,) = await routable(running, "coder")
    long = open_stream(session, running, "coder", tokens=80)  # held: a second pod comes up
    await long.started()
    (newer,) = await routable(running, "coder") - {older}
    await first.cancel()  # its client goes: the older pod is idle
    await kube.wait_until(lambda: kube.replicas("coder") == 1, within=30)
    await kube.wait_until(lambda: [p["metadata"]["name"] for p in kube.pods("coder")] == [newer])
    assert not long.task.done()  # type: ignore[union-attr]
    assert (await long.finished()).done


# ----- the pool bounds growth, and never swaps a busy model out for it -------------------


@pytest.fixture
async def two_gpus() -> AsyncIterator[FakeKube]:
    async with FakeKube(gpus=2, bookmark_interval=0.2) as fake:
        yield fake


@pytest.mark.timeout(180)
async def test_a_two_gpu_pool_bounds_growth_and_never_swaps_a_busy_model_out(
    two_gpus: FakeKube, activator: ActivatorFactory, session: aiohttp.ClientSession
) -> None:
    kube = two_gpus
    replicas = Replicas(kube)
    models = {
        "coder": scaled(kube, "coder", most=2, target=1, gpu=True, pool="gpu"),
        "chat": scaled(kube, "chat", most=1, target=1, gpu=True, pool="gpu", idle_timeout="1s"),
    }
    running = await start(activator, kube, models, pools={"gpu": {"gpus": 2}})
    chat = open_stream(session, running, "chat", tokens=LONG)  # busy until we close it
    await chat.started()
    coder = [open_stream(session, running, "coder", tokens=LONG) for _ in range(2)]
    await coder[0].started()
    # Demand 2, one GPU left to it: it stays at 1 replica, the busy model keeps its GPU.
    await wait_for(lambda: _decided(running, "pool"), what="coder bounded by its pool")
    assert kube.replicas("coder") == 1 and running.model("chat").state == "ready"
    assert not coder[1].first.is_set()  # held in activator, not queued on the busy pod
    # The other model's traffic ends; it idles out, and its GPU goes to the second pod.
    await chat.cancel()
    await coder[1].started()
    assert kube.replicas("coder") == 2 and running.model("chat").state == "stopped"
    # A request for the stopped model takes a GPU back from the extra replica.
    back = await open_stream(session, running, "chat", tokens=2).finished()
    assert back.done
    assert kube.replicas("coder") == 1
    for stream in coder:
        await stream.cancel()
    assert replicas.of("coder") == [0, 1, 2, 1]
    assert kube.max_gpus_in_use <= 2
    assert running.sample("activator_swaps_total") == 0
    assert running.sample("activator_scale_events_total", model="chat", reason="idle") == 1


async def _decided(running: Running, reason: str) -> bool:
    described = await running.admin("coder")
    decision = described["replicas"]["last_decision"]
    return decision is not None and decision["reason"] == reason
