"""kubetune.handlers.metrics: the collectors the handlers feed, on a fresh registry per test."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from kubetune.handlers.metrics import (
    JOB_STATES,
    METRICS_PORT_ENV,
    ROLLOUT_STATES,
    OperatorMetrics,
    port_from_env,
    serve,
)


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics(CollectorRegistry())


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def jobs(metrics: OperatorMetrics, kind: str, state: str) -> float | None:
    return sample(metrics, "kubetune_operator_jobs", kind=kind, state=state)


def test_every_job_and_rollout_state_starts_at_zero(metrics: OperatorMetrics) -> None:
    for kind in ("FineTuneJob", "QuantizeJob"):
        for state in JOB_STATES:
            assert jobs(metrics, kind, state) == 0
    assert ROLLOUT_STATES == ("Progressing", "Paused", "Promoted", "RolledBack")
    for state in ROLLOUT_STATES:
        assert sample(metrics, "kubetune_operator_rollouts", state=state) == 0


def test_jobs_gauge_follows_each_job_through_its_phases(metrics: OperatorMetrics) -> None:
    metrics.observe_job("FineTuneJob", "ns", "a", None)  # no status yet: Pending
    metrics.observe_job("FineTuneJob", "ns", "b", "Running")
    metrics.observe_job("QuantizeJob", "ns", "a", "Running")  # same name, other kind: another job
    assert jobs(metrics, "FineTuneJob", "Pending") == 1
    assert jobs(metrics, "FineTuneJob", "Running") == 1
    assert jobs(metrics, "QuantizeJob", "Running") == 1

    metrics.observe_job("FineTuneJob", "ns", "a", "Running")
    metrics.observe_job("FineTuneJob", "ns", "a", "Running")  # the same phase again counts once
    assert (jobs(metrics, "FineTuneJob", "Pending"), jobs(metrics, "FineTuneJob", "Running")) == (0, 2)

    metrics.observe_job("FineTuneJob", "ns", "a", "Succeeded")
    metrics.observe_job("FineTuneJob", "ns", "b", "Failed")
    assert jobs(metrics, "FineTuneJob", "Running") == 0
    assert (jobs(metrics, "FineTuneJob", "Succeeded"), jobs(metrics, "FineTuneJob", "Failed")) == (1, 1)

    metrics.forget_job("FineTuneJob", "ns", "a")
    metrics.forget_job("FineTuneJob", "ns", "a")  # deleting twice does not go negative
    metrics.forget_job("FineTuneJob", "other", "never-seen")
    assert jobs(metrics, "FineTuneJob", "Succeeded") == 0
    assert metrics.jobs.counts() == {("FineTuneJob", "Failed"): 1, ("QuantizeJob", "Running"): 1}


def test_rollouts_gauge(metrics: OperatorMetrics) -> None:
    metrics.observe_rollout("ns", "bot", "Progressing")
    metrics.observe_rollout("ns", "other", "Progressing")
    metrics.observe_rollout("ns", "bot", "RolledBack")
    assert sample(metrics, "kubetune_operator_rollouts", state="Progressing") == 1
    assert sample(metrics, "kubetune_operator_rollouts", state="RolledBack") == 1
    metrics.observe_rollout("ns", "bot", None)  # rollout finished or deployment deleted
    assert sample(metrics, "kubetune_operator_rollouts", state="RolledBack") == 0


def test_reconcile_counts_times_and_classifies_errors(metrics: OperatorMetrics) -> None:
    with metrics.reconcile("FineTuneJob"):
        pass
    with pytest.raises(ConnectionError), metrics.reconcile("FineTuneJob"):
        raise ConnectionError("api server away")
    assert sample(metrics, "kubetune_operator_reconciles_total", kind="FineTuneJob", result="success") == 1
    assert sample(metrics, "kubetune_operator_reconciles_total", kind="FineTuneJob", result="error") == 1
    assert (
        sample(
            metrics, "kubetune_operator_reconcile_errors_total", kind="FineTuneJob", reason="ConnectionError"
        )
        == 1
    )
    assert sample(metrics, "kubetune_operator_reconcile_duration_seconds_count", kind="FineTuneJob") == 2


def test_port_from_env() -> None:
    assert port_from_env({}) == 9090
    assert port_from_env({}, default=0) == 0
    assert port_from_env({METRICS_PORT_ENV: "0"}) == 0
    assert port_from_env({METRICS_PORT_ENV: " 9191 "}) == 9191
    with pytest.raises(ValueError, match="KUBETUNE_METRICS_PORT must be a port number"):
        port_from_env({METRICS_PORT_ENV: "metrics"})
    with pytest.raises(ValueError, match="KUBETUNE_METRICS_PORT must be between 0 and 65535"):
        port_from_env({METRICS_PORT_ENV: "70000"})


def test_serve_exposes_the_registry_until_stopped(metrics: OperatorMetrics) -> None:
    metrics.observe_job("FineTuneJob", "ns", "a", "Running")
    server = serve(0, "127.0.0.1", metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert 'kubetune_operator_jobs{kind="FineTuneJob",state="Running"} 1.0' in text
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=1)


# What `kubetune operator` watches and the metrics port it serves are observed on the running
# process in tests/integration/test_operator_cli.py.


def test_only_exact_namespace_names_disable_scanning() -> None:
    from kubetune.handlers.main import exact_namespaces

    assert exact_namespaces(["team-a", "team-b"]) is True
    assert exact_namespaces(["team-*"]) is False
    assert exact_namespaces([]) is False
