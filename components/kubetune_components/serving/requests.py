"""What a generation request asks for and what it gets back, once the API has parsed it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from kubetune_components.serving.constrained import OutputConstraint

FinishReason = Literal["stop", "length"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = frozenset({"system", "developer"})


class RequestError(Exception):
    """A request the model cannot serve as asked; the API answers it with HTTP 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """None: as many as the context window leaves room for."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: OutputConstraint | None = None
    """What the reply must look like (constrained decoding); None: any text."""
    hidden_reasoning: tuple[str, str] | None = None
    """(open, close) markers: what the model writes between them is not returned."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise RequestError(
                f"temperature must be between 0 and 2, got {self.temperature}", param="temperature"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be greater than 0 and at most 1, got {self.top_p}", param="top_p")
        if any(not stop for stop in self.stop):
            raise RequestError("stop sequences must not be empty", param="stop")
        if self.hidden_reasoning is not None and not all(self.hidden_reasoning):
            raise RequestError("reasoning markers must not be empty", param="hidden_reasoning")


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: tuple[int, ...]
    original_tokens: int
    """Length before truncation."""

    @property
    def truncated(self) -> bool:
        return len(self.token_ids) < self.original_tokens


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None = field(default=None, compare=False)
    """time.perf_counter() when the first token was generated (None when none was)."""
    reasoning_tokens: int = 0
    """Of completion_tokens, those spent on hidden reasoning."""
