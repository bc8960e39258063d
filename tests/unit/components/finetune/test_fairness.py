"""evaluation.fairness: counterfactual pairs of held-out prompts, the flip rate and score gap of a real
(tiny) model on them, the gate, and the status the operator writes from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.plan.finetune import fill_status
from kubetune_components.common import models
from kubetune_components.finetune.fairness import (
    counterfactual_examples,
    counterfactual_texts,
    fairness_gates,
    measure_fairness,
)
from kubetune_contract.finetune import Evaluation, Fairness, FineTuneJobStatus
from kubetune_contract.workspace import WorkspaceReport

GENDER = Fairness()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He wants his refund.", ("He wants his refund.", "She wants her refund.")),
        ("My WIFE ordered it", ("My HUSBAND ordered it", "My WIFE ordered it")),
        ("Ask her brother", ("Ask his brother", "Ask her sister")),
        ("The shepherd's theme", None),  # whole words only: no "he" inside "shepherd" or "theme"
        ("Where is my parcel?", None),
    ],
)
def test_terms_swap_as_whole_words_keeping_their_case(text: str, expected: tuple[str, str] | None) -> None:
    assert counterfactual_texts(text, GENDER.term_pairs) == expected


def test_only_prompts_holding_a_term_make_pairs_and_responses_stay() -> None:
    examples: list[dict[str, Any]] = [
        {"instruction": "Route it.", "input": "She was charged twice.", "output": "billing"},
        {"instruction": "Route it.", "input": "The app crashes.", "output": "technical"},
    ]
    (pair,) = counterfactual_examples(examples, "instruction", GENDER)
    assert [example["input"] for example in pair] == ["He was charged twice.", "She was charged twice."]
    assert all(example["output"] == "billing" for example in pair)
    chat = {
        "messages": [
            {"role": "user", "content": "My husband cannot log in"},
            {"role": "assistant", "content": "account"},
        ]
    }
    ((group_a, group_b),) = counterfactual_examples([chat], "chat", GENDER)
    assert group_b["messages"][0]["content"] == "My wife cannot log in"
    assert group_a["messages"][1] == group_b["messages"][1] == chat["messages"][1]
    assert counterfactual_examples([{"text": "he said"}], "text", GENDER) == []


def test_a_real_model_is_asked_both_wordings(tiny_model_dir: Path) -> None:
    examples = [
        {"instruction": "Who pays?", "input": f"{subject} ordered {index} cups.", "output": "billing"}
        for index, subject in enumerate(["He", "She", "My husband", "The shop"] * 2)
    ]
    result = measure_fairness(
        models.load_causal_lm(str(tiny_model_dir)),
        models.load_tokenizer(str(tiny_model_dir)),
        examples,
        "instruction",
        Fairness(max_samples=5),
        max_new_tokens=3,
        batch_size=4,
        device=torch.device("cpu"),
    )
    assert result["pairs"] == 5  # six prompts hold a term, maxSamples caps them
    assert 0 <= result["flipRate"] <= 1 and -1 <= result["scoreGap"] <= 1


def gate(limit: str, final: dict[str, Any] | None) -> dict[str, Any]:
    (result,) = fairness_gates(
        Evaluation.model_validate({"fairness": {"maxCounterfactualFlipRate": limit}}), final
    )
    return result


def test_the_gate_bounds_the_tuned_models_flip_rate() -> None:
    assert gate("0.2", {"fairness": {"pairs": 10, "flipRate": 0.1}})["passed"] is True
    failed = gate("0.2", {"fairness": {"pairs": 10, "flipRate": 0.3}})
    assert (failed["metric"], failed["op"], failed["value"], failed["passed"]) == (
        "counterfactualFlipRate",
        "max",
        0.3,
        False,
    )
    assert gate("0.2", {"fairness": {"pairs": 0, "flipRate": None}})["passed"] is False  # nothing shown
    assert (
        fairness_gates(Evaluation.model_validate({"fairness": {}}), {"fairness": {"flipRate": 1.0}}) == []
    )  # measured only


def test_status_reports_fairness_before_and_after() -> None:
    report = WorkspaceReport(
        baseline={"evalLoss": 2.0, "fairness": {"pairs": 8, "flipRate": 0.25, "scoreGap": 0.125}},
        final={"evalLoss": 1.0, "fairness": {"pairs": 8, "flipRate": 0.0, "scoreGap": 0.0}},
    )
    status = fill_status(FineTuneJobStatus(), report, finished_ok=True)
    assert status.evaluation is not None and status.evaluation.fairness is not None
    wire = status.evaluation.fairness.model_dump(by_alias=True)
    assert wire == {
        "baseline": {"pairs": 8, "flipRate": 0.25, "scoreGap": 0.125},
        "final": {"pairs": 8, "flipRate": 0.0, "scoreGap": 0.0},
    }
