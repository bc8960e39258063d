"""How often does an answer parse and validate against its JSON schema, with and without constrained
decoding, and what does the constraint cost in tokens per second?

Runs the model server's own generation path (``ModelRuntime`` with the ``response_format``
constraint the API builds) on a tiny model: the random tiny Llama by default, or ``--model DIR``
(a published model directory, e.g. the pretrained tiny base ``python -m
kubetune_components.dev.tinylm --out DIR``). Every prompt asks for JSON and shows the schema, as an
application would; each (prompt, schema, seed) is generated unconstrained and constrained, one
after the other in alternating order, in at least 5 rounds, so load on a shared machine hits both
alike. An answer is valid when ``json.loads`` parses it and ``jsonschema`` validates it. Target:
every constrained answer valid. Not part of the test suite:

    python benchmarks/structured.py [--rounds 5] [--seeds 3] [--max-tokens 160] [--model DIR]

Writes benchmarks/results/structured.json (rounds, machine, commit, date).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MIN_ROUNDS, BenchmarkRecord, Target
from kubetune_components.dev import tinylm
from kubetune_components.serving.openai_requests import response_format_constraint
from kubetune_components.serving.requests import ChatMessage, SamplingParams
from kubetune_components.serving.runtime import ModelRuntime

SCHEMAS: dict[str, dict[str, Any]] = {
    "ticket": {
        "type": "object",
        "properties": {
            "queue": {"enum": ["billing", "technical", "account"]},
            "urgent": {"type": "boolean"},
            "summary": {"type": "string", "maxLength": 40},
        },
        "required": ["queue", "urgent", "summary"],
    },
    "order": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "quantity": {"type": "integer"},
            "express": {"type": "boolean"},
        },
        "required": ["sku", "quantity", "express"],
    },
    "contact": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "emails": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 2},
            "vip": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["name", "emails", "vip"],
    },
}
REQUESTS = (
    "I was charged twice for my subscription this month.",
    "Send me three boxes of the blue mugs, fast please.",
    "My name is Ada Lovelace, reach me at ada@example.com.",
    "The mobile app logs me out every few minutes.",
)


@dataclass
class Tally:
    answers: int = 0
    valid: int = 0
    cut: int = 0
    """Answers that reached max_tokens (finish_reason length)."""
    tokens: int = 0
    seconds: float = 0.0

    def share_valid(self) -> float:
        return self.valid / self.answers

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def run_round(runtime: ModelRuntime, seeds: int, max_tokens: int, round_number: int) -> dict[str, Tally]:
    tallies = {"unconstrained": Tally(), "constrained": Tally()}
    item = 0
    for schema_name, schema in SCHEMAS.items():
        constraint = response_format_constraint(
            {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema}}
        )
        for request in REQUESTS:
            prompt = runtime.prepare_chat(
                [
                    ChatMessage(
                        "system", f"Answer with only a JSON object valid against: {json.dumps(schema)}"
                    ),
                    ChatMessage("user", request),
                ]
            )
            for seed in range(seeds):
                item += 1
                free = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
                modes = [("unconstrained", free), ("constrained", replace(free, constraint=constraint))]
                if (item + round_number) % 2:
                    modes.reverse()
                for mode, params in modes:
                    started = time.perf_counter()
                    completion = runtime.generate(prompt, params)
                    tally = tallies[mode]
                    tally.seconds += time.perf_counter() - started
                    tally.answers += 1
                    tally.tokens += completion.completion_tokens
                    tally.valid += is_valid(completion.text, schema)
                    tally.cut += completion.finish_reason == "length"
    return tallies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt and schema")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--model", type=Path, help="a model directory (default: the random tiny Llama)")
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    torch.set_num_threads(1)
    record = BenchmarkRecord(
        "structured", Path(__file__), {**vars(args), "model": str(args.model or "random tiny")}
    )
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model or tinylm.build_random_tiny(Path(scratch) / "model", seed=0)
        runtime = ModelRuntime.load(model_dir, device="cpu")
        run_round(runtime, 1, 8, 0)  # warm-up: the first constrained request reads the vocabulary
        shares: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        speed_ratios: list[float] = []
        for round_number in range(1, args.rounds + 1):
            tallies = run_round(runtime, args.seeds, args.max_tokens, round_number)
            figures = {
                mode: {
                    "answers": tally.answers,
                    "valid": tally.valid,
                    "shareValid": round(tally.share_valid(), 4),
                    "cutByMaxTokens": tally.cut,
                    "tokens": tally.tokens,
                    "tokensPerSecond": round(tally.tokens_per_second(), 1),
                }
                for mode, tally in tallies.items()
            }
            record.add_round(figures)
            for mode, tally in tallies.items():
                shares[mode].append(tally.share_valid())
            ratio = tallies["constrained"].tokens_per_second() / tallies["unconstrained"].tokens_per_second()
            speed_ratios.append(ratio)
            print(
                f"round {round_number}: valid {figures['unconstrained']['shareValid']:.0%} unconstrained vs "
                f"{figures['constrained']['shareValid']:.0%} constrained; tokens/s "
                f"{figures['unconstrained']['tokensPerSecond']} vs "
                f"{figures['constrained']['tokensPerSecond']} (x{ratio:.2f}); constrained answers cut by "
                f"max_tokens: {figures['constrained']['cutByMaxTokens']}"
            )
        runtime.close()
    summaries = [
        record.summarize(
            "validShareUnconstrained",
            "share of answers valid without the constraint",
            shares["unconstrained"],
        ),
        record.summarize(
            "validShareConstrained",
            "share of answers valid with the constraint",
            shares["constrained"],
            Target(1.0),
        ),
        record.summarize(
            "tokensPerSecondRatio",
            "tokens/s with the constraint over tokens/s without (the cost of enforcing it)",
            speed_ratios,
        ),
    ]
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0 if summaries[1].met_by_worst_round else 1


if __name__ == "__main__":
    sys.exit(main())
