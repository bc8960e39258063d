"""Distillation (method.type distillation): the student, baseModel with all of its weights trained, learns
from a teacher model's next-token distributions.

Per response token (labels other than -100, after the shift by one) the loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(labels)

(Hinton et al.'s knowledge distillation; T^2 keeps the KL term's gradients on the scale of the
cross-entropy's as T grows). Like the loop's own loss it is a sum over tokens, which the loop divides by
the optimizer step's target tokens, so gradient accumulation, checkpoints and resume work unchanged.
The teacher runs in eval mode without gradients; it is frozen and never saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError, ModelLoadError
from kubetune_components.data import IGNORE_INDEX
from kubetune_components.finetune.loop import Batch, TokenLoss, model_inputs
from kubetune_contract.common import as_float
from kubetune_contract.finetune import DistillationOptions

TEACHER_FIELD = "method.distillation.teacher"


@dataclass(frozen=True)
class DistillationSums:
    """One batch's sums over its labelled positions."""

    loss: torch.Tensor
    """alpha * T^2 * kl + (1 - alpha) * cross_entropy, summed."""
    kl: torch.Tensor
    """KL(teacher_T || student_T), summed (not scaled by T^2)."""
    cross_entropy: torch.Tensor
    tokens: torch.Tensor


def distillation_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    vocab_size: int | None = None,
) -> DistillationSums:
    """The distillation loss of a batch: logits [batch, seq, vocab] of both models, labels [batch, seq].

    `vocab_size` (the shared tokenizer's length) cuts off embedding rows that one model pads its vocabulary
    with and no token id reaches.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    student = student_logits[:, :-1, :][mask].float()
    teacher = teacher_logits[:, :-1, :][mask].float()
    cross_entropy = F.cross_entropy(student, shift_labels[mask], reduction="sum")
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * cross_entropy
    return DistillationSums(loss=loss, kl=kl, cross_entropy=cross_entropy, tokens=mask.sum())


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits: torch.Tensor = model(**model_inputs(batch)).logits
    return logits


def teacher_logits(teacher: torch.nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return _logits(teacher, batch)


def distillation_loss(
    teacher: torch.nn.Module, options: DistillationOptions, vocab_size: int | None = None
) -> TokenLoss:
    """The loop's token loss for distillation: each micro-batch goes through the frozen teacher first."""
    temperature = as_float(options.temperature)
    alpha = as_float(options.alpha)

    def loss_sum(student: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        sums = distillation_sums(
            _logits(student, batch),
            teacher_logits(teacher, batch),
            batch["labels"],
            temperature=temperature,
            alpha=alpha,
            vocab_size=vocab_size,
        )
        return sums.loss, sums.tokens

    return loss_sum


def mean_kl_to_teacher(
    student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable[Batch], temperature: float = 1.0
) -> float:
    """Mean per-token KL(teacher_T || student_T) on the labelled positions of `batches`: how far the
    student's distributions are from the teacher's."""
    was_training = student.training
    student.eval()
    kl_sum, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                sums = distillation_sums(
                    _logits(student, batch),
                    _logits(teacher, batch),
                    batch["labels"],
                    temperature=temperature,
                    alpha=1.0,
                )
                kl_sum += float(sums.kl)
                tokens += int(sums.tokens)
    finally:
        student.train(was_training)
    return kl_sum / max(1, tokens)


def check_same_tokenizer(student: Any, student_uri: str, teacher: Any, teacher_uri: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's: the token distributions would not
    line up. Compares the vocabularies (token -> id), the added tokens and the special tokens."""
    differences: list[str] = []
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = len(student_vocab.keys() - teacher_vocab.keys())
        only_teacher = len(teacher_vocab.keys() - student_vocab.keys())
        moved = sum(
            1
            for token in student_vocab.keys() & teacher_vocab.keys()
            if student_vocab[token] != teacher_vocab[token]
        )
        differences.append(
            f"vocabularies differ ({len(student_vocab)} vs {len(teacher_vocab)} tokens; {only_student} only "
            f"in the student's, {only_teacher} only in the teacher's, {moved} with other ids)"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            differences.append(f"{name} {getattr(student, name, None)} vs {getattr(teacher, name, None)}")
    if differences:
        raise ConfigError(
            f"{TEACHER_FIELD}: the teacher ({teacher_uri}) and the student (baseModel.uri "
            f"{student_uri}) must share a tokenizer: {'; '.join(differences)}"
        )


@dataclass
class Teacher:
    """The loaded teacher and the loss that distils it."""

    model: torch.nn.Module
    loss: TokenLoss


def load_teacher(
    options: DistillationOptions, student_tokenizer: Any, student_uri: str, device: torch.device
) -> Teacher:
    """Load the teacher (its URI resolved: the operator turns fineTuneJobRef into uri), check that it shares
    the student's tokenizer, and freeze it in eval mode on `device`."""
    uri = options.teacher.uri
    if uri is None:
        raise ConfigError(
            f"{TEACHER_FIELD}.uri is required here (the operator resolves fineTuneJobRef into it)"
        )
    location = models.parse_model_uri(uri)
    if location.kind == "local" and (Path(location.ref) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{TEACHER_FIELD}: {uri} is a PEFT adapter, not a whole model; publish the teacher with "
            "output.mergeAdapter: true (lora, ia3) or train it with method full"
        )
    try:
        tokenizer = models.load_tokenizer(uri)
        check_same_tokenizer(student_tokenizer, student_uri, tokenizer, uri)
        model = models.load_causal_lm(uri)
    except ModelLoadError as error:  # its message names baseModel.uri: say that it was the teacher
        message = error.message.removeprefix(f"{models.FIELD}: ")
        raise ModelLoadError(f"{TEACHER_FIELD}.uri: {message}") from error
    model.requires_grad_(False)
    model.eval()
    model.to(device)  # type: ignore[arg-type]
    return Teacher(model=model, loss=distillation_loss(model, options, vocab_size=len(student_tokenizer)))
