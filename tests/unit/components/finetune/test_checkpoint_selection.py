"""Checkpoints as results: which evaluated checkpoint is best, when early stopping stops, which checkpoints
pruning keeps, and that select best puts the best checkpoint's weights into the model that is saved."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.finetune.checkpoints import list_checkpoints
from kubetune_components.finetune.loop import train
from kubetune_components.finetune.methods import apply_method, trainable_parameters
from kubetune_components.finetune.periodic import PeriodicEvaluator, periodic_evaluator
from kubetune_components.finetune.selection import (
    CheckpointEvaluation,
    CheckpointHistory,
    best_evaluation,
    evaluations_without_improvement,
)
from kubetune_contract.finetune import EarlyStopping, FineTuneJobSpec
from kubetune_contract.workspace import WorkspaceLayout


def evaluation(step: int, **metrics: float) -> CheckpointEvaluation:
    return CheckpointEvaluation(step=step, train_loss=1.0, metrics=metrics)


LOSSES = [evaluation(5, evalLoss=2.0), evaluation(10, evalLoss=1.5), evaluation(15, evalLoss=1.7)]


def test_best_is_the_lowest_loss_or_the_highest_exact_match_and_the_earliest_of_equals() -> None:
    assert best_evaluation(LOSSES, "evalLoss") == LOSSES[1]
    matches = [evaluation(5, exactMatch=0.2), evaluation(10, exactMatch=0.5), evaluation(15, exactMatch=0.5)]
    assert best_evaluation(matches, "exactMatch") == matches[1]
    assert best_evaluation(LOSSES, "exactMatch") is None  # never measured


def test_evaluations_without_improvement_count_from_the_last_new_best() -> None:
    assert evaluations_without_improvement(LOSSES, "evalLoss") == 1
    flat = [evaluation(step, evalLoss=1.0) for step in (5, 10, 15)]
    assert evaluations_without_improvement(flat, "evalLoss") == 2  # equal is not better


def test_select_last_publishes_the_last_step_and_select_best_the_best_evaluation() -> None:
    history = CheckpointHistory(select="last", evaluations=list(LOSSES))
    assert history.selected_step(last_step=15) == 15
    assert history.protected_steps() == set()
    best = CheckpointHistory(select="best", select_metric="evalLoss", evaluations=list(LOSSES))
    assert best.selected_step(last_step=15) == 10
    assert best.protected_steps() == {10}
    report = best.report(last_step=15, early_stopped_at=None)
    assert [(c["step"], c["selected"]) for c in report["checkpoints"]] == [
        (5, False),
        (10, True),
        (15, False),
    ]
    assert report["selectedStep"] == 10


@pytest.mark.parametrize(("patience", "stops"), [(1, True), (2, False)])
def test_early_stopping_waits_for_patience_evaluations_without_a_new_best(patience: int, stops: bool) -> None:
    history = CheckpointHistory(early_stopping=EarlyStopping(metric="evalLoss", patience=patience))
    for entry in LOSSES:
        history.record(entry)
    assert history.should_stop() is stops


def test_a_resumed_history_drops_evaluations_after_its_checkpoint_and_a_repeat_replaces_one() -> None:
    history = CheckpointHistory()
    history.restore([entry.to_json() for entry in LOSSES], up_to_step=10)
    assert [entry.step for entry in history.evaluations] == [5, 10]
    history.record(evaluation(10, evalLoss=1.4))
    assert [entry.metrics["evalLoss"] for entry in history.evaluations] == [2.0, 1.4]


# -- the loop with periodic evaluations ------------------------------------------------------------


ROWS = [
    {"instruction": "Route the ticket.", "input": f"Ticket {i} about {topic}", "output": topic}
    for i, topic in enumerate(["billing", "shipping", "account", "technical"] * 6)
]


class ScriptedEvaluator(PeriodicEvaluator):
    """The real evaluator's bookkeeping, with validation losses given in advance instead of measured, so
    the test decides which checkpoint is best."""

    def __init__(self, losses: Mapping[int, float], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses = losses

    def evaluate(self, model: torch.nn.Module, step: int, train_loss: float | None) -> None:
        self.history.record(CheckpointEvaluation(step, train_loss, {"evalLoss": self.losses[step]}))


def spec_for(model_dir: Path, **training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": str(model_dir)},
            "dataset": {"uri": "unused.jsonl"},
            "method": {"type": "lora", "lora": {"r": 4}},
            "training": {
                "maxSteps": 12,
                "batchSize": 4,
                "learningRate": "5e-2",
                "maxSeqLength": 128,
                "checkpointEverySteps": 1000,
                "keepCheckpoints": 1,
                "evalEverySteps": 3,
                **training,
            },
            "evaluation": {"metrics": ["evalLoss"]},
            "output": {"select": "best"},
        }
    )


def run(
    spec: FineTuneJobSpec, tokenizer: PreTrainedTokenizerBase, workspace: Path, losses: Mapping[int, float]
) -> tuple[torch.nn.Module, ScriptedEvaluator, Any]:
    torch.manual_seed(0)
    model = apply_method(models.load_causal_lm(spec.base_model.uri), spec.method, tokenizer)
    features = [data.tokenize_for_training(row, "instruction", tokenizer, 128) for row in ROWS]
    evaluator = ScriptedEvaluator(losses, spec, ROWS[:4], tokenizer, workspace, torch.device("cpu"))
    result = train(
        model,
        [feature for feature in features if feature is not None],
        spec.training,
        pad_token_id=int(tokenizer.pad_token_id),
        checkpoint_dir=workspace / WorkspaceLayout.CHECKPOINTS,
        fingerprint="f",
        evaluator=evaluator,
    )
    return model, evaluator, result


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainable_parameters(model).items()}


def test_select_best_keeps_the_best_checkpoint_and_publishes_its_weights(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    spec = spec_for(tiny_model_dir)
    model, evaluator, result = run(spec, tiny_tokenizer, tmp_path, {3: 2.0, 6: 1.0, 9: 1.5, 12: 1.8})
    assert result.steps == 12 and result.early_stopped_at_step is None
    # keepCheckpoints 1 keeps the newest, and the best one besides: select best may publish it.
    assert [c.step for c in list_checkpoints(tmp_path / WorkspaceLayout.CHECKPOINTS)] == [6, 12]
    last_weights = trainable_state(model)

    selection = evaluator.select_weights(model, 12, None, tmp_path / WorkspaceLayout.CHECKPOINTS, "f")
    assert selection == {
        "select": "best",
        "selectMetric": "evalLoss",
        "selectedStep": 6,
        "selectedMetrics": {"evalLoss": 1.0},
    }
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / WorkspaceLayout.CHECKPOINTS / "step-6" / "trainable.safetensors"))
    now = trainable_state(model)
    assert all(torch.equal(now[name], saved[name]) for name in now)
    assert not all(torch.equal(now[name], last_weights[name]) for name in now)
    report = json.loads((tmp_path / WorkspaceLayout.CHECKPOINT_EVALUATIONS).read_text())
    assert [(c["step"], c["selected"]) for c in report["checkpoints"]] == [
        (3, False),
        (6, True),
        (9, False),
        (12, False),
    ]


def test_early_stopping_ends_training_and_its_checkpoint_records_why(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    spec = spec_for(tiny_model_dir, earlyStopping={"metric": "evalLoss", "patience": 2})
    _, _, result = run(spec, tiny_tokenizer, tmp_path, {3: 1.0, 6: 1.2, 9: 1.1, 12: 0.5})
    assert (result.steps, result.early_stopped_at_step) == (9, 9)
    checkpoints = list_checkpoints(tmp_path / WorkspaceLayout.CHECKPOINTS)
    assert [c.step for c in checkpoints] == [3, 9]
    # A run interrupted now resumes from step 9 with the history that stopped it, and stops again at once.
    _, resumed, again = run(spec, tiny_tokenizer, tmp_path, {})
    assert (again.resumed_from_step, again.steps, again.early_stopped_at_step) == (9, 9, 9)
    assert [e.step for e in resumed.history.evaluations] == [3, 6, 9]


def test_eval_every_steps_without_held_out_examples_is_refused_naming_the_field(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / WorkspaceLayout.VALIDATION_SPLIT).write_text("")
    from kubetune_components.common.errors import DatasetError

    with pytest.raises(DatasetError, match=r"^training\.evalEverySteps: the validation split is empty"):
        periodic_evaluator(
            spec_for(tiny_model_dir), tmp_path, tiny_tokenizer, torch.device("cpu"), write_reports=True
        )
