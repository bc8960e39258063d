"""The running operator serves Prometheus metrics: reconciles counted and jobs by state, scraped over HTTP.

The operator is the real one (kubetune.handlers.jobs) with the memo `kubetune operator` gives it
(metrics_port/metrics_address), against kmock's emulator, running a FineTuneJob on the local executor
with the fast stand-in steps of tests/integration/fake_steps.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgi_server import free_port
from kubetune.config import OperatorConfig
from kubetune.reconcile.jobs import Backends

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")

HANDLERS = "kubetune.handlers.jobs"
FAKE_STEPS = Path(__file__).parent / "fake_steps"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]))
    return OperatorConfig(home=tmp_path, default_executor="local", reconcile_interval_s=0.5)


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }


def finished(obj: dict[str, Any]) -> bool:
    return any(c["type"] == "Succeeded" and c["status"] != "Unknown" for c in obj["status"]["conditions"])


async def test_metrics_endpoint_counts_reconciles_and_jobs_by_state(
    k8s: Cluster,
    run_operator: OperatorRunner,
    settings: OperatorConfig,
    wait_for: Callable[..., Awaitable[Any]],
) -> None:
    port = free_port()
    memo = kopf.Memo(backends=Backends(settings), metrics_port=port, metrics_address="127.0.0.1")
    jobs, reconciles = "kubetune_operator_jobs", "kubetune_operator_reconciles_total"

    def succeeded_jobs(samples: Samples) -> float:
        return value(samples, jobs, kind="FineTuneJob", state="Succeeded")

    async with run_operator(HANDLERS, memo=memo):
        # The registry is process-wide (other tests' operators count in it too): compare with a baseline.
        before = await scrape(port)
        await k8s.create("finetunejobs", job("metrics-probe"))
        await k8s.wait_for("finetunejobs", "metrics-probe", finished, timeout=60)
        # The gauge follows watch events, which may trail the operator's last status patch a little.
        after = await wait_for(
            lambda: scrape(port), lambda s: succeeded_jobs(s) == succeeded_jobs(before) + 1, timeout=10
        )
        # At least: the submission pass, one pass seeing the run going, one seeing it finished.
        assert value(after, reconciles, kind="FineTuneJob", result="success") >= 3 + value(
            before, reconciles, kind="FineTuneJob", result="success"
        )
        assert value(after, reconciles, kind="FineTuneJob", result="error") == value(
            before, reconciles, kind="FineTuneJob", result="error"
        )
        duration = "kubetune_operator_reconcile_duration_seconds_count"
        assert value(after, duration, kind="FineTuneJob") > value(before, duration, kind="FineTuneJob")
        # Every state of every job kind is published (0 when no job is in it), and the rollout states.
        for kind in ("FineTuneJob", "QuantizeJob"):
            for state in ("Pending", "Running", "Succeeded", "Failed"):
                assert (jobs, (("kind", kind), ("state", state))) in after
        assert ("kubetune_operator_rollouts", (("state", "Progressing"),)) in after

        # Deleting the job takes it off the gauge.
        await k8s.delete("finetunejobs", "metrics-probe")
        await k8s.wait_gone("finetunejobs", "metrics-probe", timeout=30)
        await wait_for(
            lambda: scrape(port), lambda s: succeeded_jobs(s) == succeeded_jobs(before), timeout=10
        )

    # The cleanup handler stopped the endpoint with the operator.
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(port)
