"""The node's GPUs as the NVIDIA device plugin advertises them.

Without sharing, each pod that requests nvidia.com/gpu: 1 holds one physical GPU until
the pod is deleted: a vLLM engine put to sleep still holds its GPU, so a second GPU pod
stays Pending (FailedScheduling) while the first exists. With time-slicing (the device
plugin's sharing.timeSlicing.resources[].replicas, GKE GPU time-sharing's
max-shared-clients-per-gpu) the node advertises gpus x replicas nvidia.com/gpu and hands
each pod one replica of a physical GPU: `sharing` pods share one GPU, with no memory or
fault isolation between them.
"""

from __future__ import annotations

import asyncio

from tests.fakekube.store import Obj


class GpuPool:
    def __init__(self, gpus: int | None, *, sharing: int = 1) -> None:
        """gpus: physical GPUs on the node (None = no accounting: every pod schedules).
        sharing: time-slicing replicas per GPU (1 = no sharing)."""
        if sharing < 1:
            raise ValueError("gpu_sharing must be >= 1")
        self.gpus = gpus
        self.sharing = sharing
        self.assignments: dict[str, int] = {}  # pod name -> physical GPU index
        self.max_in_use = 0
        self._freed = asyncio.Condition()

    @property
    def capacity(self) -> int | None:
        """nvidia.com/gpu the node advertises (replicas count as GPUs)."""
        return None if self.gpus is None else self.gpus * self.sharing

    @property
    def in_use(self) -> int:
        return len(self.assignments)

    def free(self) -> bool:
        return self.capacity is None or self.in_use < self.capacity

    async def acquire(self, pod: str) -> int:
        """Wait until a GPU replica is free and give one to `pod` (the scheduler retries
        when a GPU pod is deleted). Returns the physical GPU's index."""
        async with self._freed:
            await self._freed.wait_for(self.free)
            clients = [0] * (self.gpus or 1)
            for index in self.assignments.values():
                clients[index] += 1
            # The least shared GPU; the device plugin does not promise any placement.
            index = min(range(len(clients)), key=lambda i: (clients[i], i))
            self.assignments[pod] = index
            self.max_in_use = max(self.max_in_use, self.in_use)
            return index

    async def release(self, pod: str) -> None:
        if self.assignments.pop(pod, None) is not None:
            async with self._freed:
                self._freed.notify_all()

    def clients(self, index: int) -> list[str]:
        """The pods holding a replica of GPU `index`."""
        return sorted(p for p, i in self.assignments.items() if i == index)


def node_object(name: str, *, gpus: GpuPool, zone: str) -> Obj:
    """The simulated node, labelled as GPU feature discovery labels a time-sliced node
    (nvidia.com/gpu.replicas, nvidia.com/gpu.sharing-strategy) and GKE's GPU
    time-sharing labels, with nvidia.com/gpu capacity = GPUs x replicas."""
    labels = {
        "kubernetes.io/hostname": name,
        "topology.kubernetes.io/zone": zone,
    }
    resources: dict[str, str] = {"cpu": "16", "memory": "128Gi", "pods": "110"}
    if gpus.gpus is not None:
        resources["nvidia.com/gpu"] = str(gpus.capacity)
        labels["nvidia.com/gpu.count"] = str(gpus.gpus)
        labels["nvidia.com/gpu.replicas"] = str(gpus.sharing)
        if gpus.sharing > 1:
            labels["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
            labels["cloud.google.com/gke-gpu-sharing-strategy"] = "time-sharing"
            labels["cloud.google.com/gke-max-shared-clients-per-gpu"] = str(gpus.sharing)
        else:
            labels["nvidia.com/gpu.sharing-strategy"] = "none"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }
