"""Preference tuning (method.type dpo and kto) inside kubetune's own training loop, on TRL's losses.

The losses are TRL's own (trl 1.16): ``DPOTrainer._compute_loss`` (the sigmoid loss of Direct Preference
Optimization) and ``KTOTrainer._compute_loss`` (Kahneman-Tversky Optimization with its KL estimate), run
on a small host object that gives them the trainer attributes they read (beta, loss type, weights, the
reference model) instead of a whole ``Trainer``. TRL's fused LM head (``add_fused_lm_head``) is added to
the model, as the trainers do, so both losses read per-token log-probabilities without building logits.
The reference model is the base model: with weights lora, the same model with its adapter disabled
(TRL's ``use_adapter``, no second copy); with weights full, a frozen copy of the base.

Everything else is the loop's (loop.py): a preference row is one "feature" whose chosen (or only)
completion sits in ``input_ids``/``labels`` as for supervised training, so micro-batching by length,
checkpoints, resume, progress and periodic evaluation work unchanged. A feature counts one loss unit
(``LOSS_UNITS``) instead of its response tokens, so a step's loss is the mean of the rows' losses, as
TRL's is, however the rows fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import torch

from kubetune_components import data
from kubetune_components.data import IGNORE_INDEX, LOSS_UNITS
from kubetune_components.finetune.loop import Batch, Feature, TokenLoss
from kubetune_contract.common import as_float
from kubetune_contract.finetune import DatasetFormat, KtoOptions, Method, PreferenceOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REJECTED_INPUT_IDS = "rejected_input_ids"
REJECTED_LABELS = "rejected_labels"
DESIRABLE = "desirable"
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
"""Per-token fields TRL's losses read from the fused LM head (the last two feed its metrics only)."""


# --------------------------------------------------------------------------------------------------
# Rows -> features.


def _sequence(
    prompt_ids: list[int], completion_ids: list[int], max_seq_length: int
) -> tuple[list[int], list[int]]:
    input_ids = (prompt_ids + completion_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_length]
    return input_ids, labels


def _completion_ids(text: str, tokenizer: Any) -> list[int]:
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]


def tokenize_preference_row(
    example: Mapping[str, Any], fmt: DatasetFormat, tokenizer: Any, max_seq_length: int
) -> Feature | None:
    """A preference row (chosen in input_ids/labels, rejected beside) or a feedback row (its completion,
    and whether it is desirable), cut at `max_seq_length`; None when the prompt leaves no completion token."""
    prompt = data.render_preference_prompt(example["prompt"], tokenizer)
    prompt_ids = data.prompt_token_ids(prompt, fmt, tokenizer)
    if len(prompt_ids) >= max_seq_length:
        return None
    completions = data.preference_completions(dict(example), fmt)
    input_ids, labels = _sequence(prompt_ids, _completion_ids(completions[0], tokenizer), max_seq_length)
    feature: Feature = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    if fmt == "preference":
        rejected_ids, rejected_labels = _sequence(
            prompt_ids, _completion_ids(completions[1], tokenizer), max_seq_length
        )
        feature[REJECTED_INPUT_IDS] = rejected_ids
        feature[REJECTED_LABELS] = rejected_labels
    else:
        feature[DESIRABLE] = [int(bool(example["label"]))]
    feature[LOSS_UNITS] = [1]
    return feature


def tokenize_preference_rows(
    examples: Sequence[Mapping[str, Any]], fmt: DatasetFormat, tokenizer: Any, max_seq_length: int
) -> list[Feature]:
    features = (tokenize_preference_row(example, fmt, tokenizer, max_seq_length) for example in examples)
    return [feature for feature in features if feature is not None]


# --------------------------------------------------------------------------------------------------
# The model and its reference.


def _patch_fused_head(model: torch.nn.Module) -> None:
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import add_fused_lm_head

    target = model.get_base_model() if is_peft_model(model) else model  # type: ignore[operator]
    add_fused_lm_head(cast("PreTrainedModel", target), outputs=FUSED_OUTPUTS)


def reference_model(model: torch.nn.Module, options: PreferenceOptions) -> torch.nn.Module | None:
    """The frozen reference for weights full (a copy of the base, taken before training); None for lora,
    whose reference is the same model with the adapter disabled."""
    if options.weights == "lora":
        return None
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(cast("PreTrainedModel", reference))
    return reference


class _Accelerator:
    """The few accelerate calls TRL's losses make, for one process (the loop reduces across processes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def autocast() -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


def _host(model: torch.nn.Module, reference: torch.nn.Module | None, options: PreferenceOptions) -> Any:
    """The trainer attributes TRL's `_compute_loss` reads (trl 1.16), with its defaults for DPO (sigmoid
    loss, reverse KL, no weighting or label smoothing) and KTO (kto loss with its KL term)."""
    host = SimpleNamespace(
        model=model,
        ref_model=reference,
        accelerator=_Accelerator(next(model.parameters()).device),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=as_float(options.beta),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        # DPO
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        use_weighting=False,
        # KTO
        loss_type="kto",
        calculate_KL=True,
    )
    if isinstance(options, KtoOptions):
        host.desirable_weight = as_float(options.desirable_weight)
        host.undesirable_weight = as_float(options.undesirable_weight)
    from trl.trainer.kto_trainer import KTOTrainer

    host._compute_kl_logps = KTOTrainer._compute_kl_logps.__get__(host)
    return host


# --------------------------------------------------------------------------------------------------
# Batches in TRL's layout, and the loss.


def _pad_rows(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    width = max(int(row.shape[0]) for row in rows)
    return torch.stack(
        [torch.nn.functional.pad(row, (0, width - int(row.shape[0])), value=value) for row in rows]
    )


def _rows(ids: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each row without its right padding (labels mark the padding -100 like the prompt: the attention
    mask tells them apart, so it is recomputed from the last completion token)."""
    for row_ids, row_labels in zip(ids, labels, strict=True):
        completion = (row_labels != IGNORE_INDEX).nonzero()
        end = int(completion[-1]) + 1 if completion.numel() else int(row_ids.shape[0])
        yield row_ids[:end], row_labels[:end]


def _trl_inputs(
    ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], pad_token_id: int
) -> dict[str, torch.Tensor]:
    input_ids = _pad_rows(ids, pad_token_id)
    attention_mask = _pad_rows([torch.ones_like(row) for row in ids], 0)
    completion_mask = _pad_rows([(row != IGNORE_INDEX).long() for row in labels], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def dpo_inputs(batch: Batch, pad_token_id: int) -> dict[str, torch.Tensor]:
    """TRL's DPO batch: chosen rows, then rejected rows, with their completion masks."""
    chosen = list(_rows(batch["input_ids"], batch["labels"]))
    rejected = list(_rows(batch[REJECTED_INPUT_IDS], batch[REJECTED_LABELS]))
    rows = chosen + rejected
    return _trl_inputs([ids for ids, _ in rows], [labels for _, labels in rows], pad_token_id)


def kto_inputs(batch: Batch, pad_token_id: int) -> dict[str, torch.Tensor]:
    """TRL's KTO batch: each row, its label, and the KL row pairing its prompt with the completion of the
    row before it in the micro-batch (TRL's `add_kl_completion_ids`; with one row, its own completion)."""
    rows = list(_rows(batch["input_ids"], batch["labels"]))
    inputs = _trl_inputs([ids for ids, _ in rows], [labels for _, labels in rows], pad_token_id)
    kl_ids, kl_labels = [], []
    for index, (ids, labels) in enumerate(rows):
        prompt_length = int((labels == IGNORE_INDEX).sum())
        other_ids, other_labels = rows[index - 1]
        other_prompt = int((other_labels == IGNORE_INDEX).sum())
        kl_ids.append(torch.cat([ids[:prompt_length], other_ids[other_prompt:]]))
        kl_labels.append(torch.cat([labels[:prompt_length], other_labels[other_prompt:]]))
    kl = _trl_inputs(kl_ids, kl_labels, pad_token_id)
    inputs.update({f"KL_{key}": value for key, value in kl.items()})
    inputs["label"] = batch[DESIRABLE][:, 0].bool()
    return inputs


def preference_loss(
    model: torch.nn.Module, method: Method, pad_token_id: int, reference: torch.nn.Module | None
) -> TokenLoss:
    """The loop's loss for dpo or kto: TRL's loss of the micro-batch (a mean over its rows) times its rows,
    with the rows as the count (the loop divides by the step's rows)."""
    options = method.preference
    assert options is not None, f"{method.type} is not a preference method"
    _patch_fused_head(model)
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    host = _host(model, reference, options)
    compute = DPOTrainer._compute_loss if method.type == "dpo" else KTOTrainer._compute_loss
    build = dpo_inputs if method.type == "dpo" else kto_inputs

    def loss_sum(forward_model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch[LOSS_UNITS].sum()
        loss = cast(torch.Tensor, compute(host, forward_model, build(batch, pad_token_id), False))
        for logged in host._metrics.values():
            logged.clear()  # TRL's trainer logs and clears them; the loop reports its own figures
        return loss * rows, rows

    return loss_sum


# --------------------------------------------------------------------------------------------------
# Evaluation: preference accuracy.


def completion_logprobs(
    model: torch.nn.Module,
    features: Sequence[Feature],
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[float]:
    """Each feature's sequence log-probability of its completion (the sum over its labelled tokens, the
    quantity DPO's implicit reward compares), in the order of `features`."""
    scores: list[float] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = data.pad_batch(
                [
                    {key: feature[key] for key in ("input_ids", "attention_mask", "labels")}
                    for feature in features[start : start + batch_size]
                ],
                pad_token_id,
            )
            batch = {key: tensor.to(device) for key, tensor in batch.items()}
            with autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            logits = logits[:, -batch["labels"].shape[1] :, :][:, :-1, :].float()
            mask = labels != IGNORE_INDEX
            token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
            scores.extend((token_logprobs.squeeze(-1) * mask).sum(dim=1).tolist())
    return scores


def feedback_pairs(examples: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """(desirable, undesirable) row indices of feedback rows sharing a prompt: every desirable completion
    of a prompt against every undesirable one of the same prompt."""
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for index, example in enumerate(examples):
        key = json.dumps(example["prompt"], sort_keys=True, ensure_ascii=False)
        good, bad = by_prompt.setdefault(key, ([], []))
        (good if example["label"] else bad).append(index)
    return [
        (good_index, bad_index)
        for good, bad in by_prompt.values()
        for good_index in good
        for bad_index in bad
    ]


@dataclass(frozen=True)
class PreferenceAccuracy:
    accuracy: float | None
    """Share of pairs whose chosen completion the model finds likelier; None without pairs."""
    pairs: int


def preference_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: DatasetFormat,
    *,
    max_seq_length: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> PreferenceAccuracy:
    """Preference rows: the share where log p(chosen | prompt) > log p(rejected | prompt). Feedback rows:
    the same over the pairs of a desirable and an undesirable completion of one prompt (feedback_pairs).
    Rows whose prompt fills maxSeqLength are left out."""
    pad = int(tokenizer.pad_token_id)
    if fmt == "preference":
        features = tokenize_preference_rows(examples, fmt, tokenizer, max_seq_length)
        rejected: list[Feature] = [
            {
                "input_ids": f[REJECTED_INPUT_IDS],
                "attention_mask": [1] * len(f[REJECTED_INPUT_IDS]),
                "labels": f[REJECTED_LABELS],
            }
            for f in features
        ]
        scores = completion_logprobs(
            model,
            [*features, *rejected],
            pad_token_id=pad,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
        )
        pairs = [(index, len(features) + index) for index in range(len(features))]
    else:
        rows = [
            (example, feature)
            for example in examples
            if (feature := tokenize_preference_row(example, fmt, tokenizer, max_seq_length)) is not None
        ]
        scores = completion_logprobs(
            model,
            [feature for _, feature in rows],
            pad_token_id=pad,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
        )
        pairs = feedback_pairs([example for example, _ in rows])
    if not pairs:
        return PreferenceAccuracy(accuracy=None, pairs=0)
    wins = sum(1 for chosen, other in pairs if scores[chosen] > scores[other])
    return PreferenceAccuracy(accuracy=wins / len(pairs), pairs=len(pairs))
