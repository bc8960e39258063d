"""Moderation by category: keyword and pattern lists (shipped defaults plus the spec's), and optionally a
classifier whose labels name categories. Each category has its own action; every match is counted."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from kubetune_guardrails.decisions import ACTION_SEVERITY, GuardDecision, GuardErrorCode, GuardMode

GUARD_NAME = "moderation"
ERROR_CODE: GuardErrorCode = "content_policy_violation"


@dataclass(frozen=True)
class Pattern:
    """A regular expression, and the lower-case substrings one of which every match contains (none: it
    always runs)."""

    regex: re.Pattern[str]
    anchors: tuple[str, ...] = ()

    def count(self, text: str, lowered: str) -> int:
        if self.anchors and not any(anchor in lowered for anchor in self.anchors):
            return 0
        return len(self.regex.findall(text))


@dataclass(frozen=True)
class ShippedList:
    keywords: tuple[str, ...]
    patterns: tuple[Pattern, ...]


@cache
def shipped_lists() -> Mapping[str, ShippedList]:
    """The default keywords and patterns per category (kubetune_guardrails/data/moderation.json)."""
    text = resources.files("kubetune_guardrails").joinpath("data/moderation.json").read_text()
    return {
        name: ShippedList(
            tuple(lists["keywords"]),
            tuple(
                Pattern(re.compile(entry["regex"], re.IGNORECASE), tuple(entry["anchors"]))
                for entry in lists["patterns"]
            ),
        )
        for name, lists in json.loads(text).items()
        if not name.startswith("_")
    }


@dataclass(frozen=True)
class Category:
    """One category's lists, compiled: keywords (whole words, case-insensitive) and patterns."""

    name: str
    action: GuardMode
    keywords: tuple[str, ...]
    keyword_pattern: re.Pattern[str] | None
    patterns: tuple[Pattern, ...]

    @classmethod
    def build(
        cls, name: str, action: GuardMode, keywords: Sequence[str], patterns: Sequence[str]
    ) -> Category:
        shipped = shipped_lists().get(name, ShippedList((), ()))
        words = tuple(dict.fromkeys(word.lower() for word in [*shipped.keywords, *keywords]))
        keyword_pattern = (
            re.compile("|".join(rf"\b{re.escape(word)}\b" for word in words), re.IGNORECASE)
            if words
            else None
        )
        own = tuple(Pattern(re.compile(regex, re.IGNORECASE)) for regex in patterns)
        return cls(name, action, words, keyword_pattern, (*shipped.patterns, *own))

    def count(self, text: str, lowered: str) -> int:
        found = 0
        # a substring test is cheap; the word-boundary regex runs only on a text holding a keyword
        if self.keyword_pattern is not None and any(word in lowered for word in self.keywords):
            found += len(self.keyword_pattern.findall(text))
        return found + sum(pattern.count(text, lowered) for pattern in self.patterns)


CategoryScorer = Callable[[str], Mapping[str, float]]
"""A classifier's probability per category label for one text."""


class Moderator:
    """A TextGuard over the categories; the outcome is the most severe action among those that matched."""

    name = GUARD_NAME

    def __init__(
        self, categories: Sequence[Category], classifier: CategoryScorer | None = None, threshold: float = 0.5
    ) -> None:
        self.categories = [category for category in categories if category.action != "off"]
        self.classifier = classifier
        self.threshold = threshold

    def matches(self, text: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        lowered = text.lower()
        for category in self.categories:
            if found := category.count(text, lowered):
                counts[category.name] = found
        if self.classifier is not None:
            for label, probability in self.classifier(text).items():
                if probability >= self.threshold and any(c.name == label for c in self.categories):
                    counts[label] = counts.get(label, 0) + 1
        return counts

    def check(self, text: str) -> GuardDecision:
        counts = self.matches(text)
        if not counts:
            return GuardDecision.passed(self.name)
        action: GuardMode = max(
            (category.action for category in self.categories if category.name in counts),
            key=lambda mode: ACTION_SEVERITY[mode],
        )
        details = "categories: " + ", ".join(sorted(counts))
        if action == "block":
            return GuardDecision(self.name, "block", ERROR_CODE, 1.0, details, counts)
        return GuardDecision(self.name, "flag", None, 1.0, details, counts)
