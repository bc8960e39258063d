"""PII redaction with Presidio's pattern recognizers: what is found, what is not, streams split anywhere."""

from __future__ import annotations

import time

import pytest

from kubetune_guardrails import StreamTextGuard
from kubetune_guardrails.pii import (
    MAX_ENTITY_CHARS,
    PiiTextGuard,
    check_entities,
    pii_detector,
    redact,
)

LETTER = (
    "Hi, I'm writing about my refund. Mail me at jane.roe@example.org or call +1 415-555-0132. "
    "The card was 4111 1111 1111 1111, refunds go to IBAN DE89 3704 0044 0532 0130 00. "
    "My SSN is 536-22-1234 and the router logged 192.168.10.20 and 2001:db8::8a2e:370:7334. Thanks!"
)


def test_every_default_entity_is_replaced_by_its_placeholder_and_counted() -> None:
    redaction = redact(LETTER)
    assert redaction.text == (
        "Hi, I'm writing about my refund. Mail me at <EMAIL_ADDRESS> or call <PHONE_NUMBER>. "
        "The card was <CREDIT_CARD>, refunds go to IBAN <IBAN_CODE>. "
        "My SSN is <US_SSN> and the router logged <IP_ADDRESS> and <IP_ADDRESS>. Thanks!"
    )
    assert dict(redaction.counts) == {
        "EMAIL_ADDRESS": 1,
        "PHONE_NUMBER": 1,
        "CREDIT_CARD": 1,
        "IBAN_CODE": 1,
        "US_SSN": 1,
        "IP_ADDRESS": 2,
    }


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 was declined.",  # fails the Luhn check
        "IBAN DE89 3704 0044 0532 0130 01 bounced.",  # fails the ISO 7064 check
        "Upgrade from v2.13.0 to version 10.0.19041.1 first.",
        "Your order A-10293847 ships Tuesday; tracking 1Z999AA10123456784.",
        "The meeting is at 10:30 in room 4.12, budget $4,250.00.",
        "Write to support at the usual address.",
    ],
)
def test_look_alikes_that_fail_a_check_are_left_alone(text: str) -> None:
    assert redact(text).text == text


def test_a_context_word_is_what_makes_a_bare_number_an_ssn() -> None:
    assert redact("Reference 536221234 attached.").counts == {}
    assert redact("Social security number: 536221234.").counts == {"US_SSN": 1}


def test_only_the_configured_entities_are_looked_for() -> None:
    redaction = redact(LETTER, ["EMAIL_ADDRESS"])
    assert dict(redaction.counts) == {"EMAIL_ADDRESS": 1}
    assert "4111 1111 1111 1111" in redaction.text


def test_an_unknown_entity_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unsupported PII entities PERSON; supported: EMAIL_ADDRESS"):
        check_entities(["EMAIL_ADDRESS", "PERSON"])


def test_the_engine_is_built_once_and_then_costs_milliseconds() -> None:
    assert pii_detector() is pii_detector()
    text = (LETTER + " ") * 7  # about 2,000 characters with 49 entities
    redact(text)
    started = time.perf_counter()
    for _ in range(5):
        redact(text)
    # About 2 ms on an idle core; generous for a loaded machine.
    assert (time.perf_counter() - started) / 5 < 0.25


def stream_through(guard: StreamTextGuard, chunks: list[str]) -> str:
    return "".join(guard.feed(chunk) for chunk in chunks) + guard.finish()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 40])
def test_a_stream_split_anywhere_is_redacted_like_the_whole_text(size: int) -> None:
    guard = PiiTextGuard().stream()
    assert isinstance(guard, StreamTextGuard)
    chunks = [LETTER[start : start + size] for start in range(0, len(LETTER), size)]
    assert stream_through(guard, chunks) == redact(LETTER).text
    (decision,) = guard.decisions
    assert decision.action == "redact" and decision.counts == redact(LETTER).counts
    assert decision.text == redact(LETTER).text


def test_a_stream_holds_back_only_a_tail_and_releases_text_as_it_goes() -> None:
    guard = PiiTextGuard().stream()
    words = "plain words without anything personal in them " * 10
    released = guard.feed(words)
    # The tail, and the rest of the word it cuts into (the cut falls between words).
    assert released and len(words) - len(released) <= MAX_ENTITY_CHARS + len("anything ")
    assert released + guard.finish() == words
    assert guard.decisions == []


def test_a_blocking_stream_stops_at_the_first_entity_and_says_why() -> None:
    guard = PiiTextGuard(action="block").stream()
    text = "Nothing here yet. " * 6 + "Then: write to jane.roe@example.org please. " + "More text. " * 10
    out = stream_through(guard, [text[index : index + 9] for index in range(0, len(text), 9)])
    assert "jane.roe" not in out and out.startswith("Nothing here yet.")
    (decision,) = guard.decisions
    assert (decision.action, decision.code, dict(decision.counts)) == (
        "block",
        "pii_detected",
        {"EMAIL_ADDRESS": 1},
    )
    assert "jane" not in decision.details


def test_a_whole_text_guard_redacts_or_blocks_and_never_repeats_the_pii() -> None:
    assert PiiTextGuard().check("nothing to see").action == "pass"
    redacted = PiiTextGuard().check("mail jane.roe@example.org")
    assert (redacted.action, redacted.text) == ("redact", "mail <EMAIL_ADDRESS>")
    blocked = PiiTextGuard(action="block").check("mail jane.roe@example.org")
    assert (blocked.action, blocked.code, blocked.text) == ("block", "pii_detected", None)
    assert "jane" not in str(blocked.audit_record())
