"""Against forgetting: reference sets scored before and after tuning, their gate, and replay.

- A reference set (`evaluation.reference[]`) holds what the base model could already do. The evaluate
  step scores it on the base and on the tuned model (evaluate.py); here is what tuning lost on it, its
  `drop`: the relative increase of perplexity ((final - baseline) / baseline), or the fall of exactMatch
  (baseline - final). `evaluation.maxReferenceDrop` bounds every set's drop.
- Replay (`training.replay`) mixes examples of such data into the training set: `ratio` of them per
  training example, drawn in an order seeded with `training.seed` (repeated when the file holds fewer),
  so the same spec trains on the same mixture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kubetune_components import data
from kubetune_components.common.errors import DatasetError
from kubetune_contract.common import GateResult, as_float, within_bound
from kubetune_contract.finetune import Evaluation, Replay, reference_drop

REFERENCE_KEY = "reference"
"""Where an evaluation report (evaluation/{baseline,final}.json) keeps the reference sets' scores:
{name: {metric, value, samples}}."""
REFERENCE_GATE_PREFIX = "referenceDrop."
"""A reference gate's metric in gates.json: `referenceDrop.<set name>`."""

Feature = dict[str, list[int]]


def reference_scores(report: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The reference sets' scores of an evaluation report, by name ({} when it has none)."""
    scores = (report or {}).get(REFERENCE_KEY)
    if not isinstance(scores, Mapping):
        return {}
    return {str(name): dict(score) for name, score in scores.items() if isinstance(score, Mapping)}


def _value(score: Mapping[str, Any] | None) -> float | None:
    value = (score or {}).get("value")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def reference_results(
    baseline: Mapping[str, Any] | None, final: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per reference set of either report: name, metric, baseline, final, drop (status's shape)."""
    before, after = reference_scores(baseline), reference_scores(final)
    rows = []
    for name in dict.fromkeys([*before, *after]):
        metric = str((before.get(name) or after.get(name) or {}).get("metric", "perplexity"))
        base_value, final_value = _value(before.get(name)), _value(after.get(name))
        rows.append(
            {
                "name": name,
                "metric": metric,
                "baseline": base_value,
                "final": final_value,
                "drop": reference_drop(metric, base_value, final_value),
            }
        )
    return rows


def reference_gates(
    settings: Evaluation, baseline: Mapping[str, Any] | None, final: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """gates.json entries of `maxReferenceDrop`, one per reference set of the spec; a set that was not
    scored on both models fails its gate."""
    if settings.max_reference_drop is None:
        return []
    threshold = as_float(settings.max_reference_drop)
    measured = {row["name"]: row["drop"] for row in reference_results(baseline, final)}
    results = []
    for reference in settings.reference:
        drop = measured.get(reference.name)
        result = GateResult(
            metric=f"{REFERENCE_GATE_PREFIX}{reference.name}",
            op="max",
            threshold=threshold,
            value=drop,
            passed=within_bound(drop, "max", threshold),
        )
        results.append(result.model_dump(by_alias=True, mode="json"))
    return results


def describe_reference_failure(result: Mapping[str, Any]) -> str | None:
    """Why a reference gate failed, or None when `result` is not a reference gate."""
    metric = str(result["metric"])
    if not metric.startswith(REFERENCE_GATE_PREFIX):
        return None
    name = metric.removeprefix(REFERENCE_GATE_PREFIX)
    value, threshold = result["value"], result["threshold"]
    if value is None:
        return f"reference set {name} was not scored on both the base and the tuned model"
    return f"reference set {name} dropped by {value:.6g}, above maxReferenceDrop {threshold:g}"


# --------------------------------------------------------------------------------------------------
# Replay.


def replay_count(training_examples: int, ratio: str) -> int:
    """Replay examples mixed into `training_examples` task examples (at least one)."""
    return max(1, round(training_examples * as_float(ratio)))


def replay_order(available: int, count: int, seed: int) -> list[int]:
    """`count` indices into `available` examples: seeded permutations, one after the other."""
    if available <= 0:
        raise DatasetError("training.replay.uri: the replay file holds no usable example")
    generator = torch.Generator().manual_seed(seed * 7_919 + 17)
    order: list[int] = []
    while len(order) < count:
        order.extend(torch.randperm(available, generator=generator).tolist())
    return order[:count]


def replay_features(
    replay: Replay,
    training_examples: int,
    tokenizer: Any,
    max_seq_length: int,
    seed: int,
) -> list[Feature]:
    """The tokenized replay examples to add to `training_examples` task examples."""
    try:
        examples = data.load_examples(replay.uri, replay.format)
    except DatasetError as error:
        raise DatasetError(f"training.replay.uri: {error.message}") from None
    features: list[Feature] = []
    for example in examples:
        feature = data.tokenize_for_training(dict(example), replay.format, tokenizer, max_seq_length)
        if feature is not None:
            features.append(feature)
    order = replay_order(len(features), replay_count(training_examples, replay.ratio), seed)
    return [features[index] for index in order]
