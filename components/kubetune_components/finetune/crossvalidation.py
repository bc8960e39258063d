"""k-fold cross-validation (evaluation.crossValidation): an estimate of the recipe's held-out quality, and
of how much it varies, on data too small to trust one validation split.

The curated training examples (data/train.jsonl) are shuffled with dataset.seed and dealt into k parts,
whose sizes differ by at most one. Fold i is a workspace of its own (WorkspaceLayout.fold(i)): it trains
the job's recipe on the other k-1 parts and evaluates on part i, with the same functions the finetune and
evaluate steps use. The folds are independent, so the pipeline runs them as parallel tasks. The publish
step then summarizes them (evaluation/cross-validation.json: each metric's mean, standard deviation and
per-fold values), and the lineage manifest keeps that summary. The published model itself is trained by
the ordinary finetune step, on all the curated training examples.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError, DatasetError
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.finetune.evaluate import run_evaluation
from kubetune_components.finetune.train import run_finetune
from kubetune_contract.finetune import FineTuneJobSpec
from kubetune_contract.workspace import WorkspaceLayout

FOLDS_FIELD = "spec.evaluation.crossValidation.folds"

Example = TypeVar("Example")


def fold_parts(count: int, folds: int, seed: int) -> list[list[int]]:
    """The indices of `count` examples dealt into `folds` disjoint parts covering them all: shuffled with
    `seed`, then dealt round-robin, so the parts' sizes differ by at most one."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return [sorted(order[part::folds]) for part in range(folds)]


def fold_split(
    examples: Sequence[Example], folds: int, fold: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) of fold `fold` (0-based): it holds out its own part."""
    if not 0 <= fold < folds:
        raise ConfigError(f"fold {fold} does not exist: {FOLDS_FIELD} is {folds} (folds 0 to {folds - 1})")
    held_out = set(fold_parts(len(examples), folds, seed)[fold])
    train = [example for index, example in enumerate(examples) if index not in held_out]
    return train, [examples[index] for index in sorted(held_out)]


def check_fold_count(folds: int, training_examples: int) -> None:
    """Every fold must hold out at least one example; curation refuses more folds than examples."""
    if folds > training_examples:
        raise DatasetError(
            f"{FOLDS_FIELD}: {folds} folds need at least {folds} curated training examples; curation kept "
            f"{training_examples}"
        )


def fold_spec(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    """The spec a fold trains and evaluates with: the job's recipe and held-out metrics, without what only
    the published model is measured on (reference sets, fairness, the lm-eval harness, gates) or a
    cross-validation of its own."""
    evaluation = spec.evaluation.model_copy(
        update={
            "gates": [],
            "reference": [],
            "max_reference_drop": None,
            "fairness": None,
            "harness": None,
            "cross_validation": None,
        }
    )
    return spec.model_copy(update={"evaluation": evaluation})


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; the curate step must run before the folds")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, examples: Sequence[Mapping[str, Any]]) -> None:
    storage.atomic_write_text(
        path, "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)
    )


def run_fold(spec: FineTuneJobSpec, workspace_dir: Path, fold: int) -> dict[str, Any]:
    """Train fold `fold` on the other parts and evaluate it on its own; returns its evaluation (also in
    the fold's evaluation/final.json). A fold trained before (same data and recipe) is only evaluated."""
    settings = spec.evaluation.cross_validation
    if settings is None:
        raise ConfigError("crossvalidate-fold: the job has no evaluation.crossValidation")
    examples = _read_jsonl(workspace_dir / WorkspaceLayout.TRAIN_SPLIT)
    check_fold_count(settings.folds, len(examples))
    train, held_out = fold_split(examples, settings.folds, fold, spec.dataset.seed)
    fold_dir = workspace_dir / WorkspaceLayout.fold(fold)
    _write_jsonl(fold_dir / WorkspaceLayout.TRAIN_SPLIT, train)
    _write_jsonl(fold_dir / WorkspaceLayout.VALIDATION_SPLIT, held_out)
    recipe = fold_spec(spec)
    progress = ProgressReporter(fold_dir)
    training = run_finetune(recipe, fold_dir, progress=progress)
    evaluation = run_evaluation(recipe, fold_dir, "final", progress=progress)
    progress.set_phase("done")
    return {
        "fold": fold,
        "train": len(train),
        "heldOut": len(held_out),
        "trainLoss": training.get("trainLoss"),
        **evaluation,
    }


def _numbers(evaluation: Mapping[str, Any]) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in evaluation.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and name != "samples"
    }


def summarize_folds(evaluations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each metric every fold reports: its mean, standard deviation (population: divided by k) and
    per-fold values, in fold order. A metric some fold lacks is left out rather than averaged over fewer."""
    if not evaluations:
        raise ValueError("no folds to summarize")
    per_fold = [_numbers(evaluation) for evaluation in evaluations]
    shared = [name for name in per_fold[0] if all(name in numbers for numbers in per_fold[1:])]
    metrics: dict[str, Any] = {}
    for name in shared:
        values = [numbers[name] for numbers in per_fold]
        if not all(math.isfinite(value) for value in values):
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
        metrics[name] = {"mean": mean, "std": std, "perFold": values}
    return {"folds": len(evaluations), "metrics": metrics}


def write_cross_validation_summary(spec: FineTuneJobSpec, workspace_dir: Path) -> dict[str, Any] | None:
    """Summarize the folds' evaluations into evaluation/cross-validation.json; None without
    evaluation.crossValidation. Raises ComponentError when a fold has no evaluation."""
    settings = spec.evaluation.cross_validation
    if settings is None:
        return None
    evaluations = []
    for fold in settings.fold_indices():
        path = workspace_dir / WorkspaceLayout.fold(fold) / WorkspaceLayout.FINAL_EVALUATION
        try:
            evaluations.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            raise ComponentError(
                f"fold {fold} of {settings.folds} has no evaluation ({path}); every crossvalidate-fold task "
                "must finish before publish",
                "CrossValidationIncomplete",
            ) from None
    summary = summarize_folds(evaluations)
    storage.atomic_write_json(workspace_dir / WorkspaceLayout.CROSS_VALIDATION, summary)
    return summary
