"""What the status page shows, as plain JSON: the admin API's views of models and pools,
and the wake-duration histogram summarised from the app's own metrics registry."""

from __future__ import annotations

from typing import Any

from activator.edge.admin import ReplicaStatus, model_view
from activator.fleet.registry import ModelRegistry
from activator.model.lifecycle import Model
from activator.observability.metrics import WAKE_BUCKETS, Metrics

# Fields of a model's `cluster` entry that change on every look (a clock's reading): the
# stream sends a snapshot whenever its JSON changes, so with them it would send one per
# tick to every open page while nothing happens.
VOLATILE_CLUSTER = frozenset({"idle_seconds"})
# What the page's header says of this replica (from /admin/ha).
HA_FIELDS = ("identity", "role", "leader", "deciding", "started")


def snapshot(
    registry: ModelRegistry, metrics: Metrics, *, replicas: ReplicaStatus | None = None
) -> dict[str, Any]:
    """Everything the page draws, in one object: what /admin/models (less the volatile
    fields), /admin/pools and /admin/wake-durations answer, and `ha`: this replica's
    identity, role and leader when several replicas run (None when one runs alone).
    Fields a model or pool gains later are passed through."""
    return {
        "models": [steady_view(m, replicas=replicas) for m in registry],
        "pools": [p.describe() for p in registry.pools()],
        "wake_durations": wake_durations(metrics),
        "ha": None if replicas is None else ha_view(replicas),
    }


def steady_view(model: Model, *, replicas: ReplicaStatus | None) -> dict[str, Any]:
    """One model as /admin/models shows it, less the volatile fields of `cluster`."""
    body = model_view(model, replicas=replicas)
    if "cluster" in body:
        body["cluster"] = {k: v for k, v in body["cluster"].items() if k not in VOLATILE_CLUSTER}
    return body


def ha_view(replicas: ReplicaStatus) -> dict[str, Any]:
    described = replicas.describe()
    return {key: described[key] for key in HA_FIELDS if key in described}


def wake_durations(metrics: Metrics) -> dict[str, Any]:
    """activator_wake_duration_seconds per model and outcome: count, sum, and how many
    wakes fell in each bucket (`bins`, not cumulative: bins[i] counts wakes in
    (bounds[i-1], bounds[i]], the last bin those above the last bound). Series of several
    backends of one model (there is one in practice) are added up."""
    bounds = [float(b) for b in WAKE_BUCKETS]
    index = {b: i for i, b in enumerate(bounds)}
    cumulative: dict[str, dict[str, list[float]]] = {}
    totals: dict[str, dict[str, list[float]]] = {}  # [count, sum]
    for family in metrics.wake_duration.collect():
        for sample in family.samples:
            model, outcome = sample.labels["model"], sample.labels["outcome"]
            series = cumulative.setdefault(model, {}).setdefault(outcome, [0.0] * (len(bounds) + 1))
            total = totals.setdefault(model, {}).setdefault(outcome, [0.0, 0.0])
            if sample.name.endswith("_bucket"):
                # "+Inf" is the only bound not in WAKE_BUCKETS.
                series[index.get(float(sample.labels["le"]), len(bounds))] += sample.value
            elif sample.name.endswith("_count"):
                total[0] += sample.value
            elif sample.name.endswith("_sum"):
                total[1] += sample.value
    models: dict[str, dict[str, Any]] = {}
    for model, outcomes in cumulative.items():
        models[model] = {}
        for outcome, series in outcomes.items():
            count, total_seconds = totals[model][outcome]
            bins = [round(series[0])]
            bins += [round(series[i] - series[i - 1]) for i in range(1, len(series))]
            models[model][outcome] = {
                "count": round(count),
                "sum": round(total_seconds, 6),
                "bins": bins,
            }
    return {"bounds": bounds, "models": models}
