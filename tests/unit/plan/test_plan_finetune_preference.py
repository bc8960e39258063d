"""A preference-tuned FineTuneJob's status shows preferenceAccuracy of the base and the tuned model beside
the other held-out metrics, and `kubetune get` prints both."""

from __future__ import annotations

from pathlib import Path

from test_plan_finetune_checkpoints import succeeded

from kubetune.local.report import evaluation_summary
from kubetune_contract.workspace import WorkspaceReport


def test_status_shows_preference_accuracy_before_and_after(tmp_path: Path) -> None:
    report = WorkspaceReport(
        baseline={"evalLoss": 6.9, "preferenceAccuracy": 0.367, "preferencePairs": 60},
        final={"evalLoss": 6.7, "preferenceAccuracy": 0.533, "preferencePairs": 60},
    )
    evaluation = succeeded(report, tmp_path)["evaluation"]
    assert evaluation["baseline"] == {"evalLoss": 6.9, "preferenceAccuracy": 0.367}
    assert evaluation["final"] == {"evalLoss": 6.7, "preferenceAccuracy": 0.533}
    summary = evaluation_summary({"kind": "FineTuneJob", "status": {"evaluation": evaluation}})
    assert any(line.split() == ["preferenceAccuracy", "0.3670", "0.5330"] for line in summary), summary
