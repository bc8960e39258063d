"""`kubetune up` with evaluation.crossValidation on the tiny pretrained base: the pipeline's fold loop trains
and evaluates each fold on its own held-out part, status shows every metric's mean and standard deviation
across the folds, the lineage manifest records them, and the published model is trained on all the
curated training examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import KubetuneCli

# The `kubetune up` inside may take longer than the suite-wide 600 s timeout on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROWS = 32  # 24 to train on after the 25% validation split: two folds of 12
JOB = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: folds}
spec:
  baseModel: {uri: ./.kubetune/models/tiny-base}
  dataset: {uri: tickets.jsonl, format: instruction, validationSplit: "0.25"}
  method: {type: lora, lora: {r: 8, alpha: 16}}
  training: {maxSteps: 2, batchSize: 8, learningRate: "3e-3", maxSeqLength: 128}
  evaluation:
    metrics: [evalLoss]
    crossValidation: {folds: 2}
  executor: local
"""


def test_folds_report_mean_and_spread_and_the_published_model_trains_on_all_the_data(
    project: Path, kubetune: KubetuneCli
) -> None:
    tickets = (project / "examples/quickstart/data/support-tickets.jsonl").read_text().splitlines()
    (project / "tickets.jsonl").write_text("\n".join(tickets[:ROWS]) + "\n")
    (project / "job.yaml").write_text(JOB)
    result = kubetune("up", "-f", "job.yaml", timeout=1200)

    obj = yaml.safe_load(kubetune("get", "ftj", "folds", "-o", "yaml").stdout)
    status = obj["status"]
    assert status["phase"] == "Succeeded", result.stdout
    cross_validation = status["evaluation"]["crossValidation"]
    assert cross_validation["folds"] == 2
    loss = cross_validation["metrics"]["evalLoss"]
    first, second = loss["perFold"]
    assert first > 0 and second > 0 and first != second
    assert loss["mean"] == pytest.approx((first + second) / 2)
    assert loss["std"] == pytest.approx(abs(first - second) / 2)  # population std of two values
    assert f"cross-validation (2 folds) evalLoss: {loss['mean']:.4f} +/- {loss['std']:.4f}" in result.stdout

    # Each fold trained on the other part (12 examples) and was graded on its own (12); the run's own
    # splits and model are the ordinary ones: trained on all 24, graded on the 8 validation examples.
    workspace = Path(
        json.loads((Path(status["pipelineRun"]["url"]) / "request.json").read_text())["workspace"]
    )
    train = (workspace / "data/train.jsonl").read_text().splitlines()
    assert len(train) == 24
    held_out: list[str] = []
    for fold in range(2):
        fold_dir = workspace / "folds" / f"fold-{fold}"
        assert len((fold_dir / "data/train.jsonl").read_text().splitlines()) == 12
        held_out += (fold_dir / "data/validation.jsonl").read_text().splitlines()
        evaluation = json.loads((fold_dir / "evaluation/final.json").read_text())
        assert evaluation["samples"] == 12
        assert evaluation["evalLoss"] == pytest.approx(loss["perFold"][fold])
    assert sorted(held_out) == sorted(train)

    manifest = json.loads((Path(status["output"]["uri"]) / "kubetune-manifest.json").read_text())
    assert manifest["crossValidation"]["folds"] == 2
    assert manifest["crossValidation"]["metrics"]["evalLoss"]["perFold"] == pytest.approx(loss["perFold"])
    assert manifest["dataset"]["curation"]["train"] == 24
    assert status["evaluation"]["final"]["evalLoss"] > 0
