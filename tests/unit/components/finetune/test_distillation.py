"""Distillation: the loss (KL at temperature T, scaled by T^2, mixed with the labels' cross-entropy by
alpha), the refusal of a teacher with another tokenizer, and a short run that brings the student's
distributions closer to the teacher's."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_components.data import IGNORE_INDEX
from kubetune_components.dev import tinylm
from kubetune_components.finetune import loop
from kubetune_components.finetune import train as ft
from kubetune_components.finetune.distillation import distillation_sums, load_teacher, mean_kl_to_teacher
from kubetune_contract.finetune import DistillationOptions


def softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(value / temperature) for value in values]
    return [e / sum(exps) for e in exps]


def test_the_loss_is_alpha_t_squared_kl_plus_one_minus_alpha_cross_entropy_on_response_tokens() -> None:
    student = [[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [5.0, 5.0, 5.0]]
    teacher = [[9.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 2, 1]  # position 1 predicts token 2, position 2 predicts token 1
    temperature, alpha = 2.0, 0.25

    kl = ce = 0.0
    for position, target in ((1, 2), (2, 1)):
        p = softmax(teacher[position], temperature)
        q = softmax(student[position], temperature)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        ce += -math.log(softmax(student[position], 1.0)[target])

    sums = distillation_sums(
        torch.tensor([student]),
        torch.tensor([teacher]),
        torch.tensor([labels]),
        temperature=temperature,
        alpha=alpha,
    )
    assert int(sums.tokens) == 2  # the prompt positions and the last one (nothing to predict) carry no loss
    assert float(sums.kl) == pytest.approx(kl, rel=1e-5)
    assert float(sums.cross_entropy) == pytest.approx(ce, rel=1e-5)
    assert float(sums.loss) == pytest.approx(alpha * temperature**2 * kl + (1 - alpha) * ce, rel=1e-5)


def test_alpha_zero_is_the_loops_own_cross_entropy_and_a_perfect_student_has_no_kl() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 6, 0], [IGNORE_INDEX, IGNORE_INDEX, 2, 2, IGNORE_INDEX]])

    class Fixed(torch.nn.Module):
        def forward(self, **_: Any) -> Any:
            return type("Out", (), {"logits": logits})()

    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}
    cross_entropy, tokens = loop.token_loss_sum(Fixed(), batch)
    sums = distillation_sums(logits, logits.clone(), labels, temperature=3.0, alpha=0.0)
    assert float(sums.loss) == pytest.approx(float(cross_entropy), rel=1e-6)
    assert int(sums.tokens) == int(tokens) == 6
    assert float(sums.kl) == pytest.approx(0.0, abs=1e-6)


def teacher_options(uri: Path | str, **options: Any) -> DistillationOptions:
    return DistillationOptions.model_validate({"teacher": {"uri": str(uri)}, **options})


def test_a_teacher_with_another_tokenizer_is_refused_naming_both_models(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = tinylm.build_random_tiny(tmp_path / "other-vocab", vocab_size=tinylm.DEFAULT_VOCAB_SIZE // 2)
    student_tokenizer = models.load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ConfigError) as refused:
        load_teacher(teacher_options(other), student_tokenizer, str(tiny_model_dir), torch.device("cpu"))
    message = refused.value.message
    assert message.startswith("method.distillation.teacher: ")
    assert f"the teacher ({other})" in message and f"(baseModel.uri {tiny_model_dir})" in message
    assert "vocabularies differ" in message


def test_a_teacher_that_is_not_there_is_named_as_the_teacher(tiny_model_dir: Path, tmp_path: Path) -> None:
    student_tokenizer = models.load_tokenizer(str(tiny_model_dir))
    with pytest.raises(Exception, match=r"^method\.distillation\.teacher\.uri: .*does not exist"):
        load_teacher(teacher_options(tmp_path / "nowhere"), student_tokenizer, "s", torch.device("cpu"))


ROWS = [
    {"instruction": "Compose the two moves.", "input": f"{a} then {b}", "output": f"{(a + b) % 5}"}
    for a in range(5)
    for b in range(5)
]


def test_distilling_brings_the_student_closer_to_the_teacher(tmp_path: Path) -> None:
    # Teacher and student share the tiny tokenizer; the student is smaller and starts from other weights.
    teacher_dir = tinylm.build_random_tiny(tmp_path / "teacher", seed=3, hidden_size=96, num_hidden_layers=3)
    student_dir = tinylm.build_random_tiny(tmp_path / "student", seed=4, hidden_size=32, num_hidden_layers=1)
    workspace = tmp_path / "workspace"
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    spec = {
        "baseModel": {"uri": str(student_dir)},
        "dataset": {"uri": "unused.jsonl", "format": "instruction"},
        "method": {
            "type": "distillation",
            "distillation": {"teacher": {"uri": str(teacher_dir)}, "temperature": "2", "alpha": "1"},
        },
        "training": {
            "maxSteps": 12,
            "batchSize": 8,
            "learningRate": "1e-2",
            "scheduler": {"type": "constant"},
        },
        "output": {"uri": "unused"},
    }
    tokenizer = models.load_tokenizer(str(student_dir))
    features = ft.tokenize_examples(ROWS, "instruction", tokenizer, 64)
    batches = [
        loop.collate(features[start : start + 8], int(tokenizer.pad_token_id), torch.device("cpu"))
        for start in range(0, len(features), 8)
    ]
    teacher = models.load_causal_lm(str(teacher_dir)).eval()
    before = mean_kl_to_teacher(models.load_causal_lm(str(student_dir)), teacher, batches)

    summary = ft.run_finetune(spec, workspace)

    after = mean_kl_to_teacher(
        ft.load_trained_model(workspace / "trained", str(student_dir)), teacher, batches
    )
    assert after < 0.5 * before, (before, after)
    assert summary["method"] == "distillation" and summary["teacher"] == str(teacher_dir)
    assert summary["trainableParameters"] == tinylm.parameter_count(models.load_causal_lm(str(student_dir)))


def test_an_adapter_is_no_teacher_the_job_says_to_merge_it(
    tiny_model_dir: Path, published_adapter: Path
) -> None:
    student_tokenizer = models.load_tokenizer(str(tiny_model_dir))
    with pytest.raises(
        ConfigError, match=r"is a PEFT adapter, not a whole model; .*output\.mergeAdapter: true"
    ):
        load_teacher(teacher_options(published_adapter), student_tokenizer, "s", torch.device("cpu"))
