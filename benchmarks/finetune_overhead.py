"""How much does kubetune's finetune step cost on top of a plain PEFT + torch training loop?

Trains the same tiny Llama (built from a config, random weights) with LoRA on the same quickstart
tickets, with the same hyperparameters and the very same micro-batches in the same order:

  (a) kubetune: the finetune step itself (`run_finetune`: tokenization, length-grouped batches,
      progress.json, SIGTERM handling), timed by its own training-loop clock;
  (b) plain: a hand-written loop: get_peft_model, AdamW, get_scheduler, `model(..., labels=...)`,
      backward, clip, step.

Both timers hold the same work: padding each micro-batch happens inside both loops, and neither
writes a checkpoint (the checkpoint interval is set past the last step). Each is warmed up first,
then the two alternate for at least 5 rounds (the first of each pair alternating too, so neither
always runs on a machine the other just warmed). Every round's ratio kubetune / plain of tokens/s
(non-padding tokens) is printed, then the median and the min-max spread, and whether the target
(>= 0.95) is met by the median and by the worst round. The rounds, the machine, the commit and the
date go to benchmarks/results/finetune-overhead.json. Not part of the test suite:

    python benchmarks/finetune_overhead.py [--steps 60] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _results import MIN_ROUNDS, BenchmarkRecord, Target
from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.dev import tinylm
from kubetune_components.finetune import loop
from kubetune_components.finetune import train as finetune
from kubetune_contract.workspace import WorkspaceLayout

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "examples" / "quickstart" / "data" / "support-tickets.jsonl"
TARGET = Target(0.95)
LORA_RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA: dict[str, Any] = {
    "r": LORA_RANK,
    "alpha": LORA_ALPHA,
    "dropout": "0.05",
    "targetModules": TARGET_MODULES,
    "useRslora": False,
}


def training_block(steps: int) -> dict[str, Any]:
    return {
        "maxSteps": steps,
        "batchSize": 8,
        "gradientAccumulationSteps": 1,
        "learningRate": "3e-3",
        "weightDecay": "0",
        "maxGradNorm": "1.0",
        "scheduler": {"type": "cosine", "warmupRatio": "0.1"},
        "precision": "fp32",
        "seed": 42,
        "maxSeqLength": 128,
        # Past the last step: no checkpoint inside kubetune's timer, as there is none in the plain loop's.
        "checkpointEverySteps": steps + 1,
        "keepCheckpoints": 2,
    }


def kubetune_run(model_dir: Path, train_file: Path, steps: int, scratch: Path) -> tuple[float, int]:
    """The finetune step on a fresh workspace; returns (tokens/s, tokens) of its training loop."""
    workspace = Path(tempfile.mkdtemp(dir=scratch))
    (workspace / WorkspaceLayout.DATA).mkdir()
    shutil.copy(train_file, workspace / WorkspaceLayout.TRAIN_SPLIT)
    spec = {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": str(DATASET), "format": "instruction"},
        "method": {"type": "lora", "lora": LORA},
        "training": training_block(steps),
        "output": {"uri": str(scratch / "store"), "mergeAdapter": False},
    }
    progress = ProgressReporter(workspace)
    summary = finetune.run_finetune(spec, workspace, progress=progress)
    shutil.rmtree(workspace, ignore_errors=True)
    return float(summary["tokensSeen"]) / float(summary["trainSeconds"]), int(summary["tokensSeen"])


def plain_run(
    model_dir: Path, features: list[dict[str, list[int]]], pad_token_id: int, steps: int
) -> tuple[float, int]:
    """The textbook loop over the same micro-batches kubetune trains on."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    torch.manual_seed(42)
    model = get_peft_model(
        models.load_causal_lm(str(model_dir)),
        LoraConfig(
            task_type="CAUSAL_LM",
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.05,
            target_modules=TARGET_MODULES,
        ),
    )
    parameters = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.0)
    warmup_steps = math.ceil(0.1 * steps)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    lengths = [len(feature["input_ids"]) for feature in features]
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < steps:
        plan += loop.plan_micro_batches(lengths, 8, seed=42, epoch=epoch)
        epoch += 1

    model.train()
    tokens = 0
    started = time.perf_counter()
    for indices in plan[:steps]:
        # Padding inside the timer, as kubetune pads each micro-batch inside its own.
        batch = data.pad_batch([features[index] for index in indices], pad_token_id)
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - started
    return tokens / elapsed, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"timed rounds (>= {MIN_ROUNDS})")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: a model this small gains little from more, and on a "
        "shared machine spinning threads make timings erratic)",
    )
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (a ratio needs its spread)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    transformers_logging: Any = logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    record = BenchmarkRecord(
        "finetune-overhead",
        Path(__file__),
        {"steps": args.steps, "rounds": args.rounds, "threads": args.threads, "batchSize": 8},
        argv,
    )
    ratios: list[float] = []
    scratch = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    try:
        shape = tinylm.BASE_SHAPE
        model_dir = tinylm.build_random_tiny(
            scratch / "model",
            seed=0,
            hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads,
            intermediate_size=shape.intermediate_size,
        )
        tokenizer = models.load_tokenizer(str(model_dir))
        examples = data.load_examples(str(DATASET), "instruction")
        train_file = scratch / "train.jsonl"
        train_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
        features = finetune.tokenize_examples(examples, "instruction", tokenizer, 128)
        pad_token_id = int(tokenizer.pad_token_id)
        parameters = tinylm.parameter_count(models.load_causal_lm(str(model_dir)))
        record.settings.update(parameters=parameters, examples=len(features), loraRank=LORA_RANK)
        print(
            f"tiny Llama {parameters:,} parameters, LoRA r={LORA_RANK} on {len(TARGET_MODULES)} projections, "
            f"{len(features)} examples, batch 8, {args.steps} steps x {args.rounds} rounds, "
            f"{torch.get_num_threads()} threads, load average {record.load_before}"
        )

        kubetune_run(model_dir, train_file, args.warmup_steps, scratch)
        plain_run(model_dir, features, pad_token_id, args.warmup_steps)
        for round_number in range(1, args.rounds + 1):
            rates: dict[str, tuple[float, int]] = {}
            order = ["kubetune", "plain"] if round_number % 2 else ["plain", "kubetune"]
            for loop_name in order:
                if loop_name == "kubetune":
                    rates[loop_name] = kubetune_run(model_dir, train_file, args.steps, scratch)
                else:
                    rates[loop_name] = plain_run(model_dir, features, pad_token_id, args.steps)
            (kubetune_rate, kubetune_tokens), (plain_rate, plain_tokens) = rates["kubetune"], rates["plain"]
            if kubetune_tokens != plain_tokens:
                raise RuntimeError(f"the loops saw different tokens ({kubetune_tokens} vs {plain_tokens})")
            ratio = kubetune_rate / plain_rate
            ratios.append(ratio)
            record.add_round(
                {
                    "order": order,
                    "tokens": kubetune_tokens,
                    "kubetuneTokensPerSecond": round(kubetune_rate, 1),
                    "plainTokensPerSecond": round(plain_rate, 1),
                    "ratio": round(ratio, 4),
                    "loadAverage": os.getloadavg()[0],
                }
            )
            print(
                f"round {round_number} ({' then '.join(order)}) tokens/s: kubetune {kubetune_rate:,.0f}, "
                f"plain {plain_rate:,.0f}, ratio {ratio:.3f}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = record.summarize("kubetunePerPlain", "tokens/s ratio kubetune / plain", ratios, TARGET)
    print(summary.line())
    print(f"load average before {record.load_before}, after {list(os.getloadavg())}")
    print(f"wrote {record.write()}")
    return 0 if summary.met_by_median else 1


if __name__ == "__main__":
    sys.exit(main())
