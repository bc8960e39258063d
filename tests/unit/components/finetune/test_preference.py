"""Preference tuning (method.type dpo and kto) on TRL's losses inside kubetune's loop: the preference and
feedback formats (line-numbered errors; the rows `kubetune feedback export` writes), preference accuracy,
and runs on the tiny models: DPO raises held-out preference accuracy over the base, KTO trains and
publishes, and a killed DPO run resumes from its checkpoint to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from kubetune.gateway.capture import kto_rows, preference_rows
from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.artifacts import MANIFEST_FILE
from kubetune_components.common.errors import DatasetError
from kubetune_components.finetune import preference, signals, steps
from kubetune_components.finetune import train as ft
from kubetune_contract.finetune import DatasetFormat
from kubetune_contract.workspace import WorkspaceLayout

EXAMPLES = Path(__file__).resolve().parents[4] / "examples" / "preference" / "data"
PROMPT = data.render_instruction_prompt("Route the ticket: billing or shipping.", "Where is my parcel?")
CPU = torch.device("cpu")


def lines(path: Path, count: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:count]


# -- the formats ---------------------------------------------------------------------------------------


def test_a_preference_row_without_rejected_is_refused_naming_its_line_and_the_format(
    write_jsonl: Any,
) -> None:
    path = write_jsonl(
        [
            {"prompt": PROMPT, "chosen": "shipping", "rejected": "billing"},
            {"prompt": PROMPT, "chosen": "shipping"},
        ]
    )
    with pytest.raises(DatasetError) as error:
        data.load_examples(str(path), "preference")
    assert error.value.message == (
        f'{path} line 2: "rejected" is missing (dataset.format preference rows hold prompt, chosen, rejected)'
    )


@pytest.mark.parametrize(
    ("row", "fmt", "says"),
    [
        ({"chosen": "a", "rejected": "b"}, "preference", '"prompt" is missing'),
        (
            {"prompt": PROMPT, "chosen": "a", "rejected": "a"},
            "preference",
            '"chosen" and "rejected" are the same',
        ),
        (
            {"prompt": 7, "chosen": "a", "rejected": "b"},
            "preference",
            '"prompt" must be a string or a message list',
        ),
        ({"prompt": PROMPT, "completion": "a", "label": "yes"}, "feedback", '"label" must be a boolean'),
        (
            {"prompt": PROMPT, "label": True},
            "feedback",
            '"completion" is missing (dataset.format feedback rows',
        ),
        (
            {"prompt": PROMPT, "completion": [{"role": "user", "content": "a"}], "label": True},
            "feedback",
            '"completion" as a message list must hold one assistant message',
        ),
    ],
)
def test_bad_rows_are_refused_with_their_line(
    write_jsonl: Any, row: dict[str, Any], fmt: DatasetFormat, says: str
) -> None:
    good: dict[str, Any] = (
        {"prompt": PROMPT, "chosen": "a", "rejected": "b"}
        if fmt == "preference"
        else {"prompt": PROMPT, "completion": "a", "label": True}
    )
    path = write_jsonl([good, good, row])
    with pytest.raises(DatasetError, match=rf"line 3: {re.escape(says)}"):
        data.load_examples(str(path), fmt)


def test_the_rows_kubetune_feedback_export_writes_are_read_as_they_are(
    write_jsonl: Any, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    chat = [{"role": "user", "content": "Where is my parcel?"}]
    records = [
        {"prompt": PROMPT, "completion": "shipping", "score": 1.0},
        {"prompt": PROMPT, "completion": "billing", "score": 0.0},
        {"prompt": chat, "completion": "shipping", "score": 0.9},
        {"prompt": chat, "completion": "no idea", "score": 0.1},
    ]
    feedback = data.load_examples(str(write_jsonl(kto_rows(records), "kto.jsonl")), "feedback")
    assert [(row["completion"], row["label"]) for row in feedback] == [
        ("shipping", True),
        ("billing", False),
        ("shipping", True),
        ("no idea", False),
    ]
    pairs = data.load_examples(str(write_jsonl(preference_rows(records), "pairs.jsonl")), "preference")
    assert [(row["chosen"], row["rejected"]) for row in pairs] == [
        ("shipping", "billing"),
        ("shipping", "no idea"),
    ]
    # A message-list prompt goes through the chat template, ready for the answer.
    feature = preference.tokenize_preference_row(feedback[2], "feedback", tiny_tokenizer, 128)
    assert feature is not None
    prompt_ids = [
        token for token, label in zip(feature["input_ids"], feature["labels"], strict=True) if label < 0
    ]
    assert tiny_tokenizer.decode(prompt_ids) == tiny_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert feature["desirable"] == [1] and feature["loss_units"] == [1]


# -- preference accuracy -------------------------------------------------------------------------------


def test_preference_accuracy_compares_the_sequence_log_probabilities_of_both_completions(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = models.load_causal_lm(str(tiny_model_dir)).eval()
    rows = [
        {"prompt": PROMPT, "chosen": chosen, "rejected": rejected}
        for chosen, rejected in [
            ("shipping", "billing"),
            ("returns", "ok"),
            ("yes", "account"),
            ("no", "maybe"),
        ]
    ]
    features = preference.tokenize_preference_rows(rows, "preference", tiny_tokenizer, 128)
    scores = preference.completion_logprobs(model, features, pad_token_id=3, batch_size=3, device=CPU)
    # By hand: the log-probability of each completion token (and eos) after what precedes it.
    for feature, score in zip(features, scores, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
        by_hand = sum(
            torch.log_softmax(logits[position - 1], dim=-1)[feature["input_ids"][position]].item()
            for position, label in enumerate(feature["labels"])
            if label != data.IGNORE_INDEX
        )
        assert score == pytest.approx(by_hand, abs=1e-4)

    measured = preference.preference_accuracy(
        model, tiny_tokenizer, rows, "preference", max_seq_length=128, batch_size=2, device=CPU
    )
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    mirrored = preference.preference_accuracy(
        model, tiny_tokenizer, swapped, "preference", max_seq_length=128, batch_size=2, device=CPU
    )
    assert measured.pairs == mirrored.pairs == 4
    assert measured.accuracy is not None and mirrored.accuracy is not None
    assert measured.accuracy + mirrored.accuracy == pytest.approx(1.0)  # no ties between distinct texts


def test_feedback_rows_pair_each_desirable_completion_with_the_undesirable_ones_of_its_prompt() -> None:
    rows = [
        {"prompt": "a", "completion": "x", "label": True},
        {"prompt": "b", "completion": "y", "label": False},  # no desirable completion of b: unpaired
        {"prompt": "a", "completion": "z", "label": False},
        {"prompt": "a", "completion": "w", "label": False},
        {"prompt": "c", "completion": "v", "label": True},  # nothing to compare with
    ]
    assert preference.feedback_pairs(rows) == [(0, 2), (0, 3)]


# -- runs on the tiny models ---------------------------------------------------------------------------


def config(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "prefs", "namespace": "default", "generation": 1},
        "spec": spec,
    }


def test_dpo_with_lora_raises_held_out_preference_accuracy_over_the_base(
    tiny_base_dir: Path, tmp_path: Path
) -> None:
    # The example's data: right team chosen; a wrong team or a short non-answer (which the base prefers)
    # rejected. Held out: tickets written from sentences training never saw.
    spec = {
        "baseModel": {"uri": str(tiny_base_dir)},
        "dataset": {
            "uri": str(EXAMPLES / "support-preference.jsonl"),
            "format": "preference",
            "validationUri": str(EXAMPLES / "support-preference-heldout.jsonl"),
        },
        "method": {"type": "dpo", "dpo": {"lora": {"r": 16, "alpha": 32, "targetModules": ALL_LINEAR}}},
        "training": {
            "maxSteps": 10,
            "batchSize": 8,
            "learningRate": "5e-3",
            "scheduler": {"type": "constant"},
            "maxSeqLength": 128,
        },
        "evaluation": {
            "metrics": ["preferenceAccuracy"],
            "maxSamples": 60,
            "gates": [{"metric": "preferenceAccuracy", "minImprovement": "0.1"}],
        },
        "output": {"uri": str(tmp_path / "store")},
    }
    workspace = str(tmp_path / "run")
    for step in ("curate", "evaluate-baseline", "finetune", "evaluate-final"):
        steps.run_step(step, config(spec), workspace)
    root = tmp_path / "run"
    baseline = json.loads((root / WorkspaceLayout.BASELINE_EVALUATION).read_text())
    final = json.loads((root / WorkspaceLayout.FINAL_EVALUATION).read_text())
    trained = json.loads((root / WorkspaceLayout.TRAINED / ft.TRAINING_RECORD).read_text())
    assert baseline["preferencePairs"] == final["preferencePairs"] == 60
    assert final["preferenceAccuracy"] >= baseline["preferenceAccuracy"] + 0.1, (baseline, final)
    assert trained["method"] == "dpo" and trained["adapter"] == "lora"
    assert trained["trainLoss"] < math.log(2)  # DPO's loss starts at log 2, where policy == reference
    assert trained["trainableParameters"] < tinylm_parameters(tiny_base_dir) / 4  # an adapter only
    # The gate on preferenceAccuracy passes, and the published model is the base with the adapter merged.
    output = steps.run_step("publish", config(spec), workspace)
    published = Path(output["uri"])
    assert (published / "model.safetensors").is_file() and not (published / "adapter_config.json").exists()


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tinylm_parameters(model_dir: Path) -> int:
    return sum(parameter.numel() for parameter in models.load_causal_lm(str(model_dir)).parameters())


def test_kto_trains_on_feedback_rows_and_publishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = {
        "baseModel": {"uri": str(tiny_model_dir)},
        "dataset": {
            "uri": str(tmp_path / "feedback.jsonl"),
            "format": "feedback",
            # Held-out feedback pairs up by prompt: a file keeps both answers of each prompt together.
            "validationUri": str(tmp_path / "heldout.jsonl"),
        },
        "method": {"type": "kto", "kto": {"lora": {"r": 4}, "desirableWeight": "1.5"}},
        "training": {"maxSteps": 3, "batchSize": 4, "learningRate": "5e-3", "maxSeqLength": 160},
        "evaluation": {"metrics": ["evalLoss", "preferenceAccuracy"], "maxSamples": 16},
        "output": {"uri": str(tmp_path / "store")},
    }
    for name, source, count in (
        ("feedback", "support-feedback", 32),
        ("heldout", "support-feedback-heldout", 12),
    ):
        rows = lines(EXAMPLES / f"{source}.jsonl", count)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    workspace = str(tmp_path / "run")
    for step in ("curate", "evaluate-baseline", "finetune", "evaluate-final"):
        steps.run_step(step, config(spec), workspace)
    final = json.loads((tmp_path / "run" / WorkspaceLayout.FINAL_EVALUATION).read_text())
    assert 0 <= final["preferenceAccuracy"] <= 1 and final["preferencePairs"] == 6
    trained = json.loads((tmp_path / "run" / WorkspaceLayout.TRAINED / ft.TRAINING_RECORD).read_text())
    assert trained["method"] == "kto" and trained["steps"] == 3 and math.isfinite(trained["trainLoss"])
    output = steps.run_step("publish", config(spec), workspace)
    published = Path(output["uri"])
    manifest = json.loads((published / MANIFEST_FILE).read_text())
    assert manifest["artifact"]["format"] == "merged"  # the adapter folded into the base, as dpo/kto publish
    assert models.load_causal_lm(str(published)) is not None


def test_a_killed_dpo_run_on_full_weights_resumes_to_the_weights_of_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Full weights: the reference is a frozen copy of the base, taken before the checkpoint is loaded.
    spec = {
        "baseModel": {"uri": str(tiny_model_dir)},
        "dataset": {"uri": "unused.jsonl", "format": "preference"},
        "method": {"type": "dpo", "dpo": {"weights": "full", "beta": "0.2"}},
        "training": {
            "maxSteps": 4,
            "batchSize": 3,
            "gradientAccumulationSteps": 2,
            "learningRate": "1e-3",
            "checkpointEverySteps": 2,
            "maxSeqLength": 96,
        },
    }
    rows = "".join(json.dumps(row) + "\n" for row in lines(EXAMPLES / "support-preference.jsonl", 24))

    def workspace(name: str) -> Path:
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        (root / WorkspaceLayout.TRAIN_SPLIT).write_text(rows)
        return root

    uninterrupted = workspace("uninterrupted")
    expected = ft.run_finetune(spec, uninterrupted)
    killed = workspace("killed")
    with pytest.raises(signals.TrainingInterrupted):
        ft.run_finetune(spec, killed, on_step=lambda step: step == 3)
    resumed = ft.run_finetune(spec, killed)
    assert resumed["resumedFromStep"] == 3 and resumed["steps"] == 4
    assert resumed["trainLoss"] == pytest.approx(expected["trainLoss"], rel=1e-5)
    weights = load_file(str(uninterrupted / "trained" / "model.safetensors"))
    resumed_weights = load_file(str(killed / "trained" / "model.safetensors"))
    for name, weight in weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
