"""A small client of the Prometheus HTTP API: instant queries (``/api/v1/query``), nothing more.

Every failure is a :class:`PrometheusError` naming the query and what went wrong (the HTTP status and
Prometheus's own error text, a timeout, a refused connection), so the rollout analysis can record it.

The client is asynchronous (httpx.AsyncClient): the operator awaits its queries on Kopf's event loop.
Its connections belong to the event loop that first uses it, so use and close it on that one loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

MAX_BODY_IN_ERROR = 500


class PrometheusError(RuntimeError):
    """A query could not be answered. ``status`` is the HTTP status when there was a response."""

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or the value of a scalar, with no labels)."""

    labels: dict[str, str] = field(default_factory=dict)
    value: float = math.nan


def _value(pair: Any, query: str) -> float:
    if not isinstance(pair, list) or len(pair) != 2:
        raise PrometheusError(f"query {query!r}: expected a [time, value] pair, got {pair!r}")
    try:
        return float(pair[1])  # "NaN", "+Inf" and "-Inf" parse too
    except (TypeError, ValueError) as exc:
        raise PrometheusError(f"query {query!r}: {pair[1]!r} is not a sample value") from exc


def parse_query_response(payload: Any, query: str) -> list[Sample]:
    """The samples of a ``/api/v1/query`` JSON response (vector or scalar)."""
    if not isinstance(payload, dict) or payload.get("status") != "success":
        error = payload.get("error") if isinstance(payload, dict) else None
        error_type = payload.get("errorType") if isinstance(payload, dict) else None
        raise PrometheusError(f"query {query!r} failed: {error_type or 'error'}: {error or payload!r}")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise PrometheusError(f"query {query!r}: the response has no data object")
    result_type, result = data.get("resultType"), data.get("result")
    if result_type == "vector" and isinstance(result, list):
        samples = []
        for item in result:
            if not isinstance(item, dict):
                raise PrometheusError(f"query {query!r}: unexpected vector element {item!r}")
            labels = item.get("metric") or {}
            samples.append(
                Sample({str(k): str(v) for k, v in labels.items()}, _value(item.get("value"), query))
            )
        return samples
    if result_type == "scalar":
        return [Sample({}, _value(result, query))]
    raise PrometheusError(
        f"query {query!r} returned a {result_type!r} result; analysis needs an instant vector or a scalar"
    )


def checked_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash; ValueError unless it is an absolute http(s) URL."""
    url = httpx.URL(base_url)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"Prometheus URL {base_url!r} must be an absolute http:// or https:// URL")
    return base_url.rstrip("/")


class PrometheusClient:
    """Instant queries against one Prometheus server (``base_url`` such as ``http://prometheus:9090``).

    Close it with :meth:`aclose` (or ``async with``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = checked_base_url(base_url)
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout_s, headers=dict(headers or {}), transport=transport
        )

    async def query(self, promql: str, at: datetime | None = None) -> list[Sample]:
        """Evaluate ``promql`` at ``at`` (default: Prometheus's now). Sent as a form POST, so long
        queries do not run into URL length limits."""
        form = {"query": promql}
        if at is not None:
            form["time"] = f"{at.timestamp():.3f}"
        where = f"{self.base_url}/api/v1/query"
        try:
            response = await self._http.post("/api/v1/query", data=form)
        except httpx.TimeoutException as exc:
            raise PrometheusError(
                f"query {promql!r}: {where} did not answer within {self.timeout_s:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise PrometheusError(f"query {promql!r}: cannot reach {where}: {exc}") from exc
        body = response.text
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 200:
            detail = (
                f"{payload.get('errorType')}: {payload.get('error')}"
                if isinstance(payload, dict) and payload.get("error")
                else body[:MAX_BODY_IN_ERROR]
            )
            raise PrometheusError(
                f"query {promql!r}: {where} answered HTTP {response.status_code}: {detail}",
                status=response.status_code,
                body=body,
            )
        if payload is None:
            raise PrometheusError(
                f"query {promql!r}: {where} answered with something that is not JSON: "
                f"{body[:MAX_BODY_IN_ERROR]}",
                status=response.status_code,
                body=body,
            )
        return parse_query_response(payload, promql)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
