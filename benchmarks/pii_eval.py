"""Precision and recall of the PII detector (Presidio patterns, kubetune_guardrails.pii) per entity, and its
cost per text, on the labelled set benchmarks/data/pii-labelled.jsonl.

    python benchmarks/pii_eval.py              # prints the table, writes benchmarks/results/pii-eval.json

The set (benchmarks/data/make_pii_labelled.py writes it) holds texts with PII in the formats people
write it, hard negatives that look like PII and are not (order numbers, versions, cards and IBANs with
a wrong checksum) and plain texts. A found span counts as a true positive when it has the labelled
entity and overlaps a labelled span; every other found span is a false positive of its entity, every
labelled span nothing found matches a false negative. The false-positive rate is the share of texts
without PII in which anything was found. benchmarks/guardrails.py records `figures()` beside its own.

Timing: every text is redacted once per round, rounds interleaved; the figures are the medians of the
rounds (the detection counts are the same every round: the detector is deterministic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import MIN_ROUNDS, BenchmarkRecord, Target

LABELLED = Path(__file__).resolve().parent / "data" / "pii-labelled.jsonl"
TARGET_RECALL = 0.9
TARGET_PRECISION = 0.9
TARGET_FPR = 0.05


@dataclass
class EntityScore:
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        labelled = self.true_positives + self.false_negatives
        return self.true_positives / labelled if labelled else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "truePositives": self.true_positives,
            "falsePositives": self.false_positives,
            "falseNegatives": self.false_negatives,
        }


def load_labelled(path: Path = LABELLED) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_pii(path: Path = LABELLED, entities: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-entity and overall precision/recall, and the false-positive rate on texts without PII.

    Returns {"entities": {ENTITY: {precision, recall, truePositives, ...}}, "overall": {...},
    "falsePositiveRate", "negativeTexts", "texts", "errors": [{id, kind, entity, text}]}.
    """
    from kubetune_guardrails.pii import SUPPORTED_ENTITIES, pii_detector

    wanted = tuple(entities or SUPPORTED_ENTITIES)
    detector = pii_detector(wanted)
    records = load_labelled(path)
    scores = {entity: EntityScore() for entity in wanted}
    negatives = flagged_negatives = 0
    errors: list[dict[str, Any]] = []
    for record in records:
        text = record["text"]
        gold = [span for span in record["spans"] if span["entity"] in wanted]
        found = detector.find(text)
        matched: set[int] = set()
        for finding in found:
            hit = next(
                (
                    index
                    for index, span in enumerate(gold)
                    if index not in matched
                    and span["entity"] == finding.entity
                    and finding.start < span["end"]
                    and span["start"] < finding.end
                ),
                None,
            )
            if hit is None:
                scores[finding.entity].false_positives += 1
                errors.append(
                    {
                        "id": record["id"],
                        "error": "false positive",
                        "entity": finding.entity,
                        "text": text[finding.start : finding.end],
                    }
                )
            else:
                matched.add(hit)
                scores[finding.entity].true_positives += 1
        for index, span in enumerate(gold):
            if index not in matched:
                scores[span["entity"]].false_negatives += 1
                errors.append(
                    {
                        "id": record["id"],
                        "error": "missed",
                        "entity": span["entity"],
                        "text": text[span["start"] : span["end"]],
                    }
                )
        if not gold:
            negatives += 1
            flagged_negatives += bool(found)
    overall = EntityScore(
        sum(score.true_positives for score in scores.values()),
        sum(score.false_positives for score in scores.values()),
        sum(score.false_negatives for score in scores.values()),
    )
    return {
        "entities": {entity: score.to_json() for entity, score in scores.items()},
        "overall": overall.to_json(),
        "falsePositiveRate": round(flagged_negatives / negatives, 4) if negatives else 0.0,
        "negativeTexts": negatives,
        "texts": len(records),
        "errors": errors,
    }


def figures() -> dict[str, Any]:
    """What benchmarks/guardrails.py records under detectors.pii: evaluate_pii() on the shipped set."""
    return evaluate_pii()


def time_redaction(texts: Sequence[str]) -> float:
    """Milliseconds per text to redact every text once (after a warm-up)."""
    from kubetune_guardrails.pii import redact

    started = time.perf_counter()
    for text in texts:
        redact(text)
    return (time.perf_counter() - started) * 1000 / len(texts)


def print_table(result: dict[str, Any]) -> None:
    print(f"{'entity':<15} {'precision':>9} {'recall':>7} {'TP':>4} {'FP':>4} {'FN':>4}")
    for entity, score in [*result["entities"].items(), ("overall", result["overall"])]:
        print(
            f"{entity:<15} {score['precision']:>9.3f} {score['recall']:>7.3f} {score['truePositives']:>4} "
            f"{score['falsePositives']:>4} {score['falseNegatives']:>4}"
        )
    print(
        f"false-positive rate on {result['negativeTexts']} texts without PII: "
        f"{result['falsePositiveRate']:.3f}"
    )
    for error in result["errors"]:
        print(f"  {error['error']:<14} {error['entity']:<13} {error['id']}: {error['text']!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    args = parser.parse_args(argv)
    record = BenchmarkRecord("pii-eval", Path(__file__), {"set": LABELLED.name, "rounds": args.rounds}, argv)
    started = time.perf_counter()
    from kubetune_guardrails.pii import pii_detector

    pii_detector()
    load_seconds = time.perf_counter() - started
    labelled = load_labelled()
    texts = [item["text"] for item in labelled]
    # Every labelled text in a row: about one entity or look-alike per 30 characters, the worst case.
    dense = " ".join(texts)[:2000]
    # Support-ticket prose with no digits: what most prompts look like.
    prose = " ".join(item["text"] for item in labelled if item["kind"] == "plain")
    prose = (prose + " ") * (2000 // len(prose) + 1)
    prose = prose[:2000]
    time_redaction(texts)
    per_text, per_2000, per_2000_dense = [], [], []
    result: dict[str, Any] = {}
    for _ in range(args.rounds):
        result = evaluate_pii()
        per_text.append(time_redaction(texts))
        per_2000.append(time_redaction([prose] * 20))
        per_2000_dense.append(time_redaction([dense] * 10))
        record.add_round(
            {
                "recall": result["overall"]["recall"],
                "precision": result["overall"]["precision"],
                "falsePositiveRate": result["falsePositiveRate"],
                "msPerText": round(per_text[-1], 4),
                "msPer2000CharsProse": round(per_2000[-1], 4),
                "msPer2000CharsDense": round(per_2000_dense[-1], 4),
            }
        )
    print_table(result)
    record.summarize(
        "recall", "PII recall over all entities", [r["recall"] for r in record.rounds], Target(TARGET_RECALL)
    )
    record.summarize(
        "precision",
        "PII precision over all entities",
        [r["precision"] for r in record.rounds],
        Target(TARGET_PRECISION),
    )
    record.summarize(
        "falsePositiveRate",
        "share of texts without PII with a finding",
        [r["falsePositiveRate"] for r in record.rounds],
        Target(TARGET_FPR, higher_is_better=False),
    )
    record.summarize(
        "msPer2000CharsProse", "milliseconds to redact 2,000 characters of prose", per_2000, Target(5, False)
    )
    record.summarize(
        "msPer2000CharsDense", "milliseconds to redact 2,000 characters dense with numbers", per_2000_dense
    )
    record.extra["detection"] = {key: value for key, value in result.items() if key != "errors"}
    record.extra["errors"] = result["errors"]
    record.extra["engineLoadSeconds"] = round(load_seconds, 3)
    print(
        f"engine load {load_seconds:.2f} s (once per process); median {statistics.median(per_text):.3f} ms "
        f"per text; per 2,000 characters {statistics.median(per_2000):.3f} ms of prose, "
        f"{statistics.median(per_2000_dense):.3f} ms dense with numbers"
    )
    for summary in record.ratios.values():
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
