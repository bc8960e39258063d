"""`kubetune up` with the tiny pretrained base and evaluation.harness: the lm-evaluation-harness task shipped
in examples/harness/tasks is scored on the base and on the tuned LoRA model, the scores appear in
status.evaluation.harness beside kubetune's own metrics, and a harness gate that the tuned model does not
meet fails the job, naming the score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import KubetuneCli

# The `kubetune up` inside may take longer than the suite-wide 600 s timeout on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# accuracy is at most 1, so an improvement of 0.9 over a base model that already scores above 0.1 is out
# of reach: this gate must fail, while min 0 passes.
JOB = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: harness-gated}
spec:
  baseModel: {uri: ./.kubetune/models/tiny-base}
  dataset:
    uri: examples/quickstart/data/support-tickets.jsonl
    format: instruction
    validationUri: examples/quickstart/data/support-tickets-heldout.jsonl
  method: {type: lora, lora: {r: 8, alpha: 16}}
  training: {maxSteps: 6, batchSize: 8, learningRate: "3e-3", maxSeqLength: 128}
  evaluation:
    metrics: [evalLoss]
    maxSamples: 10
    harness:
      tasks: [{name: ticket-routing, uri: examples/harness/tasks}]
      gates:
        - {task: ticket-routing, metric: acc, min: "0"}
        - {task: ticket-routing, metric: acc, minImprovement: "0.9"}
  executor: local
"""


def status_of(kubetune: KubetuneCli, name: str) -> dict[str, Any]:
    obj = json.loads(kubetune("get", "ftj", name, "-o", "json").stdout)
    status: dict[str, Any] = obj["status"]
    return status


def test_harness_scores_reach_status_and_gate_the_tuned_model(project: Path, kubetune: KubetuneCli) -> None:
    (project / "job.yaml").write_text(JOB)
    result = kubetune("up", "-f", "job.yaml", timeout=1500, check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # the minImprovement gate failed

    status = status_of(kubetune, "harness-gated")
    assert status["phase"] == "Failed"
    evaluation = status["evaluation"]
    assert evaluation["baseline"]["evalLoss"] > evaluation["final"]["evalLoss"]  # beside kubetune's own
    rows = {row["metric"]: row for row in evaluation["harness"]}
    assert set(rows) == {"acc", "acc_norm"}
    for row in rows.values():
        assert row["task"] == "ticket-routing" and row["samples"] == 10 and row["higherIsBetter"]
        assert 0 <= row["baseline"] <= 1 and 0 <= row["final"] <= 1

    passed, failed = evaluation["gates"]
    assert passed == {
        "metric": "harness:ticket-routing/acc",
        "op": "min",
        "threshold": 0.0,
        "value": rows["acc"]["final"],
        "passed": True,
    }
    assert failed["metric"] == "harness:ticket-routing/acc" and failed["op"] == "minImprovement"
    assert failed["value"] == pytest.approx(rows["acc"]["final"] - rows["acc"]["baseline"])
    assert not failed["passed"]
    assert "harness:ticket-routing/acc improved by" in result.stdout + result.stderr
    assert f"harness ticket-routing acc: {rows['acc']['baseline']:.4f} -> {rows['acc']['final']:.4f}" in (
        result.stdout
    )
    assert "output" not in status
