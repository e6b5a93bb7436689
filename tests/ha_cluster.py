"""Several activators as separate processes (`python -m activator serve`) on the fake API
server, each with its own identity (kubeconfig, POD_NAME): for the HA end-to-end tests.

Timings are short so a failover takes seconds: lease 3 s, renew deadline 2 s, retry
period 0.5 s. The issue's bound on a takeover is lease_duration + 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from activator.ha.intent import ModelIntent, intent_of
from tests.fakekube.server import FakeKube, PodPlan
from tests.fakekube.store import Change
from tests.harness import chat, wait_for
from tests.serve_process import Served, free_port, spawn_serve, until_ready

NS = "activator"
LEASE = "activator-leader"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3, 2, 0.5
ISSUE_BOUND = LEASE_DURATION + 2  # the issue's bound on a takeover
SLACK = 2.0  # a shared, noisy machine: scheduling delays on top of the protocol's own
START_S = 60.0
ASK_S = 60.0  # bounds a replica's start (imports and a first API round on 2 busy cores)


def kube_model(
    kube: FakeKube, name: str, *, plan: PodPlan | None = None, **keys: Any
) -> dict[str, Any]:
    """A GPU Deployment on the fake cluster (replicas 0) and its model's config block."""
    workload = kube.add_workload(name, served_model_name=f"{name}-served", gpu=True, plan=plan)
    return {
        "kubernetes": {"namespace": "serving", "deployment": name, "url": workload.url},
        "served_model_name": f"{name}-served",
        "startup_timeout": "60s",
        **keys,
    }


@dataclass
class Replica(Served):
    identity: str
    port: int


@dataclass
class Cluster:
    """The activator replicas of one test. `models` and `pools` are their shared config."""

    kube: FakeKube
    workdir: Path
    session: aiohttp.ClientSession
    models: dict[str, Any]
    pools: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level config
    replicas: dict[str, Replica] = field(default_factory=dict)
    gone: list[Replica] = field(default_factory=list)
    # The API server's own record: (monotonic time, deployment, spec.replicas) of every
    # change, from the store's observer.
    record: list[tuple[float, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def observe(change: Change) -> None:
            if change.resource == "deployments":
                name = change.obj["metadata"]["name"]
                replicas = int(change.obj.get("spec", {}).get("replicas") or 0)
                self.record.append((time.monotonic(), name, replicas))

        self.kube.store.observe(observe)

    def config(self, identity: str, port: int) -> dict[str, Any]:
        return {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "access_log": "off",
                "shutdown_grace": "10s",
            },
            "kubernetes": {
                "kubeconfig": self.kube.kubeconfig_for(identity),
                "in_cluster": False,
                "request_timeout": "2s",
                "leader_election": {
                    "enabled": True,
                    "namespace": NS,
                    "lease_duration": f"{LEASE_DURATION}s",
                    "renew_deadline": f"{RENEW_DEADLINE}s",
                    "retry_period": f"{RETRY_PERIOD}s",
                },
            },
            "pools": self.pools,
            "models": self.models,
            **self.extra,
        }

    async def spawn(
        self, identity: str, *, wait_ready: bool = True, pod_ip: str = "127.0.0.1"
    ) -> Replica:
        """Start `python -m activator serve` as pod `identity`; until /readyz answers.
        `pod_ip`: its POD_IP, so the admin address it publishes for the others."""
        port = free_port()
        path = self.workdir / f"{identity}-{port}.yaml"
        path.write_text(yaml.safe_dump(self.config(identity, port)))
        log = self.workdir / f"{identity}-{port}.log"
        env = {
            **os.environ,
            "POD_NAME": identity,
            "POD_NAMESPACE": NS,
            "POD_UID": str(uuid.uuid4()),
            "POD_IP": pod_ip,
            "PYTHONUNBUFFERED": "1",
        }
        process = await spawn_serve(path, log=log, env=env)
        url = f"http://127.0.0.1:{port}"
        replica = Replica(process=process, url=url, log=log, identity=identity, port=port)
        self.replicas[identity] = replica
        if wait_ready:
            await self.until_ready(replica)
        return replica

    async def until_ready(self, replica: Replica) -> None:
        await until_ready(self.session, replica, timeout=START_S, name=replica.identity)

    def kill(self, identity: str) -> float:
        """SIGKILL: the process is gone at once (its Leases stay). Returns when."""
        replica = self.replicas.pop(identity)
        replica.process.send_signal(signal.SIGKILL)
        self.gone.append(replica)
        return time.monotonic()

    async def terminate(self, identity: str) -> int:
        """SIGTERM, as Kubernetes does at a rolling restart; until it exits."""
        replica = self.replicas.pop(identity)
        replica.process.send_signal(signal.SIGTERM)
        self.gone.append(replica)
        async with asyncio.timeout(30):
            return await replica.process.wait()

    async def aclose(self) -> None:
        for replica in [*self.replicas.values(), *self.gone]:
            if replica.process.returncode is None:
                replica.process.kill()
            await replica.process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"----- {r.identity} ({r.log.name}) -----\n{r.output()[-6000:]}"
            for r in [*self.replicas.values(), *self.gone]
        )

    # -- what the API server says ------------------------------------------------------

    def holder(self) -> str | None:
        lease = self.kube.lease(LEASE, namespace=NS)
        return (lease or {}).get("spec", {}).get("holderIdentity") or None

    def intent(self) -> dict[str, ModelIntent]:
        return intent_of(self.kube.lease(LEASE, namespace=NS))

    async def leader(self) -> str:
        """The holder of the leader Lease once it decides (its intent is published)."""

        async def deciding() -> str | None:
            holder = self.holder()
            if holder is None or holder not in self.replicas:
                return None
            body = await self.admin(holder, "/admin/ha")
            return holder if body.get("deciding") else None

        found: str = await wait_for(deciding, timeout=30, what="a deciding leader", interval=0.1)
        return found

    def followers(self, leader: str) -> list[str]:
        return sorted(name for name in self.replicas if name != leader)

    def scale_writes(self, name: str, replicas: int) -> list[str]:
        """Clients whose scale PATCHes set `name` to `replicas`, in order."""
        return [
            r.client
            for r in self.kube.requests
            if r.verb == "patch"
            and r.resource == "deployments/scale"
            and r.name == name
            and isinstance(r.body, dict)
            and r.body.get("spec", {}).get("replicas") == replicas
        ]

    def pods_created(self, name: str) -> int:
        return len({pod for pod, _ in self.kube.kubelet.ready_times if pod.startswith(f"{name}-")})

    def most_running_at_once(self, names: set[str]) -> int:
        """From the API's record: the most deployments of `names` at spec.replicas >= 1
        at any one revision."""
        current: dict[str, int] = {}
        most = 0
        for _, name, replicas in self.record:
            if name in names:
                current[name] = replicas
                most = max(most, sum(1 for v in current.values() if v >= 1))
        return most

    # -- clients ------------------------------------------------------------------------

    async def admin(self, identity: str, path: str) -> Any:
        async with self.session.get(self.replicas[identity].url + path) as resp:
            return await resp.json()

    async def metrics(self, identity: str) -> str:
        async with self.session.get(self.replicas[identity].url + "/metrics") as resp:
            return await resp.text()

    async def ask(self, identity: str, model: str, **extra: Any) -> tuple[int, Any, dict[str, str]]:
        """One chat completion through replica `identity`: (status, body, headers).
        Bounded by ASK_S (a held request waits for a wake, maybe a failover)."""
        url = self.replicas[identity].url + "/v1/chat/completions"
        async with (
            asyncio.timeout(ASK_S),
            self.session.post(url, json=chat(model, **extra)) as resp,
        ):
            data = await resp.read()
            try:
                body: Any = json.loads(data)
            except ValueError:
                body = data.decode(errors="replace")
            return resp.status, body, dict(resp.headers)


@contextlib.asynccontextmanager
async def cluster_of(
    kube: FakeKube,
    workdir: Path,
    models: dict[str, Any],
    *,
    names: tuple[str, ...] = ("r1", "r2"),
    pools: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[Cluster]:
    """Replicas `names` started together (each until /readyz); all killed at exit, with
    their logs printed if the test failed."""
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(kube, workdir, session, models, pools or {}, extra or {})
        try:
            for name in names:
                await cluster.spawn(name, wait_ready=False)
            for replica in list(cluster.replicas.values()):
                await cluster.until_ready(replica)
            yield cluster
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            await cluster.aclose()
