"""k-fold cross-validation: how the curated training examples are dealt into folds, what a fold step trains
and evaluates, how publish summarizes the folds, and what curation refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kubetune_components.common.errors import ComponentError, DatasetError
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.finetune import steps
from kubetune_components.finetune.crossvalidation import (
    fold_parts,
    fold_spec,
    fold_split,
    summarize_folds,
    write_cross_validation_summary,
)
from kubetune_contract.workspace import WorkspaceLayout, WorkspaceReport

CATEGORIES = ("billing", "technical", "account", "shipping")
ROWS = [
    {
        "instruction": "Route the ticket to a team.",
        "input": f"Ticket {index}: a {CATEGORIES[index % 4]} question",
        "output": CATEGORIES[index % 4],
    }
    for index in range(12)
]


@pytest.mark.parametrize(("count", "folds"), [(10, 2), (10, 3), (7, 7), (101, 5)])
def test_folds_are_disjoint_cover_every_example_and_differ_in_size_by_at_most_one(
    count: int, folds: int
) -> None:
    parts = fold_parts(count, folds, seed=42)
    assert len(parts) == folds
    dealt = [index for part in parts for index in part]
    assert sorted(dealt) == list(range(count))  # every example in exactly one part
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_the_same_seed_deals_the_same_folds_and_another_seed_shuffles_them_differently() -> None:
    assert fold_parts(50, 5, seed=7) == fold_parts(50, 5, seed=7)
    assert fold_parts(50, 5, seed=7) != fold_parts(50, 5, seed=8)
    assert fold_parts(50, 5, seed=7) != [list(range(i, 50, 5)) for i in range(5)]  # shuffled, not striped


def test_each_fold_trains_on_the_other_parts_and_holds_out_its_own() -> None:
    examples = [f"example-{index}" for index in range(11)]
    held_out_sets = []
    for fold in range(3):
        train, held_out = fold_split(examples, 3, fold, seed=1)
        assert set(train).isdisjoint(held_out)
        assert sorted(train + held_out) == sorted(examples)
        held_out_sets.append(set(held_out))
    assert set().union(*held_out_sets) == set(examples)  # each example held out once over the folds
    assert sum(len(held_out) for held_out in held_out_sets) == len(examples)


def test_the_summary_gives_each_metrics_mean_standard_deviation_and_per_fold_values() -> None:
    summary = summarize_folds(
        [
            {"samples": 4, "evalLoss": 1.0, "exactMatch": 0.5, "lenientMatch": 0.5},
            {"samples": 4, "evalLoss": 2.0, "exactMatch": 0.25},
            {"samples": 3, "evalLoss": 3.0, "exactMatch": 0.75},
        ]
    )
    assert summary["folds"] == 3
    assert set(summary["metrics"]) == {"evalLoss", "exactMatch"}  # lenientMatch: not every fold has it
    loss = summary["metrics"]["evalLoss"]
    assert loss["perFold"] == [1.0, 2.0, 3.0]
    assert loss["mean"] == pytest.approx(2.0)
    assert loss["std"] == pytest.approx(math.sqrt(2 / 3))  # population: divided by k
    assert summary["metrics"]["exactMatch"]["mean"] == pytest.approx(0.5)


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    dataset = tmp_path / "tickets.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(dataset), "format": "instruction", "validationSplit": "0.25"},
            "method": {"type": "lora", "lora": {"r": 4}},
            "training": {"maxSteps": 2, "batchSize": 4, "learningRate": "1e-2", "maxSeqLength": 64},
            "evaluation": {
                "metrics": ["evalLoss", "exactMatch"],
                "maxNewTokens": 4,
                "gates": [{"metric": "evalLoss", "max": "1000"}],
                "crossValidation": {"folds": 3},
            },
            "output": {"uri": str(tmp_path / "store")},
        },
    }


def test_a_fold_trains_the_jobs_recipe_but_skips_what_only_the_published_model_is_measured_on(
    config: dict[str, Any],
) -> None:
    config["spec"]["evaluation"]["reference"] = [{"name": "general", "uri": "general.jsonl"}]
    config["spec"]["evaluation"]["fairness"] = {}
    spec = parse_finetune_job(config).spec
    folded = fold_spec(spec)
    assert (folded.method, folded.training, folded.dataset) == (spec.method, spec.training, spec.dataset)
    assert folded.evaluation.metrics == spec.evaluation.metrics
    assert folded.evaluation.max_new_tokens == spec.evaluation.max_new_tokens
    evaluation = folded.evaluation.model_dump()
    assert (evaluation["gates"], evaluation["reference"]) == ([], [])
    assert evaluation["fairness"] is evaluation["harness"] is evaluation["cross_validation"] is None
    assert set(evaluation) == set(type(spec.evaluation).model_fields)  # no field made up by the copy


def test_curation_refuses_more_folds_than_training_examples_naming_the_field_and_both_numbers(
    config: dict[str, Any], tmp_path: Path
) -> None:
    config["spec"]["evaluation"]["crossValidation"]["folds"] = 10  # 12 rows, 9 left for training
    workspace = tmp_path / "run"
    with pytest.raises(DatasetError) as refused:
        steps.run_step("curate", config, str(workspace))
    assert str(refused.value) == (
        "spec.evaluation.crossValidation.folds: 10 folds need at least 10 curated training examples; "
        "curation kept 9"
    )
    assert not (workspace / WorkspaceLayout.TRAIN_SPLIT).exists()  # no half-written splits
    assert json.loads((workspace / WorkspaceLayout.ERROR).read_text())["step"] == "curate"


def test_each_fold_step_trains_and_evaluates_on_its_own_part_and_publish_summarizes_them(
    config: dict[str, Any], tmp_path: Path
) -> None:
    workspace = tmp_path / "run"
    steps.run_step("curate", config, str(workspace))
    training = (workspace / WorkspaceLayout.TRAIN_SPLIT).read_text().splitlines()
    assert len(training) == 9

    held_out_lines: list[str] = []
    for fold in range(3):
        result = steps.run_step("crossvalidate", config, str(workspace), fold=fold)
        fold_dir = workspace / WorkspaceLayout.fold(fold)
        fold_train = (fold_dir / WorkspaceLayout.TRAIN_SPLIT).read_text().splitlines()
        held_out = (fold_dir / WorkspaceLayout.VALIDATION_SPLIT).read_text().splitlines()
        assert (len(fold_train), len(held_out)) == (6, 3)
        assert sorted(fold_train + held_out) == sorted(training)
        held_out_lines += held_out
        assert (fold_dir / WorkspaceLayout.TRAINED).is_dir()
        evaluation = json.loads((fold_dir / WorkspaceLayout.FINAL_EVALUATION).read_text())
        assert evaluation["samples"] == 3 and evaluation["evalLoss"] > 0
        assert (result["fold"], result["heldOut"]) == (fold, 3)
    assert sorted(held_out_lines) == sorted(training)
    # The folds leave the run's own splits, model and evaluations alone.
    assert not (workspace / WorkspaceLayout.TRAINED).exists()
    assert not (workspace / WorkspaceLayout.FINAL_EVALUATION).exists()

    summary = write_cross_validation_summary(parse_finetune_job(config).spec, workspace)
    assert summary is not None and summary["folds"] == 3
    assert {"evalLoss", "exactMatch"} <= set(summary["metrics"])
    assert summary["metrics"]["evalLoss"]["perFold"] == [
        json.loads((workspace / WorkspaceLayout.fold(fold) / WorkspaceLayout.FINAL_EVALUATION).read_text())[
            "evalLoss"
        ]
        for fold in range(3)
    ]
    assert WorkspaceReport.read(str(workspace)).cross_validation == summary


def test_publish_refuses_to_summarize_while_a_fold_has_no_evaluation(
    config: dict[str, Any], tmp_path: Path
) -> None:
    workspace = tmp_path / "run"
    (workspace / WorkspaceLayout.fold(0) / "evaluation").mkdir(parents=True)
    (workspace / WorkspaceLayout.fold(0) / WorkspaceLayout.FINAL_EVALUATION).write_text('{"evalLoss": 1.0}')
    with pytest.raises(ComponentError, match=r"fold 1 of 3 has no evaluation") as refused:
        write_cross_validation_summary(parse_finetune_job(config).spec, workspace)
    assert refused.value.reason == "CrossValidationIncomplete"
    assert not (workspace / WorkspaceLayout.CROSS_VALIDATION).exists()


def test_the_fold_command_line_needs_a_fold(config: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        steps.main(["crossvalidate", "--config-json", json.dumps(config), "--workspace", str(tmp_path)])
    with pytest.raises(SystemExit):
        steps.main(
            ["curate", "--fold", "0", "--config-json", json.dumps(config), "--workspace", str(tmp_path)]
        )
