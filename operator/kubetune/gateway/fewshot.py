"""Few-shot examples chosen per request from a pool (a prompt's ``fewShot: {uri, k, select}``).

The pool is a JSONL file of ``{"user": ..., "assistant": ...}`` objects, read once. ``select``:

- ``similar``: the ``k`` examples whose user text is nearest the request's last user message by BM25
  (``bm25s``), best first; ties go to the earlier line;
- ``random``: ``k`` drawn with the request's text as the seed, so one request always gets the same;
- ``fixed``: the first ``k``.

The examples must fit the context window: they are taken in that order while the whole prompt stays
within ``max_prompt_tokens``, so a request gets fewer examples rather than a truncated question. The
gateway has no tokenizer, so a text is counted as its UTF-8 length in bytes, which no byte-level
BPE (or byte-fallback sentencepiece) tokenizer exceeds. The lines used are reported in the
``x-kubetune-few-shot`` response header (``FEW_SHOT_HEADER``), 1-based, in prompt order.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import bm25s

FEW_SHOT_HEADER = "x-kubetune-few-shot"
MESSAGE_OVERHEAD_TOKENS = 8
"""Tokens a chat template may add around one message (role markers, separators)."""
Selection = Literal["similar", "random", "fixed"]


class FewShotPoolError(ValueError):
    """A pool that cannot be read: the message names the file and the line."""


@dataclass(frozen=True)
class PoolExample:
    line: int
    """1-based line of the pool file (what the response header reports)."""
    user: str
    assistant: str


def upper_bound_tokens(text: str) -> int:
    """At least as many tokens as ``text`` takes with a byte-level tokenizer: one per UTF-8 byte."""
    return len(text.encode("utf-8"))


def _pool_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri)
    raise FewShotPoolError(f"fewShot.uri {uri!r}: the gateway reads a local path or a file:// URI")


class ExamplePool:
    """Examples and their BM25 index over the user texts."""

    def __init__(self, examples: Sequence[PoolExample]) -> None:
        if not examples:
            raise FewShotPoolError("a few-shot pool needs at least one example")
        self.examples = tuple(examples)
        self._retriever = bm25s.BM25()
        self._retriever.index(
            bm25s.tokenize([example.user for example in self.examples], show_progress=False),
            show_progress=False,
        )

    @classmethod
    def load(cls, uri: str) -> ExamplePool:
        path = _pool_path(uri)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise FewShotPoolError(f"fewShot.uri {uri!r}: {error.strerror or error}") from error
        examples: list[PoolExample] = []
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as error:
                raise FewShotPoolError(f"{path}:{number}: not JSON: {error}") from error
            if not (
                isinstance(row, dict)
                and isinstance(row.get("user"), str)
                and isinstance(row.get("assistant"), str)
            ):
                raise FewShotPoolError(
                    f'{path}:{number}: must be an object with "user" and "assistant" strings'
                )
            examples.append(PoolExample(number, row["user"], row["assistant"]))
        return cls(examples)

    def ranked(self, select: Selection, query: str) -> list[PoolExample]:
        """Every example, in the order ``select`` prefers them for ``query``."""
        if select == "fixed":
            return list(self.examples)
        if select == "random":
            seed = int.from_bytes(hashlib.sha256(query.encode("utf-8")).digest()[:8], "big")
            shuffled = list(self.examples)
            random.Random(seed).shuffle(shuffled)
            return shuffled
        query_tokens = bm25s.tokenize(query, return_ids=False, show_progress=False)[0]
        scores = self._retriever.get_scores(query_tokens) if query_tokens else [0.0] * len(self.examples)
        order = sorted(range(len(self.examples)), key=lambda index: (-float(scores[index]), index))
        return [self.examples[index] for index in order]


def select_examples(
    pool: ExamplePool,
    select: Selection,
    k: int,
    query: str,
    room_tokens: int,
    count_tokens: Callable[[str], int] = upper_bound_tokens,
) -> list[PoolExample]:
    """Up to ``k`` examples, in ``select``'s order, whose user and assistant turns fit in
    ``room_tokens`` (what the context window leaves after the rest of the prompt)."""
    chosen: list[PoolExample] = []
    left = room_tokens
    for example in pool.ranked(select, query):
        if len(chosen) == k:
            break
        cost = count_tokens(example.user) + count_tokens(example.assistant) + 2 * MESSAGE_OVERHEAD_TOKENS
        if cost <= left:
            chosen.append(example)
            left -= cost
    return chosen


class PoolCache:
    """Pools by uri, read again when their file changes (a pool is edited like the prompt it serves)."""

    def __init__(self) -> None:
        self._pools: dict[str, tuple[int, ExamplePool]] = {}

    def get(self, uri: str) -> ExamplePool:
        path = _pool_path(uri)
        try:
            changed = path.stat().st_mtime_ns
        except OSError as error:
            raise FewShotPoolError(f"fewShot.uri {uri!r}: {error.strerror or error}") from error
        cached = self._pools.get(uri)
        if cached is None or cached[0] != changed:
            cached = (changed, ExamplePool.load(uri))
            self._pools[uri] = cached
        return cached[1]


def header_value(examples: Sequence[PoolExample]) -> str:
    """The ``x-kubetune-few-shot`` header: the pool lines used, in prompt order (empty: none)."""
    return ",".join(str(example.line) for example in examples)
