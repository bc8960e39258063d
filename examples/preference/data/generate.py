"""Write the preference-tuning example's data from the quickstart's ticket-router tickets.

Each ticket becomes a preference row (the right team chosen; rejected, a wrong team or, for every
other ticket, a short non-answer such as "yes" or "Please wait." that a router must not give) and two
feedback rows (the right team labelled desirable, the rejected answer undesirable). The tiny base
prefers the short non-answers to any team name, so before tuning it gets about a quarter of the
held-out pairs right; preference tuning teaches it to answer with a team. Prompts are the quickstart's
rendered instruction prompt, as the served router sees it. Deterministic: run it again to get the
same files.

    python examples/preference/data/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kubetune_components.data import render_instruction_prompt

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parents[1] / "quickstart" / "data"
TEAMS = ("billing", "technical", "account", "shipping", "returns")
NON_ANSWERS = ("yes", "no", "Hello!", "Please wait.", "ok", "The team", "thanks", "maybe")
TRAIN_TICKETS = 240
"""Enough for a few DPO steps to move held-out preference accuracy; small enough for a test."""


def rows(tickets: list[dict[str, str]], seed: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    rng = random.Random(seed)
    preference: list[dict[str, object]] = []
    feedback: list[dict[str, object]] = []
    for ticket in tickets:
        right = ticket["output"]
        wrong_team = rng.choice([team for team in TEAMS if team != right])
        wrong = wrong_team if len(preference) % 2 == 0 else rng.choice(NON_ANSWERS)
        prompt = render_instruction_prompt(ticket["instruction"], ticket["input"])
        preference.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        feedback.append({"prompt": prompt, "completion": right, "label": True})
        feedback.append({"prompt": prompt, "completion": wrong, "label": False})
    return preference, feedback


def write(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def main() -> None:
    def read(name: str) -> list[dict[str, str]]:
        lines = (QUICKSTART / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    train_preference, train_feedback = rows(read("support-tickets.jsonl")[:TRAIN_TICKETS], seed=1)
    heldout_preference, heldout_feedback = rows(read("support-tickets-heldout.jsonl"), seed=2)
    write(HERE / "support-preference.jsonl", train_preference)
    write(HERE / "support-preference-heldout.jsonl", heldout_preference)
    write(HERE / "support-feedback.jsonl", train_feedback)
    write(HERE / "support-feedback-heldout.jsonl", heldout_feedback)


if __name__ == "__main__":
    main()
