"""The shared vocabulary of every guard: what it decided, and how an output guard streams.

A guard looks at one text (a user message, a tool result, an answer) and returns a GuardDecision.
Output guards that rewrite text (redaction, link neutralization) also work chunk by chunk on a
stream: `StreamTextGuard.feed` returns the text that is safe to emit now and holds back a tail that a
later chunk could still turn into a match (an e-mail address split across two SSE chunks);
`finish` returns what is left once the stream ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

GuardAction = Literal["pass", "flag", "block", "redact"]
"""What a guard did: let the text through, let it through and count it, refuse it, or rewrite it."""

GuardMode = Literal["block", "flag", "off"]
"""What a spec asks a guard to do with what it finds (PII also has redact)."""

GuardErrorCode = Literal["prompt_injection_detected", "pii_detected", "content_policy_violation"]
"""The `code` of the OpenAI error body of a refused request (HTTP 400)."""

ACTION_SEVERITY: Mapping[str, int] = {"off": 0, "pass": 0, "redact": 1, "flag": 2, "block": 3}
"""Order of actions when several guards decide on one request: the most severe one is the outcome."""


@dataclass(frozen=True)
class GuardDecision:
    """One guard's verdict on one text.

    `counts` is per entity (PII: EMAIL_ADDRESS) or per category (moderation: violence) or per rule
    (prompt injection: instruction_override); `details` is a short human-readable reason, never the
    offending text itself (it ends up in logs and the audit record).
    """

    guard: str
    action: GuardAction
    code: GuardErrorCode | None = None
    score: float = 0.0
    details: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)
    text: str | None = None
    """The rewritten text when action is "redact"; None otherwise."""

    def __post_init__(self) -> None:
        if self.action == "block" and self.code is None:
            raise ValueError(f"guard {self.guard}: a block decision needs an error code")
        if self.action == "redact" and self.text is None:
            raise ValueError(f"guard {self.guard}: a redact decision needs the rewritten text")

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @classmethod
    def passed(cls, guard: str, score: float = 0.0) -> GuardDecision:
        return cls(guard=guard, action="pass", score=score)

    def audit_record(self) -> dict[str, object]:
        """The JSON-serializable form written to the audit log (no text, only what was decided)."""
        record: dict[str, object] = {"guard": self.guard, "action": self.action}
        if self.code is not None:
            record["code"] = self.code
        if self.score:
            record["score"] = round(self.score, 4)
        if self.counts:
            record["counts"] = dict(self.counts)
        if self.details:
            record["details"] = self.details
        return record


def most_severe(decisions: list[GuardDecision]) -> GuardDecision | None:
    """The decision that decides the request's outcome (first of the most severe), None if there are none."""
    if not decisions:
        return None
    return max(decisions, key=lambda decision: ACTION_SEVERITY[decision.action])


@runtime_checkable
class TextGuard(Protocol):
    """A guard over a whole text: an input guard, or an output guard on a non-streamed answer."""

    name: str

    def check(self, text: str) -> GuardDecision: ...


@runtime_checkable
class StreamTextGuard(Protocol):
    """A guard over a streamed text, one instance per stream.

    feed(chunk) returns the text safe to emit now (possibly rewritten, possibly empty when the guard
    holds a tail back); finish() returns the held-back rest. The concatenation of everything returned
    equals check() of the whole text. `decisions` lists what the guard did so far (for metrics and
    the audit record); a decision with action "block" stops the stream.
    """

    name: str

    def feed(self, chunk: str) -> str: ...

    def finish(self) -> str: ...

    @property
    def decisions(self) -> list[GuardDecision]: ...


class PassThroughStreamGuard:
    """A stream guard that holds nothing back: for guards that only need to see the text, not rewrite it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._decisions: list[GuardDecision] = []

    def feed(self, chunk: str) -> str:
        return chunk

    def finish(self) -> str:
        return ""

    @property
    def decisions(self) -> list[GuardDecision]:
        return self._decisions
