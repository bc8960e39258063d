"""The periodic evaluations of `training.evalEverySteps`: what the training loop calls every N steps.

Each evaluation scores the model being trained on the validation split (evalLoss and perplexity always,
exactMatch when evaluation.metrics asks for it), records it in the run's `CheckpointHistory`
(selection.py) and rewrites `evaluation/checkpoints.json`, which the operator shows as status.checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, DatasetError
from kubetune_components.finetune.checkpoints import list_checkpoints, load_trainable_weights
from kubetune_components.finetune.evaluate import (
    evaluate_model,
    inference_precision,
    read_validation_examples,
)
from kubetune_components.finetune.methods import trainable_parameters
from kubetune_components.finetune.selection import (
    CHECKPOINT_METRICS,
    CheckpointEvaluation,
    CheckpointHistory,
)
from kubetune_contract.finetune import FineTuneJobSpec
from kubetune_contract.workspace import WorkspaceLayout

HISTORY_STATE_KEY = "evaluations"
"""Where a checkpoint's state.json keeps the history of evaluations up to its step."""


class PeriodicEvaluator:
    """Evaluates every `every_steps` optimizer steps; keeps the history; says when to stop early."""

    def __init__(
        self,
        spec: FineTuneJobSpec,
        examples: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        workspace_dir: Path,
        device: torch.device,
        *,
        write_reports: bool = True,
    ) -> None:
        every = spec.training.eval_every_steps
        assert every is not None, "a periodic evaluator needs training.evalEverySteps"
        self.every_steps = every
        self.spec = spec
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.report_path = workspace_dir / WorkspaceLayout.CHECKPOINT_EVALUATIONS
        self.device = device
        self.write_reports = write_reports  # one process of a distributed run writes for all
        self.history = CheckpointHistory(
            select=spec.output.select,
            select_metric=spec.output.select_metric,
            early_stopping=spec.training.early_stopping,
        )
        wanted = [*spec.evaluation.metrics, "evalLoss", "perplexity"]
        self.settings = spec.evaluation.model_copy(update={"metrics": list(dict.fromkeys(wanted))})

    def restore(self, state: Mapping[str, Any] | None, step: int) -> None:
        """Continue with the history saved in the checkpoint of `step` (none for a fresh start)."""
        records = (state or {}).get(HISTORY_STATE_KEY) or []
        self.history.restore(records, step)
        self._write(last_step=None, early_stopped_at=None)

    def evaluate(self, model: torch.nn.Module, step: int, train_loss: float | None) -> None:
        training = self.spec.training
        metrics, _ = evaluate_model(
            model,
            self.tokenizer,
            self.examples,
            self.spec.dataset.format,
            self.settings,
            max_seq_length=training.max_seq_length,
            batch_size=training.batch_size,
            device=self.device,
            precision=inference_precision(training.precision, self.device),
        )
        numbers = {key: float(metrics[key]) for key in CHECKPOINT_METRICS if key in metrics}
        self.history.record(CheckpointEvaluation(step=step, train_loss=train_loss, metrics=numbers))
        self._write(last_step=None, early_stopped_at=None)

    def should_stop(self) -> bool:
        return self.history.should_stop()

    def protected_steps(self) -> set[int]:
        return self.history.protected_steps()

    def checkpoint_state(self) -> dict[str, Any]:
        return {HISTORY_STATE_KEY: self.history.to_json()}

    def finish(self, last_step: int, early_stopped_at: int | None) -> dict[str, Any]:
        """Write the final report (the selected checkpoint marked); returns it."""
        return self._write(last_step=last_step, early_stopped_at=early_stopped_at)

    def select_weights(
        self,
        model: torch.nn.Module,
        last_step: int,
        early_stopped_at: int | None,
        checkpoint_dir: Path,
        fingerprint: str,
    ) -> dict[str, Any]:
        """Put the selected checkpoint's weights into `model` (unless they are the last step's, which it
        holds), write the final report; returns what the training record says of the selection."""
        selected = self.history.selected_step(last_step)
        if selected != last_step:
            checkpoint = next(
                (
                    c
                    for c in list_checkpoints(checkpoint_dir)
                    if c.step == selected and c.state.get("fingerprint") == fingerprint
                ),
                None,
            )
            if checkpoint is None:
                raise ComponentError(
                    f"output.select best: the checkpoint of step {selected} is missing from {checkpoint_dir}"
                )
            load_trainable_weights(checkpoint, trainable_parameters(model))
        self.finish(last_step, early_stopped_at)
        chosen = next((e for e in self.history.evaluations if e.step == selected), None)
        return {
            "select": self.history.select,
            "selectMetric": self.history.select_metric,
            "selectedStep": selected,
            "selectedMetrics": dict(chosen.metrics) if chosen is not None else None,
        }

    def _write(self, *, last_step: int | None, early_stopped_at: int | None) -> dict[str, Any]:
        report = self.history.report(last_step=last_step, early_stopped_at=early_stopped_at)
        if self.write_reports:
            storage.atomic_write_json(self.report_path, report)
        return report


def periodic_evaluator(
    spec: FineTuneJobSpec, workspace_dir: Path, tokenizer: Any, device: torch.device, *, write_reports: bool
) -> PeriodicEvaluator | None:
    """The evaluator of training.evalEverySteps (None when it is not set); refuses an empty validation
    split, naming the field."""
    if spec.training.eval_every_steps is None:
        return None
    examples = read_validation_examples(workspace_dir, spec.dataset.format)
    if not examples:
        raise DatasetError(
            "training.evalEverySteps: the validation split is empty, so there is nothing to evaluate on "
            "while training; set dataset.validationSplit above 0 or dataset.validationUri"
        )
    return PeriodicEvaluator(spec, examples, tokenizer, workspace_dir, device, write_reports=write_reports)
