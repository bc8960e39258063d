"""Canary analysis: the queries sent, and how results, missing data and errors are judged."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kubetune.rollout.analysis import analyse, prometheus_duration, render_query, unavailable
from kubetune.rollout.prometheus import PrometheusClient, PrometheusError, Sample
from kubetune_contract.deployment import AnalysisMetric

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakePrometheus:
    """Answers queries from a table (a float, a list of samples, or an exception) and records them."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.queries: list[tuple[str, datetime | None]] = []

    async def query(self, promql: str, at: datetime | None = None) -> list[Sample]:
        self.queries.append((promql, at))
        for key, answer in self.answers.items():
            if key in promql:
                if isinstance(answer, Exception):
                    raise answer
                if isinstance(answer, list):
                    return answer
                return [Sample({}, float(answer))]
        return []


def metric(**fields: Any) -> AnalysisMetric:
    return AnalysisMetric.model_validate(fields)


def test_builtin_queries_are_the_contracts_with_names_and_window_substituted() -> None:
    error_rate = render_query(metric(name="errorRate", max="0.05"), "support-bot", "int8", 60)
    assert error_rate == (
        '(sum(rate(kubetune_gateway_requests_total{deployment="support-bot",version="int8",code=~"5.."}[60s]))'
        " or vector(0)) / "
        'sum(rate(kubetune_gateway_requests_total{deployment="support-bot",version="int8"}[60s]))'
    )
    p95 = render_query(metric(name="p95Latency", max="2"), "d", "v", 30)
    assert p95 == (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(kubetune_gateway_request_duration_seconds_bucket{deployment="d",version="v"}[30s])))'
    )
    ttft = render_query(metric(name="timeToFirstToken", max="1"), "d", "v", 30)
    assert "kubetune_gateway_time_to_first_token_seconds_bucket" in ttft
    feedback = render_query(metric(name="feedback", min="0.5"), "d", "v", 90)
    assert feedback == (
        'sum(rate(kubetune_gateway_feedback_score_sum{deployment="d",version="v"}[90s])) / '
        'sum(rate(kubetune_gateway_feedback_score_count{deployment="d",version="v"}[90s]))'
    )


def test_custom_queries_get_deployment_version_and_window() -> None:
    custom = metric(name="tokens", query='sum(rate(x{d="$deployment",v="$version"}[$window]))', max="3")
    assert render_query(custom, "bot", "canary", 1.5) == 'sum(rate(x{d="bot",v="canary"}[1500ms]))'


@pytest.mark.parametrize(
    ("seconds", "expected"), [(60, "60s"), (5, "5s"), (0.5, "500ms"), (90.25, "90250ms")]
)
def test_prometheus_durations(seconds: float, expected: str) -> None:
    assert prometheus_duration(seconds) == expected


def test_prometheus_durations_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive duration"):
        prometheus_duration(0)


async def test_a_metric_above_max_fails_and_is_named_with_value_and_threshold() -> None:
    client = FakePrometheus({"code=~": 0.25, "request_duration": 0.4})
    metrics = [metric(name="errorRate", max="0.05"), metric(name="p95Latency", max="2")]
    run = await analyse(metrics, client, "bot", "canary", 5, NOW)
    assert not run.passed
    assert (run.metric, run.value, run.threshold) == ("errorRate", 0.25, "0.05")
    assert run.message.startswith("errorRate 0.25 is above max 0.05")
    assert [(r.name, r.value, r.passed) for r in run.results] == [
        ("errorRate", 0.25, False),
        ("p95Latency", 0.4, True),
    ]
    assert run.time == "2026-01-01T12:00:00.000Z"
    assert all(at == NOW for _, at in client.queries)


class BarrierPrometheus:
    """Answers no query before every one of ``expected`` queries has been asked."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.asked: list[str] = []
        self.all_asked = asyncio.Event()

    async def query(self, promql: str, at: datetime | None = None) -> list[Sample]:
        self.asked.append(promql)
        if len(self.asked) == self.expected:
            self.all_asked.set()
        await self.all_asked.wait()
        return [Sample({}, 0.01)]


async def test_the_metrics_of_an_analysis_are_queried_at_the_same_time() -> None:
    metrics = [metric(name="errorRate", max="0.05"), metric(name="p95Latency", max="2")]
    client = BarrierPrometheus(expected=len(metrics))
    run = await asyncio.wait_for(analyse(metrics, client, "bot", "canary", 5, NOW), timeout=5)
    assert run.passed and [r.name for r in run.results] == ["errorRate", "p95Latency"]


async def test_a_metric_below_min_fails() -> None:
    run = await analyse(
        [metric(name="feedback", min="0.5")], FakePrometheus({"feedback": 0.2}), "bot", "c", 60, NOW
    )
    assert (run.passed, run.metric, run.value, run.threshold) == (False, "feedback", 0.2, "0.5")
    assert "feedback 0.2 is below min 0.5" in run.message


async def test_values_within_bounds_pass() -> None:
    run = await analyse(
        [metric(name="errorRate", max="0.05")], FakePrometheus({"code=~": 0.05}), "bot", "c", 60, NOW
    )
    assert run.passed and run.metric is None and run.results[0].passed is True
    assert run.message == "within bounds: errorRate 0.05"


async def test_no_data_nan_errors_and_many_series_are_inconclusive_not_failures() -> None:
    client = FakePrometheus(
        {
            "code=~": math.nan,
            "request_duration": PrometheusError("query 'x': Prometheus answered HTTP 503: unavailable"),
            "many": [Sample({"a": "1"}, 1.0), Sample({"a": "2"}, 2.0)],
        }
    )
    metrics = [
        metric(name="errorRate", max="0.05"),
        metric(name="p95Latency", max="2"),
        metric(name="feedback", min="0.5"),  # the fake has no answer: an empty vector
        metric(name="many", query="many_series", max="1"),
    ]
    run = await analyse(metrics, client, "bot", "c", 60, NOW)
    assert run.passed and run.metric is None
    assert [r.passed for r in run.results] == [None, None, None, None]
    assert [r.value for r in run.results] == [None, None, None, None]
    assert "errorRate: no data (NaN)" in run.message
    assert "HTTP 503" in run.message
    assert "feedback: no data" in run.message
    assert "returned 2 series" in run.message


async def test_an_infinite_value_fails_without_putting_infinity_in_the_status() -> None:
    run = await analyse(
        [metric(name="p95Latency", max="2")], FakePrometheus({"duration": math.inf}), "b", "c", 60, NOW
    )
    assert (run.passed, run.metric, run.value, run.threshold) == (False, "p95Latency", None, "2")
    assert "inf is above max 2" in run.message
    json.dumps(run.to_wire(), allow_nan=False)


def test_unavailable_runs_are_inconclusive_and_say_why() -> None:
    run = unavailable([metric(name="errorRate", max="0.05")], "no Prometheus is configured", NOW)
    assert run.passed and run.results[0].passed is None
    assert run.message.startswith("no Prometheus is configured")


# -- the HTTP client --------------------------------------------------------------------------------


def client_for(handler: Any) -> PrometheusClient:
    return PrometheusClient("http://prometheus:9090/", transport=httpx.MockTransport(handler), timeout_s=2)


async def test_client_posts_the_query_and_reads_a_vector() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {
            "status": "success",
            "data": {"resultType": "vector", "result": [{"metric": {"version": "a"}, "value": [1, "0.125"]}]},
        }
        return httpx.Response(200, json=body)

    async with client_for(handler) as client:
        samples = await client.query("up", at=NOW)
    assert samples == [Sample({"version": "a"}, 0.125)]
    assert seen[0].method == "POST" and seen[0].url.path == "/api/v1/query"
    form = dict(httpx.QueryParams(seen[0].content.decode()))
    assert form == {"query": "up", "time": f"{NOW.timestamp():.3f}"}


async def test_client_reads_scalars_nan_and_empty_vectors() -> None:
    answers = iter(
        [
            {"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}},
            {
                "status": "success",
                "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "NaN"]}]},
            },
            {"status": "success", "data": {"resultType": "vector", "result": []}},
        ]
    )
    client = client_for(lambda request: httpx.Response(200, json=next(answers)))
    assert await client.query("scalar(1)") == [Sample({}, 3.0)]
    assert math.isnan((await client.query("x"))[0].value)
    assert await client.query("y") == []


async def test_client_errors_name_status_and_prometheus_message() -> None:
    body = {"status": "error", "errorType": "bad_data", "error": 'parse error at char 5: unexpected "}"'}
    client = client_for(lambda request: httpx.Response(400, json=body))
    with pytest.raises(PrometheusError, match=r"HTTP 400: bad_data: parse error at char 5") as caught:
        await client.query("sum(}")
    assert caught.value.status == 400 and caught.value.body is not None and "bad_data" in caught.value.body


async def test_client_errors_for_non_json_and_matrix_results() -> None:
    client = client_for(lambda request: httpx.Response(502, text="<html>bad gateway</html>"))
    with pytest.raises(PrometheusError, match=r"HTTP 502: <html>bad gateway</html>"):
        await client.query("up")
    matrix = {"status": "success", "data": {"resultType": "matrix", "result": []}}
    with pytest.raises(PrometheusError, match="'matrix' result"):
        await client_for(lambda request: httpx.Response(200, json=matrix)).query("up[5m]")


async def test_client_timeouts_and_refused_connections_are_clear() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(PrometheusError, match=r"did not answer within 2s"):
        await client_for(slow).query("up")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(PrometheusError, match=r"cannot reach http://prometheus:9090/api/v1/query"):
        await client_for(refused).query("up")


def test_client_refuses_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="must be an absolute http"):
        PrometheusClient("prometheus:9090")


async def test_a_zero_window_is_an_inconclusive_result_not_a_crash() -> None:
    run = await analyse([metric(name="errorRate", max="0.05")], FakePrometheus({}), "bot", "c", 0, NOW)
    assert run.passed and run.results[0].passed is None
    assert "an analysis window must be a positive duration, got 0s" in run.message
