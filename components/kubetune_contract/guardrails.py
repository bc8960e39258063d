"""spec.guardrails of a ModelDeployment: the guards the gateway runs on what goes in and comes out.

Input guards see user-supplied content (user messages and tool results) before the model does; output
guards see the answer, streamed or not. A refused request gets HTTP 400 with an OpenAI error body whose
``code`` names the guard (prompt_injection_detected, pii_detected, content_policy_violation); a flagged
one is served and counted. The gateway reads this model as it is (its config embeds it), and the guard
library (kubetune_guardrails) implements it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from kubetune_contract.common import MODEL_URI_PATTERN, KubeModel, RatioString

GuardMode = Literal["block", "flag", "off"]
PiiMode = Literal["redact", "block", "flag", "off"]

PiiEntity = Literal["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"]
PII_ENTITIES: tuple[PiiEntity, ...] = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
)
"""The entities the PII guard recognizes (Presidio's names), and the default list."""

MODERATION_CATEGORIES = ("violence", "self_harm", "hate", "sexual", "illicit")
"""The categories the guard library ships keyword and pattern lists for (kubetune_guardrails/data)."""

UNSHIPPED_CATEGORY_NEEDS_LISTS = (
    "a category that is not shipped (" + ", ".join(MODERATION_CATEGORIES) + ") needs keywords or patterns"
)
CATEGORY_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
DOMAIN_PATTERN = r"^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _check_pattern(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from exc
    return pattern


RegexString = Annotated[
    str,
    Field(min_length=1, max_length=1024, description="A regular expression (Python), case-insensitive."),
    AfterValidator(_check_pattern),
]


class GuardClassifier(KubeModel):
    """A Hugging Face sequence-classification model (config, weights, tokenizer) the gateway loads."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        description="Where the model is: a path, file:// URI or pvc://claim/path (the gateway mounts the "
        "claim read-only); loaded with AutoModelForSequenceClassification.",
    )
    label: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The label (config.id2label) that means unsafe, e.g. INJECTION; unset: the label with "
        "the highest index. For moderation, each label that names a category scores that category.",
    )
    max_length: int = Field(
        default=512, ge=16, le=8192, description="Tokens the classifier reads; a longer text is cut."
    )


class PromptInjection(KubeModel):
    """A rule set (overrides, jailbreaks, fake role tokens, hidden payloads) plus an optional classifier."""

    action: GuardMode = Field(
        default="block",
        description="block: refuse with code prompt_injection_detected; flag: serve and count; off.",
    )
    threshold: RatioString = Field(
        default="0.5",
        description="A text whose combined score (rules and classifier, 0..1) reaches this is an injection.",
    )
    classifier: GuardClassifier | None = Field(
        default=None, description="A classifier combined with the rules; rules alone when unset."
    )
    spotlighting: Literal["off", "delimiters", "datamarking"] = Field(
        default="off",
        description="Mark untrusted input for the model: delimiters wraps user messages and tool results "
        "in tags the system prompt explains; datamarking also interleaves a marker between their words.",
    )


class Pii(KubeModel):
    """Personal data in prompts and answers, found by Presidio's pattern recognizers."""

    input: PiiMode = Field(
        default="redact",
        description="On user messages and tool results before the model and the logs see them: redact "
        "(replace with <ENTITY>), block (code pii_detected), flag or off.",
    )
    output: PiiMode = Field(
        default="redact",
        description="On the answer, streamed included (matches split across chunks are still found).",
    )
    entities: list[PiiEntity] = Field(
        default_factory=lambda: list(PII_ENTITIES),
        min_length=1,
        description="The entities looked for: " + ", ".join(PII_ENTITIES) + ".",
    )


class OutputSanitization(KubeModel):
    """What the answer may carry to the client."""

    allowed_link_domains: list[Annotated[str, Field(pattern=DOMAIN_PATTERN, max_length=253)]] | None = Field(
        default=None,
        max_length=256,
        description="Markdown links and images to other domains (subdomains of these included) are "
        "neutralized: the URL is removed, the text kept. Unset: links are not checked; []: none allowed.",
    )
    strip_html: bool = Field(
        default=False,
        description="Remove HTML tags (script and style with their content) and terminal "
        "escape sequences from the answer.",
    )
    detect_prompt_leak: bool = Field(
        default=False,
        description="Put a canary token in the system prompt; an answer carrying it, or a long verbatim "
        "part of the system prompt, is refused (code content_policy_violation).",
    )


class ModerationCategory(KubeModel):
    """One category: the shipped list for its name, plus the keywords and patterns given here."""

    name: str = Field(
        pattern=CATEGORY_NAME_PATTERN,
        max_length=63,
        description="A shipped category (" + ", ".join(MODERATION_CATEGORIES) + ") or a new one, which then "
        "needs keywords or patterns.",
    )
    action: GuardMode | None = Field(
        default=None, description="This category's action; unset: the moderation action."
    )
    keywords: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=1024, description="Words or phrases matched whole, case-insensitive."
    )
    patterns: list[RegexString] = Field(
        default_factory=list, max_length=256, description="Regular expressions matched case-insensitively."
    )

    @model_validator(mode="after")
    def _has_something_to_match(self) -> ModerationCategory:
        if self.name not in MODERATION_CATEGORIES and not self.keywords and not self.patterns:
            raise ValueError(f"{UNSHIPPED_CATEGORY_NEEDS_LISTS}; {self.name!r} is not shipped")
        return self


class Moderation(KubeModel):
    """Content categories checked on input and output, each counted; the action per category."""

    action: GuardMode = Field(
        default="block",
        description="block: refuse with code content_policy_violation; flag: serve and count; off.",
    )
    categories: list[ModerationCategory] = Field(
        default_factory=lambda: [ModerationCategory(name=name) for name in MODERATION_CATEGORIES],
        max_length=64,
        description="The categories checked; unset: every shipped one with the moderation action.",
    )
    classifier: GuardClassifier | None = Field(
        default=None,
        description="A classifier whose labels name categories, combined with the lists (either matches).",
    )
    threshold: RatioString = Field(
        default="0.5",
        description="The classifier's probability at which a category matches.",
    )

    @model_validator(mode="after")
    def _unique_categories(self) -> Moderation:
        names = [category.name for category in self.categories]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"categories names must be unique; repeated: {', '.join(repeated)}")
        return self


class Guardrails(KubeModel):
    """The guards of the gateway; each is off while its section is unset."""

    prompt_injection: PromptInjection | None = Field(
        default=None, description="Prompt-injection detection on user messages and tool results."
    )
    pii: Pii | None = Field(default=None, description="PII redaction or refusal on input and output.")
    output: OutputSanitization | None = Field(
        default=None, description="Link, HTML and escape-sequence sanitization and prompt-leak detection."
    )
    moderation: Moderation | None = Field(
        default=None, description="Content moderation by category on input and output."
    )
