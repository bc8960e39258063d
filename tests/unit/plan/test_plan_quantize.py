"""Planning for QuantizeJob: waiting on the source FineTuneJob, then the common job lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.config import OperatorConfig
from kubetune.plan.lifecycle import Observed
from kubetune.plan.quantize import plan_quantize
from kubetune.plan.runs import RunStatus
from kubetune_components.common.jobs import parse_quantize_job
from kubetune_contract.workspace import WorkspaceReport

NOW = "2026-01-01T00:00:00Z"


def qj(**model: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "router-int8", "namespace": "ml", "uid": "abcdef12-3", "generation": 1},
        "spec": {
            "model": model or {"fineTuneJobRef": {"name": "router"}},
            "method": {"type": "int8-weight-only"},
            "evaluation": {"gates": [{"metric": "perplexityIncrease", "max": "0.05"}]},
        },
    }


def ftj(condition: dict[str, Any] | None, output: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running", "conditions": [condition] if condition else []}
    if output:
        status["output"] = {"uri": output, "version": "v1"}
    return {
        "metadata": {"name": "router", "namespace": "ml"},
        "spec": {"dataset": {"uri": "data/tickets.jsonl", "format": "instruction", "validationSplit": "0.1"}},
        "status": status,
    }


@pytest.fixture
def settings(tmp_path: Path) -> OperatorConfig:
    return OperatorConfig(home=tmp_path, artifact_store="/store")


def succeeded(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Succeeded")


def test_waits_while_the_finetunejob_is_missing_or_running(settings: OperatorConfig) -> None:
    missing = plan_quantize(qj(), Observed(), settings, NOW, lambda ns, name: None)
    assert (succeeded(missing.status)["status"], succeeded(missing.status)["reason"]) == (
        "Unknown",
        "WaitingForSource",
    )
    assert "FineTuneJob/router does not exist" in succeeded(missing.status)["message"]
    running = ftj({"type": "Succeeded", "status": "Unknown", "reason": "Running"})
    waiting = plan_quantize(qj(), Observed(), settings, NOW, lambda ns, name: running)
    assert waiting.action == "none"
    assert succeeded(waiting.status)["message"] == "waiting for FineTuneJob/router to succeed (Running)"


def test_fails_when_the_finetunejob_failed(settings: OperatorConfig) -> None:
    failed = ftj(
        {"type": "Succeeded", "status": "False", "reason": "QualityGateFailed", "message": "too weak"}
    )
    decision = plan_quantize(qj(), Observed(), settings, NOW, lambda ns, name: failed)
    condition = succeeded(decision.status)
    assert (condition["status"], condition["reason"]) == ("False", "SourceFailed")
    assert condition["message"] == "FineTuneJob/router failed (QualityGateFailed: too weak)"
    assert decision.finished


def test_submits_with_the_published_model_and_the_finetune_dataset(settings: OperatorConfig) -> None:
    done = ftj({"type": "Succeeded", "status": "True", "reason": "Completed"}, output="/store/ml/router/v1")
    decision = plan_quantize(qj(), Observed(), settings, NOW, lambda ns, name: done, base_dir=Path("/work"))
    assert decision.action == "submit" and decision.request is not None
    spec = decision.request.config["spec"]
    assert spec["model"] == {"uri": "/store/ml/router/v1"}  # the reference resolved, not kept beside it
    assert parse_quantize_job(decision.request.config).spec.model.uri == "/store/ml/router/v1"
    assert spec["dataset"]["uri"] == "/work/data/tickets.jsonl"
    assert spec["output"]["uri"] == "/store"
    assert decision.request.key == "qj-ml-router-int8-g1-abcdef12"
    assert decision.status["source"] == {"uri": "/store/ml/router/v1", "fineTuneJob": "router"}


def test_report_and_success_message(settings: OperatorConfig) -> None:
    report = WorkspaceReport(
        measured_before={
            "sizeBytes": 4000,
            "latencySecondsPerToken": 0.01,
            "perplexity": 2.0,
            "exactMatch": 1.0,
        },
        measured_after={
            "sizeBytes": 1100,
            "latencySecondsPerToken": 0.02,
            "perplexity": 2.01,
            "exactMatch": 1.0,
        },
        gates=[
            {"metric": "perplexityIncrease", "op": "max", "threshold": 0.05, "value": 0.005, "passed": True}
        ],
        output={"uri": "/store/ml/router-int8/v1", "version": "v1"},
    )
    run = RunStatus(backend="local", id="r", phase="Succeeded")
    decision = plan_quantize(
        qj(uri="/models/m"), Observed(run=run, report=report), settings, NOW, lambda *_: None
    )
    status = decision.status
    assert status["report"]["sizeBytes"] == {"before": 4000, "after": 1100}
    assert status["report"]["sizeRatio"] == 0.275
    assert status["report"]["latency"] == {"before": 0.01, "after": 0.02}
    assert status["report"]["quality"]["after"] == {"perplexity": 2.01, "exactMatch": 1.0}
    assert status["report"]["gates"][0]["passed"] is True
    assert (
        succeeded(status)["message"]
        == "published /store/ml/router-int8/v1 (size ratio 0.275, perplexity +0.50%)"
    )


def test_every_status_field_written_is_in_the_crd_status_schema(settings: OperatorConfig) -> None:
    """The API server prunes status fields its schema lacks: the models must know all we write."""
    from kubetune_contract.quantize import QuantizeJobStatus

    report = WorkspaceReport(
        progress={"phase": "quantizing", "step": 2, "totalSteps": 8},
        measured_before={"sizeBytes": 4000, "latencySecondsPerToken": 0.01, "perplexity": 2.0},
        measured_after={"sizeBytes": 1000, "latencySecondsPerToken": 0.01, "perplexity": 2.0},
        gates=[{"metric": "sizeRatio", "op": "max", "threshold": 0.5, "value": 0.25, "passed": True}],
        output={"uri": "/o", "version": "v1"},
    )
    run = RunStatus(backend="local", id="r", phase="Succeeded")
    status = plan_quantize(
        qj(uri="/m"), Observed(run=run, report=report), settings, NOW, lambda *_: None
    ).status
    QuantizeJobStatus.model_validate(status)  # extra="forbid": an unknown field fails here


def test_a_missing_finetunejob_is_waited_for_a_grace_period_then_the_job_fails(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, artifact_store="/store", missing_reference_grace_s=60)
    missing = plan_quantize(qj(), Observed(), settings, NOW, lambda ns, name: None)
    assert succeeded(missing.status)["lastTransitionTime"] == NOW
    assert "waiting up to 60s" in succeeded(missing.status)["message"]

    still_within = plan_quantize(
        {**qj(), "status": missing.status},
        Observed(),
        settings,
        "2026-01-01T00:00:59Z",
        lambda ns, name: None,
    )
    assert succeeded(still_within.status)["reason"] == "WaitingForSource"
    assert not still_within.finished and still_within.events == []

    given_up = plan_quantize(
        {**qj(), "status": still_within.status},
        Observed(),
        settings,
        "2026-01-01T00:01:00Z",
        lambda ns, name: None,
    )
    condition = succeeded(given_up.status)
    assert (condition["status"], condition["reason"]) == ("False", "SourceNotFound")
    assert condition["message"].startswith(
        "spec.model.fineTuneJobRef: FineTuneJob/router does not exist in namespace ml and did not appear "
        "within 60s (KUBETUNE_MISSING_REFERENCE_GRACE)"
    )
    stalled = next(c for c in given_up.status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "SourceNotFound")
    assert given_up.finished and given_up.status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in given_up.events] == [("Warning", "SourceNotFound")]


def test_the_grace_period_counts_from_creation_when_no_pass_was_recorded(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, artifact_store="/store", missing_reference_grace_s=60)
    created_long_ago = qj()
    created_long_ago["metadata"]["creationTimestamp"] = "2025-12-31T00:00:00Z"
    decision = plan_quantize(created_long_ago, Observed(), settings, NOW, lambda ns, name: None)
    assert succeeded(decision.status)["reason"] == "SourceNotFound"


def test_a_finetunejob_that_exists_is_waited_for_without_a_bound(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, artifact_store="/store", missing_reference_grace_s=0)
    running = ftj({"type": "Succeeded", "status": "Unknown", "reason": "Running"})
    created_long_ago = qj()
    created_long_ago["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    decision = plan_quantize(created_long_ago, Observed(), settings, NOW, lambda ns, name: running)
    assert succeeded(decision.status)["reason"] == "WaitingForSource" and not decision.finished
