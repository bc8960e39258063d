"""The gateway's Prometheus series (names and labels are a contract: dashboards and rollout
analysis query them).

Each app owns a CollectorRegistry, so several gateways (tests) can live in one process.
``requests_total`` counts one sample per upstream attempt, labelled with the upstream's status code,
or 502 / 504 when the attempt failed / timed out; a cache hit counts as a 200 of the version that
produced the entry (``cache_hits_total`` tells hits apart). ``endpoint`` is the request path
(``/v1/chat/completions`` or ``/v1/completions``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram, Summary)

OPEN_REQUESTS_METRIC = "kubetune_gateway_open_requests"
"""Per version: requests the gateway holds (the version is scaling up from zero) or has sent and not
yet answered. KEDA scales a version with minReplicas 0 on it (kubetune.kube.children)."""
HELD_REQUESTS_METRIC = "kubetune_gateway_held_requests_total"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kubetune_gateway_requests_total",
            "Upstream attempts by version, endpoint and HTTP status (502/504: failed/timed out).",
            ["deployment", "version", "endpoint", "code"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "kubetune_gateway_request_duration_seconds",
            "Duration of an upstream attempt, to the last byte of the response.",
            ["deployment", "version", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "kubetune_gateway_time_to_first_token_seconds",
            "Time to the first generated text (the whole response when not streaming).",
            ["deployment", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "kubetune_gateway_tokens_total",
            "Tokens reported in upstream usage, direction in (prompt) or out (completion).",
            ["deployment", "version", "direction"],
            registry=self.registry,
        )
        self.feedback_score = Summary(
            "kubetune_gateway_feedback_score",
            "Feedback scores (0 to 1) posted to /v1/feedback for a version's responses.",
            ["deployment", "version"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "kubetune_gateway_cache_hits_total",
            "Deterministic requests answered from the response cache.",
            ["deployment"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "kubetune_gateway_cache_misses_total",
            "Deterministic requests the response cache could not answer.",
            ["deployment"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "kubetune_gateway_fallbacks_total",
            "Requests sent to the fallback version because the chosen version failed or was not ready.",
            ["deployment", "from_version", "to_version"],
            registry=self.registry,
        )
        self.connect_retries = Counter(
            "kubetune_gateway_connect_retries_total",
            "Requests re-sent to another version because the chosen one could not be connected to.",
            ["deployment", "from_version", "to_version"],
            registry=self.registry,
        )
        self.constitution_critiques = Counter(
            "kubetune_gateway_constitution_critiques_total",
            "Answers critiqued against a prompt's constitution, by verdict (complies, violates).",
            ["deployment", "version", "verdict"],
            registry=self.registry,
        )
        self.constitution_revisions = Counter(
            "kubetune_gateway_constitution_revisions_total",
            "Answers rewritten because the critique found them violating the principle.",
            ["deployment", "version", "principle"],
            registry=self.registry,
        )
        usage_labels = ["deployment", "version", "key", "tenant"]
        self.usage_requests = Counter(
            "kubetune_gateway_usage_requests_total",
            "Requests by key id, tenant, version and decision (served, unauthenticated, forbidden, "
            "limited, limit-store-unavailable, rejected, failed).",
            [*usage_labels, "decision"],
            registry=self.registry,
        )
        self.usage_tokens = Counter(
            "kubetune_gateway_usage_tokens_total",
            "Tokens served by key id, tenant and version, direction in (prompt) or out (completion).",
            [*usage_labels, "direction"],
            registry=self.registry,
        )
        self.usage_cost = Counter(
            "kubetune_gateway_usage_cost_total",
            "Cost of the tokens served (the version's pricing) by key id, tenant and version.",
            usage_labels,
            registry=self.registry,
        )
        self.limit_store_up = Gauge(
            "kubetune_gateway_limit_store_up",
            "1 when the last call to the limit store (Redis) succeeded, 0 when it failed.",
            ["deployment"],
            registry=self.registry,
        )
        self.limit_store_failures = Counter(
            "kubetune_gateway_limit_store_failures_total",
            "Limit store calls that failed, by what the gateway did: failClosed (refused), failOpen "
            "(served unlimited), uncharged (an answer's tokens not counted).",
            ["deployment", "behaviour"],
            registry=self.registry,
        )
        self.guard_decisions = Counter(
            "kubetune_gateway_guard_decisions_total",
            "Guard decisions (spec.guardrails) by guard and action: pass, flag, block, redact; stage "
            "input (user messages, tool results) or output (the answer).",
            ["deployment", "guard", "action", "stage"],
            registry=self.registry,
        )

        self.open_requests = Gauge(
            OPEN_REQUESTS_METRIC,
            "Requests for a version that the gateway holds while it scales up from zero, or has sent "
            "and not yet answered.",
            ["deployment", "version"],
            registry=self.registry,
        )
        self.held_requests = Counter(
            HELD_REQUESTS_METRIC.removesuffix("_total"),
            "Requests held for a version scaling up from zero, by outcome: ready (sent once it was), "
            "timeout (503 after holdTimeout), full (503 at once: maxHeldRequests were held), "
            "cancelled (the client left).",
            ["deployment", "version", "outcome"],
            registry=self.registry,
        )

        # labels() takes a lock and builds a key on every call; the hot path looks children up here.
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: MetricT, *labels: str) -> MetricT:
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[no-any-return]

    @contextmanager
    def open_request(self, deployment: str, version: str) -> Iterator[None]:
        """Count a request sent to ``version`` in the open-requests gauge until it is answered (a
        stream: until its answer starts)."""
        gauge = self.child(self.open_requests, deployment, version)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def record_attempt(self, deployment: str, version: str, endpoint: str, code: int, seconds: float) -> None:
        self.child(self.requests, deployment, version, endpoint, str(code)).inc()
        self.child(self.request_duration, deployment, version, endpoint).observe(seconds)

    def record_usage(self, deployment: str, version: str, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        for field, direction in (("prompt_tokens", "in"), ("completion_tokens", "out")):
            count = usage.get(field)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self.child(self.tokens, deployment, version, direction).inc(count)
