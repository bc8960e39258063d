"""PII detection and redaction with Microsoft Presidio, for prompts, answers (streamed too) and training data.

Presidio's analyzer runs its pattern recognizers (regular expressions confirmed by checksums: Luhn for
cards, ISO 7064 for IBANs, libphonenumber for phone numbers, ipaddress for IPs) and raises their scores
when context words stand nearby ("ssn", "phone", "iban"). No spaCy model can be downloaded where kubetune
runs, so the NLP engine is spaCy's blank English pipeline: its tokenizer, plus a lemma that is the lower-cased
word, which is all the context enhancer needs. Named-entity recognition (names, places) is therefore off:
only the pattern entities below are detected.

The anonymizer replaces each finding with ``<ENTITY>`` (``<EMAIL_ADDRESS>``). Engines are built once per
entity set and cached: building one costs a second or two (importing Presidio and spaCy), a redaction
about 0.4 ms per 1,000 characters of prose (benchmarks/pii_eval.py).
"""

from __future__ import annotations

import functools
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from kubetune_contract.guardrails import PII_ENTITIES
from kubetune_guardrails.decisions import GuardDecision

PII_GUARD = "pii"
"""The guard's name in decisions, metrics and the audit record."""

SUPPORTED_ENTITIES: tuple[str, ...] = PII_ENTITIES
"""Presidio entity types kubetune detects (spec.guardrails.pii.entities); the default set everywhere."""

SCORE_THRESHOLD = 0.4
"""Findings scoring below this are ignored: Presidio's weak patterns (a bare 9-digit number as an SSN) only
count once a context word lifts them, as do phone numbers libphonenumber finds without one."""

MAX_ENTITY_CHARS = 64
"""Longer than any entity we detect (an IBAN with spaces is 42, an IPv6 address 39, a long e-mail ~60):
the tail a streaming redactor holds back so that an entity split across chunks is still whole."""

RELEASE_CHARS = 32
"""A stream is analysed again once this much text has come in beyond the held tail: a token-sized chunk
each time would cost an analysis per token (about 0.1 ms each) for the same result."""

PHONE_REGIONS = ("US", "GB")
"""Regions whose national formats are recognized (US covers Canada's); numbers written with their country
code (+49 30 901820) are recognized whatever the region. Each region costs a pass of libphonenumber."""
PHONE_LENIENCY = 2
"""libphonenumber's STRICT_GROUPING: the digits must be grouped as the country writes them, which keeps
dates (2024-11-0192) and bare timestamps out."""

PiiAction = Literal["redact", "block", "flag"]
"""What a guard does with PII it finds: replace it, refuse the text (pii_detected), or pass and count it."""

_LANGUAGE = "en"


@dataclass(frozen=True)
class PiiFinding:
    """One entity found in a text: [start, end) character offsets and Presidio's confidence."""

    entity: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Redaction:
    """The text with each finding replaced by ``<ENTITY>``, and how many of each entity were replaced."""

    text: str
    counts: Mapping[str, int] = field(default_factory=dict)
    findings: tuple[PiiFinding, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.findings)


def placeholder(entity: str) -> str:
    return f"<{entity}>"


def check_entities(entities: Iterable[str]) -> tuple[str, ...]:
    """The entities, deduplicated in the supported order; ValueError naming any we cannot detect."""
    wanted = list(dict.fromkeys(entities))
    unknown = [entity for entity in wanted if entity not in SUPPORTED_ENTITIES]
    if unknown:
        raise ValueError(
            f"unsupported PII entities {', '.join(unknown)}; supported: {', '.join(SUPPORTED_ENTITIES)}"
        )
    return tuple(entity for entity in SUPPORTED_ENTITIES if entity in wanted)


def _import_presidio_without_transformers() -> None:
    """Import presidio_analyzer without the transformers library, which it imports (seconds of start-up,
    hundreds of MB) only for its optional transformer NER engine, which kubetune does not use.

    A None entry in sys.modules makes `import transformers` raise ImportError, which Presidio handles;
    when transformers is imported already (a pipeline step), nothing changes."""
    if "presidio_analyzer" in sys.modules or "transformers" in sys.modules:
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]
    try:
        import presidio_analyzer  # noqa: F401
    finally:
        del sys.modules["transformers"]


def _build_analyzer(entities: tuple[str, ...]) -> Any:
    _import_presidio_without_transformers()
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from spacy.attrs import IDX, LENGTH
    from spacy.lang.en.stop_words import STOP_WORDS
    from spacy.tokens import Doc

    class BlankEnglishNlpEngine(SpacyNlpEngine):  # type: ignore[misc]
        """spaCy's blank English tokenizer, with the lower-cased word as its lemma: what the context
        enhancer needs, with no model to download. The words are read from the token offsets in one
        array, without building a spaCy Token per word (which took most of an analysis' time)."""

        def load(self) -> None:
            pipelines: Any = {_LANGUAGE: spacy.blank(_LANGUAGE)}
            self.nlp = pipelines

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            pipelines: Any = self.nlp
            return self._artifacts(pipelines[language].make_doc(text), text, language)

        def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
            return self._artifacts(doc, doc.text, language)

        def _artifacts(self, doc: Doc, text: str, language: str) -> NlpArtifacts:
            offsets: list[list[int]] = doc.to_array([IDX, LENGTH]).tolist() if len(doc) else []
            words = [text[start : start + length] for start, length in offsets]
            return NlpArtifacts(
                entities=[],
                # The context enhancer only iterates the tokens for their lengths: words will do.
                tokens=cast(Doc, words),
                tokens_indices=[start for start, _ in offsets],
                lemmas=[word.lower() for word in words],
                nlp_engine=self,
                language=language,
                scores=[],
            )

        def is_stopword(self, word: str, language: str) -> bool:
            return word in STOP_WORDS

        def is_punct(self, word: str, language: str) -> bool:
            return not any(character.isalnum() for character in word)

    # The public-suffix list bundled with tldextract: the default extractor would fetch it over the network.
    offline_domains = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
        def validate_result(self, pattern_text: str) -> bool:
            return bool(offline_domains(pattern_text.rsplit("@", 1)[-1]).fqdn)

    class DottedSsnRecognizer(UsSsnRecognizer):  # type: ignore[misc]
        """Presidio's SSN recognizer, with more context words ("social security no.")."""

        CONTEXT = [*UsSsnRecognizer.CONTEXT, "security", "social", "ssn#", "tin"]

    recognizers: dict[str, Any] = {
        "EMAIL_ADDRESS": OfflineEmailRecognizer(),
        "PHONE_NUMBER": PhoneRecognizer(supported_regions=PHONE_REGIONS, leniency=PHONE_LENIENCY),
        "CREDIT_CARD": CreditCardRecognizer(),
        "IBAN_CODE": IbanRecognizer(),
        "US_SSN": DottedSsnRecognizer(),
        "IP_ADDRESS": IpRecognizer(),
    }
    registry = RecognizerRegistry(supported_languages=[_LANGUAGE])
    for entity in entities:
        registry.add_recognizer(recognizers[entity])
    nlp_engine = BlankEnglishNlpEngine(models=[{"lang_code": _LANGUAGE, "model_name": "blank"}])
    nlp_engine.load()
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp_engine,
        supported_languages=[_LANGUAGE],
        default_score_threshold=SCORE_THRESHOLD,
    )


class PiiDetector:
    """Finds and redacts the configured entities; build it with :func:`pii_detector` (cached)."""

    def __init__(self, entities: Sequence[str] = SUPPORTED_ENTITIES) -> None:
        _import_presidio_without_transformers()  # presidio_anonymizer imports the analyzer
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        self.entities = check_entities(entities)
        self._analyzer = _build_analyzer(self.entities)
        self._anonymizer = AnonymizerEngine()
        self._operators = {
            entity: OperatorConfig("replace", {"new_value": placeholder(entity)}) for entity in self.entities
        }

    def find(self, text: str) -> list[PiiFinding]:
        """Findings in text order; where two overlap, only the higher-scoring (then longer) one."""
        if not text or not self.entities:
            return []
        results = self._analyzer.analyze(text=text, language=_LANGUAGE, entities=list(self.entities))
        ranked = sorted(results, key=lambda result: (-result.score, -(result.end - result.start)))
        kept: list[PiiFinding] = []
        for result in ranked:
            if any(result.start < other.end and other.start < result.end for other in kept):
                continue
            kept.append(PiiFinding(result.entity_type, result.start, result.end, float(result.score)))
        return sorted(kept, key=lambda finding: finding.start)

    def redact_findings(self, text: str, findings: Sequence[PiiFinding]) -> str:
        if not findings:
            return text
        from presidio_anonymizer.entities import RecognizerResult

        results = [
            RecognizerResult(finding.entity, finding.start, finding.end, finding.score)
            for finding in findings
        ]
        return str(
            self._anonymizer.anonymize(text=text, analyzer_results=results, operators=self._operators).text
        )

    def redact(self, text: str) -> Redaction:
        findings = self.find(text)
        return Redaction(
            text=self.redact_findings(text, findings),
            counts=dict(Counter(finding.entity for finding in findings)),
            findings=tuple(findings),
        )

    def stream(self, action: PiiAction = "redact") -> PiiStreamGuard:
        return PiiStreamGuard(self, action)


@functools.lru_cache(maxsize=16)
def _cached_detector(entities: tuple[str, ...]) -> PiiDetector:
    return PiiDetector(entities)


def pii_detector(entities: Iterable[str] = SUPPORTED_ENTITIES) -> PiiDetector:
    """The detector for these entities, built once per process and entity set."""
    return _cached_detector(check_entities(entities))


def redact(text: str, entities: Iterable[str] = SUPPORTED_ENTITIES) -> Redaction:
    """``text`` with every PII entity replaced by ``<ENTITY>``, and the count per entity."""
    return pii_detector(entities).redact(text)


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    for entity, count in counts.items():
        total[entity] = total.get(entity, 0) + count


_WHITESPACE = re.compile(r"\s")


class PiiStreamGuard:
    """Redacts (or blocks) PII in a streamed text, chunk by chunk (kubetune_guardrails.StreamTextGuard).

    It holds back the last :data:`MAX_ENTITY_CHARS` characters (up to :data:`RELEASE_CHARS` more between
    analyses, and more while an entity found in the pending text reaches into the tail), so an entity
    split across chunks is found whole. What it emits
    is what :meth:`PiiDetector.redact` makes of the same text, except where a context word more than a
    tail away would have changed a score.
    """

    def __init__(self, detector: PiiDetector, action: PiiAction = "redact") -> None:
        self.name = PII_GUARD
        self._detector = detector
        self._action = action
        self._pending = ""
        self._emitted: list[str] = []
        self._counts: dict[str, int] = {}
        self._blocked = False

    def _release(self, final: bool) -> str:
        if self._blocked:
            return ""
        pending = self._pending
        findings = self._detector.find(pending)
        if final:
            cut = len(pending)
        else:
            cut = len(pending) - MAX_ENTITY_CHARS
            if cut <= 0:
                return ""
            # Cut between words, never inside a finding: the rest is looked at again with what follows.
            space = max((match.start() for match in _WHITESPACE.finditer(pending, 0, cut)), default=-1)
            if space > 0:
                cut = space
            for finding in findings:
                if finding.start < cut < finding.end:
                    cut = finding.start
        released = [finding for finding in findings if finding.end <= cut]
        if released and self._action == "block":
            self._blocked = True
            add_counts(self._counts, Counter(finding.entity for finding in released))
            return ""
        add_counts(self._counts, Counter(finding.entity for finding in released))
        text = pending[:cut]
        if self._action == "redact":
            text = self._detector.redact_findings(text, released)
        self._pending = pending[cut:]
        self._emitted.append(text)
        return text

    def feed(self, chunk: str) -> str:
        self._pending += chunk
        if len(self._pending) < MAX_ENTITY_CHARS + RELEASE_CHARS:
            return ""
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def counts(self) -> Mapping[str, int]:
        return dict(self._counts)

    @property
    def decisions(self) -> list[GuardDecision]:
        if self._blocked:
            return [pii_decision("block", self._counts)]
        if not self._counts:
            return []
        if self._action == "flag":
            return [pii_decision("flag", self._counts)]
        return [pii_decision("redact", self._counts, "".join(self._emitted))]


def pii_decision(
    action: Literal["redact", "block", "flag"], counts: Mapping[str, int], text: str | None = None
) -> GuardDecision:
    """The GuardDecision for PII found: its counts per entity, never the PII itself."""
    summary = ", ".join(f"{count} {entity}" for entity, count in sorted(counts.items()))
    return GuardDecision(
        guard=PII_GUARD,
        action=action,
        code="pii_detected" if action == "block" else None,
        score=1.0,
        details=f"PII found: {summary}",
        counts=dict(counts),
        text=text,
    )


class PiiTextGuard:
    """A whole-text PII guard (kubetune_guardrails.TextGuard): redact, or block with ``pii_detected``."""

    def __init__(self, entities: Iterable[str] = SUPPORTED_ENTITIES, action: PiiAction = "redact") -> None:
        self.name = PII_GUARD
        self._detector = pii_detector(entities)
        self._action = action

    def check(self, text: str) -> GuardDecision:
        redaction = self._detector.redact(text)
        if not redaction.found:
            return GuardDecision.passed(PII_GUARD)
        if self._action == "redact":
            return pii_decision("redact", redaction.counts, redaction.text)
        return pii_decision(self._action, redaction.counts)

    def stream(self) -> PiiStreamGuard:
        return self._detector.stream(self._action)
