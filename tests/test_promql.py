"""The dashboard's and the alert rules' PromQL is valid and names only metrics we export.

Parsing is checked by a real Prometheus server (Debian package `prometheus`, on
127.0.0.1 with a temporary storage dir and no remote endpoints) through its HTTP API,
and the rules by `promtool check rules` and `promtool test rules`. Without the binaries
these tests skip, and fail when CI=true (`.ci/tools.sh` installs them).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.observability.metrics import Metrics
from tests.tools import on_path

REPO = Path(__file__).resolve().parents[1]
OBSERVABILITY = REPO / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RULES = OBSERVABILITY / "prometheus-rules.yaml"

METRIC_NAME = re.compile(r"\bactivator_[a-z0-9_]*[a-z0-9]")
# Grafana's built-in interval variables, given a value Prometheus accepts.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "6h"}
# The sample names each metric type exposes (prometheus_client's exposition, without the
# `_created` series, which /metrics leaves out).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
}
STARTUP_DEADLINE = 60.0


def _require(tool: str) -> str:
    return on_path(tool, hint="Debian package prometheus; bash .ci/tools.sh installs it")


@dataclass(frozen=True)
class Query:
    source: str  # where the expression comes from, for failure messages
    expr: str  # as written, Grafana variables and all


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _rule_groups() -> dict[str, Any]:
    (rule,) = list(yaml.safe_load_all(RULES.read_text(encoding="utf-8")))
    assert rule["kind"] == "PrometheusRule"
    # The CR's spec is exactly a Prometheus rules file.
    spec: dict[str, Any] = rule["spec"]
    return spec


def _variable_values() -> dict[str, str]:
    """A value for each dashboard variable that keeps the query valid: the All value of
    multi-value query variables (used with =~), the current value of the others."""
    values = dict(GRAFANA_BUILTINS)
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            values[variable["name"]] = variable["allValue"]
        elif variable["type"] in ("custom", "interval", "constant"):
            values[variable["name"]] = variable["current"]["value"]
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown dashboard variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def dashboard_queries() -> list[Query]:
    dashboard = _dashboard()
    queries = [
        Query(f"dashboard panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # label_values(SELECTOR, label) is Grafana's, not PromQL; its selector is.
        definition = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", definition)
        assert match, f"unexpected variable query {definition!r}"
        queries.append(Query(f"dashboard variable ${variable['name']}", match.group(1)))
    return queries


def rule_queries() -> list[Query]:
    return [
        Query(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in _rule_groups()["groups"]
        for rule in group["rules"]
    ]


ALL_QUERIES = dashboard_queries() + rule_queries()


def exported_names() -> set[str]:
    """Every series name an app's registry can expose, from the families it collects
    (labelled metrics have no samples until first used) and from the samples it has."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples if s.name != family.name + "_created")
    return names


def test_queries_were_found() -> None:
    assert len(dashboard_queries()) >= 15
    assert {q.source for q in rule_queries()} >= {
        "rule ActivatorWakeFailing",
        "rule ActivatorWakeSlow",
        "rule ActivatorHoldQueueNearFull",
        "rule ActivatorModelStuckStarting",
    }


def test_every_activator_metric_referenced_is_exported() -> None:
    exported = exported_names()
    unknown = {
        (query.source, name)
        for query in ALL_QUERIES
        for name in METRIC_NAME.findall(query.expr)
        if name not in exported
    }
    assert not unknown, f"not in activator.observability.metrics: {sorted(unknown)}"


def test_dashboard_uses_only_declared_variables() -> None:
    values = _variable_values()
    for query in dashboard_queries():
        assert "$" not in _substitute(query.expr, values), query.source


def test_dashboard_shows_what_operators_ask_for() -> None:
    exprs = " ".join(q.expr for q in dashboard_queries())
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (model, le) " in exprs
    for name in (
        "activator_time_to_first_byte_seconds_bucket",
        "activator_held_requests",
        "activator_model_state",
        "activator_swaps_total",
        "activator_upstream_errors_total",
        "activator_cost_dollars_total",
        "activator_gpu_seconds_total",
        "activator_model_gpus",  # the always-on baseline of GPU-hours avoided
    ):
        assert name in exprs
    assert "by (cold, le)" in exprs  # cold vs warm TTFB
    assert 'state="idle"' in exprs  # idle GPU time


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 for a bad expression, with a JSON body
            with exc:
                body = json.load(exc)
        return body

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            body: dict[str, Any] = json.load(response)
        return body


def _rules_file(directory: Path, *, annotations: bool = True) -> Path:
    groups = _rule_groups()
    if not annotations:
        # promtool's unit tests compare annotations too; they are text for people, so
        # the behaviour tests pin expressions, durations and labels only.
        for group in groups["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = directory / "activator-rules.yaml"
    path.write_text(yaml.safe_dump(groups), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _require("prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    rules = _rules_file(directory)
    config = directory / "prometheus.yml"
    # No scrape targets and no remote endpoints: the server only parses and evaluates.
    config.write_text(
        yaml.safe_dump({"global": {"evaluation_interval": "1m"}, "rule_files": [str(rules)]}),
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            # Port 0: the kernel picks a free port; the server logs the address it got.
            "--web.listen-address=127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="prometheus-stderr", daemon=True)
    reader.start()
    try:
        address = None
        ready = False
        seen: list[str] = []
        deadline = time.monotonic() + STARTUP_DEADLINE
        # Wait for the server's own events: the address it listens on and readiness.
        # "Listening on" comes from the listener's own goroutine, so it may follow
        # "Server is ready".
        while address is None or not ready:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "prometheus did not become ready and log its address:\n" + (
                "".join(seen)
            )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, "prometheus exited:\n" + "".join(seen)
            seen.append(line)
            listening = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', line)
            if listening:
                address = listening.group(1)
            if "Server is ready to receive web requests" in line:
                ready = True
        yield Prometheus(url=f"http://{address}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.prometheus
@pytest.mark.parametrize("query", ALL_QUERIES, ids=[q.source for q in ALL_QUERIES])
def test_expression_parses_in_prometheus(prometheus: Prometheus, query: Query) -> None:
    expr = _substitute(query.expr, _variable_values())
    answer = prometheus.query(expr)
    assert answer["status"] == "success", (
        f"{query.source}: {answer.get('errorType')}: {answer.get('error')}\n{expr}"
    )


@pytest.mark.prometheus
def test_prometheus_loads_every_alert_rule(prometheus: Prometheus) -> None:
    answer = prometheus.get("/api/v1/rules")
    loaded = {rule["name"] for group in answer["data"]["groups"] for rule in group["rules"]}
    expected = {
        rule.get("alert") or rule.get("record")
        for group in _rule_groups()["groups"]
        for rule in group["rules"]
    }
    assert loaded == expected


@pytest.mark.prometheus
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    promtool = _require("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(_rules_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout


def _alert_test(
    alert: str,
    series: dict[str, str],
    *,
    quiet_at: str,
    firing_at: str,
    labels: dict[str, str],
    quiet_again_at: str | None = None,
) -> dict[str, Any]:
    """A promtool unit test: `alert` is silent at `quiet_at`, fires at `firing_at`, and
    (if given) is silent again at `quiet_again_at`."""
    checks: list[dict[str, Any]] = [
        {"eval_time": quiet_at, "alertname": alert, "exp_alerts": []},
        {
            "eval_time": firing_at,
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {**labels, "alertname": alert}}],
        },
    ]
    if quiet_again_at is not None:
        checks.append({"eval_time": quiet_again_at, "alertname": alert, "exp_alerts": []})
    return {
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "alert_rule_test": checks,
    }


# Synthetic series (one sample a minute) for each alert, so each rule is seen to stay
# quiet and then fire: an expression can parse and still never match.
ALERT_TESTS = [
    _alert_test(
        "ActivatorWakeFailing",
        {
            'activator_wake_duration_seconds_count{model="a",backend="kubernetes",'
            'outcome="failed"}': "0x10 1x20",
        },
        quiet_at="10m",
        firing_at="12m",
        labels={"model": "a", "severity": "warning"},
    ),
    # A model's first failed wake: its series appears with the count already at 1.
    _alert_test(
        "ActivatorWakeFailing",
        {
            'activator_wake_duration_seconds_count{model="b",backend="process",'
            'outcome="timeout"}': "_x11 1x20",
        },
        quiet_at="10m",
        firing_at="12m",
        labels={"model": "b", "severity": "warning"},
        # 15 minutes after that first failure, with no other since.
        quiet_again_at="28m",
    ),
    _alert_test(
        "ActivatorWakeSlow",
        {
            # Every wake takes between 300 s and 420 s: p90 is about 408 s.
            'activator_wake_duration_seconds_bucket{model="a",backend="kubernetes",'
            'outcome="ready",le="300"}': "0x120",
            'activator_wake_duration_seconds_bucket{model="a",backend="kubernetes",'
            'outcome="ready",le="420"}': "0+1x120",
            'activator_wake_duration_seconds_bucket{model="a",backend="kubernetes",'
            'outcome="ready",le="+Inf"}': "0+1x120",
        },
        quiet_at="10m",
        firing_at="30m",
        labels={"model": "a", "severity": "info"},
    ),
    _alert_test(
        "ActivatorModelStuckStarting",
        {'activator_model_state{model="a",state="starting"}': "1x60"},
        quiet_at="20m",
        firing_at="40m",
        labels={"model": "a", "severity": "warning"},
    ),
    _alert_test(
        "ActivatorHoldQueueNearFull",
        {
            'activator_queue_capacity{model="a"}': "1000x30",
            'activator_held_requests{model="a",reason="starting"}': "500x10 700x20",
            'activator_held_requests{model="a",reason="waiting_for_gpu"}': "0x10 200x20",
        },
        quiet_at="10m",
        firing_at="15m",
        labels={"model": "a", "severity": "warning"},
    ),
    _alert_test(
        "ActivatorUpstreamErrors",
        {'activator_upstream_errors_total{model="a",kind="connect"}': "0x10 0+6x40"},
        quiet_at="10m",
        firing_at="35m",
        labels={"model": "a", "kind": "connect", "severity": "warning"},
    ),
    _alert_test(
        "ActivatorScaleReverted",
        {
            'activator_scale_events_total{model="a",direction="down",reason="revert"}': (
                "0x10 1x20"
            ),
        },
        quiet_at="10m",
        firing_at="12m",
        labels={"model": "a", "severity": "warning"},
    ),
]


def test_every_alert_has_a_behaviour_test() -> None:
    tested = {t["alert_rule_test"][0]["alertname"] for t in ALERT_TESTS}
    assert tested == {q.source.removeprefix("rule ") for q in rule_queries()}


@pytest.mark.prometheus
def test_alerts_stay_quiet_then_fire_on_synthetic_series(tmp_path: Path) -> None:
    promtool = _require("promtool")
    rules = _rules_file(tmp_path, annotations=False)
    tests = tmp_path / "alert-tests.yaml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": ALERT_TESTS}
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [promtool, "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
