"""Measuring a model before and after: latency per generated token and quality on held-out examples.

(Its size is serialization.weights_size_bytes of the directory it was saved to.)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from kubetune_components import data
from kubetune_components.finetune.evaluate import MAX_PERPLEXITY_EXPONENT, exact_match, mean_token_loss
from kubetune_components.finetune.train import tokenize_examples
from kubetune_contract.finetune import DatasetFormat

BUILT_IN_LATENCY_PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "My order has not arrived yet and",
    "Please reset my password because",
    "The weather today is",
    "How do I change the billing address",
    "Thank you for your help with",
    "The meeting is scheduled for",
)


def latency_prompt_ids(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], fmt: str, count: int
) -> list[list[int]]:
    """`count` prompts: those of the first validation examples, topped up with the built-in prompts."""
    dataset_format = cast(DatasetFormat, fmt)
    prompts: list[list[int]] = []
    for example in list(examples)[:count]:
        prompt, _ = data.render_prompt_and_response(dict(example), dataset_format, tokenizer)
        ids = data.prompt_token_ids(prompt, dataset_format, tokenizer)
        if ids:
            prompts.append(ids)
    index = 0
    while len(prompts) < count:
        text = BUILT_IN_LATENCY_PROMPTS[index % len(BUILT_IN_LATENCY_PROMPTS)]
        prompts.append(list(tokenizer(text, add_special_tokens=True)["input_ids"]))
        index += 1
    return prompts


def greedy_tokens(
    model: torch.nn.Module, prompt: list[int], new_tokens: int, device: torch.device
) -> list[int]:
    """Exactly `new_tokens` greedily generated tokens (eos does not stop it)."""
    generate: Any = model.generate
    input_ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        output = generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, len(prompt) :].tolist()]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_token(
    model: torch.nn.Module, prompts: Sequence[list[int]], new_tokens: int, device: torch.device
) -> float:
    """Median over `prompts` of wall seconds per generated token (batch 1, greedy), after a warm-up."""
    model.eval()
    greedy_tokens(model, prompts[0], new_tokens, device)
    timings: list[float] = []
    for prompt in prompts:
        _synchronize(device)
        start = time.perf_counter()
        generated = greedy_tokens(model, prompt, new_tokens, device)
        _synchronize(device)
        timings.append((time.perf_counter() - start) / max(1, len(generated)))
    return float(statistics.median(timings))


def measure_quality(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: str,
    *,
    max_samples: int,
    max_new_tokens: int,
    max_seq_length: int,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, float | None]:
    """{perplexity, exactMatch} on the first `max_samples` held-out examples (None without any)."""
    chosen = list(examples)[:max_samples]
    if not chosen:
        return {"perplexity": None, "exactMatch": None}
    features = tokenize_examples(chosen, fmt, tokenizer, max_seq_length)
    perplexity: float | None = None
    if features:
        loss, _ = mean_token_loss(
            model, features, pad_token_id=int(tokenizer.pad_token_id), batch_size=batch_size, device=device
        )
        perplexity = math.exp(min(loss, MAX_PERPLEXITY_EXPONENT))
    score, _ = exact_match(
        model,
        tokenizer,
        chosen,
        fmt,
        max_new_tokens=max_new_tokens,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
    )
    return {"perplexity": perplexity, "exactMatch": score}
