"""Several pods per workload on the fake cluster: one engine per pod on its own loopback
pod IP, scale-down in the ReplicaSet's order with graceful termination, pod deletion and
readiness faults, and GPUs held per pod (shared only with device-plugin time-slicing)."""

from __future__ import annotations

from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from tests.fakekube.server import FakeKube, PodPlan
from tests.fakekube_helpers import ready


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/v1/models") as response:
        return str((await response.json())["data"][0]["id"])


async def test_replicas_n_runs_n_engines_each_on_its_own_pod_ip(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", served_model_name="coder")
    kube.scale("coder-chat", 3)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 3))
    pods = kube.pods("coder-chat")
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 3
    assert all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    assert all(p["status"]["podIPs"] == [{"ip": p["status"]["podIP"]}] for p in pods)
    urls = kube.pod_urls("coder-chat")
    assert sorted(urls.values()) == sorted(f"http://{ip}:8000" for ip in ips)
    async with aiohttp.ClientSession() as session:
        for url in urls.values():
            assert await served_model(session, url) == "coder"
    status = kube.get("coder-chat")["status"]
    assert (status["replicas"], status["availableReplicas"]) == (3, 3)


async def test_pod_cidr_gives_predictable_addresses() -> None:
    async with FakeKube(pod_cidr="127.0.0.0/24") as kube:
        kube.add_workload("coder-chat", engine=False, replicas=2)
        await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
        ips = sorted(p["status"]["podIP"] for p in kube.pods("coder-chat"))
        assert ips == ["127.0.0.2", "127.0.0.3"]


async def test_scale_down_deletes_not_ready_pods_first_then_the_newest(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", engine=False)
    kube.scale("coder-chat", 2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    older = {p["metadata"]["name"] for p in kube.pods("coder-chat")}
    kube.scale("coder-chat", 3)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 3))
    (newest,) = {p["metadata"]["name"] for p in kube.pods("coder-chat")} - older
    unready = sorted(older)[0]
    kube.set_pod_ready(unready, False)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))

    kube.scale("coder-chat", 2)
    await kube.wait_until(lambda: len(kube.pods("coder-chat")) == 2)
    assert unready not in {p["metadata"]["name"] for p in kube.pods("coder-chat")}
    kube.scale("coder-chat", 1)
    await kube.wait_until(lambda: len(kube.pods("coder-chat")) == 1)
    assert newest not in {p["metadata"]["name"] for p in kube.pods("coder-chat")}


async def test_scale_down_terminates_with_a_deletion_timestamp_and_grace(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", plan=PodPlan(termination_grace=7))
    kube.scale("coder-chat", 1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    (pod,) = kube.pods("coder-chat")
    phases: list[tuple[str, str | None]] = []
    name = pod["metadata"]["name"]

    def record(change: Any) -> None:
        if change.resource == "pods" and change.obj["metadata"]["name"] == name:
            meta = change.obj["metadata"]
            phases.append(
                (change.type, meta.get("deletionTimestamp") and change.obj["status"]["phase"])
            )

    kube.store.observe(record)
    kube.scale("coder-chat", 0)
    await kube.wait_until(lambda: not kube.pods("coder-chat"))
    assert phases[0] == ("MODIFIED", "Running")  # terminating: deletionTimestamp, still running
    assert phases[-2] == ("MODIFIED", "Succeeded")  # the engine exited on SIGTERM
    assert phases[-1][0] == "DELETED"
    (event,) = [
        e for e in kube.events() if e["reason"] == "Killing" and e["involvedObject"]["name"] == name
    ]
    assert event["message"] == "Stopping container engine"


async def test_statefulset_scales_down_from_the_highest_ordinal(kube: FakeKube) -> None:
    kube.add_workload("ranker", kind="StatefulSet", engine=False, replicas=3)
    await kube.wait_until(
        lambda: kube.get("ranker", kind="StatefulSet")["status"].get("readyReplicas") == 3
    )
    kube.scale("ranker", 1, kind="StatefulSet")
    await kube.wait_until(lambda: len(kube.pods("ranker", kind="StatefulSet")) == 1)
    assert [p["metadata"]["name"] for p in kube.pods("ranker", kind="StatefulSet")] == ["ranker-0"]


async def test_a_deleted_pod_is_replaced(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", engine=False, replicas=2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    victim = kube.pods("coder-chat")[0]["metadata"]["name"]
    kube.delete_pod(victim, grace=0)
    await kube.wait_until(
        lambda: (
            ready(kube, "coder-chat", 2)
            and victim not in {p["metadata"]["name"] for p in kube.pods("coder-chat")}
        )
    )
    assert kube.replicas("coder-chat") == 2


async def test_failing_readiness_probe_unreadies_the_pod_but_keeps_the_engine(
    kube: FakeKube,
) -> None:
    kube.add_workload("coder-chat", served_model_name="coder", replicas=1)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    (pod,) = kube.pods("coder-chat")
    name = pod["metadata"]["name"]
    kube.set_pod_ready(name, False)
    await kube.wait_until(lambda: not is_ready(kube.pods("coder-chat")[0]))
    assert "readyReplicas" not in kube.get("coder-chat")["status"]
    async with aiohttp.ClientSession() as session:
        assert await served_model(session, kube.pod_urls("coder-chat")[name]) == "coder"
    kube.set_pod_ready(name, True)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))


async def test_pods_are_listed_by_kubernetes_asyncio_with_their_ips(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", engine=False, replicas=2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    api_client = await config.new_client_from_config(config_file=kube.kubeconfig)
    async with api_client:
        pods = await client.CoreV1Api(api_client).list_namespaced_pod(
            "serving", label_selector="app=coder-chat"
        )
    assert len({p.status.pod_ip for p in pods.items}) == 2


# -- GPUs ---------------------------------------------------------------------------------


async def test_without_sharing_a_second_gpu_pod_stays_pending_while_the_first_exists() -> None:
    async with FakeKube(gpus=1) as kube:
        kube.add_workload("a", engine=False, gpu=True, replicas=1)
        await kube.wait_until(lambda: ready(kube, "a", 1))
        kube.add_workload("b", engine=False, gpu=True, replicas=1)
        await kube.wait_until(
            lambda: any(
                e["reason"] == "FailedScheduling"
                and e["involvedObject"]["name"].startswith("b-")
                and "Insufficient nvidia.com/gpu" in e["message"]
                for e in kube.events()
            )
        )
        (pending,) = kube.pods("b")
        assert pending["status"]["phase"] == "Pending"
        assert pending["status"]["conditions"][0]["reason"] == "Unschedulable"
        kube.scale("a", 0)
        await kube.wait_until(lambda: ready(kube, "b", 1))
        assert kube.max_gpus_in_use == 1


async def test_time_slicing_lets_two_gpu_pods_share_one_gpu() -> None:
    async with FakeKube(gpus=1, gpu_sharing=2) as kube:
        kube.add_workload("a", engine=False, gpu=True, replicas=1)
        kube.add_workload("b", engine=False, gpu=True, replicas=1)
        await kube.wait_until(lambda: ready(kube, "a", 1) and ready(kube, "b", 1))
        assert set(kube.gpu_assignments().values()) == {0}
        assert kube.max_gpus_in_use == 2  # nvidia.com/gpu replicas handed out
        kube.add_workload("c", engine=False, gpu=True, replicas=1)
        await kube.wait_until(
            lambda: any(
                e["reason"] == "FailedScheduling" and e["involvedObject"]["name"].startswith("c-")
                for e in kube.events()
            )
        )


async def test_the_node_advertises_time_sliced_gpus() -> None:
    async with FakeKube(gpus=2, gpu_sharing=4) as kube:
        api_client = await config.new_client_from_config(config_file=kube.kubeconfig)
        async with api_client:
            (node,) = (await client.CoreV1Api(api_client).list_node()).items
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.metadata.labels["nvidia.com/gpu.replicas"] == "4"
        assert node.metadata.labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
        assert node.metadata.labels["cloud.google.com/gke-max-shared-clients-per-gpu"] == "4"


async def test_gpu_pods_spread_over_gpus_before_sharing() -> None:
    async with FakeKube(gpus=2, gpu_sharing=2) as kube:
        kube.add_workload("a", engine=False, gpu=True, replicas=2)
        await kube.wait_until(lambda: ready(kube, "a", 2))
        assert sorted(kube.gpu_assignments().values()) == [0, 1]


async def test_killing_one_pods_engine_leaves_the_others_serving(kube: FakeKube) -> None:
    kube.add_workload("coder-chat", served_model_name="coder", replicas=2)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 2))
    victim, survivor = sorted(kube.pod_urls("coder-chat"))
    kube.kill_engine("coder-chat", pod=victim)
    await kube.wait_until(lambda: ready(kube, "coder-chat", 1))
    assert [r[0] for r in kube.routable("coder-chat")] == [
        p["status"]["podIP"] for p in kube.pods("coder-chat") if p["metadata"]["name"] == survivor
    ]
    async with aiohttp.ClientSession() as session:
        assert await served_model(session, kube.pod_urls("coder-chat")[survivor]) == "coder"
