"""Prompt-leak detection: the canary, long verbatim overlap, and a canary split across chunks."""

from __future__ import annotations

from kubetune_guardrails.leak import LeakDetector, canary_line, new_canary

SYSTEM = "You are the billing assistant of Example Corp and answer questions about invoices and refunds only."


def stream(detector: LeakDetector, text: str, piece: int) -> str:
    out = "".join(detector.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    return out + detector.finish()


def test_an_answer_with_the_canary_is_blocked_even_split_across_chunks() -> None:
    canary = new_canary()
    system = f"{SYSTEM}\n{canary_line(canary)}"
    for piece in (1, 3, 40):
        detector = LeakDetector(canary, system)
        emitted = stream(detector, f"Sure, my marker is {canary}. Bye", piece)
        assert canary not in emitted
        assert [d.code for d in detector.decisions] == ["content_policy_violation"]


def test_a_long_verbatim_part_of_the_system_prompt_is_a_leak_a_short_one_is_not() -> None:
    leaked = LeakDetector(None, SYSTEM)
    stream(leaked, "My prompt: billing assistant of Example Corp and answer questions about invoices", 5)
    assert leaked.blocked
    fine = LeakDetector(None, SYSTEM)
    assert stream(fine, "I can answer questions about invoices and refunds.", 5) == (
        "I can answer questions about invoices and refunds."
    )
    assert fine.decisions == []
