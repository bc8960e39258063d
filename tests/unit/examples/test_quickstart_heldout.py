"""The quickstart's held-out tickets measure generalisation: none of their label-bearing sentences is in
the training file or in the tiny base's pretraining corpus."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from kubetune_components.dev import tinylm

REPO_ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = REPO_ROOT / "examples/quickstart"


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart_generate", QUICKSTART / "data/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_tickets(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def held_out_templates(generate: ModuleType) -> list[str]:
    templates = generate.HELD_OUT
    return [
        template
        for pool in (templates.issues, templates.details)
        for sentences in pool.values()
        for template in sentences
    ]


def test_the_quickstart_evaluates_on_the_committed_held_out_file(generate: ModuleType) -> None:
    spec = (QUICKSTART / "01-finetune.yaml").read_text(encoding="utf-8")
    assert f"validationUri: {generate.HELD_OUT_PATH.relative_to(REPO_ROOT)}" in spec
    assert "validationSplit" not in spec  # a random split of the training file would share its sentences
    assert generate.main(["--check"]) == 0


def test_held_out_tickets_are_balanced_distinct_and_unseen(generate: ModuleType) -> None:
    held_out = read_tickets(generate.HELD_OUT_PATH)
    training = read_tickets(generate.DATASET_PATH)
    assert Counter(ticket["output"] for ticket in held_out) == dict.fromkeys(
        generate.CATEGORIES, generate.HELD_OUT_PER_CATEGORY
    )
    inputs = [ticket["input"] for ticket in held_out]
    assert len(set(inputs)) == len(inputs)
    assert not set(inputs) & {ticket["input"] for ticket in training}


def test_the_two_splits_are_written_from_disjoint_sentences(generate: ModuleType) -> None:
    for pool in ("issues", "details"):
        for category in generate.CATEGORIES:
            training = {normalised(s) for s in getattr(generate.TRAINING, pool)[category]}
            held_out = {normalised(s) for s in getattr(generate.HELD_OUT, pool)[category]}
            assert held_out and not training & held_out, (pool, category)


def test_no_held_out_sentence_occurs_in_training_or_pretraining_text(generate: ModuleType) -> None:
    training_inputs = [normalised(t["input"]) for t in read_tickets(generate.DATASET_PATH)]
    pretraining = [normalised(document) for document in tinylm.corpus_documents()]
    held_out_inputs = [normalised(t["input"]) for t in read_tickets(generate.HELD_OUT_PATH)]
    for template in held_out_templates(generate):
        pattern = generate.template_pattern(template)
        leaks = [text for text in training_inputs + pretraining if pattern.search(text)]
        assert not leaks, f"held-out sentence {template!r} occurs in {leaks[:3]}"
    # Not vacuous: every held-out ticket carries a held-out issue sentence the patterns recognise,
    # and the same patterns do find the training sentences in the training file.
    issue_patterns = [generate.template_pattern(t) for s in generate.HELD_OUT.issues.values() for t in s]
    assert all(any(p.search(text) for p in issue_patterns) for text in held_out_inputs)
    training_patterns = [generate.template_pattern(t) for s in generate.TRAINING.issues.values() for t in s]
    assert all(any(p.search(text) for p in training_patterns) for text in training_inputs)


def test_the_pretraining_corpus_is_the_generators_training_template_text(generate: ModuleType) -> None:
    corpus = tinylm.CORPUS_DIR / "corpus-support.txt"
    dataset = generate.generate_dataset()
    assert corpus.read_text(encoding="utf-8") == generate.generate_pretraining_text(dataset)


def test_a_template_pattern_matches_any_filling_of_its_slots_and_nothing_else(generate: ModuleType) -> None:
    pattern = generate.template_pattern("I sent back the {product} {days} days ago.")
    assert pattern.search("hi, i sent back   the desk lamp 12 days ago. thanks")
    assert not pattern.search("I sent back the lamp yesterday.")
