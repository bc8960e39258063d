"""`kubetune up` with the tiny pretrained base: periodic evaluations become status.checkpoints, select best
publishes the best one (and the manifest says which), early stopping stops a run whose metric stalls, and
a reference set is scored before and after tuning, its maxReferenceDrop gate refusing a model that forgot
more than allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import KubetuneCli

# The `kubetune up` inside may take longer than the suite-wide 600 s timeout on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

COMMON = """\
  baseModel: {uri: ./.kubetune/models/tiny-base}
  dataset:
    uri: examples/quickstart/data/support-tickets.jsonl
    format: instruction
    validationUri: examples/quickstart/data/support-tickets-heldout.jsonl
  method: {type: lora, lora: {r: 8, alpha: 16}}
  executor: local
"""
REFERENCE = "reference: [{name: general-text, uri: examples/quickstart/data/general-reference.jsonl}]"

JOBS = f"""\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: picks-best}}
spec:
{COMMON}\
  training: {{maxSteps: 36, batchSize: 8, learningRate: "3e-3", maxSeqLength: 128, evalEverySteps: 12}}
  evaluation:
    metrics: [evalLoss, exactMatch]
    maxNewTokens: 8
    maxSamples: 20
    {REFERENCE}
    maxReferenceDrop: "10"
  output: {{select: best, selectMetric: evalLoss}}
---
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: forgets}}
spec:
{COMMON}\
  training: {{maxSteps: 36, batchSize: 8, learningRate: "3e-3", maxSeqLength: 128}}
  evaluation:
    metrics: [evalLoss]
    {REFERENCE}
    maxReferenceDrop: "0.0001"
---
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {{name: stalls}}
spec:
{COMMON}\
  # A learning rate of 0 leaves the weights, so the validation loss, exactly as they are: no evaluation
  # after the first is a new best.
  training:
    maxSteps: 40
    batchSize: 8
    learningRate: "0"
    maxSeqLength: 128
    evalEverySteps: 5
    earlyStopping: {{metric: evalLoss, patience: 2}}
  evaluation: {{metrics: [evalLoss]}}
"""


def status_of(kubetune: KubetuneCli, name: str) -> dict[str, Any]:
    obj = json.loads(kubetune("get", "ftj", name, "-o", "json").stdout)
    status: dict[str, Any] = obj["status"]
    return status


def test_checkpoints_selection_early_stopping_and_the_forgetting_guard(
    project: Path, kubetune: KubetuneCli
) -> None:
    (project / "jobs.yaml").write_text(JOBS)
    result = kubetune("up", "-f", "jobs.yaml", timeout=1500, check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # `forgets` failed its gate

    best = status_of(kubetune, "picks-best")
    assert best["phase"] == "Succeeded", result.stdout
    checkpoints = best["checkpoints"]
    assert [c["step"] for c in checkpoints] == [12, 24, 36]
    assert all({"evalLoss", "perplexity", "exactMatch"} <= set(c["metrics"]) for c in checkpoints)
    assert all(c["trainLoss"] > 0 for c in checkpoints)
    [selected] = [c for c in checkpoints if c["selected"]]
    assert selected["metrics"]["evalLoss"] == min(c["metrics"]["evalLoss"] for c in checkpoints)
    # What was published is that checkpoint: the final evaluation measures the same validation loss.
    assert best["evaluation"]["final"]["evalLoss"] == pytest.approx(selected["metrics"]["evalLoss"], rel=1e-5)
    manifest = json.loads((Path(best["output"]["uri"]) / "kubetune-manifest.json").read_text())
    assert manifest["checkpoint"]["select"] == "best"
    assert manifest["checkpoint"]["step"] == selected["step"]
    [reference] = best["evaluation"]["reference"]
    assert reference["name"] == "general-text" and reference["metric"] == "perplexity"
    assert reference["baseline"] > 1 and reference["final"] > 1
    assert reference["drop"] == pytest.approx(
        (reference["final"] - reference["baseline"]) / reference["baseline"]
    )
    assert f"reference general-text perplexity: {reference['baseline']:.4f} -> " in result.stdout
    assert f"published checkpoint: step {selected['step']} of 3 evaluated" in result.stdout

    forgets = status_of(kubetune, "forgets")
    assert forgets["phase"] == "Failed"
    [gate] = forgets["evaluation"]["gates"]
    assert gate["metric"] == "referenceDrop.general-text" and not gate["passed"]
    assert gate["value"] == pytest.approx(forgets["evaluation"]["reference"][0]["drop"])
    assert "reference set general-text dropped by" in result.stdout
    assert "output" not in forgets

    stalls = status_of(kubetune, "stalls")
    assert stalls["phase"] == "Succeeded", result.stdout
    assert [c["step"] for c in stalls["checkpoints"]] == [5, 10, 15]
    assert stalls["earlyStoppedAtStep"] == 15
    assert stalls["progress"]["step"] == 15
