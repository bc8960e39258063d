"""Per-version experiment statistics and the significance tests behind ``GET /v1/experiments``.

Counted per upstream attempt, like ``kubetune_gateway_requests_total`` (a cache hit counts as a
success of the version that produced the entry). With Redis configured (``access.store.redisUrl``)
the statistics live there, one hash and one latency list per version, so every replica reports the
same numbers; otherwise they live in the gateway process since it started. Prometheus holds the
durable series either way. A request is recorded in Redis after its answer, off the request path.

The tests compare each version against the control version, both two-sided and both from
``scipy.stats``: Welch's t-test (unequal variances) on feedback scores, from the running summary
statistics (``ttest_ind_from_stats``), and a pooled two-proportion z-test on error rates (``norm``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from scipy import stats

from kubetune.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

LATENCY_WINDOW = 10_000  # recent attempts per version kept for the latency percentiles


class ExperimentsUnavailable(RuntimeError):
    """The shared statistics (Redis) could not be read."""


def normal_two_sided_p(z: float) -> float:
    return float(2.0 * stats.norm.sf(abs(z)))


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (Welford), enough for a t-test."""

    count: int = 0
    mean: float = 0.0
    squared_deviations: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.squared_deviations += delta * (value - self.mean)

    @classmethod
    def from_sums(cls, count: int, total: float, total_of_squares: float) -> RunningMoments:
        if count == 0:
            return cls()
        mean = total / count
        return cls(count, mean, max(0.0, total_of_squares - total * total / count))

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator)."""
        return self.squared_deviations / (self.count - 1) if self.count > 1 else 0.0


def welch_t_test(treatment: RunningMoments, control: RunningMoments) -> dict[str, Any]:
    result: dict[str, Any] = {
        "test": "welch-t",
        "difference": treatment.mean - control.mean if treatment.count and control.count else None,
        "t": None,
        "degreesOfFreedom": None,
        "pValue": None,
        "note": None,
    }
    if treatment.count < 2 or control.count < 2:
        result["note"] = "needs at least 2 feedback scores for each version"
        return result
    treatment_term = treatment.variance / treatment.count
    control_term = control.variance / control.count
    squared_error = treatment_term + control_term
    if squared_error == 0.0:
        if treatment.mean == control.mean:
            result.update(t=0.0, pValue=1.0, note="no variance in either version; the means are equal")
        else:
            result["note"] = "no variance in either version; the test is undefined"
        return result
    tested = stats.ttest_ind_from_stats(
        treatment.mean,
        math.sqrt(treatment.variance),
        treatment.count,
        control.mean,
        math.sqrt(control.variance),
        control.count,
        equal_var=False,
    )
    # Welch-Satterthwaite: scipy uses the same degrees of freedom but does not return them
    degrees_of_freedom = squared_error**2 / (
        treatment_term**2 / (treatment.count - 1) + control_term**2 / (control.count - 1)
    )
    result.update(t=float(tested.statistic), degreesOfFreedom=degrees_of_freedom, pValue=float(tested.pvalue))
    return result


def two_proportion_z_test(
    treatment_errors: int, treatment_total: int, control_errors: int, control_total: int
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "test": "two-proportion-z",
        "difference": None,
        "z": None,
        "pValue": None,
        "note": None,
    }
    if treatment_total == 0 or control_total == 0:
        result["note"] = "needs at least 1 request for each version"
        return result
    treatment_rate = treatment_errors / treatment_total
    control_rate = control_errors / control_total
    pooled = (treatment_errors + control_errors) / (treatment_total + control_total)
    standard_error = math.sqrt(pooled * (1.0 - pooled) * (1.0 / treatment_total + 1.0 / control_total))
    result["difference"] = treatment_rate - control_rate
    if standard_error == 0.0:
        # pooled is 0 or 1: both versions have the same rate (all successes or all errors).
        result.update(z=0.0, pValue=1.0)
        return result
    z = (treatment_rate - control_rate) / standard_error
    result.update(z=z, pValue=normal_two_sided_p(z))
    return result


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass
class VersionStats:
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    feedback: RunningMoments = field(default_factory=RunningMoments)


@dataclass(frozen=True)
class SharedStatistics:
    """Where the replicas of one deployment keep their experiment statistics in Redis."""

    client: aioredis.Redis
    prefix: str  # e.g. kubetune:default/support-router

    def counters(self, version: str) -> str:
        return f"{self.prefix}:experiment:{version}"

    def latencies(self, version: str) -> str:
        return f"{self.prefix}:experiment:{version}:latencies"


class ExperimentTracker:
    """Accumulates per-version outcomes and reports them with tests against the control version."""

    def __init__(self, shared: SharedStatistics | None = None) -> None:
        self._stats: dict[str, VersionStats] = {}
        self.shared = shared
        self._pending: set[asyncio.Task[None]] = set()

    def _for(self, version: str) -> VersionStats:
        stats = self._stats.get(version)
        if stats is None:
            stats = self._stats[version] = VersionStats()
        return stats

    def record_request(self, version: str, duration_seconds: float, *, error: bool) -> None:
        if self.shared is not None:
            task = asyncio.get_running_loop().create_task(
                self._share_request(self.shared, version, duration_seconds, error)
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        stats = self._for(version)
        stats.requests += 1
        stats.errors += int(error)
        stats.latencies.append(duration_seconds)

    async def _share_request(
        self, shared: SharedStatistics, version: str, duration_seconds: float, error: bool
    ) -> None:
        try:
            async with shared.client.pipeline(transaction=True) as pipe:
                pipe.hincrby(shared.counters(version), "requests", 1)
                pipe.hincrby(shared.counters(version), "errors", int(error))
                pipe.lpush(shared.latencies(version), repr(duration_seconds))
                pipe.ltrim(shared.latencies(version), 0, LATENCY_WINDOW - 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("experiment statistics of %s not recorded in Redis: %s", version, exc)

    async def record_feedback(self, version: str, score: float) -> None:
        if self.shared is None:
            self._for(version).feedback.add(score)
            return
        try:
            async with self.shared.client.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.shared.counters(version), "feedbackCount", 1)
                pipe.hincrbyfloat(self.shared.counters(version), "feedbackSum", score)
                pipe.hincrbyfloat(self.shared.counters(version), "feedbackSumOfSquares", score * score)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ExperimentsUnavailable(f"the feedback cannot be stored in Redis: {exc}") from exc

    async def _load_shared(self, shared: SharedStatistics, names: list[str]) -> dict[str, VersionStats]:
        async with shared.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(shared.counters(name))
                pipe.lrange(shared.latencies(name), 0, -1)
            replies = await pipe.execute()
        loaded: dict[str, VersionStats] = {}
        for index, name in enumerate(names):
            counters = {key.decode(): float(value) for key, value in replies[2 * index].items()}
            latencies = deque((float(value) for value in replies[2 * index + 1]), maxlen=LATENCY_WINDOW)
            loaded[name] = VersionStats(
                requests=int(counters.get("requests", 0)),
                errors=int(counters.get("errors", 0)),
                latencies=latencies,
                feedback=RunningMoments.from_sums(
                    int(counters.get("feedbackCount", 0)),
                    counters.get("feedbackSum", 0.0),
                    counters.get("feedbackSumOfSquares", 0.0),
                ),
            )
        return loaded

    async def report(self, config: GatewayConfig) -> dict[str, Any]:
        control_name = config.control_version
        names = [version.name for version in config.versions]
        if self.shared is not None:
            try:
                self._stats = await self._load_shared(self.shared, names)
            except (RedisError, OSError) as exc:
                raise ExperimentsUnavailable(
                    f"the shared experiment statistics cannot be read: {exc}"
                ) from exc
        control = self._for(control_name)
        versions = []
        for version in config.versions:
            stats = self._for(version.name)
            latencies = list(stats.latencies)
            entry: dict[str, Any] = {
                "name": version.name,
                "weight": version.weight,
                "requests": stats.requests,
                "errors": stats.errors,
                "errorRate": stats.errors / stats.requests if stats.requests else None,
                "latencyP50Seconds": percentile(latencies, 0.50),
                "latencyP95Seconds": percentile(latencies, 0.95),
                "meanFeedback": stats.feedback.mean if stats.feedback.count else None,
                "feedbackCount": stats.feedback.count,
                "comparison": None,
            }
            if version.name != control_name:
                entry["comparison"] = {
                    "against": control_name,
                    "feedback": welch_t_test(stats.feedback, control.feedback),
                    "errorRate": two_proportion_z_test(
                        stats.errors, stats.requests, control.errors, control.requests
                    ),
                }
            versions.append(entry)
        return {
            "deployment": config.deployment,
            "namespace": config.namespace,
            "control": control_name,
            "versions": versions,
        }
