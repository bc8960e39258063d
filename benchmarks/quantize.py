"""What does each QuantizeJob method cost on CPU? Size, latency per generated token and perplexity vs fp32.

Perplexity costs only mean something on a model that has learnt its text, so this first trains one: the
dev tiny-base architecture (`tinylm.BASE_SHAPE`, the tiny BPE tokenizer) on the dev corpus
(`kubetune_components/dev/corpus`), 90% of its paragraphs for training and 10% held out, evaluating the
held-out perplexity every `--eval-every` steps and keeping the best state (early stopping, at most
`--train-steps` steps). Beside it, the held-out perplexity of an add-one unigram model of the training
tokens: the trained model must land far below it. The trained model is cached under benchmarks/.cache
(keyed by corpus, shape and recipe), so later runs reuse it.

Then for every method: quantize a fresh copy with `kubetune_components.quantize`, save it, reload it with
`load_quantized` and measure the reloaded model: weight-file size and held-out perplexity (both exact),
and seconds per greedy token (batch 1) in at least 5 interleaved rounds over all models, each round's
latency ratio to fp32 recorded, median and min-max reported. Everything goes to
benchmarks/results/quantize.json. Not part of the test suite:

    python benchmarks/quantize.py [--train-steps 160] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from _results import MIN_ROUNDS, BenchmarkRecord
from kubetune_components import quantize
from kubetune_components.common import models
from kubetune_components.dev import tinylm
from kubetune_contract.quantize import QuantizeMethod

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SHAPE = tinylm.BASE_SHAPE
SEQUENCE_LENGTH = 128
BATCH_SIZE = 8
PEAK_LEARNING_RATE = 2e-3
WARMUP_STEPS = 20
TRAINING_SEED = 0
HELD_OUT_FRACTION = 0.1
LATENCY_PROMPTS = 4
LATENCY_NEW_TOKENS = 16
CPU = torch.device("cpu")
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


class Corpus:
    """The dev corpus tokenized and split by paragraph into training documents and held-out blocks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        eos = int(tokenizer.eos_token_id)
        documents = [[*tokenizer(text)["input_ids"], eos] for text in tinylm.corpus_documents()]
        random.Random(0).shuffle(documents)
        held_out_count = max(1, int(len(documents) * HELD_OUT_FRACTION))
        self.train_documents = documents[held_out_count:]
        stream = [token for document in documents[:held_out_count] for token in document]
        self.held_out_blocks = [
            stream[start : start + SEQUENCE_LENGTH]
            for start in range(0, len(stream) - SEQUENCE_LENGTH + 1, SEQUENCE_LENGTH)
        ]
        self.train_tokens = sum(len(document) for document in self.train_documents)
        self.held_out_tokens = len(self.held_out_blocks) * SEQUENCE_LENGTH
        self.vocab_size = len(tokenizer)

    def unigram_perplexity(self) -> float:
        """Held-out perplexity of add-one-smoothed unigram frequencies of the training tokens."""
        counts = collections.Counter(token for document in self.train_documents for token in document)
        total = self.train_tokens + self.vocab_size
        targets = [token for block in self.held_out_blocks for token in block[1:]]
        log_likelihood = sum(math.log((counts[token] + 1) / total) for token in targets)
        return math.exp(-log_likelihood / len(targets))


def held_out_perplexity(model: torch.nn.Module, blocks: list[list[int]]) -> float:
    """exp(mean next-token cross-entropy) over every position of every block."""
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), BATCH_SIZE):
            batch = torch.tensor(blocks[start : start + BATCH_SIZE], dtype=torch.long)
            logits = model(input_ids=batch).logits.float()
            total_loss += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)


def _learning_rate(step: int, total_steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return PEAK_LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_until_converged(
    model: LlamaForCausalLM, corpus: Corpus, max_steps: int, eval_every: int
) -> dict[str, Any]:
    """Trains with AdamW and a cosine schedule, keeping the state of the best held-out perplexity."""
    rng = random.Random(TRAINING_SEED)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PEAK_LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.01
    )
    blocks: list[list[int]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(max_steps):
        model.train()
        if len(blocks) < BATCH_SIZE:
            blocks = tinylm._pack_blocks(corpus.train_documents, SEQUENCE_LENGTH, rng)
        batch = torch.tensor([blocks.pop() for _ in range(BATCH_SIZE)], dtype=torch.long)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, max_steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == max_steps:
            model.eval()
            perplexity = held_out_perplexity(model, corpus.held_out_blocks)
            train_loss = float(loss.detach())
            curve.append({"step": step + 1, "trainLoss": train_loss, "heldOutPerplexity": perplexity})
            print(f"  step {step + 1}: train loss {train_loss:.3f}, held-out perplexity {perplexity:.2f}")
            if best is None or perplexity < best[0]:
                best = (perplexity, step + 1, copy.deepcopy(model.state_dict()))
            elif perplexity > best[0] * 1.05:
                break  # overfitting the small corpus: the best state is behind us
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    return {
        "bestStep": best[1],
        "stepsRun": curve[-1]["step"],
        "trainSeconds": round(time.perf_counter() - started, 1),
        "curve": curve,
    }


def training_key(corpus_hash: str, max_steps: int, eval_every: int) -> str:
    recipe = {
        "shape": asdict(SHAPE),
        "sequenceLength": SEQUENCE_LENGTH,
        "batchSize": BATCH_SIZE,
        "peakLearningRate": PEAK_LEARNING_RATE,
        "warmupSteps": WARMUP_STEPS,
        "seed": TRAINING_SEED,
        "heldOutFraction": HELD_OUT_FRACTION,
        "maxSteps": max_steps,
        "evalEvery": eval_every,
        "corpus": corpus_hash,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def trained_model(max_steps: int, eval_every: int) -> tuple[Path, dict[str, Any]]:
    """The converged model's directory under benchmarks/.cache (trained now unless cached) and its record."""
    corpus_hash = hashlib.sha256(b"".join(path.read_bytes() for path in tinylm.corpus_paths())).hexdigest()
    model_dir = CACHE_DIR / f"quantize-model-{training_key(corpus_hash, max_steps, eval_every)}"
    record_file = model_dir / "training.json"
    if record_file.is_file():
        print(f"reusing the trained model in {model_dir}")
        return model_dir, json.loads(record_file.read_text())
    CACHE_DIR.mkdir(exist_ok=True)
    (CACHE_DIR / ".gitignore").write_text("*\n")
    tokenizer = tinylm.build_tiny_tokenizer()
    corpus = Corpus(tokenizer)
    torch.manual_seed(TRAINING_SEED)
    model = LlamaForCausalLM(tinylm.tiny_llama_config(tokenizer, SHAPE))
    print(
        f"training {tinylm.parameter_count(model):,} parameters on the dev corpus: {corpus.train_tokens:,} "
        f"training tokens, {corpus.held_out_tokens:,} held out, at most {max_steps} steps of "
        f"{BATCH_SIZE}x{SEQUENCE_LENGTH} tokens"
    )
    training = train_until_converged(model, corpus, max_steps, eval_every)
    staging = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    record = {
        **training,
        "corpus": [path.name for path in tinylm.corpus_paths()],
        "corpusSha256": corpus_hash,
        "trainTokens": corpus.train_tokens,
        "heldOutTokens": corpus.held_out_tokens,
        "parameters": tinylm.parameter_count(model),
        "shape": asdict(SHAPE),
        "heldOutPerplexity": held_out_perplexity(model, corpus.held_out_blocks),
        "unigramPerplexity": corpus.unigram_perplexity(),
    }
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return model_dir, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=160, help="most training steps (early stopping)")
    parser.add_argument("--eval-every", type=int, default=40, help="held-out evaluation interval (steps)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"latency rounds (>= {MIN_ROUNDS})")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (a ratio needs its spread)")
    if args.train_steps < 1 or args.eval_every < 1:
        parser.error("--train-steps and --eval-every must be at least 1")
    torch.set_num_threads(args.threads)
    settings = {"trainSteps": args.train_steps, "evalEvery": args.eval_every, "threads": args.threads}
    record = BenchmarkRecord("quantize", Path(__file__), settings, argv)
    started = time.perf_counter()

    model_dir, training = trained_model(args.train_steps, args.eval_every)
    tokenizer = models.load_tokenizer(str(model_dir))
    corpus = Corpus(tokenizer)
    model = models.load_causal_lm(str(model_dir))
    print(
        f"model: {training['parameters'] / 1e6:.2f}M parameters, trained {training['bestStep']} steps "
        f"(best of {training['stepsRun']}) in {training['trainSeconds']:.0f}s on {training['trainTokens']:,} "
        f"dev-corpus tokens; held-out perplexity {training['heldOutPerplexity']:.2f}, unigram "
        f"{training['unigramPerplexity']:.2f}"
    )
    train_features = [
        {"input_ids": block, "attention_mask": [1] * len(block), "labels": block}
        for block in tinylm._pack_blocks(corpus.train_documents, SEQUENCE_LENGTH, random.Random(1))
    ]
    prompts = [
        list(tokenizer(text)["input_ids"]) for text in quantize.BUILT_IN_LATENCY_PROMPTS[:LATENCY_PROMPTS]
    ]
    names = ["fp32"]
    sizes = [quantize.weights_size_bytes(model_dir)]
    loaded: list[torch.nn.Module] = [model]
    with tempfile.TemporaryDirectory() as scratch:
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
            names.append(name)
            loaded.append(quantize.load_quantized(out_dir))
            sizes.append(quantize.weights_size_bytes(out_dir))
    perplexities = [held_out_perplexity(each, corpus.held_out_blocks) for each in loaded]

    # Rounds interleave the models, so a burst of background load hits every model of that round alike.
    latencies: list[list[float]] = [[] for _ in loaded]
    for round_number in range(1, args.rounds + 1):
        figures: dict[str, float] = {}
        for index, timed_model in enumerate(loaded):
            seconds = quantize.seconds_per_token(
                timed_model, prompts, LATENCY_NEW_TOKENS, torch.device("cpu")
            )
            latencies[index].append(seconds)
            figures[names[index]] = seconds
        record.add_round({"secondsPerToken": figures})
        ratios = ", ".join(f"{name} {figures[name] / figures['fp32']:.2f}" for name in names[1:])
        print(f"round {round_number} latency ratio to fp32: {ratios}")

    rows: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        ratio_rounds = [mine / fp32 for mine, fp32 in zip(latencies[index], latencies[0], strict=True)]
        latency = record.summarize(f"latency {name}", f"{name} latency / fp32", ratio_rounds)
        rows.append(
            {
                "method": name,
                "sizeBytes": sizes[index],
                "sizeRatio": sizes[index] / sizes[0],
                "perplexity": perplexities[index],
                "perplexityChange": perplexities[index] / perplexities[0] - 1,
                "latencyRatio": {
                    "median": latency.median,
                    "min": min(latency.values),
                    "max": max(latency.values),
                },
            }
        )
    record.extra["model"] = {key: value for key, value in training.items() if key != "curve"} | {
        "curve": training["curve"]
    }
    record.extra["methods"] = rows
    print(
        f"{'method':26} {'size MB':>8} {'size':>6} {'latency (median, min-max)':>26} "
        f"{'ppl':>9} {'ppl change':>10}"
    )
    for row in rows:
        spread = row["latencyRatio"]
        latency_text = f"{spread['median']:.2f} ({spread['min']:.2f}-{spread['max']:.2f})"
        print(
            f"{row['method']:26} {row['sizeBytes'] / 1e6:8.2f} {row['sizeRatio']:6.3f} {latency_text:>26} "
            f"{row['perplexity']:9.2f} {row['perplexityChange']:+10.2%}"
        )
    print(f"total {time.perf_counter() - started:.0f}s; wrote {record.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
