"""A cross-validated FineTuneJob: its status shows each metric's mean and spread across the folds (what the
publish step summarized), `kubetune up` prints them, and the run gets the folds to fan out over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_plan_finetune import job_body

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.local.report import evaluation_summary
from kubetune.pipelines.registry import pipeline_arguments
from kubetune.plan.finetune import Observed, build_request, plan_finetune
from kubetune.plan.runs import RunStatus
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.workspace import WorkspaceReport

T1 = "2026-01-01T00:05:00Z"
SUMMARY = {
    "folds": 3,
    "metrics": {
        "evalLoss": {"mean": 2.0, "std": 0.5, "perFold": [1.5, 2.0, 2.5]},
        "exactMatch": {"mean": 0.5, "std": 0.0, "perFold": [0.5, 0.5, 0.5]},
        "perplexity": {"mean": float("inf"), "std": 0.0, "perFold": [1.0, 2.0, float("inf")]},
    },
}


def settings(tmp_path: Path) -> OperatorConfig:
    return OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")


def status_after(report: WorkspaceReport, tmp_path: Path) -> dict[str, Any]:
    done = RunStatus(backend="local", id="run-1", phase="Succeeded", url="/runs/run-1")
    return plan_finetune(job_body(), Observed(run=done, report=report), settings(tmp_path), T1).status


def test_status_shows_each_metrics_mean_spread_and_per_fold_values(tmp_path: Path) -> None:
    status = status_after(WorkspaceReport(final={"evalLoss": 1.9}, cross_validation=SUMMARY), tmp_path)
    assert status["evaluation"]["crossValidation"] == {
        "folds": 3,
        "metrics": {
            "evalLoss": {"mean": 2.0, "std": 0.5, "perFold": [1.5, 2.0, 2.5]},
            "exactMatch": {"mean": 0.5, "std": 0.0, "perFold": [0.5, 0.5, 0.5]},
            # a metric with a value JSON cannot carry is left out, not written as a wrong number
        },
    }
    lines = evaluation_summary({"status": status})
    assert "  cross-validation (3 folds) evalLoss: 2.0000 +/- 0.5000 (folds: 1.5000, 2.0000, 2.5000)" in lines


def test_status_has_no_cross_validation_without_folds(tmp_path: Path) -> None:
    status = status_after(WorkspaceReport(final={"evalLoss": 1.9}), tmp_path)
    assert "crossValidation" not in status["evaluation"]


def test_the_run_fans_out_over_the_jobs_folds_and_over_none_without_cross_validation(tmp_path: Path) -> None:
    body = job_body()
    plain = build_request(parse_resource(body, FineTuneJob), settings(tmp_path))
    assert pipeline_arguments(plain.kind, plain.config, plain.workspace)["folds"] == []

    body["spec"]["evaluation"] = {**body["spec"].get("evaluation", {}), "crossValidation": {"folds": 4}}
    folded = build_request(parse_resource(body, FineTuneJob), settings(tmp_path))
    arguments = pipeline_arguments(folded.kind, folded.config, folded.workspace)
    assert arguments["folds"] == [0, 1, 2, 3]
    assert json.loads(arguments["config_json"])["spec"]["evaluation"]["crossValidation"] == {"folds": 4}
    assert arguments["workspace"] == folded.workspace
