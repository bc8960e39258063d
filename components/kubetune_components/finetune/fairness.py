"""Counterfactual fairness (evaluation.fairness): does the answer change when a demographic term does?

Every held-out prompt holding a term of `termPairs` is asked twice, as written and with each such term
swapped for its counterpart (whole words, case kept); greedy answers are compared after trimming and
lower-casing. The flip rate is the share of pairs answered differently; the score gap is exactMatch of
the group-A wording minus that of the group-B wording of the same prompts. Text datasets have no prompt
to swap in, so they yield no pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kubetune_contract.common import GateResult, as_float, within_bound
from kubetune_contract.finetune import DatasetFormat, Evaluation, Fairness

FAIRNESS_KEY = "fairness"
"""Where evaluation/{baseline,final}.json keep the result: {pairs, flipRate, scoreGap}."""


def _swap_table(
    term_pairs: Sequence[Sequence[str]],
) -> tuple[dict[str, str], dict[str, str], re.Pattern[str]]:
    to_b: dict[str, str] = {}
    to_a: dict[str, str] = {}
    for first, second in term_pairs:
        to_b.setdefault(first.lower(), second.lower())
        to_a.setdefault(second.lower(), first.lower())
    words = sorted({*to_b, *to_a}, key=len, reverse=True)
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(word) for word in words) + r")(?!\w)", re.IGNORECASE
    )
    return to_b, to_a, pattern


def _with_case(replacement: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def counterfactual_texts(text: str, term_pairs: Sequence[Sequence[str]]) -> tuple[str, str] | None:
    """(the text in group-A wording, in group-B wording), or None when it holds no listed term."""
    to_b, to_a, pattern = _swap_table(term_pairs)
    if not pattern.search(text):
        return None

    def wording(table: Mapping[str, str]) -> str:
        return pattern.sub(
            lambda match: _with_case(
                table.get(match.group(0).lower(), match.group(0).lower()), match.group(0)
            ),
            text,
        )

    group_a, group_b = wording(to_a), wording(to_b)
    return (group_a, group_b) if group_a != group_b else None


def _prompt_fields(example: dict[str, Any], fmt: DatasetFormat) -> list[str]:
    if fmt == "instruction":
        return [key for key in ("instruction", "input") if isinstance(example.get(key), str)]
    return []


def counterfactual_examples(
    examples: Sequence[dict[str, Any]], fmt: DatasetFormat, fairness: Fairness
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(group-A example, group-B example) for each example whose prompt holds a listed term."""
    if fmt == "text":
        return []
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for example in examples:
        if len(pairs) >= fairness.max_samples:
            break
        group_a, group_b = dict(example), dict(example)
        changed = False
        if fmt == "chat":
            messages_a, messages_b = [], []
            for message in example["messages"][:-1]:
                texts = counterfactual_texts(message["content"], fairness.term_pairs)
                changed = changed or texts is not None
                messages_a.append({**message, "content": texts[0] if texts else message["content"]})
                messages_b.append({**message, "content": texts[1] if texts else message["content"]})
            group_a["messages"] = [*messages_a, example["messages"][-1]]
            group_b["messages"] = [*messages_b, example["messages"][-1]]
        for key in _prompt_fields(example, fmt):
            texts = counterfactual_texts(example[key], fairness.term_pairs)
            if texts is not None:
                changed = True
                group_a[key], group_b[key] = texts
        if changed:
            pairs.append((group_a, group_b))
    return pairs


def _normalized(answer: str) -> str:
    return " ".join(answer.split()).lower()


def measure_fairness(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    fmt: DatasetFormat,
    fairness: Fairness,
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, Any]:
    """{pairs, flipRate, scoreGap} of `model` on the counterfactual pairs of `examples`."""
    from kubetune_components.finetune.evaluate import greedy_answers

    pairs = counterfactual_examples(examples, fmt, fairness)
    if not pairs:
        return {"pairs": 0, "flipRate": None, "scoreGap": None}
    rendered, answers = greedy_answers(
        model,
        tokenizer,
        [example for pair in pairs for example in pair],
        fmt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    flips = 0
    right_a = right_b = 0
    for index in range(len(pairs)):
        answer_a, answer_b = answers[2 * index], answers[2 * index + 1]
        reference = _normalized(rendered[2 * index][1])
        flips += _normalized(answer_a) != _normalized(answer_b)
        right_a += _normalized(answer_a) == reference
        right_b += _normalized(answer_b) == reference
    count = len(pairs)
    return {"pairs": count, "flipRate": flips / count, "scoreGap": (right_a - right_b) / count}


FLIP_RATE_GATE = "counterfactualFlipRate"


def fairness_gates(settings: Evaluation, final: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The gates.json entry of `fairness.maxCounterfactualFlipRate` (none when unset); a tuned model with
    no flip rate (no prompt held a listed term) fails it, since nothing was shown."""
    fairness = settings.fairness
    if fairness is None or fairness.max_counterfactual_flip_rate is None:
        return []
    threshold = as_float(fairness.max_counterfactual_flip_rate)
    measured = ((final or {}).get(FAIRNESS_KEY) or {}).get("flipRate")
    value = float(measured) if isinstance(measured, (int, float)) else None
    result = GateResult(
        metric=FLIP_RATE_GATE,
        op="max",
        threshold=threshold,
        value=value,
        passed=within_bound(value, "max", threshold),
    )
    return [result.model_dump(by_alias=True, mode="json")]
