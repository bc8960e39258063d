"""evaluation.harness on FineTuneJob: what `kubetune validate` and the CRD's CEL rules refuse, each naming the
field, and what they accept; and the harness scores in status and in `kubetune up`'s summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_cel import admit, tiny_job, validate

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.local.report import evaluation_summary
from kubetune.plan.finetune import Observed, build_request, plan_finetune
from kubetune.plan.runs import RunStatus
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.workspace import WorkspaceReport

TASK = {"name": "ticket-routing", "uri": "examples/harness/tasks"}


def job(harness: dict[str, Any]) -> dict[str, Any]:
    return tiny_job(evaluation={"harness": harness})


def test_tasks_with_gates_on_their_scores_are_accepted() -> None:
    doc = job(
        {
            "tasks": [TASK, {"name": "arc_easy.local", "uri": "pvc://evals/arc"}],
            "gates": [
                {"task": "ticket-routing", "metric": "acc", "minImprovement": "0.05"},
                {"task": "arc_easy.local", "metric": "exact_match,strict-match", "min": "0.3"},
            ],
        }
    )
    assert validate(doc) == []
    assert admit(doc) == []


REFUSED = [
    (
        {"tasks": []},
        "spec.evaluation.harness.tasks: must have at least 1 item",
    ),
    (
        {"tasks": [TASK, {**TASK, "uri": "other"}]},
        "spec.evaluation.harness.tasks: task names must be unique (duplicate 'ticket-routing')",
    ),
    (
        {"tasks": [TASK], "gates": [{"task": "hellaswag", "metric": "acc", "min": "0.5"}]},
        "spec.evaluation.harness.gates: a gate's task must be one of evaluation.harness.tasks "
        "(not 'hellaswag')",
    ),
    (
        {"tasks": [TASK], "gates": [{"task": "ticket-routing", "metric": "acc"}]},
        "spec.evaluation.harness.gates[0]: a gate needs min, max or minImprovement",
    ),
]


@pytest.mark.parametrize(("harness", "message"), REFUSED, ids=[message for _, message in REFUSED])
def test_refused_naming_the_field(harness: dict[str, Any], message: str) -> None:
    assert validate(job(harness)) == [f"FineTuneJob/demo: {message}"]
    assert admit(job(harness)) != []


def test_a_task_name_and_a_gate_metric_are_checked_for_shape() -> None:
    [issue] = validate(job({"tasks": [{**TASK, "name": "bad name"}]}))
    assert issue.startswith("FineTuneJob/demo: spec.evaluation.harness.tasks[0].name: ")
    gate = {"task": "ticket-routing", "metric": "acc; drop", "min": "0"}
    [issue] = validate(job({"tasks": [TASK], "gates": [gate]}))
    assert issue.startswith("FineTuneJob/demo: spec.evaluation.harness.gates[0].metric: ")


def test_task_locations_resolve_like_the_dataset(tmp_path: Path) -> None:
    settings = OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")
    request = build_request(parse_resource(job({"tasks": [TASK]}), FineTuneJob), settings, base_dir=tmp_path)
    [task] = request.config["spec"]["evaluation"]["harness"]["tasks"]
    assert task["uri"] == str(tmp_path / "examples" / "harness" / "tasks")


def test_status_shows_every_harness_score_before_and_after(tmp_path: Path) -> None:
    def scored(acc: float) -> dict[str, Any]:
        entry = {"samples": 60, "metrics": {"acc": acc, "perplexity": 9.5}}
        return {
            "harness": {"ticket-routing": {**entry, "higherIsBetter": {"acc": True, "perplexity": False}}}
        }

    settings = OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")
    done = RunStatus(backend="local", id="run-1", phase="Succeeded", url="/runs/run-1")
    report = WorkspaceReport(baseline=scored(0.2), final=scored(0.45))
    status = plan_finetune(
        job({"tasks": [TASK]}), Observed(run=done, report=report), settings, "2026-01-01T00:05:00Z"
    ).status
    assert status["evaluation"]["harness"] == [
        {
            "task": "ticket-routing",
            "metric": "acc",
            "baseline": 0.2,
            "final": 0.45,
            "higherIsBetter": True,
            "samples": 60,
        },
        {
            "task": "ticket-routing",
            "metric": "perplexity",
            "baseline": 9.5,
            "final": 9.5,
            "higherIsBetter": False,
            "samples": 60,
        },
    ]
    summary = evaluation_summary({"kind": "FineTuneJob", "metadata": {"name": "demo"}, "status": status})
    assert "  harness ticket-routing acc: 0.2000 -> 0.4500" in summary
