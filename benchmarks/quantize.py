"""What does each QuantizeJob method buy on CPU? Size, latency per generated token and perplexity vs fp32.

Builds one Llama of ~20M parameters from a LlamaConfig (hidden 512, 6 layers, the tiny BPE tokenizer),
pretrains it for a few dozen steps on the committed corpus (so perplexity measures something; it is
still a barely trained model, so absolute perplexities are high), then for every method: quantize a
fresh copy with `kubetune_components.quantize`, save it, reload it with `load_quantized`, and measure
the reloaded model: weight-file size, median seconds per greedy token (batch 1) and perplexity on
held-out corpus paragraphs. Not part of the test suite:

    python benchmarks/quantize.py [--pretrain-steps 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from kubetune_components import quantize
from kubetune_components.common import models
from kubetune_components.dev import tinylm
from kubetune_contract.quantize import QuantizeMethod

SHAPE = tinylm.TinyShape(
    hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536
)
SEQUENCE_LENGTH = 128
HELD_OUT_BLOCKS = 16
LATENCY_PROMPTS = 4
LATENCY_NEW_TOKENS = 16
LATENCY_ROUNDS = 3
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("int8-weight-only", {"type": "int8-weight-only"}),
    ("int8-dynamic", {"type": "int8-dynamic"}),
    ("int4-weight-only g128", {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 128}}),
    ("int4-weight-only g32", {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 32}}),
    ("pruning 50%", {"type": "pruning", "pruning": {"sparsity": "0.5"}}),
    (
        "pruning 50% + int8-wo",
        {"type": "pruning", "pruning": {"sparsity": "0.5", "then": "int8-weight-only"}},
    ),
    ("mixed-precision bf16", {"type": "mixed-precision", "mixedPrecision": {"dtype": "bf16"}}),
    (
        "qat int4 g128 (8 steps)",
        {
            "type": "qat",
            "qat": {"scheme": "int4-weight-only", "steps": 8, "batchSize": 4, "learningRate": "1e-4"},
        },
    ),
]


def held_out_perplexity(model: torch.nn.Module, blocks: list[list[int]]) -> float:
    losses = []
    with torch.inference_mode():
        for start in range(0, len(blocks), 4):
            batch = torch.tensor(blocks[start : start + 4], dtype=torch.long)
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            losses.append(float(loss))
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    tokenizer = tinylm.build_tiny_tokenizer()
    documents = [
        [*tokenizer(text)["input_ids"], tokenizer.eos_token_id] for text in tinylm.corpus_documents()
    ]
    random.Random(0).shuffle(documents)
    held_out_docs = documents[: len(documents) // 10]
    train_docs = documents[len(documents) // 10 :]
    stream = [token for document in held_out_docs for token in document]
    blocks = [
        stream[i : i + SEQUENCE_LENGTH] for i in range(0, len(stream) - SEQUENCE_LENGTH + 1, SEQUENCE_LENGTH)
    ]
    blocks = blocks[:HELD_OUT_BLOCKS]
    train_features = [
        {"input_ids": block, "attention_mask": [1] * len(block), "labels": block}
        for block in tinylm._pack_blocks(train_docs, SEQUENCE_LENGTH, random.Random(1))
    ]

    torch.manual_seed(0)
    model = LlamaForCausalLM(tinylm.tiny_llama_config(tokenizer, SHAPE))
    recipe = tinylm.PretrainingRecipe(
        steps=args.pretrain_steps, batch_size=4, sequence_length=SEQUENCE_LENGTH, warmup_steps=4
    )
    final_loss = tinylm.pretrain(model, train_docs, recipe, seed=0)
    parameters = tinylm.parameter_count(model)
    print(
        f"model: {parameters / 1e6:.1f}M parameters, pretrained {args.pretrain_steps} steps "
        f"(final train loss {final_loss:.2f}) in {time.perf_counter() - started:.0f}s, {args.threads} threads"
    )

    prompts = [
        list(tokenizer(text)["input_ids"]) for text in quantize.BUILT_IN_LATENCY_PROMPTS[:LATENCY_PROMPTS]
    ]
    measured: list[tuple[str, int, torch.nn.Module, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        reference_dir = Path(scratch) / "fp32"
        model.save_pretrained(str(reference_dir))
        fp32_size = quantize.weights_size_bytes(reference_dir)
        # The reloaded fp32 model, like every other row (same loading path, same attention implementation).
        reference = models.load_causal_lm(str(reference_dir))
        measured.append(("fp32", fp32_size, reference, held_out_perplexity(reference, blocks)))
        for name, method in METHODS:
            plan = quantize.QuantizationPlan(QuantizeMethod.model_validate(method), target="cpu")
            candidate = copy.deepcopy(model)
            quantize.quantize_model(
                candidate, plan, train_features=train_features, pad_token_id=int(tokenizer.pad_token_id)
            )
            out_dir = Path(scratch) / name.replace(" ", "_")
            quantize.save_quantized(
                candidate, tokenizer, out_dir, {"method": plan.type, "options": plan.options()}
            )
            del candidate
            reloaded = quantize.load_quantized(out_dir)
            size = quantize.weights_size_bytes(out_dir)
            measured.append((name, size, reloaded, held_out_perplexity(reloaded, blocks)))

    # Latency rounds interleave the models, and each keeps its best round: on a shared machine
    # interference only ever adds time, and it should not favour whichever model ran at a quiet moment.
    best = [math.inf] * len(measured)
    for _ in range(LATENCY_ROUNDS):
        for index, (_, _, candidate_model, _) in enumerate(measured):
            latency = quantize.seconds_per_token(
                candidate_model, prompts, LATENCY_NEW_TOKENS, torch.device("cpu")
            )
            best[index] = min(best[index], latency)
    rows = [
        (name, size, latency, perplexity)
        for (name, size, _, perplexity), latency in zip(measured, best, strict=True)
    ]
    _, _, fp32_latency, fp32_perplexity = rows[0]
    print(
        f"{'method':26} {'size MB':>8} {'size':>6} {'ms/token':>9} {'latency':>8} "
        f"{'ppl':>9} {'ppl change':>10}"
    )
    for name, size, latency, perplexity in rows:
        print(
            f"{name:26} {size / 1e6:8.2f} {size / fp32_size:6.3f} {latency * 1e3:9.2f} "
            f"{latency / fp32_latency:8.2f} {perplexity:9.2f} {perplexity / fp32_perplexity - 1:+10.2%}"
        )
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
