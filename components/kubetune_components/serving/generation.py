"""Generation token by token: the rows of one (possibly batched) Hugging Face `generate` call.

`generate` runs greedily and swaps in its own sampling through a logits processor with a
per-request `torch.Generator` (so a seed gives the same text whatever else runs concurrently). A
row with an output constraint (`constrained`) has every token its grammar does not allow masked
before that, so sampling and greedy decoding alike stay inside it. A
stopping criterion sees every new token of every row, which is what streams text, applies stop
sequences and per-row token limits, hides a version's reasoning (`hide_reasoning`: deltas hold back
a tail that may open a hidden section, so a marker split across tokens never leaks), and notices
cancelled requests.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from kubetune_components.serving.constrained import RowConstraint
from kubetune_components.serving.requests import Completion, FinishReason, PreparedPrompt, SamplingParams

BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""


class IncrementalDecoder:
    """Text of a growing token sequence, as deltas that never split a multi-byte character.

    Decodes a short window around the newest tokens (like text-generation-inference) so the
    deltas concatenate to the decoding of the whole sequence for byte-level and sentencepiece
    tokenizers alike.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))

    def add(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop sequence."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def reasoning_spans(text: str, open_marker: str, close_marker: str) -> list[tuple[int, int]]:
    """The [start, end) ranges of ``text`` from an open marker through its close marker (an unclosed
    one runs to the end)."""
    spans: list[tuple[int, int]] = []
    position = 0
    while (start := text.find(open_marker, position)) >= 0:
        end = text.find(close_marker, start + len(open_marker))
        if end < 0:
            spans.append((start, len(text)))
            break
        position = end + len(close_marker)
        spans.append((start, position))
    return spans


def hide_reasoning(text: str, open_marker: str, close_marker: str) -> tuple[str, bool]:
    """``text`` without its sections from ``open_marker`` to ``close_marker`` (markers included), and
    whether it ends inside one that is not closed yet (which hides everything after its start)."""
    kept: list[str] = []
    position = 0
    spans = reasoning_spans(text, open_marker, close_marker)
    for start, end in spans:
        kept.append(text[position:start])
        position = end
    kept.append(text[position:])
    unclosed = bool(spans) and not text[: spans[-1][1]].endswith(close_marker)
    return "".join(kept), unclosed


class GenerationRow:
    """One request inside a (possibly batched) generate call: its limits, its text and its end."""

    def __init__(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        max_tokens: int,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        on_delta: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
        adapter: str | None = None,
    ) -> None:
        self.prompt = prompt
        self.adapter = adapter
        """The named adapter of a shared base model this row generates with (None: the model as is)."""
        self.params = params
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids
        self.on_delta = on_delta
        self.cancelled = cancelled or threading.Event()
        self.decoder = IncrementalDecoder(tokenizer)
        self.raw_text = ""
        """Everything generated (hidden reasoning included)."""
        self.reasoning_open = False
        self.token_ends: list[int] = []
        """len(raw_text) after each generated token: which text each token wrote."""
        self.sent = ""
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self.first_token_at: float | None = None
        self.constraint = (
            RowConstraint(params.constraint, tokenizer, eos_ids) if params.constraint is not None else None
        )
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    def _emit(self, visible: str) -> None:
        delta = visible[len(self.sent) :]
        if delta:
            self.sent = visible
            if self.on_delta is not None:
                self.on_delta(delta)

    def _answer(self) -> str:
        """The text generated so far without its hidden reasoning (an unclosed section hides the rest)."""
        markers = self.params.hidden_reasoning
        if markers is None:
            return self.raw_text
        visible, self.reasoning_open = hide_reasoning(self.raw_text, *markers)
        return visible

    def _finish(self, reason: FinishReason) -> None:
        self.raw_text += self.decoder.flush()
        answer = self._answer()
        stop_at = self._stop_position(answer)
        if stop_at is not None:
            answer, reason = answer[:stop_at], "stop"
        self._emit(answer)
        self.finish_reason = reason

    def _stop_position(self, answer: str) -> int | None:
        positions = [index for stop in self.params.stop if (index := answer.find(stop)) >= 0]
        return min(positions) if positions else None

    def accept(self, token: int) -> bool:
        """Take the next generated token; True once the row is finished."""
        if self.done:
            return True
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.constraint is not None:
            self.constraint.accepted(token)
        if token in self.eos_ids:
            self._finish("stop")
            return True
        self.generated += 1
        self.raw_text += self.decoder.add(token)
        self.token_ends.append(len(self.raw_text))
        answer = self._answer()
        stop_at = self._stop_position(answer)
        if stop_at is not None:
            self._emit(answer[:stop_at])
            self.finish_reason = "stop"
            return True
        if self.generated >= self.max_tokens:
            self._finish("length")
            return True
        markers = self.params.hidden_reasoning
        # held back: an end that may yet become a stop sequence or open a hidden section
        held = _held_back(answer, (*self.params.stop, *(markers[:1] if markers else ())))
        self._emit(answer[: len(answer) - held])
        return False

    def reasoning_tokens(self) -> int:
        """Generated tokens that wrote (part of) a hidden section."""
        if self.params.hidden_reasoning is None:
            return 0
        spans = reasoning_spans(self.raw_text, *self.params.hidden_reasoning)
        count, start = 0, 0
        for end in self.token_ends:
            if any(start < span_end and max(end, start + 1) > span_start for span_start, span_end in spans):
                count += 1
            start = end
        return count

    def completion(self) -> Completion:
        if self.finish_reason is None:
            self._finish("length")
        assert self.finish_reason is not None
        return Completion(
            text=self.sent,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt.token_ids),
            completion_tokens=self.generated,
            first_token_at=self.first_token_at,
            reasoning_tokens=self.reasoning_tokens(),
        )


class _RowsCriteria(StoppingCriteria):
    """Feeds each step's new tokens to the rows; a row that is done stops generating."""

    def __init__(self, rows: Sequence[GenerationRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        finished = [row.accept(int(token)) for row, token in zip(self.rows, newest, strict=True)]
        return cast(torch.BoolTensor, torch.tensor(finished, dtype=torch.bool, device=input_ids.device))


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling from one row of logits."""
    probabilities = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probabilities, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[before >= top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probabilities, 1, generator=generator).item())


class _ConstraintProcessor(LogitsProcessor):
    """Rows with an output constraint keep the scores of the tokens it allows next, and only those."""

    def __init__(self, rows: Sequence[GenerationRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, row in enumerate(self.rows):
            if row.constraint is None or row.done:
                continue
            allowed = row.constraint.allowed(row.decoder.tokens)
            if allowed is None:
                continue
            keep = torch.tensor(
                sorted({t for t in allowed if t < scores.shape[-1]}), dtype=torch.long, device=scores.device
            )
            masked = torch.full_like(scores[index], -math.inf)
            masked[keep] = scores[index, keep]
            scores[index] = masked
        return scores


class _SamplingProcessor(LogitsProcessor):
    """Rows with a temperature get a sampled token as the only finite score, so greedy picks it."""

    def __init__(self, rows: Sequence[GenerationRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, row in enumerate(self.rows):
            if row.generator is None or row.done:
                continue
            token = sample_token(scores[index], row.params.temperature, row.params.top_p, row.generator)
            scores[index].fill_(-math.inf)
            scores[index, token] = 0.0
        return scores


def generate_rows(
    model: torch.nn.Module,
    rows: Sequence[GenerationRow],
    *,
    pad_id: int,
    eos_ids: frozenset[int],
    device: torch.device,
) -> None:
    """One `generate` call over left-padded rows (blocking; call it off the event loop)."""
    active = [row for row in rows if not row.done]
    if not active:
        return
    width = max(len(row.prompt.token_ids) for row in active)
    input_ids = torch.full((len(active), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(active), width), dtype=torch.long)
    for index, row in enumerate(active):
        length = len(row.prompt.token_ids)
        input_ids[index, width - length :] = torch.tensor(row.prompt.token_ids, dtype=torch.long)
        attention_mask[index, width - length :] = 1
    config = GenerationConfig(
        max_new_tokens=max(row.max_tokens for row in active),
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id,
    )
    adapters: dict[str, Any] = {}
    if any(row.adapter is not None for row in active):
        # PEFT applies each row's own LoRA weights inside one batch (mixed-adapter inference)
        adapters["adapter_names"] = [row.adapter or BASE_ADAPTER for row in active]
    processors = LogitsProcessorList()
    if any(row.constraint is not None for row in active):
        processors.append(_ConstraintProcessor(active))
    if any(row.generator is not None for row in active):
        processors.append(_SamplingProcessor(active))
    generate: Any = model.generate  # type: ignore[operator]
    with torch.inference_mode():
        generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([_RowsCriteria(active)]),
            **adapters,
        )
