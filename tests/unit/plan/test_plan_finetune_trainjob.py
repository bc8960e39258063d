"""status.pipelineRun of a distributed FineTuneJob on Kubeflow names the TrainJob its finetune step runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.plan.finetune import Observed, build_request, plan_finetune
from kubetune.plan.runs import RunStatus
from kubetune_contract.finetune import FineTuneJob, trainjob_name
from kubetune_contract.workspace import WorkspaceReport

NOW = "2026-01-01T00:00:00Z"


def job_body(**training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "1234abcd-0000", "generation": 1},
        "spec": {
            "baseModel": {"uri": "pvc://models/base"},
            "dataset": {"uri": "pvc://models/train.jsonl"},
            "training": {"maxSteps": 10, **training},
            "executor": "kfp",
        },
    }


def running(backend: str) -> Observed:
    run = RunStatus(backend=backend, id="run-1", phase="Running", url=None)  # type: ignore[arg-type]
    return Observed(
        run=run, report=WorkspaceReport(progress={"phase": "training", "step": 1, "totalSteps": 10})
    )


def test_the_pipeline_run_links_the_trainjob_of_a_distributed_job(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, workspace_root="pvc://kubetune-workspace/runs")
    body = job_body(distributed={"workers": 2, "processesPerWorker": 1})

    status = plan_finetune(body, running("kfp"), settings, NOW).status

    workspace = build_request(parse_resource(body, FineTuneJob), settings).workspace
    assert status["pipelineRun"]["id"] == "run-1"
    assert status["pipelineRun"]["trainJob"] == trainjob_name("tune", workspace)
    assert status["pipelineRun"]["trainJob"].startswith("train-tune-")


def test_no_trainjob_without_distributed_training_or_off_kubeflow(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, workspace_root="pvc://kubetune-workspace/runs")

    assert "trainJob" not in plan_finetune(job_body(), running("kfp"), settings, NOW).status["pipelineRun"]
    distributed = job_body(distributed={"workers": 2})
    assert "trainJob" not in plan_finetune(distributed, running("local"), settings, NOW).status["pipelineRun"]
