"""Typed, frozen settings. `activator.config.load` builds these from YAML; nothing else
parses config.

Each class is a pydantic model and the single description of its config section: a field
is a key of the same name (except where activator.config.load says otherwise: a model's
name is its key under `models:`), its type says what values are valid (activator.config.types),
its default says why it is what it is. Unknown keys are errors. Durations are seconds.

A new section is a small class here plus a field that holds it; activator.config.load needs
no change. Types come from activator.config.types (not plain int/float/bool, which would
read YAML text as numbers), secrets are marked SECRET, and a check within one object is a
validator of its class (see ProcessTarget).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from activator.config.types import (
    SECRET,
    UNQUOTED_OFF,
    Command,
    Count,
    Duration,
    DurationOrZero,
    EnvMap,
    Flag,
    FrozenMap,
    HealthPath,
    InCluster,
    Keepalive,
    PerGpu,
    Port,
    Positive,
    Price,
    Share,
    ShareOrZero,
    Size,
    Text,
    TextList,
    Url,
    parse_share,
    problem_at,
)

AccessLogFormat = Literal["text", "json", "off"]
WorkloadKind = Literal["Deployment", "StatefulSet"]
ShutdownAction = Literal["keep", "stop"]
SleepLevel = Literal[1, 2]
# vLLM's share of the GPU that the engine may take; vLLM reads `_` as `-` in its flags.
GPU_MEMORY_FLAGS = ("--gpu-memory-utilization", "--gpu_memory_utilization")


def _no_entries() -> Mapping[str, Any]:
    return MappingProxyType({})  # a factory: pydantic deep-copies plain defaults


class Section(BaseModel):
    """Base of every settings class: read-only, and no key it does not know."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        fields = type(self).model_fields
        for key, value in super().__repr_args__():
            secret = key in fields and SECRET in fields[key].metadata
            yield key, "***" if secret and value else value


class ServerSettings(Section):
    host: Text = "127.0.0.1"  # loopback by default: an engine front door is not public by accident
    port: Port = 8080
    api_keys: Annotated[TextList, SECRET] = ()  # empty = /v1/* is open
    admin_api_key: Annotated[Text | None, SECRET] = None  # None = /admin/* is open
    # 32 MiB: long-context prompts and embedding batches are large, but a body is held in
    # memory while the model wakes, so it must be capped.
    max_body_bytes: Size = 32 * 1024 * 1024
    # Caps held requests over all models together (per-model caps are max_queued).
    max_queued_total: Count = 20_000
    # On SIGTERM: how long in-flight requests may run before they are cut.
    shutdown_grace: Duration = 30.0
    # Longest time a request body may take to arrive once the headers are in (a client
    # that sends a byte every few seconds would otherwise hold a slot forever) -> 408.
    body_timeout: Duration = 60.0
    # How long a status-page login lasts (activator.edge.sessions): a working day, so an
    # operator logs in about once a day, and a cookie that leaked is dead by the next.
    ui_session_ttl: Duration = 12 * 3600.0
    # Bodies one client address may have arriving at once, on any route (429 past it):
    # bounds the connections a client trickling its bodies holds open. A gateway in front
    # is one address for all of its clients, and bodies that arrive at once hold a slot
    # for an instant, hence well above a gateway's burst of bodies still in flight.
    max_body_reads_per_client: Count = 256
    access_log: Annotated[AccessLogFormat, UNQUOTED_OFF] = "text"
    # Reload when the config file's content changes (SIGHUP and POST /admin/reload reload
    # in any case). Off by default: an edit applies as soon as it is saved. New content
    # applies once two reads one watch_interval apart agree (never half of a write).
    watch_config: Flag = False
    # How often the file is read for a change. Its content is compared, not its mtime or
    # inode: Kubernetes swaps a ConfigMap volume's `..data` symlink and editors rename a new
    # file over the old one, and both must count. Reading a small file is cheap, and the
    # kubelet takes up to a minute to deliver a ConfigMap change anyway.
    watch_interval: Duration = 2.0


class LeaderElectionSettings(Section):
    """Several activator replicas (docs/kubernetes.md, "Several replicas (HA)"): one is
    elected leader with a coordination.k8s.io/v1 Lease and decides for every model; the
    others serve and hold requests and follow it. Off: one replica decides alone."""

    enabled: Flag = False
    # The namespace of the Leases: activator's own. None = $POD_NAMESPACE (downward API),
    # else the service account's namespace.
    namespace: Text | None = None
    lease_name: Text = "activator-leader"
    # This replica's name, unique among them; None = $POD_NAME, else $HOSTNAME.
    identity: Text | None = None
    # client-go's defaults: another replica takes over about lease_duration + retry_period
    # after the leader dies; the leader stops deciding renew_deadline after its last renewal.
    lease_duration: Duration = 15.0
    renew_deadline: Duration = 10.0
    retry_period: Duration = 2.0
    # The least time between two Lease writes caused by a change (a replica's demand,
    # the leader's intent): bounds the write rate under load; heartbeats keep their period.
    write_interval: Duration = 0.15

    @model_validator(mode="after")
    def _consistent_timings(self) -> LeaderElectionSettings:
        from activator.config.ha import HaSettings

        try:  # the rules client-go applies (activator.config.ha.validate)
            HaSettings(
                namespace=self.namespace or "default",
                lease_name=self.lease_name,
                lease_duration=self.lease_duration,
                renew_deadline=self.renew_deadline,
                retry_period=self.retry_period,
                write_interval=self.write_interval,
            )
        except ValueError as error:
            raise ValueError(str(error)) from None
        return self


class KubernetesSettings(Section):
    """How activator reaches the Kubernetes API (server-level)."""

    kubeconfig: Text | None = None  # None = the default kubeconfig lookup
    in_cluster: InCluster = None  # None = auto: in-cluster when the service account is mounted
    context: Text | None = None
    # Each API call is bounded; a watch is re-established after this many seconds.
    request_timeout: Duration = 30.0
    watch_timeout: Duration = 300.0
    # How long a pod may sit in FailedScheduling with no word from a cluster autoscaler
    # before the start fails: the autoscaler scans every 10 s; 45 s leaves room for a slow
    # scan without holding requests on a cluster that has no autoscaler.
    scheduling_grace: Duration = 45.0
    # Scale to 0, then wait this long for the pods to be deleted (the pod's 30 s default
    # termination grace plus a vLLM drain).
    stop_timeout: Duration = 300.0
    # GitOps reverts tolerated in one wake before the start fails with the fix: a
    # controller that keeps writing replicas: 0 wins every race.
    revert_limit: Count = 3
    # What SIGTERM does to Kubernetes models: "keep" leaves them as they are so the next
    # activator (a rolling restart) adopts them warm; "stop" scales them to 0 as before.
    on_shutdown: ShutdownAction = "keep"
    leader_election: LeaderElectionSettings = Field(default_factory=LeaderElectionSettings)

    @model_validator(mode="after")
    def _replicas_keep_models(self) -> KubernetesSettings:
        if self.leader_election.enabled and self.on_shutdown == "stop":
            raise problem_at(
                "on_shutdown",
                "must be keep with leader_election enabled: one replica stopping would stop "
                "the models the others serve",
                self.on_shutdown,
            )
        return self


class ProcessTarget(Section):
    """Local backend: a command that serves the OpenAI API on `{port}`."""

    command: Command
    port: Port = 0  # 0 = pick a free loopback port for each start
    host: Text = "127.0.0.1"
    # Extra variables for the engine (it inherits activator's environment); may hold tokens.
    env: Annotated[EnvMap, SECRET] = Field(default_factory=_no_entries)
    cwd: Text | None = None
    stop_grace: Duration = 30.0  # SIGTERM, then SIGKILL of the process group after this
    log_lines: Count = 200  # lines of engine output kept for errors and the admin API

    @model_validator(mode="after")
    def _port_placeholder(self) -> ProcessTarget:
        if self.port == 0 and not any("{port}" in arg for arg in self.command):
            raise problem_at("command", "must contain {port} when port is 0", self.command)
        try:
            self.gpu_memory_utilization  # noqa: B018 - raises ValueError on a bad flag
        except ValueError as error:
            raise problem_at("command", str(error), None) from None
        return self

    @property
    def gpu_memory_utilization(self) -> float | None:
        """The share of each GPU the engine may take, from --gpu-memory-utilization X (or
        =X, the last one wins as in argparse) in `command`; None when it has no such flag.
        A `sh -c "..."` argument is read word by word."""
        words: list[str] = []
        for arg in self.command:
            if " " in arg and any(flag in arg for flag in GPU_MEMORY_FLAGS):
                words += _words(arg)
            else:
                words.append(arg)
        found: tuple[str, str] | None = None
        for index, word in enumerate(words):
            flag, equals, value = word.partition("=")
            if flag not in GPU_MEMORY_FLAGS:
                continue
            if not equals and index + 1 == len(words):
                raise ValueError(f"{flag} has no value")
            found = (flag, value if equals else words[index + 1])
        if found is None:
            return None
        flag, value = found
        try:
            return parse_share(float(value))
        except ValueError as error:  # float()'s own words name no key: ours do
            detail = error if "share" in str(error) else "expected a share like 0.45"
            raise ValueError(f"{flag} {value}: {detail}") from None


def _words(arg: str) -> list[str]:
    try:
        return shlex.split(arg)
    except ValueError:  # unbalanced quotes: the shell will complain, not us
        return arg.split()


class KubernetesTarget(Section):
    """Kubernetes backend: a workload with a scale subresource, reached through `url`.
    (In a file, `deployment: x` or `statefulset: x` gives name and kind.)"""

    namespace: Text
    name: Text
    url: Url
    kind: WorkloadKind = "Deployment"
    # With replicas.max > 1 activator routes to the pods itself: the Service (in
    # `namespace`) whose EndpointSlices list them. None = the first label of url's host
    # (coder.serving.svc -> coder); required when that host is an IP address.
    service: Text | None = None
    # The Service port (by name) its pods are reached on; None = its only port, else the
    # one named http.
    service_port: Text | None = None

    @property
    def service_name(self) -> str | None:
        """The Service whose EndpointSlices list the pods, or None if none is known."""
        if self.service is not None:
            return self.service
        host = urlsplit(self.url).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return host.split(".", 1)[0] if host and host != "localhost" else None
        return None


class PoolSettings(Section):
    name: str  # its key under `pools:`
    gpus: Count
    # Host RAM that the pool's sleeping (level 1) models may hold together; None = no
    # model of the pool sleeps at level 1 (activator.config.load requires it when one does).
    host_memory: Size | None = None
    # Memory of each GPU of the pool (80GiB for an H100): what models that declare their
    # gpu_memory as a size are shares of. None = unknown: models give shares, or take
    # their GPUs whole.
    gpu_memory: Size | None = None


class SleepSettings(Section):
    """vLLM sleep mode: put to sleep instead of stopped when the pool needs the GPU.
    The engine must run with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1."""

    level: SleepLevel = 1
    # Host memory the engine holds for its weights once it has slept at level 1 (about
    # none at level 2): measure it (vLLM keeps its pinned backup after a wake, rounded up).
    host_memory: Size | None = None
    # Bound on one sleep or one wake. A level-1 sleep copies the weights to host memory,
    # and vLLM allocates that pinned memory at the first sleep: seconds per 10 GB.
    timeout: Duration = 120.0
    # GPU memory the engine keeps while asleep, on each of its GPUs: a size or a share.
    # Counted for a model with a gpu_memory, so that a wake beside it never over-commits.
    # None = DEFAULT_GPU_RESIDUE (activator.config.gpu_memory says why).
    gpu_residue: PerGpu | None = None

    @model_validator(mode="after")
    def _host_memory_for_level_one(self) -> SleepSettings:
        if self.level == 1 and self.host_memory is None:
            raise problem_at("host_memory", "required for level 1 (the weights' size)", None)
        return self

    @property
    def host_bytes(self) -> int:
        """Host memory the engine holds once asleep: the weights at level 1, none at 2."""
        return (self.host_memory or 0) if self.level == 1 else 0


class CostSettings(Section):
    """What a model costs, in dollars (any one currency will do): for
    activator_cost_dollars_total (activator.observability.cost) and LiteLLM's per-token prices
    (activator.litellm_config). Every price is optional; None = not priced."""

    # Per GPU and hour the engine holds its GPUs (x the model's `gpus`), in every state
    # but sleeping: what the GPU node or the cloud's GPU costs.
    gpu_hour: Price | None = None
    # Per million tokens of the engines' `usage`: prompt (cached included) and completion.
    input_per_million: Price | None = None
    output_per_million: Price | None = None

    @property
    def priced(self) -> bool:
        prices = (self.gpu_hour, self.input_per_million, self.output_per_million)
        return any(price is not None for price in prices)


class ReplicasSettings(Section):
    """Scale-out of a Kubernetes model (docs/kubernetes.md, "Scaling out"): 1..max
    replicas by load, and requests routed to its pods directly (least loaded first)."""

    # Most replicas. 1: one engine, scaled 0 <-> 1 and reached through its Service.
    max: Count = 1
    # Requests one replica should carry: desired replicas = ceil((in flight + held) /
    # target_concurrency). 16: a moderate batch for a 7B model on one GPU; measure yours.
    target_concurrency: Positive = 16.0
    # Demand must stay lower this long before a replica goes (Knative's stable window:
    # a dip shorter than this sheds nothing). Scale-up is at once. 0: at once too.
    scale_down_delay: DurationOrZero = 300.0
    # A pod carries at most target_concurrency x burst_factor requests; past that they
    # are held in activator (not queued on a busy engine) until a pod has room, so a new
    # pod takes the queue as soon as it is up. 2: each pod keeps its next batch queued.
    burst_factor: Positive = 2.0

    @model_validator(mode="after")
    def _burst_reaches_the_target(self) -> ReplicasSettings:
        if self.burst_factor < 1:
            raise problem_at(
                "burst_factor", "must be 1 or more (a pod must reach its target)", self.burst_factor
            )
        return self


class ModelDefaults(Section):
    """The per-model keys that `defaults:` may also set (for every model at once)."""

    # 10 min: long enough to cover a person's think time between requests, short enough
    # that an idle GPU does not bill for long.
    idle_timeout: Duration = 600.0
    # 20 min: a cold GPU node (provision + image pull + weights) took up to 18 min.
    startup_timeout: Duration = 1200.0
    max_queued: Count = 1000
    health_path: HealthPath = "/health"
    # Interval of SSE comment lines sent to a held streaming client; None = off.
    stream_keepalive: Keepalive = None
    # Longest silence allowed while reading an upstream response (the SDK's own default).
    upstream_read_timeout: Duration = 600.0
    # Pool swap policy (see activator.placement.policy). 0 min_residency: no protected time.
    min_residency: DurationOrZero = 30.0
    drain_timeout: Duration = 120.0
    max_wait: Duration = 300.0
    upstream_api_key: Annotated[Text | None, SECRET] = None  # None = forward the client's
    # Scale-out by load (Kubernetes models only when max > 1); under `defaults:` and a
    # model both, a model's keys win key by key.
    replicas: ReplicasSettings = Field(default_factory=ReplicasSettings)
    # Prices (activator.observability.cost); under `defaults:` and a model both, a model's keys win
    # key by key. None = no activator_cost_dollars_total for the model.
    cost: CostSettings | None = None


class AdapterSettings(Section):
    """A LoRA adapter served by its model's engine (docs/adapters.md): a client names it
    like a model; activator loads it into the running base on demand."""

    path: Text  # what vLLM's /v1/load_lora_adapter gets as lora_path (the engine's view)
    aliases: TextList = ()
    # Unloaded after this long without requests; None = its base model's idle_timeout.
    idle_timeout: Duration | None = None


# vLLM's flag for the adapters one batch may use (activator.config.settings.ModelSettings
# reads it as the default of max_adapters).
MAX_LORAS_FLAGS = ("--max-loras", "--max_loras")
# max_adapters without --max-loras: a handful of small adapters in memory at once costs
# little beside a base model, and each one beyond is a load away.
DEFAULT_MAX_ADAPTERS = 8


class ModelSettings(ModelDefaults):
    name: str  # its key under `models:`
    # What the engine serves (activator rewrites "model" to it); a file's default: the name.
    served_model_name: Text
    aliases: TextList = ()
    pool: Text | None = None
    gpus: Count = 1
    sleep: SleepSettings | None = None  # None = stopped, never put to sleep
    process: ProcessTarget | None = None
    kubernetes: KubernetesTarget | None = None
    # Memory of each of its GPUs the engine takes while awake: a share (0.45) or a size
    # (36GiB: the pool must give its gpu_memory). None = process.command's
    # --gpu-memory-utilization, else the model takes its GPUs whole (as without it).
    gpu_memory: PerGpu | None = None
    # Resolved by activator.config.load once the pool is known (config.gpu_memory); not
    # keys of a file. The share of each of its GPUs it takes awake (None = its GPUs whole)
    # and keeps asleep (0 when it never sleeps or takes its GPUs whole).
    memory_fraction: Share | None = None
    residue_fraction: ShareOrZero = 0.0
    # LoRA adapters of this base, by the name clients send (docs/adapters.md); those of
    # adapter_dir are added by activator.config.load when the config is read.
    adapters: Annotated[Mapping[str, AdapterSettings], FrozenMap] = Field(
        default_factory=_no_entries
    )
    # A folder whose sub-folders holding an adapter_config.json are adapters named after
    # the folder (read when the config is loaded or reloaded).
    adapter_dir: Text | None = None
    # Adapters loaded at once on the engine (least recently used unloaded past it); None
    # = process.command's --max-loras, else DEFAULT_MAX_ADAPTERS.
    max_adapters: Count | None = None
    # Bound on one adapter load (the engine reads its weights from its path): 2 min for
    # a few hundred MB from a network volume.
    adapter_load_timeout: Duration = 120.0

    @model_validator(mode="after")
    def _scale_out_needs_a_kubernetes_service(self) -> ModelSettings:
        if self.replicas.max == 1:
            return self
        if self.adapters or self.adapter_dir is not None:
            raise problem_at(
                "replicas",
                "max above 1 cannot be combined with adapters yet (each pod would need "
                "its own loaded set)",
                None,
            )
        if self.kubernetes is None:
            raise problem_at(
                "replicas",
                "max above 1 needs a kubernetes target (a local engine is one process)",
                None,
            )
        if self.sleep is not None:
            raise problem_at(
                "replicas",
                "max above 1 cannot be combined with sleep (a sleep or a wake would reach "
                "one pod through the Service)",
                None,
            )
        if self.kubernetes.service_name is None:
            raise problem_at(
                "kubernetes",
                "needs service: with replicas.max above 1 (the Service whose EndpointSlices "
                "list the pods; url's host is an address, not a Service name)",
                None,
            )
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Every name clients may send: the name, the aliases, and the engine's served
        name (replies carry it as their "model", and clients send it back)."""
        names = (self.name, *self.aliases)
        return names if self.served_model_name in names else (*names, self.served_model_name)

    @property
    def adapter_limit(self) -> int:
        """Adapters loaded at once: max_adapters, else the engine's --max-loras."""
        if self.max_adapters is not None:
            return self.max_adapters
        command = self.process.command if self.process is not None else ()
        for index, word in enumerate(command):
            flag, equals, value = word.partition("=")
            if flag not in MAX_LORAS_FLAGS:
                continue
            value = value if equals else (command[index + 1] if index + 1 < len(command) else "")
            if value.isdigit() and int(value) > 0:
                return int(value)
        return DEFAULT_MAX_ADAPTERS

    def adapter_idle_timeout(self, adapter: str) -> float:
        own = self.adapters[adapter].idle_timeout
        return self.idle_timeout if own is None else own

    @property
    def backend_kind(self) -> str:
        return "kubernetes" if self.kubernetes is not None else "process"


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    pools: Annotated[Mapping[str, PoolSettings], FrozenMap] = Field(default_factory=_no_entries)
    models: Annotated[Mapping[str, ModelSettings], FrozenMap] = Field(default_factory=_no_entries)
