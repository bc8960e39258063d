"""Output sanitization: links and images to domains not allowed, HTML, terminal escape sequences.

The classic exfiltration through a model's answer is a markdown image whose URL carries data in its
query: the client renders it and the browser sends the data away. Links and images to a domain that
is not allowed keep their text and lose their URL. HTML is removed (script and style blocks with their
content) and terminal control sequences stripped, when asked.

`Sanitizer` works on a whole text and on a stream: `feed` holds back a tail that starts a construct
which is not closed yet (``[text](ht``, ``<scr``, an escape sequence cut in two), so a link split
across chunks is still neutralized.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from kubetune_guardrails.decisions import GuardDecision

GUARD_NAME = "output_sanitizer"
NEUTRALIZED_URL = "#blocked-link"

MARKDOWN_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"\n]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^(\s{0,3}\[[^\]\n]+\]:\s*)(\S+)(.*)$", re.MULTILINE)
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
BLOCK_ELEMENT = re.compile(r"<(script|style|iframe|object)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|<!--.*?-->", re.DOTALL)
COMPLETE_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
ESCAPE_SEQUENCE = re.compile(COMPLETE_ESCAPE.pattern + r"|[\x07\x08\x9b\x1b]")

LINE_CONTINUES = "\x00"
"""Stands for the text already emitted on the current line while a later part of it is rewritten."""

MAX_HOLD = 4096
"""A construct left open longer than this is released as it is (bounded latency and memory)."""


def _domain_allowed(url: str, allowed: Sequence[str]) -> bool:
    parts = urlsplit(url)
    if not parts.scheme and not parts.netloc:
        return not url.lower().startswith(("javascript:", "data:", "vbscript:"))  # a relative link stays
    if parts.scheme not in ("http", "https"):
        return False
    host = (parts.hostname or "").lower().rstrip(".")
    for domain in allowed:
        bare = domain.removeprefix("*.")
        if host == bare or host.endswith("." + bare):
            return True
    return False


class Sanitizer:
    """One answer's sanitizer (a StreamTextGuard; `check` for a whole text)."""

    name = GUARD_NAME

    def __init__(self, allowed_link_domains: Sequence[str] | None, strip_html: bool) -> None:
        self.allowed = allowed_link_domains
        self.strip_html = strip_html
        self.counts: dict[str, int] = {}
        self._held = ""
        self._at_line_start = True
        self._decisions: list[GuardDecision] = []

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _link(self, match: re.Match[str]) -> str:
        bang, text, url = match.group(1), match.group(2), match.group(3)
        if self.allowed is None or _domain_allowed(url, self.allowed):
            return match.group(0)
        self._count("image" if bang else "link")
        return text if bang else f"[{text}]({NEUTRALIZED_URL})"

    def _reference(self, match: re.Match[str]) -> str:
        if self.allowed is None or _domain_allowed(match.group(2), self.allowed):
            return match.group(0)
        self._count("link")
        return match.group(1) + NEUTRALIZED_URL

    def _autolink(self, match: re.Match[str]) -> str:
        if self.allowed is None or _domain_allowed(match.group(1), self.allowed):
            return match.group(0)
        self._count("link")
        return NEUTRALIZED_URL

    def _strip(self, pattern: re.Pattern[str], what: str, text: str) -> str:
        def removed(match: re.Match[str]) -> str:
            self._count(what)
            return ""

        return pattern.sub(removed, text)

    def rewrite(self, text: str, at_line_start: bool = True) -> str:
        if not text:
            return text
        if not at_line_start:  # a reference definition matches only at the start of a line
            return self.rewrite(LINE_CONTINUES + text)[len(LINE_CONTINUES) :]
        if self.strip_html:
            text = self._strip(ESCAPE_SEQUENCE, "escape_sequence", text)
        if self.allowed is not None:
            text = MARKDOWN_LINK.sub(self._link, text)
            text = REFERENCE_DEFINITION.sub(self._reference, text)
            text = AUTOLINK.sub(self._autolink, text)
        if self.strip_html:
            text = self._strip(BLOCK_ELEMENT, "html", text)
            text = self._strip(HTML_TAG, "html", text)
        return text

    def _open_construct(self, text: str) -> int:
        """Where a construct that a later chunk could complete starts (len(text) when none is open)."""
        starts = []
        if self.strip_html:
            escape = text.rfind("\x1b")
            if escape >= 0 and not COMPLETE_ESCAPE.match(text, escape):
                starts.append(escape)
            tag = text.rfind("<")
            if tag >= 0 and ">" not in text[tag:]:
                starts.append(tag)
            block = re.search(r"<(script|style|iframe|object)\b", text[-MAX_HOLD:], re.IGNORECASE)
            if block is not None:
                begin = len(text) - min(len(text), MAX_HOLD) + block.start()
                if not re.search(rf"</{block.group(1)}\s*>", text[begin:], re.IGNORECASE):
                    starts.append(begin)
        if self.allowed is not None:
            bracket = text.rfind("[")
            if bracket >= 0 and not (bracket > 0 and text[bracket - 1] == "\x1b"):  # not a CSI sequence
                tail = text[bracket:]
                closed = re.match(r"\[[^\]\n]*\](?:[^(:\s]|\s[^(]|\([^)]*\)|:[ \t]*\S+\s)", tail)
                if closed is None and "\n\n" not in tail:
                    starts.append(bracket - 1 if bracket > 0 and text[bracket - 1] == "!" else bracket)
            angle = text.rfind("<")
            if angle >= 0 and ">" not in text[angle:] and " " not in text[angle:]:
                starts.append(angle)
            if text.endswith("!"):
                starts.append(len(text) - 1)
        start = min(starts) if starts else len(text)
        return start if len(text) - start <= MAX_HOLD else len(text)

    def feed(self, chunk: str) -> str:
        text = self._held + chunk
        cut = self._open_construct(text)
        self._held = text[cut:]
        return self._emit(text[:cut])

    def _emit(self, text: str) -> str:
        out = self.rewrite(text, self._at_line_start)
        if text:
            self._at_line_start = text.endswith("\n")
        return out

    def finish(self) -> str:
        rest, self._held = self._held, ""
        out = self._emit(rest)
        if self.counts:
            self._decisions.append(
                GuardDecision(
                    self.name,
                    "redact",
                    details="neutralized: " + ", ".join(sorted(self.counts)),
                    counts=dict(self.counts),
                    text="",
                )
            )
        return out

    @property
    def decisions(self) -> list[GuardDecision]:
        return self._decisions

    def check(self, text: str) -> GuardDecision:
        rewritten = self.feed(text) + self.finish()
        if not self.counts:
            return GuardDecision.passed(self.name)
        return GuardDecision(
            self.name,
            "redact",
            details="neutralized: " + ", ".join(sorted(self.counts)),
            counts=dict(self.counts),
            text=rewritten,
        )
