"""Planning for FineTuneJob: pure decisions from spec + observations (no I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.plan.finetune import Observed, build_request, is_finished, plan_finetune, run_key
from kubetune.plan.runs import RunStatus
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.workspace import WorkspaceReport

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-01T00:05:00Z"


def job_body(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "models/base"},
        "dataset": {"uri": "data/train.jsonl"},
        "method": {"type": "lora"},
        "training": {"maxSteps": 10},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tune", "namespace": "team-a", "uid": "1234abcd-0000", "generation": 1},
        "spec": spec,
    }


@pytest.fixture
def settings(tmp_path: Path) -> OperatorConfig:
    return OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")


def condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Succeeded")


def run(phase: str, **kwargs: Any) -> RunStatus:
    return RunStatus(backend="local", id="run-1", phase=phase, url="/runs/run-1", **kwargs)  # type: ignore[arg-type]


def test_invalid_spec_fails_with_the_field_path(settings: OperatorConfig) -> None:
    body = job_body(training={"learningRate": "fast"})
    decision = plan_finetune(body, Observed(), settings, T0)
    assert decision.action == "none"
    cond = condition(decision.status)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.training.learningRate" in cond["message"]
    assert decision.status["observedGeneration"] == 1
    assert decision.events[0].type == "Warning"


def test_first_sight_submits_and_sets_conditions_unknown(settings: OperatorConfig) -> None:
    decision = plan_finetune(job_body(), Observed(), settings, T0)
    assert decision.action == "submit"
    assert decision.request is not None
    assert decision.request.key == "ftj-team-a-tune-g1-1234abcd"
    cond = condition(decision.status)
    assert (cond["status"], cond["reason"], cond["lastTransitionTime"]) == ("Unknown", "Pending", T0)
    assert decision.status["startTime"] == T0
    assert decision.status["progress"] == {"step": 0, "totalSteps": 0, "epoch": 0.0, "percent": 0}


def test_running_reports_progress_and_metrics(settings: OperatorConfig) -> None:
    report = WorkspaceReport(
        progress={
            "phase": "training",
            "step": 3,
            "totalSteps": 10,
            "epoch": 0.3,
            "trainLoss": 1.5,
            "learningRate": 0.001,
        },
        baseline={"evalLoss": 2.0, "perplexity": 7.39, "exactMatch": 0.0, "samples": 5},
    )
    decision = plan_finetune(job_body(), Observed(run=run("Running"), report=report), settings, T0)
    assert decision.action == "none"
    status = decision.status
    assert condition(status)["reason"] == "Running"
    assert condition(status)["message"] == "training: step 3/10"
    assert status["progress"] == {"step": 3, "totalSteps": 10, "epoch": 0.3, "percent": 30}
    assert status["metrics"] == {"trainLoss": 1.5, "learningRate": 0.001}
    assert status["evaluation"] == {"baseline": {"evalLoss": 2.0, "perplexity": 7.39, "exactMatch": 0.0}}
    assert status["pipelineRun"]["id"] == "run-1"
    assert [e.reason for e in decision.events] == ["Running"]


def test_transition_time_moves_only_when_the_status_changes(settings: OperatorConfig) -> None:
    first = plan_finetune(job_body(), Observed(run=run("Running")), settings, T0)
    body = {**job_body(), "status": first.status}
    second = plan_finetune(body, Observed(run=run("Running")), settings, T1)
    assert condition(second.status)["lastTransitionTime"] == T0
    assert second.events == []  # no repeated "Running" event
    third = plan_finetune(
        {**job_body(), "status": second.status}, Observed(run=run("Succeeded")), settings, T1
    )
    assert condition(third.status)["lastTransitionTime"] == T1


def test_success_publishes_output_and_evaluation(settings: OperatorConfig) -> None:
    report = WorkspaceReport(
        baseline={"evalLoss": 2.0, "perplexity": 7.39, "exactMatch": 0.0},
        final={"evalLoss": 0.5, "perplexity": 1.65, "exactMatch": 0.9},
        gates=[
            {"metric": "exactMatch", "op": "minImprovement", "threshold": 0.3, "value": 0.9, "passed": True}
        ],
        output={"uri": "/store/team-a/tune/v1", "version": "v1"},
    )
    decision = plan_finetune(job_body(), Observed(run=run("Succeeded"), report=report), settings, T1)
    status = decision.status
    cond = condition(status)
    assert (cond["status"], cond["reason"]) == ("True", "Completed")
    assert status["output"] == {"uri": "/store/team-a/tune/v1", "version": "v1"}
    assert status["evaluation"]["final"]["exactMatch"] == 0.9
    assert status["evaluation"]["gates"][0]["passed"] is True
    assert status["progress"]["percent"] == 100
    assert status["completionTime"] == T1
    assert decision.finished and is_finished(status, 1) and not is_finished(status, 2)


def test_failed_gate_reports_the_reason_from_the_step(settings: OperatorConfig) -> None:
    report = WorkspaceReport(
        gates=[{"metric": "exactMatch", "op": "min", "threshold": 0.9, "value": 0.2, "passed": False}],
        error={"step": "publish", "reason": "QualityGateFailed", "message": "exactMatch 0.2 < min 0.9"},
    )
    decision = plan_finetune(job_body(), Observed(run=run("Failed"), report=report), settings, T1)
    cond = condition(decision.status)
    assert (cond["status"], cond["reason"]) == ("False", "QualityGateFailed")
    assert cond["message"] == "step publish: exactMatch 0.2 < min 0.9"
    assert "output" not in decision.status
    assert decision.events[0].type == "Warning"


def test_interrupted_runs_are_resumed_until_the_attempt_limit(settings: OperatorConfig) -> None:
    resumed = plan_finetune(job_body(), Observed(run=run("Interrupted", attempt=1)), settings, T0)
    assert resumed.action == "resume"
    assert condition(resumed.status)["reason"] == "Resuming"
    exhausted = plan_finetune(
        job_body(), Observed(run=run("Interrupted", attempt=settings.max_run_attempts)), settings, T0
    )
    assert exhausted.action == "none"
    assert condition(exhausted.status)["reason"] == "BackoffLimitExceeded"


def test_a_resumed_run_says_from_which_step(settings: OperatorConfig) -> None:
    # Killed at step 7, newest checkpoint at step 5: the resume names step 5, not the stale 7.
    killed = WorkspaceReport(progress={"phase": "training", "step": 7, "totalSteps": 10, "checkpointStep": 5})
    resumed = plan_finetune(
        job_body(),
        Observed(run=run("Interrupted", attempt=1, message="the worker was terminated"), report=killed),
        settings,
        T0,
    )
    assert (
        condition(resumed.status)["message"] == "the worker was terminated; resuming from step 5 (attempt 2)"
    )

    loading = WorkspaceReport(
        progress={"phase": "training", "step": 5, "totalSteps": 10, "checkpointStep": 5, "resumedFromStep": 5}
    )
    decision = plan_finetune(job_body(), Observed(run=run("Running"), report=loading), settings, T1)
    assert condition(decision.status)["message"] == "training: resuming from step 5 of 10"
    assert decision.status["progress"]["resumedFromStep"] == 5

    training = WorkspaceReport(
        progress={"phase": "training", "step": 8, "totalSteps": 10, "resumedFromStep": 5}
    )
    decision = plan_finetune(job_body(), Observed(run=run("Running"), report=training), settings, T1)
    assert condition(decision.status)["message"] == "training: step 8/10 (resumed from step 5)"
    assert decision.status["progress"] == {
        "step": 8,
        "totalSteps": 10,
        "epoch": 0.0,
        "percent": 80,
        "resumedFromStep": 5,
    }


def test_a_fresh_run_neither_resumes_nor_names_a_checkpoint(settings: OperatorConfig) -> None:
    fresh = WorkspaceReport(
        progress={"phase": "training", "step": 3, "totalSteps": 10, "resumedFromStep": None}
    )
    decision = plan_finetune(job_body(), Observed(run=run("Running"), report=fresh), settings, T1)
    assert condition(decision.status)["message"] == "training: step 3/10"
    assert "resumedFromStep" not in decision.status["progress"]
    unknown = plan_finetune(
        job_body(), Observed(run=run("Interrupted", attempt=1, message="stopped")), settings, T0
    )
    assert condition(unknown.status)["message"] == "stopped; resuming from the last checkpoint (attempt 2)"


def test_a_finished_job_is_left_alone(settings: OperatorConfig) -> None:
    done = plan_finetune(job_body(), Observed(run=run("Succeeded")), settings, T0)
    again = plan_finetune({**job_body(), "status": done.status}, Observed(), settings, T1)
    assert again.action == "none"
    assert again.status == done.status


def test_cancelled_run(settings: OperatorConfig) -> None:
    decision = plan_finetune(job_body(), Observed(run=run("Cancelled")), settings, T0)
    assert condition(decision.status)["reason"] == "Cancelled"


def test_run_key_is_stable_and_distinct_per_generation() -> None:
    first = parse_resource(job_body(), FineTuneJob)
    second_body = job_body()
    second_body["metadata"]["generation"] = 2
    second = parse_resource(second_body, FineTuneJob)
    assert run_key(first) == run_key(parse_resource(job_body(), FineTuneJob))
    assert run_key(first) != run_key(second)


def test_request_resolves_paths_defaults_and_cluster_options(
    settings: OperatorConfig, tmp_path: Path
) -> None:
    body = job_body(
        baseModel={"uri": "pvc://models/llama", "tokenSecretRef": {"name": "hf", "key": "token"}},
        dataset={"uri": "data/train.jsonl"},
    )
    request = build_request(parse_resource(body, FineTuneJob), settings, base_dir=tmp_path)
    spec = request.config["spec"]
    assert spec["dataset"]["uri"] == str(tmp_path / "data/train.jsonl")
    assert spec["baseModel"]["uri"] == "pvc://models/llama"
    assert spec["output"]["uri"] == "/store"
    assert spec["executor"] == "local"
    assert request.config["metadata"] == {
        "name": "tune",
        "namespace": "team-a",
        "uid": "1234abcd-0000",
        "generation": 1,
    }
    assert request.pipeline_options["pvc_claims"] == ["models"]
    assert request.pipeline_options["token_secret"] == ["hf", "token"]
    assert request.workspace.startswith(str(tmp_path))
    assert request.experiment == "kubetune-team-a"


def test_every_status_field_written_is_in_the_crd_status_schema(settings: OperatorConfig) -> None:
    """The API server prunes status fields its schema lacks: the models must know all we write."""
    from kubetune_contract.finetune import FineTuneJobStatus

    report = WorkspaceReport(
        progress={"phase": "training", "step": 3, "totalSteps": 10, "trainLoss": 1.5, "learningRate": 0.001},
        baseline={"evalLoss": 2.0, "perplexity": 7.39, "exactMatch": 0.0},
        final={"evalLoss": 0.5, "perplexity": 1.65, "exactMatch": 0.9},
        gates=[{"metric": "exactMatch", "op": "min", "threshold": 0.5, "value": 0.9, "passed": True}],
        output={"uri": "/o", "version": "v1"},
    )
    status = plan_finetune(job_body(), Observed(run=run("Succeeded"), report=report), settings, T1).status
    FineTuneJobStatus.model_validate(status)  # extra="forbid": an unknown field fails here
