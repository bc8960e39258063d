"""A FineTuneJob's status shows its periodic evaluations (status.checkpoints, the published one marked),
where early stopping ended training, and each reference set before and after tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_plan_finetune import job_body

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.local.report import evaluation_summary
from kubetune.plan.finetune import Observed, build_request, plan_finetune
from kubetune.plan.runs import RunStatus
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.workspace import WorkspaceReport

T1 = "2026-01-01T00:05:00Z"

CHECKPOINTS = {
    "select": "best",
    "selectMetric": "evalLoss",
    "selectedStep": 10,
    "earlyStoppedAtStep": 15,
    "checkpoints": [
        {"step": 5, "trainLoss": 2.1, "metrics": {"evalLoss": 2.0, "perplexity": 7.39}, "selected": False},
        {"step": 10, "trainLoss": 1.2, "metrics": {"evalLoss": 1.5, "perplexity": 4.48}, "selected": True},
        {"step": 15, "trainLoss": 0.9, "metrics": {"evalLoss": 1.7, "perplexity": 5.47}, "selected": False},
    ],
}
CHECKPOINTS_STATUS = {
    "checkpoints": [
        {"step": 5, "metrics": {"evalLoss": 2.0}, "selected": False},
        {"step": 10, "metrics": {"evalLoss": 1.5}, "selected": True},
    ],
    "earlyStoppedAtStep": 15,
}
REFERENCE_BEFORE = {"general-text": {"metric": "perplexity", "value": 20.0, "samples": 36}}
REFERENCE_AFTER = {
    "general-text": {"metric": "perplexity", "value": 25.0, "samples": 36, "baseline": 20.0, "drop": 0.25}
}


def succeeded(report: WorkspaceReport, tmp_path: Path) -> dict[str, Any]:
    settings = OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")
    done = RunStatus(backend="local", id="run-1", phase="Succeeded", url="/runs/run-1")
    return plan_finetune(job_body(), Observed(run=done, report=report), settings, T1).status


def test_status_lists_the_evaluated_checkpoints_and_marks_the_published_one(tmp_path: Path) -> None:
    status = succeeded(WorkspaceReport(checkpoints=CHECKPOINTS), tmp_path)
    assert status["checkpoints"] == [
        {"step": 5, "trainLoss": 2.1, "metrics": {"evalLoss": 2.0, "perplexity": 7.39}, "selected": False},
        {"step": 10, "trainLoss": 1.2, "metrics": {"evalLoss": 1.5, "perplexity": 4.48}, "selected": True},
        {"step": 15, "trainLoss": 0.9, "metrics": {"evalLoss": 1.7, "perplexity": 5.47}, "selected": False},
    ]
    assert status["earlyStoppedAtStep"] == 15


def test_status_shows_each_reference_set_before_and_after(tmp_path: Path) -> None:
    running = WorkspaceReport(baseline={"evalLoss": 2.0, "reference": REFERENCE_BEFORE})
    assert succeeded(running, tmp_path)["evaluation"]["reference"] == [
        {"name": "general-text", "metric": "perplexity", "baseline": 20.0}
    ]
    done = WorkspaceReport(
        baseline={"evalLoss": 2.0, "reference": REFERENCE_BEFORE},
        final={"evalLoss": 1.0, "reference": REFERENCE_AFTER},
    )
    status = succeeded(done, tmp_path)
    assert status["evaluation"]["reference"] == [
        {"name": "general-text", "metric": "perplexity", "baseline": 20.0, "final": 25.0, "drop": 0.25}
    ]
    obj = {"kind": "FineTuneJob", "metadata": {"name": "tune"}, "status": {**status, **CHECKPOINTS_STATUS}}
    summary = evaluation_summary(obj)
    assert "  reference general-text perplexity: 20.0000 -> 25.0000  (+25.00%)" in summary
    assert (
        "  published checkpoint: step 10 of 2 evaluated (evalLoss 1.5); "
        "early stopping ended training at step 15"
    ) in summary


def test_replay_and_reference_files_resolve_like_the_dataset(tmp_path: Path) -> None:
    body = job_body(
        training={"maxSteps": 10, "replay": {"uri": "data/general.jsonl"}},
        evaluation={"reference": [{"name": "general", "uri": "data/reference.jsonl"}]},
    )
    settings = OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")
    request = build_request(parse_resource(body, FineTuneJob), settings, base_dir=tmp_path)
    spec = request.config["spec"]
    assert spec["training"]["replay"]["uri"] == str(tmp_path / "data" / "general.jsonl")
    assert spec["evaluation"]["reference"][0]["uri"] == str(tmp_path / "data" / "reference.jsonl")
