"""Operator metrics for Prometheus: reconciles, errors, latency, jobs by state and rollouts by state.

Names and labels are fixed by the ModelDeployment contract (the Grafana dashboard and its test rely on
them). Handlers time each reconcile with ``METRICS.reconcile(kind)`` and report the state of every
object they see with ``METRICS.observe_job`` / ``METRICS.observe_rollout``; ``serve`` exposes
``REGISTRY`` over HTTP on the port the Helm chart's Service targets (``KUBETUNE_METRICS_PORT``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from kubetune_contract.deployment import RolloutStatus

METRICS_PORT_ENV: Final = "KUBETUNE_METRICS_PORT"
DEFAULT_METRICS_PORT: Final = 9090
JOB_KINDS: Final = ("FineTuneJob", "QuantizeJob")
# status.phase of a job; a job the operator has not written a status for yet counts as Pending.
JOB_STATES: Final = ("Pending", "Running", "Succeeded", "Failed")
ROLLOUT_STATES: Final[tuple[str, ...]] = get_args(RolloutStatus.model_fields["state"].annotation)
# Reconciles range from a status patch (milliseconds) to a pipeline submission (seconds).
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StateGauge:
    """How many objects are in each state, as a gauge: objects are keyed, so a move is one dec + one inc.

    Every label combination in ``initial`` is published at 0 from the start, so dashboards show a
    flat line rather than no data for states nobody is in yet.
    """

    def __init__(self, gauge: Gauge, initial: Iterable[tuple[str, ...]] = ()) -> None:
        self._gauge = gauge
        self._current: dict[Hashable, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        for labels in initial:
            gauge.labels(*labels).set(0)

    def observe(self, key: Hashable, labels: tuple[str, ...] | None) -> None:
        """Record that the object `key` now has `labels` (``None``: it is gone)."""
        with self._lock:
            previous = self._current.pop(key, None)
            if labels is not None:
                self._current[key] = labels
            if previous == labels:
                return
            if previous is not None:
                self._gauge.labels(*previous).dec()
            if labels is not None:
                self._gauge.labels(*labels).inc()

    def counts(self) -> dict[tuple[str, ...], int]:
        """The number of objects per label combination (only combinations someone is in)."""
        with self._lock:
            counts: dict[tuple[str, ...], int] = {}
            for labels in self._current.values():
                counts[labels] = counts.get(labels, 0) + 1
            return counts


class OperatorMetrics:
    """The operator's collectors, all registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "kubetune_operator_reconciles",
            "Reconcile passes, by kind of resource and result (success or error).",
            ["kind", "result"],
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors",
            "Reconcile passes that raised, by kind of resource and reason (the exception's type).",
            ["kind", "reason"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "kubetune_operator_reconcile_duration_seconds",
            "Time one reconcile pass took, by kind of resource.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        jobs = Gauge(
            "kubetune_operator_jobs",
            "Jobs the operator sees, by kind and state (status.phase).",
            ["kind", "state"],
            registry=registry,
        )
        rollouts = Gauge(
            "kubetune_operator_rollouts",
            "ModelDeployment rollouts, by state (status.rollout.state).",
            ["state"],
            registry=registry,
        )
        self.jobs = StateGauge(jobs, [(kind, state) for kind in JOB_KINDS for state in JOB_STATES])
        self.rollouts = StateGauge(rollouts, [(state,) for state in ROLLOUT_STATES])

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Count and time one reconcile pass of a `kind` resource; an exception counts as an error."""
        started = time.perf_counter()
        try:
            yield
        except BaseException as error:
            self.reconciles.labels(kind, "error").inc()
            self.reconcile_errors.labels(kind, type(error).__name__).inc()
            raise
        else:
            self.reconciles.labels(kind, "success").inc()
        finally:
            self.reconcile_duration.labels(kind).observe(time.perf_counter() - started)

    def observe_job(self, kind: str, namespace: str | None, name: str, phase: str | None) -> None:
        """A job's current phase (``None`` or empty: not reported yet, counted as Pending)."""
        self.jobs.observe((kind, namespace, name), (kind, phase or "Pending"))

    def forget_job(self, kind: str, namespace: str | None, name: str) -> None:
        self.jobs.observe((kind, namespace, name), None)

    def observe_rollout(self, namespace: str | None, name: str, state: str | None) -> None:
        """A ModelDeployment's rollout state (``None``: no rollout in progress or it was deleted)."""
        self.rollouts.observe((namespace, name), (state,) if state else None)


def _default_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    # Process (CPU, memory, open files) and Python runtime metrics of the operator pod.
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    return registry


REGISTRY: Final = _default_registry()
METRICS: Final = OperatorMetrics(REGISTRY)


def port_from_env(env: Mapping[str, str], default: int = DEFAULT_METRICS_PORT) -> int:
    """The metrics port from ``KUBETUNE_METRICS_PORT`` (0 disables the endpoint)."""
    raw = env.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(
            f"{METRICS_PORT_ENV} must be a port number (0 disables metrics), not {raw!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{METRICS_PORT_ENV} must be between 0 and 65535, not {port}")
    return port


@dataclass
class MetricsServer:
    """The HTTP endpoint serving ``/metrics`` from a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(port: int, address: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve `registry` on http://<address>:<port>/metrics until :meth:`MetricsServer.stop`."""
    server, thread = start_http_server(port, addr=address, registry=registry)
    return MetricsServer(server, thread)
