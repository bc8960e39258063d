"""How much does kubetune's finetune step cost on top of a plain PEFT + torch training loop?

Trains the same tiny Llama (built from a config, random weights) with LoRA on the same quickstart
tickets, with the same hyperparameters and the very same micro-batches in the same order:

  (a) kubetune: the finetune step itself (`run_finetune`: tokenization, length-grouped batches,
      progress.json, SIGTERM handling), timed by its own training-loop clock;
  (b) plain: a hand-written loop: get_peft_model, AdamW, get_scheduler, `model(..., labels=...)`,
      backward, clip, step.

The TRL row: TRL's SFTTrainer (prompt-completion rows, loss on the completion, its own batching and
clock) on the same model, LoRA, data and hyperparameters, for the same steps: tokens/s kubetune / TRL
(target >= 1.0: kubetune should match or beat it). Beside it TRL's own packing (packing=True: best-fit
decreasing into --packed-length sequences, --packed-batch-size of them per step, padding-free), to show
what packing gives a TRL user over TRL's unpacked default (random batches, each padded to its longest
row), and kubetune's packed tokens/s per TRL's packed.

The packed row: (c) the finetune step with `training.packing: true` beside (d) the same step unpacked,
each trained the same epochs on the same examples (packed into sequences of --packed-length tokens,
--packed-batch-size of them per micro-batch, so a step sees about as many examples as 8 unpacked ones),
then scored on the quickstart's held-out tickets: tokens/s packed / unpacked (target >= 1.3) at an equal
held-out eval loss (packed / unpacked <= 1.02). The unpacked row is kubetune's default unpacked
training: length-grouped micro-batches (loop.plan_micro_batches), which leave little padding for packing
to remove; the run prints how much (and how much random batches would leave), which bounds the speed-up.

Both timers hold the same work: padding each micro-batch happens inside both loops, and neither
writes a checkpoint (the checkpoint interval is set past the last step). Each is warmed up first,
then the two alternate for at least 5 rounds (the first of each pair alternating too, so neither
always runs on a machine the other just warmed). Every round's ratio kubetune / plain of tokens/s
(non-padding tokens) is printed, then the median and the min-max spread, and whether the target
(>= 0.95) is met by the median and by the worst round. The rounds, the machine, the commit and the
date go to benchmarks/results/finetune-overhead.json. Not part of the test suite:

    python benchmarks/finetune_overhead.py [--steps 60] [--rounds 5] [--threads 1] [--packing-epochs 2]
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
HELD_OUT = REPO / "examples" / "quickstart" / "data" / "support-tickets-heldout.jsonl"
TARGET = Target(0.95)
MATCHES_TRL_TARGET = Target(1.0)
PACKED_SPEEDUP_TARGET = Target(1.3)
EQUAL_EVAL_LOSS_TARGET = Target(1.02, higher_is_better=False)
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


def held_out_loss(model: torch.nn.Module, features: list[dict[str, list[int]]], pad_token_id: int) -> float:
    """Mean token loss over the held-out responses, as the loop computes the training loss."""
    model.train(False)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), 8):
            batch = loop.collate(features[start : start + 8], pad_token_id, torch.device("cpu"))
            batch_sum, batch_tokens = loop.token_loss_sum(model, batch)
            loss_sum, tokens = loss_sum + float(batch_sum), tokens + int(batch_tokens)
    return loss_sum / tokens


def packing_run(
    model_dir: Path,
    train_file: Path,
    held_out: list[dict[str, list[int]]],
    pad_token_id: int,
    scratch: Path,
    *,
    packed: bool,
    epochs: int,
    packed_length: int,
    packed_batch_size: int,
) -> tuple[float, int, float, int]:
    """The finetune step, packed or not, for `epochs`: (tokens/s, tokens, held-out eval loss, steps)."""
    workspace = Path(tempfile.mkdtemp(dir=scratch))
    (workspace / WorkspaceLayout.DATA).mkdir()
    shutil.copy(train_file, workspace / WorkspaceLayout.TRAIN_SPLIT)
    training = training_block(1)
    del training["maxSteps"]
    training.update(
        epochs=epochs,
        # One length for both (no quickstart example comes near it): only packing differs.
        maxSeqLength=packed_length,
        packing=packed,
        batchSize=packed_batch_size if packed else 8,
        checkpointEverySteps=1_000_000,
    )
    spec = {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": str(DATASET), "format": "instruction"},
        "method": {"type": "lora", "lora": LORA},
        "training": training,
        "output": {"uri": str(scratch / "store"), "mergeAdapter": False},
    }
    summary = finetune.run_finetune(spec, workspace, progress=ProgressReporter(workspace))
    tuned = finetune.load_trained_model(workspace / WorkspaceLayout.TRAINED, str(model_dir))
    eval_loss = held_out_loss(tuned, held_out, pad_token_id)
    shutil.rmtree(workspace, ignore_errors=True)
    tokens = int(summary["tokensSeen"])
    return tokens / float(summary["trainSeconds"]), tokens, eval_loss, int(summary["steps"])


def trl_run(
    model_dir: Path,
    examples: list[dict[str, Any]],
    steps: int,
    scratch: Path,
    packed_length: int | None = None,
    packed_batch_size: int = 4,
) -> tuple[float, int]:
    """TRL's SFTTrainer on the same model, LoRA, data and hyperparameters (its own batching and clock):
    (tokens/s, tokens), its non-padding tokens over its train_runtime. With `packed_length`, TRL's own
    packing (best-fit decreasing into sequences of that length, padding-free batches with position ids),
    `packed_batch_size` packed sequences per step; without it, TRL's default: random batches of 8, each
    padded to its longest row."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    rows = [
        {
            "prompt": data.render_instruction_prompt(example["instruction"], example.get("input")),
            "completion": example["output"],
        }
        for example in examples
    ]
    config = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=scratch))),
        max_steps=steps,
        per_device_train_batch_size=8 if packed_length is None else packed_batch_size,
        learning_rate=3e-3,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.1 * steps),
        max_length=128 if packed_length is None else packed_length,
        packing=packed_length is not None,
        completion_only_loss=True,
        seed=42,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=models.load_causal_lm(str(model_dir)),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=models.load_tokenizer(str(model_dir)),
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.05,
            target_modules=TARGET_MODULES,
        ),
    )
    output = trainer.train()
    tokens = int(trainer.state.num_input_tokens_seen)
    return tokens / float(output.metrics["train_runtime"]), tokens


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
    parser.add_argument("--packing-epochs", type=int, default=2, help="epochs of each packed/unpacked run")
    parser.add_argument("--packed-length", type=int, default=256, help="tokens per packed sequence")
    parser.add_argument("--packed-batch-size", type=int, default=4, help="packed sequences per micro-batch")
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
        {
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": args.threads,
            "batchSize": 8,
            "packingEpochs": args.packing_epochs,
            "packedLength": args.packed_length,
            "packedBatchSize": args.packed_batch_size,
        },
        argv,
    )
    ratios: list[float] = []
    speedups: list[float] = []
    trl_ratios: list[float] = []
    trl_packing_speedups: list[float] = []
    packed_per_trl_packed: list[float] = []
    eval_loss_ratios: list[float] = []
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
        held_out = finetune.tokenize_examples(
            data.load_examples(str(HELD_OUT), "instruction"), "instruction", tokenizer, 128
        )
        packing_settings = {
            "epochs": args.packing_epochs,
            "packed_length": args.packed_length,
            "packed_batch_size": args.packed_batch_size,
        }
        parameters = tinylm.parameter_count(models.load_causal_lm(str(model_dir)))
        lengths = [len(feature["input_ids"]) for feature in features]
        padded = sum(
            max(lengths[i] for i in batch) * len(batch)
            for batch in loop.plan_micro_batches(lengths, 8, 42, 0)
        )
        # What TRL's SFTTrainer and the HF Trainer do unpacked by default: random batches, each padded to
        # its longest row. Packing can save at most the padding, so these bound its speed-up.
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(42)).tolist()
        padded_in_random_order = sum(
            max(lengths[i] for i in shuffled[start : start + 8]) * len(shuffled[start : start + 8])
            for start in range(0, len(shuffled), 8)
        )
        unpacked_padding_share = 1 - sum(lengths) / padded
        random_order_padding_share = 1 - sum(lengths) / padded_in_random_order
        record.settings.update(
            parameters=parameters,
            examples=len(features),
            loraRank=LORA_RANK,
            unpackedPaddingShare=round(unpacked_padding_share, 4),
            randomOrderPaddingShare=round(random_order_padding_share, 4),
        )
        print(
            f"padding unpacked: {unpacked_padding_share:.1%} with kubetune's length-grouped batches, "
            f"{random_order_padding_share:.1%} in random order; packing removes at most that: "
            f"<= {1 / (1 - unpacked_padding_share):.3f}x and <= {1 / (1 - random_order_padding_share):.3f}x"
        )
        print(
            f"tiny Llama {parameters:,} parameters, LoRA r={LORA_RANK} on {len(TARGET_MODULES)} projections, "
            f"{len(features)} examples, batch 8, {args.steps} steps x {args.rounds} rounds, "
            f"{torch.get_num_threads()} threads, load average {record.load_before}"
        )

        kubetune_run(model_dir, train_file, args.warmup_steps, scratch)
        plain_run(model_dir, features, pad_token_id, args.warmup_steps)
        trl_run(model_dir, examples, args.warmup_steps, scratch)
        trl_packing = {"packed_length": args.packed_length, "packed_batch_size": args.packed_batch_size}
        trl_run(model_dir, examples, args.warmup_steps, scratch, **trl_packing)
        warm_packing = {**packing_settings, "epochs": 1}
        packing_run(model_dir, train_file, held_out, pad_token_id, scratch, packed=True, **warm_packing)
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
            trl_rates: dict[bool, tuple[float, int]] = {}
            for packed in (True, False) if round_number % 2 else (False, True):
                trl_rates[packed] = trl_run(
                    model_dir, examples, args.steps, scratch, **(trl_packing if packed else {})
                )
            (trl_rate, trl_tokens), (trl_packed_rate, trl_packed_tokens) = trl_rates[False], trl_rates[True]
            trl_ratios.append(kubetune_rate / trl_rate)
            trl_packing_speedups.append(trl_packed_rate / trl_rate)
            packing: dict[bool, tuple[float, int, float, int]] = {}
            for packed in (True, False) if round_number % 2 else (False, True):
                packing[packed] = packing_run(
                    model_dir, train_file, held_out, pad_token_id, scratch, packed=packed, **packing_settings
                )
            (packed_rate, packed_tokens, packed_loss, packed_steps) = packing[True]
            (unpacked_rate, unpacked_tokens, unpacked_loss, unpacked_steps) = packing[False]
            if packed_tokens != unpacked_tokens:
                raise RuntimeError(
                    f"packed and unpacked saw different tokens ({packed_tokens} vs {unpacked_tokens})"
                )
            speedups.append(packed_rate / unpacked_rate)
            packed_per_trl_packed.append(packed_rate / trl_packed_rate)
            eval_loss_ratios.append(packed_loss / unpacked_loss)
            record.add_round(
                {
                    "order": order,
                    "tokens": kubetune_tokens,
                    "kubetuneTokensPerSecond": round(kubetune_rate, 1),
                    "plainTokensPerSecond": round(plain_rate, 1),
                    "ratio": round(ratio, 4),
                    "trlTokens": trl_tokens,
                    "trlTokensPerSecond": round(trl_rate, 1),
                    "trlPackedTokens": trl_packed_tokens,
                    "trlPackedTokensPerSecond": round(trl_packed_rate, 1),
                    "packingTokens": packed_tokens,
                    "packedTokensPerSecond": round(packed_rate, 1),
                    "unpackedTokensPerSecond": round(unpacked_rate, 1),
                    "packedSteps": packed_steps,
                    "unpackedSteps": unpacked_steps,
                    "packedEvalLoss": round(packed_loss, 4),
                    "unpackedEvalLoss": round(unpacked_loss, 4),
                    "loadAverage": os.getloadavg()[0],
                }
            )
            print(
                f"round {round_number} ({' then '.join(order)}) tokens/s: kubetune {kubetune_rate:,.0f}, "
                f"plain {plain_rate:,.0f}, ratio {ratio:.3f}; TRL SFTTrainer {trl_rate:,.0f} "
                f"(packed {trl_packed_rate:,.0f}, {trl_packing_speedups[-1]:.3f}x); "
                f"packed {packed_rate:,.0f} "
                f"({packed_steps} steps, eval loss {packed_loss:.4f}) vs unpacked {unpacked_rate:,.0f} "
                f"({unpacked_steps} steps, eval loss {unpacked_loss:.4f}), {speedups[-1]:.3f}x"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summaries = [
        record.summarize("kubetunePerPlain", "tokens/s ratio kubetune / plain", ratios, TARGET),
        record.summarize(
            "kubetunePerTrl", "tokens/s ratio kubetune / TRL SFTTrainer", trl_ratios, MATCHES_TRL_TARGET
        ),
        record.summarize(
            "packedPerUnpacked", "tokens/s ratio packed / unpacked", speedups, PACKED_SPEEDUP_TARGET
        ),
        record.summarize(
            "packedEvalLossPerUnpacked",
            "held-out eval loss ratio packed / unpacked",
            eval_loss_ratios,
            EQUAL_EVAL_LOSS_TARGET,
        ),
        record.summarize(
            "trlPackedPerTrlUnpacked",
            "tokens/s ratio TRL packed / unpacked (random batches, each padded to its longest row)",
            trl_packing_speedups,
        ),
        record.summarize(
            "packedPerTrlPacked",
            "tokens/s ratio kubetune packed / TRL SFTTrainer packed",
            packed_per_trl_packed,
        ),
    ]
    for summary in summaries:
        print(summary.line())
    print(f"load average before {record.load_before}, after {list(os.getloadavg())}")
    print(f"wrote {record.write()}")
    return 0 if all(summary.met_by_median is not False for summary in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
