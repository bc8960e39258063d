"""Evaluation metrics: evalLoss / perplexity on hand-checkable models, exact match, the step's files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.errors import DatasetError
from kubetune_components.finetune import evaluate as ev
from kubetune_components.finetune import loop, methods
from kubetune_components.finetune import train as ft
from kubetune_contract.finetune import Evaluation, Method, Scheduler, Training

CPU = torch.device("cpu")
ROWS = [
    {"instruction": "Route the ticket.", "input": "I was charged twice", "output": "billing"},
    {"instruction": "Route the ticket.", "input": "The app crashes on start", "output": "technical"},
    {"instruction": "Route the ticket.", "input": "Reset my password", "output": "account"},
    {"instruction": "Route the ticket.", "input": "Where is my parcel", "output": "shipping"},
    {"instruction": "Route the ticket.", "input": "I want my money back for the shoes", "output": "returns"},
]


class FixedDistributionLM(torch.nn.Module):
    """Predicts the same next-token distribution everywhere, so the loss can be worked out by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, length, -1))


def test_eval_loss_and_perplexity_by_hand(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = len(tiny_tokenizer)
    torch.manual_seed(0)
    logits = torch.randn(vocab)
    model = FixedDistributionLM(logits)
    # Only the response tokens and the eos after them count, whatever the prompt says.
    expected_losses = []
    for row in ROWS:
        response_ids = tiny_tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        for token in [*response_ids, tiny_tokenizer.eos_token_id]:
            expected_losses.append(-torch.log_softmax(logits, dim=-1)[token].item())
    expected = sum(expected_losses) / len(expected_losses)

    settings = Evaluation(metrics=["evalLoss", "perplexity"])
    result, predictions = ev.evaluate_model(
        model, tiny_tokenizer, ROWS, "instruction", settings, max_seq_length=128, batch_size=2, device=CPU
    )
    assert result["evalLoss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["samples"] == len(ROWS)
    assert "exactMatch" not in result and predictions == []

    uniform = FixedDistributionLM(torch.zeros(vocab))
    loss, tokens = ev.mean_token_loss(
        uniform,
        ft.tokenize_examples(ROWS, "instruction", tiny_tokenizer, 128),
        pad_token_id=tiny_tokenizer.pad_token_id,
        batch_size=3,
        device=CPU,
    )
    assert loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert tokens == len(expected_losses)


def test_exact_match_strips_whitespace_and_respects_max_samples(
    tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_prompts: list[list[int]] = []

    def fake_greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], **_: Any) -> list[str]:
        seen_prompts.extend(prompts)
        return [" billing\n", "technical", "Account", "parcel"][: len(prompts)]

    monkeypatch.setattr(ev, "greedy_responses", fake_greedy)
    score, records = ev.exact_match(
        torch.nn.Linear(1, 1),
        tiny_tokenizer,
        ROWS,
        "instruction",
        max_new_tokens=4,
        max_samples=4,
        batch_size=2,
        device=CPU,
    )
    assert score == pytest.approx(0.5)  # billing and technical match; case and wrong words do not
    assert [record["match"] for record in records] == [True, True, False, False]
    assert len(seen_prompts) == 4
    prompt, _ = data.render_prompt_and_response(ROWS[0], "instruction", tiny_tokenizer)
    assert seen_prompts[0] == data.prompt_token_ids(prompt, "instruction", tiny_tokenizer)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("billing", "billing", True),
        ("Billing.", "billing", True),  # case and punctuation around the word do not matter
        ("This goes to the billing team\nor maybe shipping", "billing", True),
        ("\n  billing\n", "billing", True),  # the first non-empty line counts
        ("shipping\nbilling", "billing", False),  # only the first line counts
        ("rebilling", "billing", False),  # whole words only
        ("billings", "billing", False),
        ("", "billing", False),
        ("return policy", "return policy", True),
        ("anything", "  ", False),  # an empty reference matches nothing
    ],
)
def test_lenient_match_finds_the_reference_as_a_whole_word_in_the_first_line(
    prediction: str, reference: str, expected: bool
) -> None:
    assert ev.is_lenient_match(prediction, reference) is expected


def test_lenient_match_is_reported_beside_exact_match(
    tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_greedy(model: Any, tokenizer: Any, prompts: Sequence[list[int]], **_: Any) -> list[str]:
        return ["billing", "It is technical.", "Account", "parcel"][: len(prompts)]

    monkeypatch.setattr(ev, "greedy_responses", fake_greedy)
    result, records = ev.evaluate_model(
        torch.nn.Linear(1, 1),
        tiny_tokenizer,
        ROWS,
        "instruction",
        Evaluation(metrics=["exactMatch"], max_samples=4),
        max_seq_length=128,
        batch_size=2,
        device=CPU,
    )
    assert [record["lenientMatch"] for record in records] == [True, True, True, False]
    assert result["exactMatch"] == pytest.approx(0.25)
    assert result["lenientMatch"] == pytest.approx(0.75)


TRAIN_PAIRS = [
    ("my card was charged twice", "billing"),
    ("the app crashes on my phone", "technical"),
    ("refund the charge on my card", "billing"),
    ("where is my parcel", "shipping"),
]


def test_the_majority_class_baseline_always_answers_the_most_common_training_response() -> None:
    held_out = [("anything at all", "billing"), ("my parcel is late", "shipping"), ("crash", "technical")]
    assert ev.majority_class_predictions([response for _, response in TRAIN_PAIRS], 2) == ["billing"] * 2
    assert ev.reference_baselines(TRAIN_PAIRS, held_out)["majorityClass"] == pytest.approx(1 / 3)
    # A tie goes to the response seen first.
    assert ev.majority_class_predictions(["shipping", "billing"], 1) == ["shipping"]


def test_the_nearest_neighbour_baseline_answers_like_the_most_similar_training_prompt() -> None:
    prompts = ["The APP crashes!", "my parcel is late", "was my card charged", "no shared words"]
    assert ev.nearest_neighbour_predictions(TRAIN_PAIRS, prompts) == [
        "technical",
        "shipping",
        "billing",
        "billing",  # nothing in common with any prompt: the first training example
    ]
    held_out = list(zip(prompts, ["technical", "shipping", "account", "returns"], strict=True))
    assert ev.reference_baselines(TRAIN_PAIRS, held_out)["nearestNeighbour"] == pytest.approx(0.5)


def test_the_reference_baselines_need_training_and_held_out_examples() -> None:
    with pytest.raises(DatasetError, match="training split is empty"):
        ev.reference_baselines([], [("a", "b")])
    with pytest.raises(DatasetError, match="validation set is empty"):
        ev.reference_baselines(TRAIN_PAIRS, [])


def test_the_baseline_step_scores_the_reference_baselines_on_the_training_split(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    train = [
        {"instruction": "Route the ticket.", "input": "I was charged twice", "output": "billing"},
        {"instruction": "Route the ticket.", "input": "Charged for an order twice", "output": "billing"},
        {"instruction": "Route the ticket.", "input": "Where is my parcel", "output": "shipping"},
    ]
    validation = [
        {"instruction": "Route the ticket.", "input": "my parcel never came", "output": "shipping"},
        {"instruction": "Route the ticket.", "input": "charged twice again", "output": "billing"},
        {"instruction": "Route the ticket.", "input": "reset my password", "output": "account"},
    ]
    workspace = _workspace(tmp_path, validation, train)
    spec = _spec(tiny_model_dir, ["exactMatch"])
    spec["evaluation"]["maxSamples"] = 3
    baseline = ev.run_evaluation(spec, workspace, "baseline")
    assert baseline["majorityClass"] == pytest.approx(1 / 3)  # billing, right once
    # shipping and billing are found; account is in no training example.
    assert baseline["nearestNeighbour"] == pytest.approx(2 / 3)


def _manual_greedy(model: torch.nn.Module, prompt: list[int], steps: int, eos: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
            if token == eos:
                break
            sequence.append(token)
    return sequence[len(prompt) :]


def test_batched_greedy_generation_matches_a_plain_argmax_loop(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = models.load_causal_lm(str(tiny_model_dir))
    prompts = [
        tiny_tokenizer(text)["input_ids"] for text in ("Route", "Route the ticket to billing", "Hello there")
    ]
    responses = ev.greedy_responses(
        model, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=3, device=CPU
    )
    for prompt, response in zip(prompts, responses, strict=True):
        expected = _manual_greedy(model, prompt, 5, tiny_tokenizer.eos_token_id)
        assert response == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_prefix_tuning_generation_uses_the_prefix(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    base = models.load_causal_lm(str(tiny_model_dir))
    prompts = [tiny_tokenizer("Route the ticket")["input_ids"]]
    base_response = ev.greedy_responses(
        base, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=1, device=CPU
    )
    torch.manual_seed(0)
    method = Method.model_validate({"type": "prefix-tuning", "prefixTuning": {"numVirtualTokens": 4}})
    tuned: Any = methods.apply_method(models.load_causal_lm(str(tiny_model_dir)), method, tiny_tokenizer)
    with torch.no_grad():
        for parameter in tuned.prompt_encoder.parameters():
            parameter.normal_(0, 5)
    tuned_response = ev.greedy_responses(
        tuned, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=1, device=CPU
    )
    expected = _manual_greedy(tuned, prompts[0], 6, tiny_tokenizer.eos_token_id)
    assert tuned_response == [tiny_tokenizer.decode(expected, skip_special_tokens=True)]
    assert tuned_response != base_response


def test_a_model_that_memorised_the_answers_scores_full_exact_match(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    torch.manual_seed(0)
    model = models.load_causal_lm(str(tiny_model_dir))
    rows = ROWS[:3]
    features = ft.tokenize_examples(rows, "instruction", tiny_tokenizer, 128)
    settings = Training(
        max_steps=40, batch_size=3, learning_rate="3e-3", scheduler=Scheduler(type="constant")
    )
    loop.train(model, features, settings, pad_token_id=tiny_tokenizer.pad_token_id)
    result, predictions = ev.evaluate_model(
        model,
        tiny_tokenizer,
        rows,
        "instruction",
        Evaluation(max_new_tokens=8),
        max_seq_length=128,
        batch_size=2,
        device=CPU,
    )
    assert [record["prediction"] for record in predictions] == [row["output"] for row in rows]
    assert result["exactMatch"] == 1.0
    assert result["evalLoss"] < 0.5


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _workspace(
    path: Path, validation: Sequence[dict[str, Any]], train: Sequence[dict[str, Any]] = ROWS
) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "data" / "validation.jsonl").write_text(_jsonl(validation))
    (path / "data" / "train.jsonl").write_text(_jsonl(train))
    return path


def _spec(model_dir: Path, metrics: list[str]) -> dict[str, Any]:
    return {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": "unused", "format": "instruction"},
        "training": {"batchSize": 4, "maxSeqLength": 64, "precision": "fp32", "seed": 1},
        "evaluation": {"metrics": metrics, "maxNewTokens": 3, "maxSamples": 2, "gates": []},
    }


def test_the_step_writes_only_the_requested_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, ROWS)
    result = ev.run_evaluation(_spec(tiny_model_dir, ["exactMatch", "perplexity"]), workspace, "baseline")
    assert set(result) == {
        "exactMatch",
        "lenientMatch",
        "perplexity",
        "samples",
        "majorityClass",
        "nearestNeighbour",
    }
    assert json.loads((workspace / "evaluation" / "baseline.json").read_text()) == result
    predictions = (workspace / "evaluation" / "baseline-predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2  # maxSamples


def test_the_final_evaluation_loads_the_trained_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, ROWS)
    spec = _spec(tiny_model_dir, ["evalLoss"])
    spec["method"] = {"type": "lora", "lora": {"r": 4}}
    spec["training"].update(maxSteps=3, learningRate="1e-2")
    ft.run_finetune(spec, workspace)
    baseline = ev.run_evaluation(spec, workspace, "baseline")
    final = ev.run_evaluation(spec, workspace, "final")
    assert final["evalLoss"] < baseline["evalLoss"]
    assert (workspace / "evaluation" / "final.json").is_file()


def test_an_empty_validation_set_is_a_dataset_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, [])
    with pytest.raises(DatasetError, match="validation"):
        ev.run_evaluation(_spec(tiny_model_dir, ["evalLoss"]), workspace, "baseline")
