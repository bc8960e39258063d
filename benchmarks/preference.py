"""Does preference tuning teach the tiny base what a ticket router should answer, on held-out tickets?

Tunes the pretrained tiny base with the real pipeline steps on the example's data
(examples/preference/data, built from the quickstart's tickets: the right team chosen; a wrong team
or a short non-answer such as "yes" rejected), side by side in each round: DPO with a LoRA adapter,
DPO on full weights (trained on the preference rows), and KTO with a LoRA adapter (trained on the
feedback rows of the same tickets: the right team desirable, the rejected answer undesirable). All
are scored on the same 60 held-out tickets, written from sentences training never saw: preference
accuracy is the share of them where the model gives the right team a higher log-probability than the
rejected answer. The base model's accuracy is measured once per round, on the same pairs.

A round is one training seed (the runs are deterministic given it). Target: DPO with LoRA raises
held-out preference accuracy by at least 0.1 over the base. About 2 minutes on 2 idle cores. Not part
of the test suite:

    python benchmarks/preference.py [--seeds 5] [--steps 10] [--threads 2]

Writes benchmarks/results/preference.json (rounds, machine, commit, date).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _finetune_runs import add_base_model_arguments, read_json, tune_from, use_base_model
from _results import REPO, BenchmarkRecord, Target
from kubetune_components.finetune import steps
from kubetune_contract.workspace import WorkspaceLayout

DATA = REPO / "examples" / "preference" / "data"
FIRST_SEED = 42
HELD_OUT_TICKETS = 60
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "targetModules": ALL_LINEAR}
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (method, options, learning rate)
    "dpoLora": ("dpo", {"weights": "lora", "lora": LORA}, "5e-3"),
    "dpoFull": ("dpo", {"weights": "full"}, "5e-4"),
    "ktoLora": ("kto", {"weights": "lora", "lora": LORA}, "5e-3"),
}
FORMATS = {"dpo": ("preference", "support-preference"), "kto": ("feedback", "support-feedback")}


def job(
    base: Path, method: str, options: dict[str, Any], learning_rate: str, seed: int, steps_: int
) -> dict[str, Any]:
    fmt, name = FORMATS[method]
    # Feedback rows are two per ticket: score all of the held-out tickets' pairs.
    rows = HELD_OUT_TICKETS * (2 if fmt == "feedback" else 1)
    spec = {
        "baseModel": {"uri": str(base)},
        "dataset": {
            "uri": str(DATA / f"{name}.jsonl"),
            "format": fmt,
            "validationUri": str(DATA / f"{name}-heldout.jsonl"),
            "seed": seed,
        },
        "method": {"type": method, method: options},
        "training": {
            "maxSteps": steps_,
            "batchSize": 8,
            "learningRate": learning_rate,
            "scheduler": {"type": "constant"},
            "maxSeqLength": 128,
            "seed": seed,
        },
        "evaluation": {"metrics": ["preferenceAccuracy"], "maxSamples": rows},
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"preference-{method}", "namespace": "default", "generation": 1},
        "spec": spec,
    }


def run_round(base: Path, seed: int, steps_: int, scratch: Path) -> dict[str, Any]:
    prepared: dict[str, Path] = {}
    baseline: dict[str, float] = {}
    for method in FORMATS:
        workspace = scratch / f"seed-{seed}-{method}-prepared"
        config = job(base, method, {}, "1e-3", seed, steps_)
        steps.run_step("curate", config, str(workspace))
        steps.run_step("evaluate-baseline", config, str(workspace))
        evaluation = read_json(workspace, WorkspaceLayout.BASELINE_EVALUATION)
        assert evaluation["preferencePairs"] == HELD_OUT_TICKETS, evaluation
        prepared[method] = workspace
        baseline[method] = evaluation["preferenceAccuracy"]
    figures: dict[str, Any] = {"seed": seed, "base": baseline["dpo"], "baseOnFeedbackPairs": baseline["kto"]}
    for name, (method, options, learning_rate) in VARIANTS.items():
        config = job(base, method, options, learning_rate, seed, steps_)
        run = tune_from(config, prepared[method], scratch / f"seed-{seed}-{name}")
        figures[name] = {
            "preferenceAccuracy": run.final["preferenceAccuracy"],
            "gain": run.final["preferenceAccuracy"] - baseline[method],
            "trainLoss": run.training["trainLoss"],
            "trainableParameters": run.training["trainableParameters"],
            "seconds": run.seconds,
        }
    return figures


def print_round(figures: dict[str, Any]) -> None:
    print(f"seed {figures['seed']}: held-out preference accuracy ({HELD_OUT_TICKETS} tickets)")
    print(f"  {'base':<10} {figures['base']:>8.3f}")
    for name in VARIANTS:
        run = figures[name]
        print(
            f"  {name:<10} {run['preferenceAccuracy']:>8.3f}  gain {run['gain']:>+7.3f}  "
            f"train loss {run['trainLoss']:.3f}  {run['trainableParameters']:>7} trained  {run['seconds']}s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="rounds, one training seed each (42, 43, ...)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of every run (batch 8)")
    add_base_model_arguments(parser)
    args = parser.parse_args(argv)
    use_base_model(parser, args)
    record = BenchmarkRecord(
        "preference",
        Path(__file__),
        {
            "seeds": args.seeds,
            "steps": args.steps,
            "threads": args.threads,
            "heldOutTickets": HELD_OUT_TICKETS,
        },
        argv,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-preference-") as scratch:
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):
            figures = run_round(args.base_model, seed, args.steps, Path(scratch))
            record.add_round(figures)
            print_round(figures)
    rounds = record.rounds
    summaries = [
        record.summarize(
            "base", "held-out preference accuracy of the base model", [r["base"] for r in rounds]
        ),
        record.summarize(
            "dpoLoraGain",
            "held-out preference accuracy gain of DPO with LoRA over the base",
            [r["dpoLora"]["gain"] for r in rounds],
            Target(0.1),
        ),
        *(
            record.summarize(
                f"{name}Accuracy",
                f"held-out preference accuracy after {name}",
                [r[name]["preferenceAccuracy"] for r in rounds],
            )
            for name in VARIANTS
        ),
    ]
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
