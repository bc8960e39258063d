"""training.distributed strategy fsdp vs ddp vs one process: same model, weights held per process, speed.

Each round full-fine-tunes one random tiny Llama (the shape below) three ways through the real finetune
step, in an order that alternates between rounds: one process accumulating 2 micro-batches per step,
ddp in 2 processes and fsdp in 2 processes (torchrun, gloo on CPU) with 1 micro-batch each, so all three
take the same global batch in the same order. It records the final loss of each (fsdp must match one
process), the weight bytes a training process holds (fsdp: its shards; ddp: everything) and training
tokens per second (the training loop's own clock, without process start-up).

    python benchmarks/fsdp.py [--rounds 5] [--hidden-size 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from _results import MIN_ROUNDS, BenchmarkRecord, Target
from kubetune_components.dev import tinylm
from kubetune_components.finetune import steps

EXAMPLES = 32
SETUPS = ("one", "ddp", "fsdp")


def write_train_split(workspace: Path) -> Path:
    teams = ["billing", "technical", "account", "shipping"]
    rows = [
        {
            "instruction": "Route the ticket.",
            "input": f"Ticket {index}: {'my order needs help ' * (index % 5)}",
            "output": teams[index % 4],
        }
        for index in range(EXAMPLES)
    ]
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return workspace


def finetune_job(model_dir: Path, setup: str) -> dict[str, Any]:
    training: dict[str, Any] = {
        "epochs": 1,
        "batchSize": 2,
        "learningRate": "1e-3",
        "seed": 7,
        "maxSeqLength": 128,
        "checkpointEverySteps": 1000,
        "gradientAccumulationSteps": 2 if setup == "one" else 1,
    }
    if setup != "one":
        training["distributed"] = {"workers": 1, "processesPerWorker": 2, "strategy": setup}
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "baseModel": {"uri": str(model_dir)},
            "dataset": {"uri": "unused.jsonl", "format": "instruction"},
            "method": {"type": "full"},
            "training": training,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    # One intra-op thread per training process (torchrun's and this one's) on a shared machine.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    record = BenchmarkRecord("fsdp", Path(__file__), {**vars(args), "examples": EXAMPLES})
    loss_gaps: list[float] = []
    memory_ratios: list[float] = []
    speed_ratios: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model_dir = tinylm.build_random_tiny(
            root / "model",
            seed=0,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            intermediate_size=3 * args.hidden_size,
        )
        for round_number in range(1, args.rounds + 1):
            order = SETUPS if round_number % 2 else tuple(reversed(SETUPS))
            runs: dict[str, dict[str, Any]] = {}
            for setup in order:
                workspace = write_train_split(root / f"round-{round_number}-{setup}")
                runs[setup] = steps.run_step("finetune", finetune_job(model_dir, setup), str(workspace))
            figures = {
                setup: {
                    key: runs[setup].get(key)
                    for key in ("trainLoss", "tokensPerSecond", "parameterBytesPerProcess", "steps")
                }
                for setup in SETUPS
            }
            record.add_round(figures)
            loss_gaps.append(
                abs(runs["fsdp"]["trainLoss"] - runs["one"]["trainLoss"]) / runs["one"]["trainLoss"]
            )
            memory_ratios.append(
                runs["fsdp"]["parameterBytesPerProcess"] / runs["ddp"]["parameterBytesPerProcess"]
            )
            speed_ratios.append(runs["fsdp"]["tokensPerSecond"] / runs["ddp"]["tokensPerSecond"])
            print(
                f"round {round_number}: final loss one {runs['one']['trainLoss']:.6f}, ddp "
                f"{runs['ddp']['trainLoss']:.6f}, fsdp {runs['fsdp']['trainLoss']:.6f}; "
                f"weight MiB per process ddp {runs['ddp']['parameterBytesPerProcess'] / 2**20:.2f}, fsdp "
                f"{runs['fsdp']['parameterBytesPerProcess'] / 2**20:.2f}; tokens/s one "
                f"{runs['one']['tokensPerSecond']:.0f}, ddp {runs['ddp']['tokensPerSecond']:.0f}, fsdp "
                f"{runs['fsdp']['tokensPerSecond']:.0f}",
                flush=True,
            )
    summaries = [
        record.summarize(
            "fsdpLossGapOverOneProcess",
            "final loss of fsdp in 2 processes vs one process with the same global batch, relative gap",
            loss_gaps,
            Target(1e-4, higher_is_better=False),
        ),
        record.summarize(
            "fsdpWeightBytesOverDdp",
            "weight bytes a training process holds, fsdp over ddp (2 processes)",
            memory_ratios,
            Target(0.55, higher_is_better=False),
        ),
        record.summarize(
            "fsdpThroughputOverDdp",
            "training tokens/s, fsdp over ddp (2 processes, gloo on CPU)",
            speed_ratios,
        ),
    ]
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0 if summaries[0].met_by_median and summaries[1].met_by_median else 1


if __name__ == "__main__":
    sys.exit(main())
