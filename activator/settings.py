"""Typed, frozen settings. `activator.config` builds these from YAML; nothing else parses config.

Every default says why it is what it is. Durations are seconds (float).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

AccessLogFormat = Literal["text", "json", "off"]
WorkloadKind = Literal["Deployment", "StatefulSet"]
ShutdownAction = Literal["keep", "stop"]


def _frozen_map() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback by default: an engine front door is not public by accident
    port: int = 8080
    api_keys: tuple[str, ...] = ()  # empty = /v1/* is open
    admin_api_key: str | None = None  # None = /admin/* is open
    # 32 MiB: long-context prompts and embedding batches are large, but a body is held in
    # memory while the model wakes, so it must be capped.
    max_body_bytes: int = 32 * 1024 * 1024
    # Caps held requests over all models together (per-model caps are max_queued).
    max_queued_total: int = 20_000
    # On SIGTERM: how long in-flight requests may run before they are cut.
    shutdown_grace: float = 30.0
    # Longest time a request body may take to arrive once the headers are in (a client
    # that sends a byte every few seconds would otherwise hold a slot forever) -> 408.
    body_timeout: float = 60.0
    access_log: AccessLogFormat = "text"


@dataclass(frozen=True, kw_only=True)
class KubernetesSettings:
    """How activator reaches the Kubernetes API (server-level)."""

    kubeconfig: str | None = None  # None = the default kubeconfig lookup
    in_cluster: bool | None = None  # None = auto: in-cluster when the service account is mounted
    context: str | None = None
    # Each API call is bounded; a watch is re-established after this many seconds.
    request_timeout: float = 30.0
    watch_timeout: float = 300.0
    # How long a pod may sit in FailedScheduling with no word from a cluster autoscaler
    # before the start fails: the autoscaler scans every 10 s; 45 s leaves room for a slow
    # scan without holding requests on a cluster that has no autoscaler.
    scheduling_grace: float = 45.0
    # Scale to 0, then wait this long for the pods to be deleted (the pod's 30 s default
    # termination grace plus a vLLM drain).
    stop_timeout: float = 300.0
    # GitOps reverts tolerated in one wake before the start fails with the fix: a
    # controller that keeps writing replicas: 0 wins every race.
    revert_limit: int = 3
    # What SIGTERM does to Kubernetes models: "keep" leaves them as they are so the next
    # activator (a rolling restart) adopts them warm; "stop" scales them to 0 as before.
    on_shutdown: ShutdownAction = "keep"


@dataclass(frozen=True, kw_only=True)
class ProcessTarget:
    """Local backend: a command that serves the OpenAI API on `{port}`."""

    command: tuple[str, ...]
    port: int = 0  # 0 = pick a free loopback port for each start
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=_frozen_map)
    cwd: str | None = None
    stop_grace: float = 30.0  # SIGTERM, then SIGKILL of the process group after this
    log_lines: int = 200  # lines of engine output kept for errors and the admin API


@dataclass(frozen=True, kw_only=True)
class KubernetesTarget:
    """Kubernetes backend: a workload with a scale subresource, reached through `url`."""

    namespace: str
    name: str
    url: str
    kind: WorkloadKind = "Deployment"


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    name: str
    gpus: int
    # Host RAM that the pool's sleeping (level 1) models may hold together; None = no
    # model of the pool sleeps at level 1 (config requires it when one does).
    host_memory: int | None = None


@dataclass(frozen=True, kw_only=True)
class SleepSettings:
    """vLLM sleep mode: put to sleep instead of stopped when the pool needs the GPU."""

    level: Literal[1, 2] = 1
    # Host memory the weights take once asleep at level 1 (about none at level 2).
    host_memory: int = 0
    # One sleep or wake call sequence: a level-1 sleep copies the weights to host memory
    # (vLLM allocates pinned memory for it at each sleep: seconds per 10 GB).
    timeout: float = 120.0

    @property
    def host_bytes(self) -> int:
        return self.host_memory if self.level == 1 else 0


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    name: str
    served_model_name: str
    aliases: tuple[str, ...] = ()
    # 10 min: long enough to cover a person's think time between requests, short enough
    # that an idle GPU does not bill for long.
    idle_timeout: float = 600.0
    # 20 min: a cold GPU node (provision + image pull + weights) took up to 18 min.
    startup_timeout: float = 1200.0
    max_queued: int = 1000
    upstream_api_key: str | None = None
    health_path: str = "/health"
    # Interval of SSE comment lines sent to a held streaming client; None = off.
    stream_keepalive: float | None = None
    # Longest silence allowed while reading an upstream response (the SDK's own default).
    upstream_read_timeout: float = 600.0
    pool: str | None = None
    gpus: int = 1
    # Pool swap policy (see activator.policy).
    min_residency: float = 30.0
    drain_timeout: float = 120.0
    max_wait: float = 300.0
    sleep: SleepSettings | None = None
    process: ProcessTarget | None = None
    kubernetes: KubernetesTarget | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def backend_kind(self) -> str:
        return "kubernetes" if self.kubernetes is not None else "process"


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    pools: Mapping[str, PoolSettings] = field(default_factory=lambda: MappingProxyType({}))
    models: Mapping[str, ModelSettings] = field(default_factory=lambda: MappingProxyType({}))
