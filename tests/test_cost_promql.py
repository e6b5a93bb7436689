"""The PromQL that docs/observability.md gives for cost parses in a real Prometheus and
names only metrics activator exports (the dashboard's is checked by test_promql.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_promql import METRIC_NAME, Prometheus, exported_names
from tests.test_promql import prometheus as prometheus  # the fixture: a real server

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def cost_queries() -> list[str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("\n## Cost\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```promql\n(.*?)```", section, re.S)


def test_the_cost_section_gives_its_queries() -> None:
    queries = " ".join(cost_queries())
    assert len(cost_queries()) >= 5
    for name in (
        "activator_cost_dollars_total",
        "activator_model_gpus",
        "activator_start_time_seconds",
        'state="idle"',
    ):
        assert name in queries


def test_the_cost_queries_name_exported_metrics() -> None:
    exported = exported_names()
    for query in cost_queries():
        assert set(METRIC_NAME.findall(query)) <= exported, query


@pytest.mark.prometheus
@pytest.mark.parametrize("query", cost_queries())
def test_a_cost_query_parses_in_prometheus(prometheus: Prometheus, query: str) -> None:
    answer = prometheus.query(query)
    assert answer["status"] == "success", (answer.get("error"), query)
