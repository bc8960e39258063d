"""The evaluation step: held-out loss, perplexity and exact match, for the base and the tuned model.

- evalLoss: mean next-token loss over the response tokens of the validation set (the same
  masking and loss as training);
- perplexity: exp(evalLoss);
- exactMatch: the share of (up to `maxSamples`) validation examples whose greedy generation of
  the response, stripped, equals the stripped reference response;
- lenientMatch: the share whose generation's first line contains the reference as a whole word,
  ignoring case, so a base model that answers right in its own words is credited;
- preferenceAccuracy (preference and feedback data): the share of held-out pairs whose chosen
  (desirable) completion the model gives a higher sequence log-probability than the rejected one
  (finetune/preference.py). With feedback data, evalLoss and exactMatch score the desirable rows only.

With exactMatch, the baseline evaluation also scores two trivial predictors on the same examples,
learned from the training split only: always answering the most common training response
(majorityClass) and answering with the response of the most similar training prompt, by cosine of
word counts (nearestNeighbour). A tuned model is only interesting where it beats them.

Each reference set of `evaluation.reference` (what the base model could already do) is scored on both
models too, under `reference` in the report: perplexity or exactMatch on its first `maxSamples`
examples. What tuning lost on it (reference_drop) is worked out from both reports by the publish step's
gate and by the operator's status, since the two evaluations may run in either order.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ConfigError, DatasetError
from kubetune_components.common.jobs import parse_finetune_spec
from kubetune_components.common.models import pick_device
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.finetune import preference
from kubetune_components.finetune.fairness import FAIRNESS_KEY, measure_fairness
from kubetune_components.finetune.forgetting import REFERENCE_KEY
from kubetune_components.finetune.harness import HARNESS_KEY, resolve_harness, run_harness
from kubetune_components.finetune.loop import Feature, autocast_context, collate, token_loss_sum
from kubetune_components.finetune.train import load_trained_model, tokenize_examples
from kubetune_contract.finetune import DatasetFormat, Evaluation, FineTuneJobSpec
from kubetune_contract.workspace import WorkspaceLayout

Which = Literal["baseline", "final"]
PREDICTIONS_KEPT = 50
"""Predictions written next to the metrics, for people to look at."""
MAX_PERPLEXITY_EXPONENT = 700.0
"""exp() overflows a float just above 709; a loss this high means the model is useless anyway."""


def inference_precision(training_precision: str, device: torch.device) -> str:
    """The training precision, except fp16 off a GPU (the baseline runs before training rejects that)."""
    if training_precision == "fp16" and device.type != "cuda":
        return "fp32"
    return training_precision


def mean_token_loss(
    model: torch.nn.Module,
    features: Sequence[Feature],
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Mean loss per target token over `features`, and the number of target tokens."""
    order = sorted(range(len(features)), key=lambda index: len(features[index]["input_ids"]))
    loss_total = 0.0
    token_total = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate(
                [features[index] for index in order[start : start + batch_size]], pad_token_id, device
            )
            with autocast_context(precision, device):
                loss_sum, tokens = token_loss_sum(model, batch)
            loss_total += float(loss_sum)
            token_total += int(tokens)
    if token_total == 0:
        raise DatasetError("the validation set has no response tokens to compute evalLoss on")
    return loss_total / token_total, token_total


def examples_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: str,
    *,
    max_seq_length: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    when_nothing_to_score: str,
) -> float:
    """Mean loss per target token of `examples` (tokenized as in training); a DatasetError saying
    `when_nothing_to_score` when no example keeps a target token within `max_seq_length`."""
    features = tokenize_examples(examples, fmt, tokenizer, max_seq_length)
    if not features:
        raise DatasetError(when_nothing_to_score)
    loss, _ = mean_token_loss(
        model,
        features,
        pad_token_id=int(tokenizer.pad_token_id),
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    return loss


def perplexity_from_loss(loss: float) -> float:
    """exp(loss), capped below float overflow."""
    return math.exp(min(loss, MAX_PERPLEXITY_EXPONENT))


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _decode_until_eos(tokenizer: Any, tokens: list[int]) -> str:
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def _greedy_without_cache(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int | None, device: torch.device
) -> list[int]:
    """One prompt, no padding and no KV cache: every step is a plain forward over the whole sequence.

    Used for prefix and prompt tuning, whose `generate` in PEFT 0.21 with transformers 5 drops the
    prefix (prefix tuning) or shifts the positions of generated tokens (prompt tuning).
    """
    sequence = torch.tensor([prompt], device=device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
        next_token = int(logits[0, -1].argmax())
        generated.append(next_token)
        if next_token == eos_id:
            break
        sequence = torch.cat([sequence, torch.tensor([[next_token]], device=device)], dim=1)
    return generated


def greedy_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> list[str]:
    """Greedy continuation of each prompt (token ids), stopped at eos, decoded without special tokens."""
    responses = [""] * len(prompts)
    pad_id = int(tokenizer.pad_token_id)
    eos_id = tokenizer.eos_token_id
    model.eval()
    with torch.inference_mode(), autocast_context(precision, device):
        if _is_prompt_learning(model):
            for index, prompt in enumerate(prompts):
                tokens = _greedy_without_cache(model, prompt, max_new_tokens, eos_id, device)
                responses[index] = _decode_until_eos(tokenizer, tokens)
            return responses
        generate: Any = model.generate
        # Prompts of similar length share a batch, so there is little padding.
        order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            width = max(len(prompts[index]) for index in indices)
            # Left padding, so every row continues right where its prompt ends.
            input_ids = torch.tensor(
                [[pad_id] * (width - len(prompts[index])) + prompts[index] for index in indices],
                device=device,
            )
            attention_mask = torch.tensor(
                [[0] * (width - len(prompts[index])) + [1] * len(prompts[index]) for index in indices],
                device=device,
            )
            output = generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            new_tokens = output[:, width:].tolist()
            for row, index in enumerate(indices):
                responses[index] = _decode_until_eos(tokenizer, new_tokens[row])
    return responses


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: DatasetFormat,
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[list[tuple[str, str]], list[str]]:
    """Each example's (prompt, reference) as training renders it, and the greedy response to each prompt."""
    rendered = [data.render_prompt_and_response(dict(example), fmt, tokenizer) for example in examples]
    prompts = [data.prompt_token_ids(prompt, fmt, tokenizer) for prompt, _ in rendered]
    responses = greedy_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    return rendered, responses


def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: str,
    *,
    max_new_tokens: int,
    max_samples: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[float, list[dict[str, Any]]]:
    """Share of the first `max_samples` examples whose stripped greedy response equals the reference."""
    dataset_format = cast(DatasetFormat, fmt)
    chosen = list(examples)[:max_samples]
    if not chosen:
        raise DatasetError("the validation set is empty; exactMatch needs held-out examples")
    rendered, predictions = greedy_answers(
        model,
        tokenizer,
        chosen,
        dataset_format,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    records = [
        {
            "prompt": prompt,
            "reference": reference,
            "prediction": prediction,
            "match": prediction.strip() == reference.strip(),
            "lenientMatch": is_lenient_match(prediction, reference),
        }
        for (prompt, reference), prediction in zip(rendered, predictions, strict=True)
    ]
    return sum(1 for record in records if record["match"]) / len(records), records


def is_lenient_match(prediction: str, reference: str) -> bool:
    """Whether the first non-empty line of `prediction` contains `reference` as a whole word (or phrase),
    ignoring case."""
    wanted = reference.strip()
    lines = [line for line in prediction.strip().splitlines() if line.strip()]
    if not wanted or not lines:
        return False
    return re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", lines[0], re.IGNORECASE) is not None


def _share(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits)


def _word_counts(text: str) -> Counter[str]:
    return Counter(re.findall(r"\w+", text.lower()))


def _cosine(left: Counter[str], right: Counter[str]) -> float:
    norms = math.sqrt(sum(v * v for v in left.values()) * sum(v * v for v in right.values()))
    if norms == 0:
        return 0.0
    return sum(count * right[word] for word, count in left.items()) / norms


def majority_class_predictions(train_responses: Sequence[str], count: int) -> list[str]:
    """The most common training response, `count` times (the first seen wins a tie)."""
    if not train_responses:
        raise DatasetError("the training split is empty; the majorityClass baseline needs training examples")
    most_common = Counter(response.strip() for response in train_responses).most_common(1)[0][0]
    return [most_common] * count


def nearest_neighbour_predictions(
    train_pairs: Sequence[tuple[str, str]], prompts: Sequence[str]
) -> list[str]:
    """For each prompt, the response of the training (prompt, response) pair whose prompt has the most
    similar word counts (cosine; the earliest pair wins a tie)."""
    if not train_pairs:
        raise DatasetError(
            "the training split is empty; the nearestNeighbour baseline needs training examples"
        )
    train = [(_word_counts(prompt), response) for prompt, response in train_pairs]
    predictions = []
    for prompt in prompts:
        words = _word_counts(prompt)
        best = max(range(len(train)), key=lambda index: (_cosine(words, train[index][0]), -index))
        predictions.append(train[best][1])
    return predictions


def reference_baselines(
    train_pairs: Sequence[tuple[str, str]], held_out_pairs: Sequence[tuple[str, str]]
) -> dict[str, float]:
    """exactMatch of the majorityClass and nearestNeighbour predictors on `held_out_pairs`."""
    if not held_out_pairs:
        raise DatasetError("the validation set is empty; the reference baselines need held-out examples")
    references = [response.strip() for _, response in held_out_pairs]
    majority = majority_class_predictions([response for _, response in train_pairs], len(references))
    nearest = nearest_neighbour_predictions(train_pairs, [prompt for prompt, _ in held_out_pairs])
    return {
        "majorityClass": _share([p.strip() == r for p, r in zip(majority, references, strict=True)]),
        "nearestNeighbour": _share([p.strip() == r for p, r in zip(nearest, references, strict=True)]),
    }


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: str,
    settings: Evaluation,
    *,
    max_seq_length: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The metrics listed in `settings` (others are left out), plus the generations behind exactMatch."""
    if not examples:
        raise DatasetError(
            "the validation set is empty; set dataset.validationSplit above 0 or dataset.validationUri"
        )
    result: dict[str, Any] = {"samples": len(examples)}
    predictions: list[dict[str, Any]] = []
    if "preferenceAccuracy" in settings.metrics:
        measured = preference.preference_accuracy(
            model,
            tokenizer,
            list(examples)[: settings.max_samples],
            cast(DatasetFormat, fmt),
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            device=device,
            autocast=lambda: autocast_context(precision, device),
        )
        result["preferenceAccuracy"] = measured.accuracy
        result["preferencePairs"] = measured.pairs
    if fmt == "feedback":  # loss and generations score the desirable completions only
        examples = [example for example in examples if example["label"]]
    if {"evalLoss", "perplexity"} & set(settings.metrics):
        loss = examples_loss(
            model,
            tokenizer,
            examples,
            fmt,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            device=device,
            precision=precision,
            when_nothing_to_score="no validation example has a response token within training.maxSeqLength",
        )
        if "evalLoss" in settings.metrics:
            result["evalLoss"] = loss
        if "perplexity" in settings.metrics:
            result["perplexity"] = perplexity_from_loss(loss)
    if "exactMatch" in settings.metrics:
        result["exactMatch"], predictions = exact_match(
            model,
            tokenizer,
            examples,
            fmt,
            max_new_tokens=settings.max_new_tokens,
            max_samples=settings.max_samples,
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
        result["lenientMatch"] = _share([bool(record["lenientMatch"]) for record in predictions])
    return result, predictions


def evaluate_reference_sets(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: Evaluation,
    *,
    max_seq_length: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, dict[str, Any]]:
    """Each reference set's score ({metric, value, samples}, by name) on its first `maxSamples` examples:
    the perplexity of its text (or responses), or the exactMatch of greedy responses."""
    scores: dict[str, dict[str, Any]] = {}
    for index, reference in enumerate(settings.reference):
        field = f"evaluation.reference[{index}]"
        try:
            examples = data.load_examples(reference.uri, reference.format)[: settings.max_samples]
        except DatasetError as error:
            raise DatasetError(f"{field}.uri: {error.message}") from None
        if not examples:
            raise DatasetError(f"{field}.uri: {reference.uri} holds no example")
        if reference.metric == "perplexity":
            loss = examples_loss(
                model,
                tokenizer,
                examples,
                reference.format,
                max_seq_length=max_seq_length,
                batch_size=batch_size,
                device=device,
                precision=precision,
                when_nothing_to_score=(
                    f"{field}: no example has a token to score within training.maxSeqLength"
                ),
            )
            value = perplexity_from_loss(loss)
        else:
            value, _ = exact_match(
                model,
                tokenizer,
                examples,
                reference.format,
                max_new_tokens=settings.max_new_tokens,
                max_samples=settings.max_samples,
                batch_size=batch_size,
                device=device,
                precision=precision,
            )
        scores[reference.name] = {"metric": reference.metric, "value": value, "samples": len(examples)}
    return scores


def read_validation_examples(workspace_dir: Path, fmt: str) -> list[dict[str, Any]]:
    path = workspace_dir / WorkspaceLayout.VALIDATION_SPLIT
    if not path.is_file():
        raise DatasetError(f"{path} is missing; the curate step must run before evaluate")
    if not path.read_bytes().strip():
        return []
    return data.load_examples(str(path), cast(DatasetFormat, fmt))


def read_training_examples(workspace_dir: Path, fmt: str) -> list[dict[str, Any]]:
    path = workspace_dir / WorkspaceLayout.TRAIN_SPLIT
    if not path.is_file():
        raise DatasetError(f"{path} is missing; the curate step must run before evaluate")
    return data.load_examples(str(path), cast(DatasetFormat, fmt))


def workspace_reference_baselines(
    workspace_dir: Path, examples: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any, max_samples: int
) -> dict[str, float]:
    """The reference baselines, learned from the workspace's training split, on the examples exactMatch
    scores (the first `max_samples`)."""
    dataset_format = cast(DatasetFormat, fmt)

    def pairs(chosen: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
        return [
            data.render_prompt_and_response(dict(example), dataset_format, tokenizer)
            for example in chosen
            if example.get("label") is not False  # feedback rows: the desirable answers only
        ]

    return reference_baselines(
        pairs(read_training_examples(workspace_dir, fmt)), pairs(list(examples)[:max_samples])
    )


def run_evaluation(
    spec: FineTuneJobSpec | Mapping[str, Any],
    workspace_dir: Path,
    which: Which,
    *,
    progress: ProgressReporter | None = None,
) -> dict[str, Any]:
    """Evaluate the base model (`baseline`) or the tuned one (`final`); writes evaluation/{which}.json."""
    if which not in ("baseline", "final"):
        raise ConfigError(f"evaluate: which must be baseline or final, got {which!r}")
    if progress is not None:
        progress.set_phase("evaluating-baseline" if which == "baseline" else "evaluating")
    if not isinstance(spec, FineTuneJobSpec):
        spec = parse_finetune_spec(spec)
    settings = spec.evaluation
    training = spec.training
    fmt = spec.dataset.format
    base_uri = spec.base_model.uri
    device = pick_device()
    precision = inference_precision(training.precision, device)
    examples = read_validation_examples(workspace_dir, fmt)
    result: dict[str, Any] = {"samples": len(examples)}
    predictions: list[dict[str, Any]] = []
    if settings.harness is not None:
        resolve_harness(settings.harness)  # a bad task or gate fails here, before any model loads
    measured = settings.metrics or settings.reference
    if measured or settings.fairness is not None or settings.harness is not None:
        torch.manual_seed(training.seed)
        if which == "baseline":
            tokenizer = models.load_tokenizer(base_uri)
            model: torch.nn.Module = models.load_causal_lm(base_uri)
        else:
            trained_dir = workspace_dir / WorkspaceLayout.TRAINED
            model = load_trained_model(trained_dir, base_uri)
            tokenizer = models.load_tokenizer(str(trained_dir))
        model.to(device)
    if settings.metrics:
        result, predictions = evaluate_model(
            model,
            tokenizer,
            examples,
            fmt,
            settings,
            max_seq_length=training.max_seq_length,
            batch_size=training.batch_size,
            device=device,
            precision=precision,
        )
        # Text datasets have no responses to predict, so no baseline answers them.
        if which == "baseline" and "exactMatch" in settings.metrics and fmt != "text":
            result.update(
                workspace_reference_baselines(workspace_dir, examples, fmt, tokenizer, settings.max_samples)
            )
    if settings.reference:
        result[REFERENCE_KEY] = evaluate_reference_sets(
            model,
            tokenizer,
            settings,
            max_seq_length=training.max_seq_length,
            batch_size=training.batch_size,
            device=device,
            precision=precision,
        )
    if settings.fairness is not None:
        result[FAIRNESS_KEY] = measure_fairness(
            model,
            tokenizer,
            examples,
            fmt,
            settings.fairness,
            max_new_tokens=settings.max_new_tokens,
            batch_size=training.batch_size,
            device=device,
            precision=precision,
        )
    if settings.harness is not None:
        result[HARNESS_KEY] = run_harness(
            model,
            tokenizer,
            settings.harness,
            limit=settings.max_samples,
            batch_size=training.batch_size,
            seed=training.seed,
        )
    storage.atomic_write_json(workspace_dir / WorkspaceLayout.evaluation(which), result)
    lines = "".join(
        json.dumps(record, ensure_ascii=False) + "\n" for record in predictions[:PREDICTIONS_KEPT]
    )
    with contextlib.suppress(OSError):
        storage.atomic_write_text(workspace_dir / WorkspaceLayout.predictions(which), lines)
    return result
