"""The serving runtime's Prometheus metrics (names fixed by the ModelDeployment contract).

They live in prometheus_client's default registry, which BentoML's /metrics exposes: in a
`bentoml serve` worker PROMETHEUS_MULTIPROC_DIR is set before the worker starts, so the values
go to the multiprocess files that BentoML collects. They are created on first use, never at import,
so that a module imported before that variable is set does not fix the single-process mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

REQUESTS = "kubetune_serving_requests"
"""Exposed as kubetune_serving_requests_total (prometheus_client adds _total to counters)."""
REQUEST_DURATION = "kubetune_serving_request_duration_seconds"
TIME_TO_FIRST_TOKEN = "kubetune_serving_time_to_first_token_seconds"
TOKENS = "kubetune_serving_tokens"
"""Exposed as kubetune_serving_tokens_total."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class ServingMetrics:
    requests: Any
    request_duration: Any
    time_to_first_token: Any
    tokens: Any

    def observe_request(
        self, deployment: str, version: str, endpoint: str, code: int, duration_s: float
    ) -> None:
        self.requests.labels(deployment=deployment, version=version, endpoint=endpoint, code=str(code)).inc()
        self.request_duration.labels(deployment=deployment, version=version, endpoint=endpoint).observe(
            duration_s
        )

    def observe_first_token(self, deployment: str, version: str, seconds: float) -> None:
        self.time_to_first_token.labels(deployment=deployment, version=version).observe(seconds)

    def count_tokens(self, deployment: str, version: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(deployment=deployment, version=version, direction="in").inc(prompt_tokens)
        self.tokens.labels(deployment=deployment, version=version, direction="out").inc(completion_tokens)


@functools.cache
def serving_metrics() -> ServingMetrics:
    """The process's metrics, registered once in prometheus_client's default registry."""
    from prometheus_client import Counter, Histogram

    return ServingMetrics(
        requests=Counter(
            REQUESTS,
            "Requests served by the model server, by endpoint and HTTP status code.",
            ["deployment", "version", "endpoint", "code"],
        ),
        request_duration=Histogram(
            REQUEST_DURATION,
            "Seconds from receiving a request to the end of its response (streams included).",
            ["deployment", "version", "endpoint"],
            buckets=LATENCY_BUCKETS,
        ),
        time_to_first_token=Histogram(
            TIME_TO_FIRST_TOKEN,
            "Seconds from receiving a generation request to its first generated token.",
            ["deployment", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        tokens=Counter(
            TOKENS,
            "Prompt (direction=in) and generated (direction=out) tokens.",
            ["deployment", "version", "direction"],
        ),
    )
