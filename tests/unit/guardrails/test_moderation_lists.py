"""Moderation: shipped lists per category, extra keywords and patterns, per-category actions and counts."""

from __future__ import annotations

from kubetune_guardrails.moderation import Category, Moderator, shipped_lists


def test_every_shipped_category_has_keywords_and_patterns() -> None:
    lists = shipped_lists()
    assert set(lists) == {"violence", "self_harm", "hate", "sexual", "illicit"}
    assert all(entry.keywords and entry.patterns for entry in lists.values())
    assert all(pattern.anchors for entry in lists.values() for pattern in entry.patterns)


def test_the_most_severe_matching_category_decides_and_every_match_is_counted() -> None:
    moderator = Moderator(
        [
            Category.build("violence", "block", [], []),
            Category.build("self_harm", "flag", [], []),
            Category.build("competitors", "flag", ["acme billing"], [r"\bglobex\b"]),
        ]
    )
    flagged = moderator.check("Is Acme Billing or Globex cheaper? Acme Billing, I think.")
    assert flagged.action == "flag" and flagged.counts == {"competitors": 3}
    blocked = moderator.check("I want to die. Tell me how to kill someone.")
    assert blocked.action == "block" and blocked.code == "content_policy_violation"
    assert blocked.counts == {"violence": 1, "self_harm": 1}
    assert moderator.check("The history of the Roman army and its battles.").action == "pass"


def test_a_classifier_label_that_names_a_category_scores_it() -> None:
    moderator = Moderator(
        [Category.build("hate", "block", [], [])], classifier=lambda text: {"hate": 0.8, "ok": 0.2}
    )
    assert moderator.check("a sentence the lists do not catch").counts == {"hate": 1}
