"""The quickstart's data against forgetting: the replay file is the tiny base's own general pretraining
text, and the reference set is text of that kind which the base never saw."""

from __future__ import annotations

import re
from pathlib import Path

from kubetune_components import data
from kubetune_components.dev import tinylm

DATA = Path(__file__).resolve().parents[3] / "examples" / "quickstart" / "data"


def sentences(text: str) -> set[str]:
    return {s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4}


def test_the_replay_file_holds_the_general_pretraining_paragraphs() -> None:
    replay = [example["text"] for example in data.load_examples(str(DATA / "general-replay.jsonl"), "text")]
    general = tinylm.corpus_documents([tinylm.CORPUS_DIR / "corpus-general.txt"])
    assert replay == general


def test_the_reference_set_shares_no_sentence_with_the_pretraining_corpus() -> None:
    reference = [
        example["text"] for example in data.load_examples(str(DATA / "general-reference.jsonl"), "text")
    ]
    assert len(reference) >= 30
    corpus = set().union(*(sentences(document) for document in tinylm.corpus_documents()))
    held_out = set().union(*(sentences(text) for text in reference))
    assert len(held_out) >= 100
    assert held_out.isdisjoint(corpus)
