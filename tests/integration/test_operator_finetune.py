"""The real kubetune operator (Kopf handlers) against kmock's Kubernetes emulator.

Jobs run on the local executor: the real pipeline through kfp's local runner in detached workers,
with the step code swapped for fast stand-ins (fake_steps) so runs take seconds and the tests can
control failures and timing. The real step code runs in test_operator_real_steps.py and tests/e2e.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf
import pytest

from kubetune.config import OperatorConfig
from kubetune.reconcile.jobs import Backends

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")

HANDLERS = "kubetune.handlers.jobs"
FAKE_STEPS = Path(__file__).parent / "fake_steps"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]))
    return OperatorConfig(home=tmp_path, default_executor="local", reconcile_interval_s=0.5)


def fresh_memo(settings: OperatorConfig) -> kopf.Memo:
    """What a newly started operator process has: nothing but its settings."""
    return kopf.Memo(backends=Backends(settings))


def job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }
    body["spec"].update(spec)
    return body


def succeeded(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Succeeded")


def finished(obj: dict[str, Any]) -> bool:
    return succeeded(obj)["status"] != "Unknown"


def starts(settings: OperatorConfig) -> list[str]:
    return [
        line
        for log in sorted(Path(settings.workspace_root).rglob("starts.log"))
        for line in log.read_text().split()
    ]


async def test_create_runs_to_success_with_evaluation_and_events(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig
) -> None:
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        await k8s.create("finetunejobs", job("tune"))
        running = await k8s.wait_for(
            "finetunejobs", "tune", lambda o: "pipelineRun" in o["status"], timeout=30
        )
        assert "kubetune.dev/finalizer" in running["metadata"]["finalizers"]
        done = await k8s.wait_for("finetunejobs", "tune", finished, timeout=60)
    status = done["status"]
    assert (succeeded(done)["status"], succeeded(done)["reason"]) == ("True", "Completed")
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert status["phase"] == "Succeeded"
    assert status["evaluation"]["baseline"] == {"evalLoss": 1.0, "exactMatch": 0.5}
    assert status["evaluation"]["final"] == {"evalLoss": 1.0, "exactMatch": 0.5}
    assert status["output"]["version"] == "v1"
    assert status["pipelineRun"]["backend"] == "local"
    assert status["progress"]["percent"] == 100
    assert status["startTime"] <= status["completionTime"]
    reasons = {event["reason"] for event in k8s.events("tune")}
    assert {"Submitted", "Succeeded"} <= reasons


async def test_invalid_spec_fails_with_the_field_path(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig
) -> None:
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        await k8s.create("finetunejobs", job("bad", training={"learningRate": "fast", "batchSize": 0}))
        done = await k8s.wait_for(
            "finetunejobs", "bad", lambda o: "conditions" in o.get("status", {}), timeout=30
        )
    condition = succeeded(done)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert "spec.training.learningRate" in condition["message"]
    assert "spec.training.batchSize" in condition["message"]
    assert not (settings.home / "local-runs").exists()  # nothing was submitted
    assert any(event["reason"] == "InvalidSpec" for event in k8s.events("bad"))


async def test_a_failed_gate_fails_the_job_with_its_reason(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL_STEP", "publish")
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        await k8s.create("finetunejobs", job("gated"))
        done = await k8s.wait_for("finetunejobs", "gated", finished, timeout=60)
    condition = succeeded(done)
    assert (condition["status"], condition["reason"]) == ("False", "QualityGateFailed")
    assert "exactMatch 0.1 < 0.5" in condition["message"]
    assert "output" not in done["status"]


async def test_delete_mid_run_cancels_the_pipeline_and_lets_go(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    monkeypatch.setenv("FAKE_STEPS", "500")
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        await k8s.create("finetunejobs", job("doomed"))
        running = await k8s.wait_for(
            "finetunejobs", "doomed", lambda o: o["status"]["progress"]["step"] >= 1, timeout=60
        )
        run_id = running["status"]["pipelineRun"]["id"]
        await k8s.delete("finetunejobs", "doomed")
        await k8s.wait_gone("finetunejobs", "doomed", timeout=60)
    backend = Backends(settings).get("local")
    cancelled = backend.find(run_id)
    assert cancelled is not None and cancelled.phase == "Cancelled"


async def test_operator_restart_mid_run_does_not_start_a_second_run(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    monkeypatch.setenv("FAKE_STEPS", "15")
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        await k8s.create("finetunejobs", job("steady"))
        first = await k8s.wait_for(
            "finetunejobs", "steady", lambda o: o["status"]["progress"]["step"] >= 1, timeout=60
        )
    # The operator is gone; the run goes on. A new operator process picks the job up again.
    async with run_operator(HANDLERS, memo=fresh_memo(settings)):
        done = await k8s.wait_for("finetunejobs", "steady", finished, timeout=60)
    assert succeeded(done)["reason"] == "Completed"
    assert done["status"]["pipelineRun"]["id"] == first["status"]["pipelineRun"]["id"]
    assert len(list((settings.home / "local-runs").iterdir())) == 1
    assert starts(settings).count("finetune") == 1
    assert starts(settings).count("curate") == 1
