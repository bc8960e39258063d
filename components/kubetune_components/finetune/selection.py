"""Checkpoints as results: the periodic evaluations of a run, the one to publish, and when to stop early.

With `training.evalEverySteps` the loop evaluates the model on the validation split every N steps (and at
its last step) and saves a checkpoint each time. `CheckpointHistory` keeps those evaluations in order; it
is pure bookkeeping, saved with every checkpoint, so a resumed run continues with the history of the
checkpoint it resumed from.

- `output.select: last` publishes the weights after the last step; `best` the evaluated checkpoint whose
  `output.selectMetric` is best (lower evalLoss or perplexity, higher exactMatch; the earliest wins a tie).
- `training.earlyStopping: {metric, patience}` stops once `patience` evaluations in a row have not beaten
  the best value of `metric` so far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_components.common import storage
from kubetune_components.common.errors import DatasetError
from kubetune_contract.finetune import LOWER_IS_BETTER, EarlyStopping, FineTuneJobSpec

CHECKPOINT_METRICS = ("evalLoss", "perplexity", "exactMatch", "lenientMatch")
"""The numbers of an evaluation that an entry keeps."""


@dataclass(frozen=True)
class CheckpointEvaluation:
    """One periodic evaluation: the step, the training loss there, the validation metrics."""

    step: int
    train_loss: float | None
    metrics: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "trainLoss": self.train_loss, "metrics": dict(self.metrics)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> CheckpointEvaluation:
        loss = record.get("trainLoss")
        return cls(
            step=int(record["step"]),
            train_loss=float(loss) if loss is not None else None,
            metrics={str(k): float(v) for k, v in dict(record.get("metrics") or {}).items()},
        )


def is_better(metric: str, candidate: float, incumbent: float) -> bool:
    """Whether `candidate` strictly beats `incumbent` on `metric`."""
    return candidate < incumbent if metric in LOWER_IS_BETTER else candidate > incumbent


def best_evaluation(evaluations: Sequence[CheckpointEvaluation], metric: str) -> CheckpointEvaluation | None:
    """The evaluation with the best `metric` (the earliest of equals); None when none measured it."""
    best: CheckpointEvaluation | None = None
    for evaluation in evaluations:
        value = evaluation.metrics.get(metric)
        if value is None:
            continue
        if best is None or is_better(metric, value, best.metrics[metric]):
            best = evaluation
    return best


def evaluations_without_improvement(evaluations: Sequence[CheckpointEvaluation], metric: str) -> int:
    """How many evaluations in a row, up to the latest, have not beaten the best `metric` before them."""
    best: float | None = None
    stale = 0
    for evaluation in evaluations:
        value = evaluation.metrics.get(metric)
        if value is None:
            continue
        if best is None or is_better(metric, value, best):
            best, stale = value, 0
        else:
            stale += 1
    return stale


@dataclass
class CheckpointHistory:
    """The periodic evaluations of one run, and the decisions they drive."""

    select: str = "last"
    select_metric: str = "evalLoss"
    early_stopping: EarlyStopping | None = None
    evaluations: list[CheckpointEvaluation] = field(default_factory=list)

    def record(self, evaluation: CheckpointEvaluation) -> None:
        """Add an evaluation (one of a step already recorded, after a resume, replaces it)."""
        self.evaluations = [e for e in self.evaluations if e.step < evaluation.step] + [evaluation]

    def restore(self, records: Sequence[Mapping[str, Any]], up_to_step: int) -> None:
        """The history saved with a checkpoint of `up_to_step` (later entries are dropped)."""
        self.evaluations = [
            e for e in (CheckpointEvaluation.from_json(r) for r in records) if e.step <= up_to_step
        ]

    def should_stop(self) -> bool:
        """Whether early stopping ends training now."""
        if self.early_stopping is None:
            return False
        stale = evaluations_without_improvement(self.evaluations, self.early_stopping.metric)
        return stale >= self.early_stopping.patience

    def best(self) -> CheckpointEvaluation | None:
        return best_evaluation(self.evaluations, self.select_metric)

    def selected_step(self, last_step: int) -> int:
        """The step whose weights are published: `last_step`, or the best evaluation's with select best."""
        if self.select == "best" and (best := self.best()) is not None:
            return best.step
        return last_step

    def protected_steps(self) -> set[int]:
        """Checkpoints that pruning must keep: the best one, which select best may publish."""
        best = self.best() if self.select == "best" else None
        return {best.step} if best is not None else set()

    def to_json(self) -> list[dict[str, Any]]:
        return [evaluation.to_json() for evaluation in self.evaluations]

    def report(self, *, last_step: int | None, early_stopped_at: int | None) -> dict[str, Any]:
        """What evaluation/checkpoints.json holds (status.checkpoints comes from it)."""
        selected = self.selected_step(last_step) if last_step is not None else None
        return {
            "select": self.select,
            "selectMetric": self.select_metric,
            "selectedStep": selected,
            "earlyStoppedAtStep": early_stopped_at,
            "checkpoints": [
                {**evaluation.to_json(), "selected": evaluation.step == selected}
                for evaluation in self.evaluations
            ],
        }


def selection_fingerprint(spec: FineTuneJobSpec, validation_file: Path) -> dict[str, Any]:
    """What, beyond the training settings, decides the published weights: the checkpoint selection and
    the validation data it judges (with training.evalEverySteps), and the replayed data."""
    relevant: dict[str, Any] = {}
    if spec.training.eval_every_steps is not None:
        relevant["selection"] = {
            "select": spec.output.select,
            "selectMetric": spec.output.select_metric,
            "evaluation": spec.evaluation.model_dump(include={"metrics", "max_new_tokens", "max_samples"}),
            "validationData": storage.sha256_of(str(validation_file)) if validation_file.is_file() else None,
        }
    if spec.training.replay is not None:
        uri = spec.training.replay.uri
        try:
            relevant["replayData"] = storage.sha256_of(uri)
        except OSError as error:
            raise DatasetError(f"training.replay.uri: cannot read {uri} ({error})") from error
    return relevant
