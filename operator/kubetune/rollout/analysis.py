"""Analysis of a canary: query its metrics in Prometheus and hold each to its bounds.

A metric fails when its value is below ``min`` or above ``max``. No data (an empty result, NaN such
as 0/0 when the canary had no requests) and a query that failed are inconclusive: recorded, never a
failure. The built-in queries are part of the ModelDeployment contract (the gateway's series).
The metrics of one analysis are queried concurrently.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol

from kubetune.common.clock import format_time
from kubetune.rollout.prometheus import PrometheusError, Sample
from kubetune_contract.deployment import AnalysisMetric, AnalysisRun, MetricResult

_SELECTOR = 'deployment="$deployment",version="$version"'

BUILTIN_QUERIES: dict[str, str] = {
    "errorRate": (
        # `or vector(0)`: a canary with no 5xx has no such series; that is a 0 rate, not "no data".
        f'(sum(rate(kubetune_gateway_requests_total{{{_SELECTOR},code=~"5.."}}[$window])) or vector(0)) / '
        f"sum(rate(kubetune_gateway_requests_total{{{_SELECTOR}}}[$window]))"
    ),
    "p95Latency": (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(kubetune_gateway_request_duration_seconds_bucket{{{_SELECTOR}}}[$window])))"
    ),
    "timeToFirstToken": (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(kubetune_gateway_time_to_first_token_seconds_bucket{{{_SELECTOR}}}[$window])))"
    ),
    "feedback": (
        f"sum(rate(kubetune_gateway_feedback_score_sum{{{_SELECTOR}}}[$window])) / "
        f"sum(rate(kubetune_gateway_feedback_score_count{{{_SELECTOR}}}[$window]))"
    ),
}


class QueryClient(Protocol):
    """What the analysis needs of Prometheus (``PrometheusClient`` is one)."""

    async def query(self, promql: str, at: datetime | None = None) -> list[Sample]: ...


def prometheus_duration(seconds: float) -> str:
    """A range for PromQL: whole seconds as ``30s``, anything finer in milliseconds (``1500ms``)."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"an analysis window must be a positive duration, got {seconds}s")
    milliseconds = round(seconds * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def render_query(metric: AnalysisMetric, deployment: str, version: str, window_s: float) -> str:
    """The metric's PromQL (its own query, or the built-in) with $deployment, $version, $window set."""
    template = metric.query if metric.query is not None else BUILTIN_QUERIES[metric.name]
    return (
        template.replace("$deployment", deployment)
        .replace("$version", version)
        .replace("$window", prometheus_duration(window_s))
    )


def _show(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class _Outcome:
    result: MetricResult
    verdict: Literal["passed", "failed", "inconclusive"]
    note: str  # what to say about this metric in the run's message
    threshold: str | None = None  # the bound it crossed, when it failed
    value: float | None = None  # its value for the record, also when not finite


def _judge(metric: AnalysisMetric, samples: list[Sample]) -> _Outcome:
    def inconclusive(why: str) -> _Outcome:
        result = MetricResult(name=metric.name, value=None, min=metric.min, max=metric.max, passed=None)
        return _Outcome(result, "inconclusive", f"{metric.name}: {why}")

    if not samples:
        return inconclusive("no data")
    if len(samples) > 1:
        return inconclusive(f"the query returned {len(samples)} series; it must return one (aggregate it)")
    value = samples[0].value
    if math.isnan(value):
        return inconclusive("no data (NaN)")
    recorded = value if math.isfinite(value) else None  # Kubernetes JSON has no Infinity
    if metric.min is not None and value < float(Decimal(metric.min)):
        result = MetricResult(name=metric.name, value=recorded, min=metric.min, max=metric.max, passed=False)
        note = f"{metric.name} {_show(value)} is below min {metric.min}"
        return _Outcome(result, "failed", note, threshold=metric.min, value=recorded)
    if metric.max is not None and value > float(Decimal(metric.max)):
        result = MetricResult(name=metric.name, value=recorded, min=metric.min, max=metric.max, passed=False)
        note = f"{metric.name} {_show(value)} is above max {metric.max}"
        return _Outcome(result, "failed", note, threshold=metric.max, value=recorded)
    result = MetricResult(name=metric.name, value=recorded, min=metric.min, max=metric.max, passed=True)
    return _Outcome(result, "passed", f"{metric.name} {_show(value)}", value=recorded)


def _run(outcomes: Sequence[_Outcome], now: datetime, preamble: str = "") -> AnalysisRun:
    failed = [outcome for outcome in outcomes if outcome.verdict == "failed"]
    passed = [outcome.note for outcome in outcomes if outcome.verdict == "passed"]
    unsure = [outcome.note for outcome in outcomes if outcome.verdict == "inconclusive"]
    parts = [preamble] if preamble else []
    if failed:
        parts.append("; ".join(outcome.note for outcome in failed))
    elif passed:
        parts.append(f"within bounds: {', '.join(passed)}")
    if unsure:
        parts.append(f"inconclusive: {'; '.join(unsure)}")
    first = failed[0] if failed else None
    return AnalysisRun(
        time=format_time(now),
        passed=not failed,
        metric=first.result.name if first else None,
        value=first.value if first else None,
        threshold=first.threshold if first else None,
        message="; ".join(parts) if parts else "no metrics to analyse",
        results=[outcome.result for outcome in outcomes],
    )


async def _measure(
    metric: AnalysisMetric, client: QueryClient, deployment: str, version: str, window_s: float, now: datetime
) -> _Outcome:
    try:
        query = render_query(metric, deployment, version, window_s)
        samples = await client.query(query, at=now)
    except (PrometheusError, ValueError) as exc:  # ValueError: a window of 0s
        result = MetricResult(name=metric.name, value=None, min=metric.min, max=metric.max, passed=None)
        return _Outcome(result, "inconclusive", f"{metric.name}: {exc}")
    return _judge(metric, samples)


async def analyse(
    metrics: Sequence[AnalysisMetric],
    client: QueryClient,
    deployment: str,
    version: str,
    window_s: float,
    now: datetime,
) -> AnalysisRun:
    """Query every metric of ``version`` of ``deployment`` over the last ``window_s`` seconds at ``now``."""
    outcomes = await asyncio.gather(
        *(_measure(metric, client, deployment, version, window_s, now) for metric in metrics)
    )
    return _run(outcomes, now)


def unavailable(metrics: Sequence[AnalysisMetric], why: str, now: datetime) -> AnalysisRun:
    """An inconclusive run for when metrics cannot be queried at all (e.g. no Prometheus configured)."""
    outcomes = [
        _Outcome(
            MetricResult(name=metric.name, value=None, min=metric.min, max=metric.max, passed=None),
            "inconclusive",
            f"{metric.name}: not checked",
        )
        for metric in metrics
    ]
    return _run(outcomes, now, preamble=why)
