"""evaluation.crossValidation: what `kubetune validate` and the CRD refuse, each naming the field, and what
they accept."""

from __future__ import annotations

from typing import Any

import pytest
from test_cel import admit, tiny_job, validate

from kubetune_contract.finetune import CROSS_VALIDATION_NOT_DISTRIBUTED, MAX_FOLDS

ACCEPTED = {
    "two folds": tiny_job(evaluation={"crossValidation": {"folds": 2}}),
    "the most folds": tiny_job(evaluation={"crossValidation": {"folds": MAX_FOLDS}}),
    "folds with distillation": tiny_job(
        method={"type": "distillation", "distillation": {"teacher": {"uri": "models/teacher"}}},
        evaluation={"crossValidation": {"folds": 3}},
    ),
    "folds with periodic evaluation and best-checkpoint selection": tiny_job(
        training={"evalEverySteps": 5},
        output={"select": "best"},
        evaluation={"crossValidation": {"folds": 5}},
    ),
}


@pytest.mark.parametrize("doc", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_validate_and_by_the_api_server(doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    assert admit(doc) == []


@pytest.mark.parametrize("folds", [1, 0, MAX_FOLDS + 1])
def test_a_fold_count_out_of_range_is_refused_naming_the_field(folds: int) -> None:
    doc = tiny_job(evaluation={"crossValidation": {"folds": folds}})
    [issue] = validate(doc)
    assert issue.startswith("FineTuneJob/demo: spec.evaluation.crossValidation.folds: ")
    [said] = admit(doc)
    assert said.startswith("spec.evaluation.crossValidation.folds: ")


def test_folds_are_required_once_cross_validation_is_asked_for() -> None:
    [issue] = validate(tiny_job(evaluation={"crossValidation": {}}))
    assert issue.startswith("FineTuneJob/demo: spec.evaluation.crossValidation.folds: ")


def test_cross_validation_with_distributed_training_is_refused_by_validate_and_by_the_api_server() -> None:
    doc = tiny_job(evaluation={"crossValidation": {"folds": 3}}, training={"distributed": {"workers": 2}})
    assert validate(doc) == [
        f"FineTuneJob/demo: spec.evaluation.crossValidation: {CROSS_VALIDATION_NOT_DISTRIBUTED}"
    ]
    assert admit(doc) == [f"spec.evaluation.crossValidation: {CROSS_VALIDATION_NOT_DISTRIBUTED}"]
