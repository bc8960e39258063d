"""The PII guard of ``spec.guardrails.pii``: Presidio (kubetune_guardrails.pii) on prompts and answers.

``input`` acts on user messages and tool results before the prompt template, the model and the logs see
them; ``output`` on the answer, streamed included (a stream guard holds back a tail so that an entity
split across chunks is still found). Each is ``redact`` (replace with ``<ENTITY>``), ``block`` (HTTP 400,
code ``pii_detected``; a stream ends with an error event before the entity), ``flag`` (served unchanged,
counted) or ``off``. The analyzer is built once per entity list, when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_contract.guardrails import Pii
from kubetune_guardrails.decisions import StreamTextGuard, TextGuard
from kubetune_guardrails.pii import PiiDetector, PiiTextGuard, pii_detector


@dataclass(frozen=True)
class PresidioPiiGuards:
    """The input guard (shared by every request) and a factory of output guards (one per answer)."""

    config: Pii
    detector: PiiDetector

    def input_guard(self) -> TextGuard | None:
        if self.config.input == "off":
            return None
        return PiiTextGuard(self.detector.entities, self.config.input)

    def output_guard(self) -> StreamTextGuard | None:
        if self.config.output == "off":
            return None
        return self.detector.stream(self.config.output)


def pii_guards(config: Pii) -> PresidioPiiGuards:
    """The guards ``config`` asks for; builds (or reuses) the analyzer for its entities now."""
    return PresidioPiiGuards(config, pii_detector(config.entities))
