"""Does distillation let a small student keep a larger teacher's quality on a task that needs composition?

The task (generated here, seeded): an order of a product shipped to a city goes to one of 16 teams, and
which one depends on the city's region AND the product's category (a 4 x 4 table of arbitrary team
names). Neither the regions nor the categories are ever named: a model must infer them from the
training pairs and compose them to route a (city, product) pair it never saw. The held-out set is
exactly such unseen pairs, so memorising the training pairs scores nothing; the data is small, so the
method matters more than its size.

Per round (one seed), in one run with the real pipeline steps (curate, finetune, evaluate):
  teacher          the tiny base (`kubetune dev tiny-base`), all weights fine-tuned on the task;
  student alone    the small tiny base (`kubetune dev tiny-base --size small`, same tokenizer, under a
                   third of the parameters), fine-tuned the same way;
  student distilled  the same small model with method distillation from the tuned teacher.
Figures: held-out exactMatch of each, the gap student-alone -> teacher, the distilled student's gain
over the student alone, and (when every round has a gap) the share of the gap it closes. Targets:
gap >= 0.10, share closed >= 0.5, student/teacher parameters <= 0.5. The training settings (16 epochs,
T 4, alpha 0.5) were chosen after trying a few on seed 42: at 8 epochs the student alone trails by more
(0.42 vs 0.58 on seed 42) but distillation at T 2 did worse than training alone there.

    python benchmarks/distillation.py [--seeds 3] [--threads 2]

Writes benchmarks/results/distillation.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _finetune_runs import tune_from
from _results import REPO, BenchmarkRecord, Target
from kubetune_components.dev import tinylm
from kubetune_components.finetune import steps
from kubetune_contract.workspace import WorkspaceLayout

DEFAULT_TEACHER_BASE = REPO / ".kubetune" / "models" / "tiny-base"
DEFAULT_STUDENT_BASE = REPO / ".kubetune" / "models" / "tiny-small"
FIRST_SEED = 42

CITIES = [
    "Paris",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Oslo",
    "Dublin",
    "Lisbon",
    "Prague",
    "Athens",
    "Warsaw",
]
PRODUCTS = [
    "apples",
    "bread",
    "chairs",
    "lamps",
    "shoes",
    "jackets",
    "phones",
    "cameras",
    "books",
    "maps",
    "tea",
    "rice",
]
TEAMS = ["amber", "birch", "coral", "delta", "ember", "fjord", "grove", "harbor",
         "indigo", "juniper", "kestrel", "lotus", "maple", "nova", "onyx", "pine"]  # fmt: skip
TEMPLATES = [
    "An order of {product} is shipped to {city}.",
    "A customer in {city} ordered {product}.",
]
INSTRUCTION = "Name the team that handles the order."
HELD_OUT_PAIRS = 48


def task_rows(seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training rows (every template of the seen pairs) and held-out rows (one per unseen pair)."""
    rng = random.Random(seed)
    region = {city: index % 4 for index, city in enumerate(rng.sample(CITIES, len(CITIES)))}
    category = {product: index % 4 for index, product in enumerate(rng.sample(PRODUCTS, len(PRODUCTS)))}
    table = rng.sample(TEAMS, len(TEAMS))
    pairs = [(city, product) for city in CITIES for product in PRODUCTS]
    rng.shuffle(pairs)
    held_out, seen = pairs[:HELD_OUT_PAIRS], pairs[HELD_OUT_PAIRS:]

    def row(city: str, product: str, template: str) -> dict[str, str]:
        team = table[region[city] * 4 + category[product]]
        return {
            "instruction": INSTRUCTION,
            "input": template.format(city=city, product=product),
            "output": team,
        }

    train = [row(city, product, template) for city, product in seen for template in TEMPLATES]
    rng.shuffle(train)
    test = [row(city, product, rng.choice(TEMPLATES)) for city, product in held_out]
    return train, test


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def job_config(
    base: Path, train: Path, test: Path, seed: int, method: dict[str, Any], args: Any
) -> dict[str, Any]:
    spec = {
        "baseModel": {"uri": str(base)},
        "dataset": {"uri": str(train), "format": "instruction", "validationUri": str(test), "seed": seed},
        "method": method,
        "training": {
            "epochs": args.epochs,
            "batchSize": 8,
            "learningRate": args.learning_rate,
            "scheduler": {"type": "cosine", "warmupRatio": "0.1"},
            "maxSeqLength": 64,
            "seed": seed,
            "checkpointEverySteps": 1000,
        },
        "evaluation": {
            "metrics": ["evalLoss", "exactMatch"],
            "maxNewTokens": 4,
            "maxSamples": HELD_OUT_PAIRS,
            "gates": [],
        },
        "output": {"uri": "unused"},
        "executor": "local",
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "distillation", "namespace": "default", "uid": "benchmark", "generation": 1},
        "spec": spec,
    }


def tune_and_score(config: dict[str, Any], prepared: Path, workspace: Path) -> dict[str, Any]:
    run = tune_from(config, prepared, workspace)
    return {
        "exactMatch": run.final["exactMatch"],
        "evalLoss": run.final["evalLoss"],
        "parameters": run.training["trainableParameters"],
        "steps": run.training["steps"],
        "seconds": run.seconds,
    }


def run_round(seed: int, args: Any, scratch: Path) -> dict[str, Any]:
    train_rows, test_rows = task_rows(seed)
    train = write_jsonl(scratch / f"train-{seed}.jsonl", train_rows)
    test = write_jsonl(scratch / f"heldout-{seed}.jsonl", test_rows)
    full = {"type": "full"}
    teacher_config = job_config(args.teacher_base, train, test, seed, full, args)
    prepared = scratch / f"seed-{seed}-prepared"
    steps.run_step("curate", teacher_config, str(prepared))
    teacher = tune_and_score(teacher_config, prepared, scratch / f"seed-{seed}-teacher")
    teacher_model = scratch / f"seed-{seed}-teacher" / WorkspaceLayout.TRAINED
    alone = tune_and_score(
        job_config(args.student_base, train, test, seed, full, args), prepared, scratch / f"seed-{seed}-alone"
    )
    distillation = {
        "type": "distillation",
        "distillation": {
            "teacher": {"uri": str(teacher_model)},
            "temperature": args.temperature,
            "alpha": args.alpha,
        },
    }
    distilled = tune_and_score(
        job_config(args.student_base, train, test, seed, distillation, args),
        prepared,
        scratch / f"seed-{seed}-distilled",
    )
    gap = teacher["exactMatch"] - alone["exactMatch"]
    return {
        "seed": seed,
        "trainExamples": len(train_rows),
        "heldOutExamples": len(test_rows),
        "teacher": teacher,
        "studentAlone": alone,
        "studentDistilled": distilled,
        "gap": gap,
        "gapClosed": (distilled["exactMatch"] - alone["exactMatch"]) / gap if gap > 0 else None,
        "parameterRatio": distilled["parameters"] / teacher["parameters"],
    }


def print_round(figures: dict[str, Any]) -> None:
    print(
        f"seed {figures['seed']}: {figures['trainExamples']} training examples, "
        f"{figures['heldOutExamples']} held out"
    )
    print(f"  {'':<18} {'teacher':>10} {'alone':>10} {'distilled':>10}")
    rows = [
        ("exactMatch", "{:>10.4f}"),
        ("evalLoss", "{:>10.4f}"),
        ("parameters", "{:>10,}"),
        ("seconds", "{:>10}"),
    ]
    for key, fmt in rows:
        values = [figures[who][key] for who in ("teacher", "studentAlone", "studentDistilled")]
        print(f"  {key:<18} " + " ".join(fmt.format(value) for value in values))
    closed = figures["gapClosed"]
    print(
        f"  gap {figures['gap']:+.4f}; "
        f"distillation closes {'n/a' if closed is None else f'{closed:.0%}'} of it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=3, help="rounds, one seed each (42, 43, ...): task and training"
    )
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--learning-rate", default="1e-3")
    parser.add_argument("--temperature", default="4")
    parser.add_argument("--alpha", default="0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-base", type=Path, default=DEFAULT_TEACHER_BASE)
    parser.add_argument("--student-base", type=Path, default=DEFAULT_STUDENT_BASE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Idempotent: reuses complete builds of the same recipe.
    tinylm.build_tiny_base(args.teacher_base, log=print)
    tinylm.build_tiny_base(args.student_base, size="small", log=print)
    record = BenchmarkRecord(
        "distillation",
        Path(__file__),
        {
            "seeds": args.seeds,
            "epochs": args.epochs,
            "learningRate": args.learning_rate,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "threads": args.threads,
            "task": "route (city, product) to one of 16 teams by region x category; held-out pairs unseen",
        },
        argv,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-distillation-") as scratch:
        for seed in range(FIRST_SEED, FIRST_SEED + args.seeds):
            figures = run_round(seed, args, Path(scratch))
            record.add_round(figures)
            print_round(figures)
    rounds = record.rounds
    summaries = [
        record.summarize(
            "teacherExactMatch",
            "held-out exactMatch of the teacher",
            [r["teacher"]["exactMatch"] for r in rounds],
        ),
        record.summarize(
            "studentAloneExactMatch",
            "held-out exactMatch of the student trained alone",
            [r["studentAlone"]["exactMatch"] for r in rounds],
        ),
        record.summarize(
            "studentDistilledExactMatch",
            "held-out exactMatch of the distilled student",
            [r["studentDistilled"]["exactMatch"] for r in rounds],
        ),
        record.summarize(
            "gap",
            "teacher exactMatch minus the student's trained alone",
            [r["gap"] for r in rounds],
            Target(0.10),
        ),
        record.summarize(
            "parameterRatio",
            "student parameters / teacher parameters",
            [r["parameterRatio"] for r in rounds],
            Target(0.5, higher_is_better=False),
        ),
    ]
    summaries.append(
        record.summarize(
            "distillationGain",
            "distilled student's exactMatch minus the student's trained alone",
            [r["studentDistilled"]["exactMatch"] - r["studentAlone"]["exactMatch"] for r in rounds],
        )
    )
    closed = [r["gapClosed"] for r in rounds]
    if all(share is not None for share in closed):
        summaries.append(
            record.summarize(
                "gapClosed", "share of the gap the distilled student closes", closed, Target(0.5)
            )
        )
    else:
        # A share of no gap means nothing; every round's figures are in the record.
        print("in some rounds the student trained alone was not behind the teacher: no gap share summarized")
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
