"""Does the quickstart fine-tune make the tiny base forget, and does replay prevent it?

Runs the quickstart's FineTuneJob (examples/quickstart/01-finetune.yaml: LoRA on the support tickets,
scored on the held-out tickets) twice per round with the real pipeline steps, side by side: as it is,
and with `training.replay` mixing paragraphs of the tiny base's own pretraining text
(examples/quickstart/data/general-replay.jsonl, the corpus' general prose) into training. Both runs
declare the reference set examples/quickstart/data/general-reference.jsonl: general prose written like
that corpus but held out from it, scored on the base model and on each tuned one.

Figures per round: the reference perplexity of the base and of each tuned model, its relative rise
((tuned - base) / base), and the task's held-out exactMatch of each tuned model. Targets: the rise
with replay at most half the rise without it (`riseRatio` <= 0.5), and exactMatch at most 2 points
lower with replay (`exactMatchDrop` <= 0.02). A round is one training seed (the runs are
deterministic given it; the seed also draws the replayed paragraphs). About 4 minutes on 2 idle cores.
Not part of the test suite:

    python benchmarks/forgetting.py [--seeds 5] [--ratio 0.05] [--threads 2]

Writes benchmarks/results/forgetting.json (rounds, machine, commit, date).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _finetune_runs import add_base_model_arguments, read_json, tune_from, use_base_model
from _results import REPO, BenchmarkRecord, Target
from kubetune_components.finetune import steps
from kubetune_contract.finetune import reference_drop
from kubetune_contract.workspace import WorkspaceLayout

QUICKSTART_JOB = REPO / "examples" / "quickstart" / "01-finetune.yaml"
DATA = REPO / "examples" / "quickstart" / "data"
REFERENCE_FILE = DATA / "general-reference.jsonl"
REPLAY_FILE = DATA / "general-replay.jsonl"
REFERENCE_NAME = "general-text"
FIRST_SEED = 42


def quickstart_config(base_model: Path, seed: int) -> dict[str, Any]:
    """The quickstart FineTuneJob as the steps receive it: paths absolute, the reference set declared."""
    job = yaml.safe_load(QUICKSTART_JOB.read_text())
    spec = job["spec"]
    spec["baseModel"]["uri"] = str(base_model)
    spec["dataset"]["uri"] = str(REPO / spec["dataset"]["uri"])
    spec["dataset"]["validationUri"] = str(REPO / spec["dataset"]["validationUri"])
    spec["training"]["seed"] = seed
    spec["evaluation"]["reference"] = [{"name": REFERENCE_NAME, "uri": str(REFERENCE_FILE)}]
    spec["evaluation"]["gates"] = []  # measured here, not gated
    spec["executor"] = "local"
    job["metadata"] = {"name": "forgetting", "namespace": "default", "uid": "benchmark", "generation": 1}
    return dict(job)


def with_replay(config: dict[str, Any], ratio: str) -> dict[str, Any]:
    replayed = copy.deepcopy(config)
    replayed["spec"]["training"]["replay"] = {"uri": str(REPLAY_FILE), "format": "text", "ratio": ratio}
    return replayed


def tune_and_score(config: dict[str, Any], prepared: Path, workspace: Path) -> dict[str, Any]:
    """Fine-tune and evaluate in `workspace`, starting from the curated data and baseline of `prepared`."""
    run = tune_from(config, prepared, workspace)
    reference = run.final["reference"][REFERENCE_NAME]
    before = read_json(workspace, WorkspaceLayout.BASELINE_EVALUATION)["reference"][REFERENCE_NAME]
    return {
        "referencePerplexity": reference["value"],
        "referenceRise": reference_drop("perplexity", before["value"], reference["value"]),
        "exactMatch": run.final["exactMatch"],
        "evalLoss": run.final["evalLoss"],
        "steps": run.training["steps"],
        "replayExamples": run.training.get("replayExamples", 0),
        "seconds": run.seconds,
    }


def run_round(base_model: Path, seed: int, ratio: str, scratch: Path) -> dict[str, Any]:
    config = quickstart_config(base_model, seed)
    prepared = scratch / f"seed-{seed}-prepared"
    steps.run_step("curate", config, str(prepared))
    steps.run_step("evaluate-baseline", config, str(prepared))
    baseline = read_json(prepared, WorkspaceLayout.BASELINE_EVALUATION)
    plain = tune_and_score(config, prepared, scratch / f"seed-{seed}-plain")
    replayed = tune_and_score(with_replay(config, ratio), prepared, scratch / f"seed-{seed}-replay")
    return {
        "seed": seed,
        "base": {
            "referencePerplexity": baseline["reference"][REFERENCE_NAME]["value"],
            "exactMatch": baseline["exactMatch"],
        },
        "withoutReplay": plain,
        "withReplay": replayed,
        "riseRatio": replayed["referenceRise"] / plain["referenceRise"]
        if plain["referenceRise"] > 0
        else None,
        "exactMatchDrop": plain["exactMatch"] - replayed["exactMatch"],
    }


def print_round(figures: dict[str, Any]) -> None:
    base, plain, replayed = figures["base"], figures["withoutReplay"], figures["withReplay"]
    print(f"seed {figures['seed']}")
    print(f"  {'':<22} {'base':>10} {'no replay':>10} {'replay':>10}")
    print(
        f"  {'reference perplexity':<22} {base['referencePerplexity']:>10.3f} "
        f"{plain['referencePerplexity']:>10.3f} {replayed['referencePerplexity']:>10.3f}"
    )
    print(
        f"  {'reference rise':<22} {'':>10} "
        f"{plain['referenceRise']:>+10.2%} {replayed['referenceRise']:>+10.2%}"
    )
    print(
        f"  {'task exactMatch':<22} {base['exactMatch']:>10.4f} "
        f"{plain['exactMatch']:>10.4f} {replayed['exactMatch']:>10.4f}"
    )
    print(f"  {'training steps':<22} {'':>10} {plain['steps']:>10} {replayed['steps']:>10}")
    print(f"  {'seconds':<22} {'':>10} {plain['seconds']:>10} {replayed['seconds']:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="rounds, one training seed each (42, 43, ...)")
    parser.add_argument("--ratio", default="0.05", help="training.replay.ratio of the replay run")
    add_base_model_arguments(parser)
    args = parser.parse_args(argv)
    use_base_model(parser, args)
    record = BenchmarkRecord(
        "forgetting",
        Path(__file__),
        {"seeds": args.seeds, "replayRatio": args.ratio, "threads": args.threads, "job": "quickstart"},
        argv,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-forgetting-") as scratch:
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):
            figures = run_round(args.base_model, seed, args.ratio, Path(scratch))
            record.add_round(figures)
            print_round(figures)
    rounds = record.rounds
    rises = [r["riseRatio"] for r in rounds if r["riseRatio"] is not None]
    summaries = [
        record.summarize(
            "withoutReplayRise",
            "reference perplexity rise without replay (relative to the base)",
            [r["withoutReplay"]["referenceRise"] for r in rounds],
        ),
        record.summarize(
            "withReplayRise",
            "reference perplexity rise with replay (relative to the base)",
            [r["withReplay"]["referenceRise"] for r in rounds],
        ),
        record.summarize(
            "exactMatchDrop",
            "task exactMatch without replay minus with replay",
            [r["exactMatchDrop"] for r in rounds],
            Target(0.02, higher_is_better=False),
        ),
    ]
    if rises:
        summaries.append(
            record.summarize(
                "riseRatio",
                "reference perplexity rise with replay / without",
                rises,
                Target(0.5, higher_is_better=False),
            )
        )
    else:
        print("the quickstart fine-tune did not raise the reference perplexity: no rise to halve")
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
