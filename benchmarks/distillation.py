"""Does distillation let a small student keep a larger teacher's quality when its own labels are noisy?

The task (generated here, seeded): an order of a product shipped to a city goes to one of 16 teams, and
which one depends on the city's region AND the product's category (a 4 x 4 table of arbitrary team
names). Neither the regions nor the categories are ever named: a model must infer them from the
training pairs and compose them to route a (city, product) pair it never saw. The held-out set is
exactly such unseen pairs, so memorising the training pairs scores nothing.

The setup, as in distillation in practice, where the teacher knows more than the student's labelled
set says: the teacher is fine-tuned on the clean labels (say, reviewed by people); both students get
the very same rows with noisy labels, a --label-noise share (0.3) of their teams replaced by another
team at random (say, from a weak labelling rule). The clean labels alone are too easy to show a gap:
there the small student trained alone came within 4 points of the teacher (median of 5 seeds: 0.854
vs 0.875). Noisy labels make the task harder without more data: the student memorises the wrong teams
and the region/category structure it needs for unseen pairs blurs; the teacher's distributions on the
same rows carry the structure the labels lost.

Per round (one seed), in one run with the real pipeline steps (curate, finetune, evaluate):
  teacher          the tiny base (`kubetune dev tiny-base`), all weights fine-tuned on the clean labels;
  student alone    the small tiny base (`kubetune dev tiny-base --size small`, same tokenizer, under a
                   fifth of the parameters), fine-tuned the same way on the noisy labels;
  student distilled  the same small model on the same noisy rows with method distillation from the
                   tuned teacher (T 1, alpha 0.9: 90% the teacher's distributions, 10% the labels).
Figures: held-out exactMatch of each, the gap student-alone -> teacher, the distilled student's gain
over the student alone, and (when every round has a gap) the share of the gap it closes. Targets:
gap >= 0.10, share closed >= 0.5, student/teacher parameters <= 0.5. Temperature: tried first on seed
42 at T 4, alpha 0.9, the distilled student closed only 22% (30% noise) and 23% (50% noise) of the gap,
probably because at T 4 the teacher's distribution spreads over the whole vocabulary and the KL
mostly matches that tail; T 1 keeps it on the teacher's choice. The recorded run is the first at T 1.

    python benchmarks/distillation.py [--seeds 3] [--threads 1] [--label-noise 0.3]

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


def task_rows(
    seed: int, label_noise: float
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Clean training rows (every template of the seen pairs), the same rows with a `label_noise` share of
    their teams replaced by another team at random, and held-out rows (one per unseen pair)."""
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

    clean = [row(city, product, template) for city, product in seen for template in TEMPLATES]
    rng.shuffle(clean)
    noisy_rng = random.Random(seed * 1000 + 1)
    noisy = [
        {**example, "output": noisy_rng.choice([t for t in TEAMS if t != example["output"]])}
        if noisy_rng.random() < label_noise
        else example
        for example in clean
    ]
    test = [row(city, product, rng.choice(TEMPLATES)) for city, product in held_out]
    return clean, noisy, test


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
    clean_rows, noisy_rows, test_rows = task_rows(seed, args.label_noise)
    clean = write_jsonl(scratch / f"clean-{seed}.jsonl", clean_rows)
    noisy = write_jsonl(scratch / f"noisy-{seed}.jsonl", noisy_rows)
    test = write_jsonl(scratch / f"heldout-{seed}.jsonl", test_rows)
    full = {"type": "full"}
    teacher_config = job_config(args.teacher_base, clean, test, seed, full, args)
    teacher_prepared = scratch / f"seed-{seed}-teacher-prepared"
    steps.run_step("curate", teacher_config, str(teacher_prepared))
    teacher = tune_and_score(teacher_config, teacher_prepared, scratch / f"seed-{seed}-teacher")
    teacher_model = scratch / f"seed-{seed}-teacher" / WorkspaceLayout.TRAINED
    alone_config = job_config(args.student_base, noisy, test, seed, full, args)
    student_prepared = scratch / f"seed-{seed}-student-prepared"
    steps.run_step("curate", alone_config, str(student_prepared))
    alone = tune_and_score(alone_config, student_prepared, scratch / f"seed-{seed}-alone")
    distillation = {
        "type": "distillation",
        "distillation": {
            "teacher": {"uri": str(teacher_model)},
            "temperature": args.temperature,
            "alpha": args.alpha,
        },
    }
    distilled = tune_and_score(
        job_config(args.student_base, noisy, test, seed, distillation, args),
        student_prepared,
        scratch / f"seed-{seed}-distilled",
    )
    gap = teacher["exactMatch"] - alone["exactMatch"]
    return {
        "seed": seed,
        "trainExamples": len(clean_rows),
        "noisyLabels": sum(a["output"] != b["output"] for a, b in zip(clean_rows, noisy_rows, strict=True)),
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
        f"{figures['heldOutExamples']} held out, {figures['noisyLabels']} of the students' labels wrong"
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
    parser.add_argument("--temperature", default="1")
    parser.add_argument("--alpha", default="0.9")
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.3,
        help="share of the student's labels replaced by a wrong team",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher-base", type=Path, default=DEFAULT_TEACHER_BASE)
    parser.add_argument("--student-base", type=Path, default=DEFAULT_STUDENT_BASE)
    args = parser.parse_args(argv)
    if not 0 <= args.label_noise < 1:
        parser.error(f"--label-noise must be in [0, 1), got {args.label_noise}")
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
            "task": "route (city, product) to one of 16 teams by region x category; held-out pairs unseen; "
            "teacher trained on the clean labels, both students on the same rows with noisy labels",
            "labelNoise": args.label_noise,
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
