"""The Grafana dashboard (and the chart's alerts) only query metrics the code actually exports.

Exported names come from the collectors the code defines: kubetune.handlers.metrics, the gateway's
kubetune.gateway.metrics and the serving runtime's kubetune_components.serving.metrics, expanded the
way prometheus_client exposes them (counters as _total, histograms as _bucket/_sum/_count, ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from kubetune.gateway.metrics import GatewayMetrics
from kubetune.handlers.metrics import OperatorMetrics
from kubetune_components.serving.metrics import serving_metrics

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "manifests" / "grafana" / "kubetune-dashboard.json"

# Suffixes prometheus_client exposes per metric type (a Summary without quantiles has no quantile samples).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def exposed_names(collectors: Iterable[Collector]) -> set[str]:
    names = set()
    for collector in collectors:
        for family in collector.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def operator_names() -> set[str]:
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    return exposed_names([registry])


def gateway_names() -> set[str]:
    return exposed_names([GatewayMetrics(CollectorRegistry()).registry])


def serving_names() -> set[str]:
    metrics = serving_metrics()
    return exposed_names(
        [metrics.requests, metrics.request_duration, metrics.time_to_first_token, metrics.tokens]
    )


EXPORTED = operator_names() | gateway_names() | serving_names()


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, labels or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    found = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w(])(?!\s*\()", text):
        name = match.group(1)
        if name.lower() not in PROMQL_WORDS:
            found.add(name)
    return found


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel target and every templating query."""
    found = [
        (panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert inner is not None, variable["definition"]
            found.append((f"${variable['name']}", inner.group(1)))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, version) (rate(kubetune_x_bucket{deployment="$deployment",'
        ' code=~"5.."}[$__rate_interval]))) / on (version) group_left sum(rate(other_total[5m])) > 0.5'
    )
    assert metric_names(expr) == {"kubetune_x_bucket", "other_total"}
    assert metric_names("absent(up{job='x'} == 1)") == {"up"}


def test_every_collector_of_the_contract_is_found() -> None:
    for name in (
        "kubetune_operator_reconciles_total",
        "kubetune_operator_reconcile_errors_total",
        "kubetune_operator_reconcile_duration_seconds_bucket",
        "kubetune_operator_jobs",
        "kubetune_operator_rollouts",
        "kubetune_gateway_requests_total",
        "kubetune_gateway_feedback_score_count",
        "kubetune_serving_time_to_first_token_seconds_bucket",
    ):
        assert name in EXPORTED


def test_every_dashboard_query_names_exported_metrics(dashboard: dict[str, Any]) -> None:
    found = queries(dashboard)
    assert len(found) >= 20
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= EXPORTED, f"{title}: {sorted(names - EXPORTED)} not exported by the code"


def test_dashboard_covers_operator_jobs_and_every_serving_signal(dashboard: dict[str, Any]) -> None:
    used = {name for _, expr in queries(dashboard) for name in metric_names(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert {
        "kubetune_operator_reconciles",
        "kubetune_operator_reconcile_errors",
        "kubetune_operator_reconcile_duration_seconds",
        "kubetune_operator_jobs",
        "kubetune_operator_rollouts",
        "kubetune_gateway_requests",
        "kubetune_gateway_request_duration_seconds",
        "kubetune_gateway_time_to_first_token_seconds",
        "kubetune_gateway_tokens",
        "kubetune_gateway_feedback_score",
        "kubetune_gateway_cache_hits",
        "kubetune_gateway_cache_misses",
        "kubetune_gateway_fallbacks",
        "kubetune_serving_requests",
        "kubetune_serving_request_duration_seconds",
        "kubetune_serving_time_to_first_token_seconds",
        "kubetune_serving_tokens",
    } <= families


def test_per_version_panels_follow_the_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "deployment", "version"} <= set(variables)
    assert variables["version"]["multi"] is True and variables["version"]["includeAll"] is True
    for title, expr in queries(dashboard):
        if "kubetune_gateway_" in expr or "kubetune_serving_" in expr:
            if title.startswith("$"):
                continue
            assert 'deployment="$deployment"' in expr, title
            versioned = not any(n in expr for n in ("cache_hits", "cache_misses", "fallbacks"))
            if versioned:
                assert 'version=~"$version"' in expr, title


def test_panels_have_unique_ids_and_stay_on_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_chart_alerts_name_exported_metrics() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        rendered = chart.render(values, name="kubetune", namespace="kubetune-system")
    (rule,) = [
        doc
        for name, text in rendered.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "PrometheusRule"
    ]
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            names = metric_names(alert["expr"])
            assert names and names <= EXPORTED | {"up"}, (alert["alert"], names)
