"""deploy/: every kustomization builds, validates against the Kubernetes schemas offline,
and keeps the invariants the activator relies on (models at replicas 0 with Recreate,
least-privilege RBAC, a hardened activator pod, a config that loads, two replicas that
elect a leader and survive a rolling update or a drain).

Needs `kubectl` (or `kustomize`) and the PyPI package kubernetes-validate; `.ci/tools.sh`
installs both. Without them these tests skip, and fail when CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config.load import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = (
    "base",
    "examples/vllm-model",
    "examples/sleep-mode",
    "examples/gpu-packing/models",
    "examples/gpu-packing/gke",
    "observability",
)
GPU_PACKING = DEPLOY / "examples" / "gpu-packing"
ARGOCD_APP = DEPLOY / "examples" / "argocd-application.yaml"

# Custom resources: kubernetes-validate ships schemas for built-in kinds only. These are
# checked by the invariant tests below instead; any other kind without a schema fails.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("argoproj.io/v1alpha1", "Application"),
}
# The oldest Kubernetes minor the manifests promise to work on, and the newest schemas
# the validator ships.
OLDEST_KUBERNETES = "1.29"

# What the Kubernetes backend does and nothing more: read workloads, pods and events
# (watches), and change replicas only through the scale subresource.
EXPECTED_GRANTS = {
    *(("apps", r, v) for r in ("deployments", "statefulsets") for v in ("get", "list", "watch")),
    *(
        ("apps", r, v)
        for r in ("deployments/scale", "statefulsets/scale")
        for v in ("get", "patch", "update")
    ),
    *(("", r, v) for r in ("pods", "events") for v in ("get", "list", "watch")),
    # Scale-out: the pods behind each model's Service, and their deletion cost annotation.
    ("", "pods", "patch"),
    *(("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")),
}
# In activator's own namespace, Leases only: leader election (get, create, update; watch
# by followers) and each replica's demand Lease (patched, created, deleted at shutdown).
LEASE_GRANTS = {
    ("coordination.k8s.io", "leases", v)
    for v in ("get", "list", "watch", "create", "update", "patch", "delete")
}


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}; CI must have it (bash .ci/tools.sh installs it)")
    pytest.skip(f"{what} (bash .ci/tools.sh installs it)")


def _executable(name: str) -> str | None:
    """`name` on PATH, or beside this interpreter (tools pip-installed into the venv)."""
    found = shutil.which(name)
    if found is None:
        found = shutil.which(name, path=str(Path(sys.executable).parent))
    return found


def _kustomize_command() -> list[str]:
    kubectl = _executable("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    kustomize = _executable("kustomize")
    if kustomize is not None:
        return [kustomize, "build"]
    _missing("neither kubectl nor kustomize is installed")
    raise AssertionError("unreachable")


def _build(folder: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*_kustomize_command(), str(DEPLOY / folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build of deploy/{folder} failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert docs, f"deploy/{folder} built no resources"
    return docs


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {folder: _build(folder) for folder in KUSTOMIZATIONS}


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(matches) == 1, f"no container {name} in {deployment['metadata']['name']}"
    return matches[0]


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return int(numbers[0])


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_kustomization_output_validates_strictly(
    built: dict[str, list[dict[str, Any]]], folder: str, version: str
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("the PyPI package kubernetes-validate is not installed")
        raise
    if version == "latest":
        version = kubernetes_validate.latest_version()
    not_validated = set()
    for doc in built[folder]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            key = (doc["apiVersion"], doc["kind"])
            assert key in CRD_KINDS, f"no schema for {key} and it is not a known CRD kind"
            not_validated.add(key)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(
                f"deploy/{folder}: {doc['kind']}/{doc['metadata']['name']} at {path}: "
                f"{exc.message} (Kubernetes {version})"
            )
    # Only custom resources go unvalidated, and the tests below check those by hand.
    assert not_validated <= CRD_KINDS


def test_argocd_application_is_a_known_crd_kind() -> None:
    docs = list(yaml.safe_load_all(ARGOCD_APP.read_text(encoding="utf-8")))
    assert {(d["apiVersion"], d["kind"]) for d in docs} <= CRD_KINDS


def test_sleep_mode_example_runs_both_models_asleep_capable_on_a_shared_gpu(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    deployments = _all(built["examples/sleep-mode"], "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"coder-chat", "coder-fim"}
    for deployment in deployments:
        assert deployment["spec"]["replicas"] == 0
        engine = _container(deployment, "vllm")
        assert "--enable-sleep-mode" in engine["args"]
        env = {e["name"]: e.get("value") for e in engine["env"]}
        assert env["VLLM_SERVER_DEV_MODE"] == "1"
        selector = deployment["spec"]["template"]["spec"]["nodeSelector"]
        assert selector["cloud.google.com/gke-gpu-sharing-strategy"] == "time-sharing"
    # The device plugin's time-slicing alternative is a valid ConfigMap.
    (config,) = yaml.safe_load_all((DEPLOY / "examples/sleep-mode/time-slicing.yaml").read_text())
    sharing = yaml.safe_load(config["data"]["any"])["sharing"]["timeSlicing"]["resources"]
    assert sharing == [{"name": "nvidia.com/gpu", "replicas": 2}]


def _gpu_memory_utilization(deployment: dict[str, Any]) -> float:
    """The engine's one --gpu-memory-utilization, as a share of the GPU."""
    flags = [
        arg.split("=", 1)[1]
        for arg in _container(deployment, "vllm")["args"]
        if arg.startswith("--gpu-memory-utilization=")
    ]
    assert len(flags) == 1, f"{deployment['metadata']['name']}: flags {flags}"
    return float(flags[0])


@pytest.mark.parametrize("folder", ["examples/gpu-packing/models", "examples/gpu-packing/gke"])
def test_gpu_packing_example_fits_both_models_on_one_gpu_as_activator_counts_them(
    built: dict[str, list[dict[str, Any]]], folder: str
) -> None:
    settings = load_config(GPU_PACKING / "activator-config.yaml")
    deployments = _all(built[folder], "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"coder-chat", "coder-fim"}
    shares = {}
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        assert deployment["spec"]["replicas"] == 0
        assert _container(deployment, "vllm")["resources"]["limits"]["nvidia.com/gpu"] == "1"
        shares[name] = _gpu_memory_utilization(deployment)
        # activator's config names this Deployment and declares the same share of the GPU.
        model = settings.models[name]
        assert model.kubernetes is not None
        assert (model.kubernetes.namespace, model.kubernetes.name) == (
            deployment["metadata"]["namespace"],
            name,
        )
        assert model.memory_fraction == pytest.approx(shares[name])
    # Both in one 1-GPU pool, and both fit on its GPU at once.
    pools = {settings.models[name].pool for name in shares}
    assert len(pools) == 1
    (pool,) = pools
    assert pool is not None and settings.pools[pool].gpus == 1
    assert sum(shares.values()) <= 1
    selectors = [d["spec"]["template"]["spec"].get("nodeSelector") for d in deployments]
    if folder.endswith("gke"):
        for selector in selectors:
            assert selector["cloud.google.com/gke-gpu-sharing-strategy"] == "time-sharing"
            assert int(selector["cloud.google.com/gke-max-shared-clients-per-gpu"]) >= 2
    else:
        assert selectors == [None, None]  # the device plugin shares the GPU: any node


@pytest.mark.parametrize(
    ("file", "mode"), [("time-slicing.yaml", "timeSlicing"), ("mps.yaml", "mps")]
)
def test_gpu_packing_device_plugin_configs_share_each_gpu_between_both_models(
    file: str, mode: str
) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("the PyPI package kubernetes-validate is not installed")
        raise
    (config,) = yaml.safe_load_all((GPU_PACKING / file).read_text())
    kubernetes_validate.validate(config, OLDEST_KUBERNETES, strict=True)
    (plugin_config,) = config["data"].values()
    sharing = yaml.safe_load(plugin_config)["sharing"]
    assert list(sharing) == [mode]
    (resource,) = sharing[mode]["resources"]
    assert resource["name"] == "nvidia.com/gpu"
    assert resource["replicas"] >= 2  # coder-chat and coder-fim


def test_model_deployments_ship_at_zero_with_recreate(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    deployments = _all(built["examples/vllm-model"], "Deployment")
    assert deployments
    for deployment in deployments:
        assert deployment["spec"]["replicas"] == 0
        # With one GPU a surge pod can never schedule: the old pod must go first.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_model_follows_the_cold_start_levers(built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built["examples/vllm-model"]
    deployment = _one(docs, "Deployment", "coder-chat")
    pod = deployment["spec"]["template"]["spec"]
    engine = _container(deployment, "vllm")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}

    # /root/.cache (HF weights and vLLM's compile cache) lives on the model's own PVC.
    cache = volumes[mounts["/root/.cache"]]
    claim = cache["persistentVolumeClaim"]["claimName"]
    pvc = _one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

    # /dev/shm is a tmpfs: the container default is too small for NCCL.
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"

    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"

    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # GPU-type agnostic: nothing pins an accelerator, so the autoscaler may fall back to
    # any GPU pool with stock.
    placement = yaml.safe_dump({k: pod.get(k) for k in ("nodeSelector", "affinity", "nodeName")})
    assert "accelerator" not in placement
    assert pod.get("nodeName") is None

    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    for container in _containers(deployment):
        assert container["imagePullPolicy"] == "IfNotPresent"


def test_model_service_routes_port_8000_to_the_engine(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["examples/vllm-model"]
    deployment = _one(docs, "Deployment", "coder-chat")
    service = _one(docs, "Service", "coder-chat")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    assert _port_number(_container(deployment, "vllm"), port["targetPort"]) == 8000


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_role_grants_exactly_the_needed_verbs(built: dict[str, list[dict[str, Any]]]) -> None:
    docs = built["base"]
    assert {r["metadata"]["name"] for r in _all(docs, "Role")} == {"activator", "activator-leases"}
    assert not _all(docs, "ClusterRole")
    assert not _all(docs, "ClusterRoleBinding")
    role = _one(docs, "Role", "activator")
    assert _grants(role) == EXPECTED_GRANTS
    assert not any("resourceNames" in rule for rule in role["rules"])


def test_lease_role_grants_leases_only_in_activators_namespace(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["base"]
    role = _one(docs, "Role", "activator-leases")
    binding = _one(docs, "RoleBinding", "activator-leases")
    account = _one(docs, "ServiceAccount")
    assert _grants(role) == LEASE_GRANTS
    # The replicas' Lease names are not known up front (one per pod): no resourceNames.
    assert not any("resourceNames" in rule for rule in role["rules"])
    assert role["metadata"]["namespace"] == account["metadata"]["namespace"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]


def test_role_is_bound_to_activator_in_the_models_namespace(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["base"]
    role = _one(docs, "Role", "activator")
    binding = _one(docs, "RoleBinding", "activator")
    account = _one(docs, "ServiceAccount")
    deployment = _one(docs, "Deployment", "activator")
    model_namespaces = {
        d["metadata"]["namespace"] for d in _all(built["examples/vllm-model"], "Deployment")
    }
    assert {role["metadata"]["namespace"]} == model_namespaces
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert deployment["metadata"]["namespace"] == account["metadata"]["namespace"]


def test_activator_runs_non_root_with_read_only_root_filesystem(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    deployment = _one(built["base"], "Deployment", "activator")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "activator")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security.get("privileged", False) is False


def test_activator_probes_resources_and_command(built: dict[str, list[dict[str, Any]]]) -> None:
    deployment = _one(built["base"], "Deployment", "activator")
    container = _container(deployment, "activator")
    assert container["command"] == [
        "activator", "serve", "--config", "/etc/activator/config.yaml",
    ]  # fmt: skip
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _port_number(container, get["port"]) == 8080
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]

    service = _one(built["base"], "Service", "activator")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080
    assert _port_number(container, port["targetPort"]) == 8080
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_activator_runs_two_replicas_that_survive_a_rollout_and_a_drain(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["base"]
    deployment = _one(docs, "Deployment", "activator")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert (
        "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]
    )
    budget = _one(docs, "PodDisruptionBudget", "activator")
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The downward API tells each replica who and where it is.
    env = {e["name"]: e for e in _container(deployment, "activator")["env"]}
    fields = {
        name: env[name]["valueFrom"]["fieldRef"]["fieldPath"]
        for name in ("POD_NAME", "POD_UID", "POD_NAMESPACE", "POD_IP")
    }
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_UID": "metadata.uid",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",  # its admin address, for followers to forward to
    }
    # Long enough for the preStop pause and the shutdown grace.
    container = _container(deployment, "activator")
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + 30


def test_configmap_config_loads_and_points_at_the_example_model(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = built["base"]
    deployment = _one(docs, "Deployment", "activator")
    pod = deployment["spec"]["template"]["spec"]
    mount = next(
        m for m in _container(deployment, "activator")["volumeMounts"]
        if m["mountPath"] == "/etc/activator"
    )  # fmt: skip
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    # The mounted name is the generated one (with its content hash), so a config edit
    # rolls the pod.
    configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"], encoding="utf-8")

    settings = load_config(path, environ={})

    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8080
    # Two replicas elect a leader; the namespace comes from POD_NAMESPACE, where the
    # lease Role is.
    election = settings.kubernetes.leader_election
    assert election.enabled and election.namespace is None and election.identity is None
    assert settings.kubernetes.on_shutdown == "keep"
    model_docs = built["examples/vllm-model"]
    targets = [m.kubernetes for m in settings.models.values() if m.kubernetes is not None]
    assert targets, "the example config has no Kubernetes-backed model"
    for target in targets:
        model = _one(model_docs, target.kind, target.name)
        assert model["metadata"]["namespace"] == target.namespace
        labels = model["spec"]["template"]["metadata"]["labels"]
        # The url is the in-cluster DNS name of a Service in front of that workload.
        routes = {
            f"http://{s['metadata']['name']}.{s['metadata']['namespace']}"
            f".svc.cluster.local:{p['port']}"
            for s in _all(model_docs, "Service")
            if s["spec"]["selector"].items() <= labels.items()
            for p in s["spec"]["ports"]
        }
        assert target.url in routes


def test_servicemonitor_scrapes_the_activator_service(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    docs = built["base"]
    monitor = _one(docs, "ServiceMonitor")
    service = _one(docs, "Service", "activator")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"


def test_prometheus_rule_lives_beside_activator(built: dict[str, list[dict[str, Any]]]) -> None:
    rule = _one(built["observability"], "PrometheusRule")
    assert rule["spec"]["groups"]
    dashboard = _one(built["observability"], "ConfigMap", "activator-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "grafana-dashboard.json" in dashboard["data"]


def test_argocd_application_respects_ignored_replicas(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    (app,) = list(yaml.safe_load_all(ARGOCD_APP.read_text(encoding="utf-8")))
    spec = app["spec"]
    # ignoreDifferences alone only hides the diff; without this option a sync still
    # writes replicas: 0 back and undoes every wake.
    assert "RespectIgnoreDifferences=true" in spec["syncPolicy"]["syncOptions"]
    assert (REPO / spec["source"]["path"] / "kustomization.yaml").is_file()
    for deployment in _all(built["examples/vllm-model"], "Deployment"):
        name = deployment["metadata"]["name"]
        ignored = [
            entry for entry in spec["ignoreDifferences"]
            if entry.get("group") == "apps"
            and entry["kind"] == "Deployment"
            and entry.get("name") in (None, name)
        ]  # fmt: skip
        assert any("/spec/replicas" in entry.get("jsonPointers", []) for entry in ignored), name
