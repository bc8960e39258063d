"""A published model, loaded for serving: prompts, the context window, sampling and streaming.

`ModelRuntime.load(model_dir)` reads `kubetune-manifest.json` to tell what the directory holds:

- a PEFT adapter (format `peft-adapter`): loaded onto its base model (the copy a Bento bundles in
  `base/`, else the manifest's `baseModel.uri`); LoRA and IA3 adapters are merged into the weights;
- merged or full weights (`merged`, `full`): a plain `from_pretrained` directory;
- a QuantizeJob's output: read back with `quantize.load_quantized`.

A directory without a manifest is recognised by its files (a quantization record, an
`adapter_config.json` or a `config.json`), so any Hugging Face model directory can be served too.

Chat requests are rendered the way the model was fine-tuned: a model trained on the `instruction`
format sees the instruction template (system messages are the instruction, the user message the
input, earlier turns become worked examples), every other model sees its tokenizer's chat template.

Generation runs Hugging Face `generate` greedily and swaps in its own sampling through a logits
processor with a per-request `torch.Generator` (so a seed gives the same text whatever else runs
concurrently); a stopping criterion sees every new token of every row, which is what streams text,
applies stop sequences and per-row token limits, and notices cancelled requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.errors import ModelLoadError
from kubetune_components.finetune import train as finetune
from kubetune_components.finetune.publish import MANIFEST_FILE
from kubetune_components.quantize import methods as quantize
from kubetune_components.serving.batching import MicroBatcher
from kubetune_components.serving.config import RuntimeLimits

logger = logging.getLogger(__name__)

BUNDLED_BASE_DIR = "base"
"""Where a Bento's copy of an adapter's model keeps the base model the adapter applies to."""
ArtifactKind = Literal["peft-adapter", "merged", "full", "quantized"]
ARTIFACT_FORMATS: tuple[str, ...] = ("peft-adapter", "merged", "full")
QUANTIZED_FORMATS: tuple[str, ...] = ("hf-safetensors", "torchao-state-dict")
PromptStyle = Literal["chat-template", "instruction"]
FinishReason = Literal["stop", "length"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = frozenset({"system", "developer"})
DEFAULT_MAX_CONCURRENCY = 4
"""Generations running at once (streams and batches); more wait for a thread."""
UNKNOWN_CONTEXT_MAX_TOKENS = 256
"""Token limit of a request without max_tokens when the model does not say how long its context is."""


class RequestError(Exception):
    """A request the model cannot serve as asked; the API answers it with HTTP 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------------------------------
# What a model directory holds.


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return value


def _dataset_format(manifest: Mapping[str, Any] | None) -> str | None:
    """The training data format of the model, following a QuantizeJob's manifest to its source's."""
    current: Any = manifest
    while isinstance(current, Mapping):
        dataset = current.get("dataset")
        if isinstance(dataset, Mapping) and dataset.get("format"):
            return str(dataset["format"])
        current = current.get("parent")
    return None


@dataclass(frozen=True)
class ModelArtifact:
    path: Path
    kind: ArtifactKind
    base_uri: str | None
    """The base model of an adapter."""
    dataset_format: str | None


def inspect_model_dir(path: str | Path) -> ModelArtifact:
    """What `path` holds; raises ModelLoadError when it is not a model directory."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory")
    manifest = _read_json_object(root / MANIFEST_FILE)
    kind: ArtifactKind
    if manifest is not None:
        artifact = manifest.get("artifact") if isinstance(manifest.get("artifact"), dict) else {}
        fmt = str((artifact or {}).get("format"))
        if manifest.get("kind") == "QuantizeJob" or fmt in QUANTIZED_FORMATS:
            kind = "quantized"
        elif fmt in ARTIFACT_FORMATS:
            kind = cast(ArtifactKind, fmt)
        else:
            known = ", ".join((*ARTIFACT_FORMATS, *QUANTIZED_FORMATS))
            raise ModelLoadError(f"{root / MANIFEST_FILE}: artifact.format {fmt!r} is not one of {known}")
    elif (root / quantize.QUANTIZATION_RECORD).is_file():
        kind = "quantized"
    elif (root / "adapter_config.json").is_file():
        kind = "peft-adapter"
    elif (root / "config.json").is_file():
        kind = "full"
    else:
        raise ModelLoadError(
            f"{root} holds no model: none of {MANIFEST_FILE}, adapter_config.json or config.json is there"
        )
    base_uri: str | None = None
    if kind == "peft-adapter":
        bundled = root / BUNDLED_BASE_DIR
        base_model = (manifest or {}).get("baseModel")
        adapter_config = _read_json_object(root / "adapter_config.json") or {}
        if (bundled / "config.json").is_file():
            base_uri = str(bundled)
        elif isinstance(base_model, Mapping) and base_model.get("uri"):
            base_uri = str(base_model["uri"])
        elif adapter_config.get("base_model_name_or_path"):
            base_uri = str(adapter_config["base_model_name_or_path"])
        else:
            raise ModelLoadError(
                f"{root} is an adapter, but neither its manifest (baseModel.uri) nor adapter_config.json "
                "(base_model_name_or_path) names the base model"
            )
    return ModelArtifact(
        path=root,
        kind=kind,
        base_uri=base_uri,
        dataset_format=_dataset_format(manifest),
    )


def load_model(artifact: ModelArtifact, device: torch.device) -> torch.nn.Module:
    """The model of `artifact` on `device`, in eval mode."""
    model: Any
    if artifact.kind == "quantized":
        model = quantize.load_quantized(artifact.path, device)
    elif artifact.kind in ("merged", "full"):
        model = models.load_causal_lm(str(artifact.path))
    else:
        from peft import PeftModel

        assert artifact.base_uri is not None
        base = models.load_causal_lm(artifact.base_uri)
        try:
            model = PeftModel.from_pretrained(base, str(artifact.path))
        except Exception as error:
            raise ModelLoadError(
                f"cannot apply the adapter in {artifact.path} to {artifact.base_uri}: {error}"
            ) from error
        peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", "")).lower()
        if peft_type.rsplit(".", 1)[-1] in finetune.MERGEABLE_METHODS:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    return cast(torch.nn.Module, model)


def load_serving_tokenizer(artifact: ModelArtifact) -> PreTrainedTokenizerBase:
    """The tokenizer published with the model; an adapter without one uses its base model's."""
    has_tokenizer = any(
        (artifact.path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")
    )
    if not has_tokenizer and artifact.base_uri is not None:
        return models.load_tokenizer(artifact.base_uri)
    return models.load_tokenizer(str(artifact.path))


def context_size(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Positions the model can attend to, less the virtual tokens of prompt or prefix tuning."""
    config = getattr(model, "config", None)
    size: int | None = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            size = value
            break
    if size is None:
        limit = getattr(tokenizer, "model_max_length", None)
        size = limit if isinstance(limit, int) and 0 < limit < 10**7 else None
    peft_configs = getattr(model, "peft_config", None)
    if size is not None and isinstance(peft_configs, Mapping):
        virtual = max(
            (int(getattr(cfg, "num_virtual_tokens", 0) or 0) for cfg in peft_configs.values()), default=0
        )
        size -= virtual
    return size


# --------------------------------------------------------------------------------------------------
# Requests.


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


# --------------------------------------------------------------------------------------------------
# Decoding token by token.


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
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids
        self.on_delta = on_delta
        self.cancelled = cancelled or threading.Event()
        self.decoder = IncrementalDecoder(tokenizer)
        self.raw_text = ""
        self.sent = ""
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self.first_token_at: float | None = None
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

    def _finish(self, reason: FinishReason) -> None:
        self.raw_text += self.decoder.flush()
        visible = self.raw_text
        stop_at = self._stop_position()
        if stop_at is not None:
            visible, reason = self.raw_text[:stop_at], "stop"
        self._emit(visible)
        self.finish_reason = reason

    def _stop_position(self) -> int | None:
        positions = [index for stop in self.params.stop if (index := self.raw_text.find(stop)) >= 0]
        return min(positions) if positions else None

    def accept(self, token: int) -> bool:
        """Take the next generated token; True once the row is finished."""
        if self.done:
            return True
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            self._finish("stop")
            return True
        self.generated += 1
        self.raw_text += self.decoder.add(token)
        stop_at = self._stop_position()
        if stop_at is not None:
            self._emit(self.raw_text[:stop_at])
            self.finish_reason = "stop"
            return True
        if self.generated >= self.max_tokens:
            self._finish("length")
            return True
        held = _held_back(self.raw_text, self.params.stop)
        self._emit(self.raw_text[: len(self.raw_text) - held])
        return False

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


# --------------------------------------------------------------------------------------------------
# Streams.


_END = object()


class TextStream:
    """Text deltas of one request as they are generated (iterate), then `result`."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        """Set once generation has ended (`result` or `error` is then final)."""
        self.result: Completion | None = None
        self.error: BaseException | None = None

    def put(self, delta: str) -> None:
        self._queue.put(delta)

    def close(self, result: Completion | None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._queue.put(_END)
        self.finished.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._queue.get()) is not _END:
                yield cast(str, item)
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error


class AsyncTextStream:
    """`TextStream` for an event loop: the generating thread hands deltas over with call_soon_threadsafe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None

    def put(self, delta: str) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def close(self, result: Completion | None, error: BaseException | None = None) -> None:
        def finish() -> None:
            self.result, self.error = result, error
            self._queue.put_nowait(_END)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(finish)

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while (item := await self._queue.get()) is not _END:
                yield cast(str, item)
        finally:
            self.cancelled.set()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------------------------------
# The runtime.


@dataclass
class _Job:
    prompt: PreparedPrompt
    params: SamplingParams
    result: Completion | None = field(default=None)
    cancelled: threading.Event | None = None


class ModelRuntime:
    """A loaded model and tokenizer, with prompt preparation and generation (sync and async)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        artifact: ModelArtifact | None = None,
        limits: RuntimeLimits | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.artifact = artifact
        self.limits = limits or RuntimeLimits()
        self.device = next(model.parameters()).device
        self.context_tokens = context_size(model, tokenizer)
        self.max_prompt_tokens = self._effective_max_prompt_tokens()
        self.prompt_style = self._prompt_style()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        eos_ids.update(int(token) for token in (eos if isinstance(eos, list) else [eos]) if token is not None)
        self.eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.executor = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="kubetune-generate"
        )
        self.batcher: MicroBatcher[_Job, Completion] | None = None
        if self.limits.max_batch_size > 1:
            self.batcher = MicroBatcher(
                self._run_jobs,
                self.executor,
                max_batch_size=self.limits.max_batch_size,
                max_latency_s=self.limits.max_latency_ms / 1000,
            )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        limits: RuntimeLimits | None = None,
        device: torch.device | str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> ModelRuntime:
        artifact = inspect_model_dir(model_dir)
        target = torch.device(device) if device is not None else finetune.pick_device()
        tokenizer = load_serving_tokenizer(artifact)
        model = load_model(artifact, target)
        return cls(model, tokenizer, artifact=artifact, limits=limits, max_concurrency=max_concurrency)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _effective_max_prompt_tokens(self) -> int:
        configured = self.limits.max_prompt_tokens
        room = self.context_tokens - 1 if self.context_tokens is not None else None
        if configured is None:
            if room is None:
                raise ModelLoadError(
                    "the model's context size is unknown; set KUBETUNE_MAX_PROMPT_TOKENS to bound prompts"
                )
            return room
        if room is not None and configured > room:
            logger.warning(
                "KUBETUNE_MAX_PROMPT_TOKENS=%d does not fit the model's %d-token context with room for a "
                "reply; prompts are limited to %d tokens",
                configured,
                self.context_tokens,
                room,
            )
            return room
        return configured

    def _prompt_style(self) -> PromptStyle | None:
        fmt = self.artifact.dataset_format if self.artifact is not None else None
        if fmt == "instruction":
            return "instruction"
        if getattr(self.tokenizer, "chat_template", None):
            return "chat-template"
        return None

    # -- prompts ----------------------------------------------------------------------------------

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _too_long(self, length: int, param: str) -> RequestError:
        return RequestError(
            f"the prompt is {length} tokens long, more than the {self.max_prompt_tokens} max prompt tokens "
            "this model serves (KUBETUNE_MAX_PROMPT_TOKENS); shorten it",
            param=param,
            code="context_length_exceeded",
        )

    def prepare_completion(self, prompt: str) -> PreparedPrompt:
        """Token ids of a raw prompt; an over-long one keeps its last tokens (after bos) or is refused."""
        ids = self._encode(prompt, add_special_tokens=True)
        limit = self.max_prompt_tokens
        if len(ids) <= limit:
            return PreparedPrompt(tuple(ids), len(ids))
        if self.limits.context_overflow == "refuse":
            raise self._too_long(len(ids), "prompt")
        bos = self.tokenizer.bos_token_id
        keep_bos = bos is not None and ids[0] == bos and limit > 1
        kept = [ids[0], *ids[len(ids) - limit + 1 :]] if keep_bos else ids[len(ids) - limit :]
        return PreparedPrompt(tuple(kept), len(ids))

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if self.prompt_style is None:
            raise RequestError(
                "this model has no chat template and was not fine-tuned on the instruction format, so it "
                "cannot take chat messages; use /v1/completions",
                param="messages",
                code="chat_not_supported",
            )
        if self.prompt_style == "instruction":
            return self._encode(render_instruction_chat(messages), add_special_tokens=True)
        conversation = [{"role": _template_role(m.role), "content": m.content} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # templates raise on conversations they do not accept
            raise RequestError(
                f"the model's chat template rejects these messages: {error}", param="messages"
            ) from error
        return self._encode(str(text), add_special_tokens=False)

    def prepare_chat(self, messages: Sequence[ChatMessage]) -> PreparedPrompt:
        """Render and tokenize; over-long conversations lose their oldest turns, then their start."""
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        ids = self.render_chat(messages)
        original = len(ids)
        limit = self.max_prompt_tokens
        if original <= limit:
            return PreparedPrompt(tuple(ids), original)
        if self.limits.context_overflow == "refuse":
            raise self._too_long(original, "messages")
        kept = list(messages)
        while len(ids) > limit and (dropped := _drop_oldest_turn(kept)) is not None:
            kept = dropped
            ids = self.render_chat(kept)
        if len(ids) > limit:
            ids = ids[len(ids) - limit :]
        return PreparedPrompt(tuple(ids), original)

    # -- generation -------------------------------------------------------------------------------

    def _room(self, prompt: PreparedPrompt, params: SamplingParams) -> int:
        if self.context_tokens is None:
            return params.max_tokens or UNKNOWN_CONTEXT_MAX_TOKENS
        room = self.context_tokens - len(prompt.token_ids)
        if room < 1:
            raise RequestError(
                f"the prompt's {len(prompt.token_ids)} tokens leave no room to generate in the model's "
                f"{self.context_tokens}-token context",
                code="context_length_exceeded",
            )
        return min(room, params.max_tokens) if params.max_tokens is not None else room

    def _row(
        self,
        prompt: PreparedPrompt,
        params: SamplingParams,
        on_delta: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> GenerationRow:
        return GenerationRow(
            prompt, params, self._room(prompt, params), self.tokenizer, self.eos_ids, on_delta, cancelled
        )

    def run_rows(self, rows: Sequence[GenerationRow]) -> None:
        """One `generate` call over left-padded rows (blocking; call it off the event loop)."""
        active = [row for row in rows if not row.done]
        if not active:
            return
        width = max(len(row.prompt.token_ids) for row in active)
        input_ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(active), width), dtype=torch.long)
        for index, row in enumerate(active):
            length = len(row.prompt.token_ids)
            input_ids[index, width - length :] = torch.tensor(row.prompt.token_ids, dtype=torch.long)
            attention_mask[index, width - length :] = 1
        config = GenerationConfig(
            max_new_tokens=max(row.max_tokens for row in active),
            do_sample=False,
            num_beams=1,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.pad_id,
        )
        processors = LogitsProcessorList()
        if any(row.generator is not None for row in active):
            processors.append(_SamplingProcessor(active))
        generate: Any = self.model.generate  # type: ignore[operator]
        with torch.inference_mode():
            generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_RowsCriteria(active)]),
            )

    def _run_jobs(self, jobs: Sequence[_Job]) -> list[Completion]:
        rows = [self._row(job.prompt, job.params, cancelled=job.cancelled) for job in jobs]
        self.run_rows(rows)
        return [row.completion() for row in rows]

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> Completion:
        """Blocking generation of one request."""
        return self._run_jobs([_Job(prompt, params)])[0]

    def generate_batch(self, requests: Sequence[tuple[PreparedPrompt, SamplingParams]]) -> list[Completion]:
        """Blocking generation of several requests in one padded batch."""
        return self._run_jobs([_Job(prompt, params) for prompt, params in requests])

    def stream(self, prompt: PreparedPrompt, params: SamplingParams) -> TextStream:
        """Generate on a worker thread; iterate the returned stream for the text deltas."""
        stream = TextStream()
        row = self._row(prompt, params, stream.put, stream.cancelled)
        self.executor.submit(self._stream_worker, row, stream)
        return stream

    def _stream_worker(self, row: GenerationRow, stream: TextStream | AsyncTextStream) -> None:
        try:
            self.run_rows([row])
            stream.close(row.completion())
        except BaseException as error:
            logger.exception("generation failed")
            stream.close(None, error)

    async def agenerate(self, prompt: PreparedPrompt, params: SamplingParams) -> Completion:
        """Generation off the event loop; with batching on, requests share `generate` calls.

        Cancelling the awaiting task stops the generation at its next token: the worker thread
        would otherwise run on to max_tokens for a caller that is gone."""
        self._room(prompt, params)  # refuse what cannot run before it waits for a batch
        job = _Job(prompt, params, cancelled=threading.Event())
        try:
            if self.batcher is not None:
                return await self.batcher.submit(job)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, lambda: self._run_jobs([job])[0])
        except asyncio.CancelledError:
            assert job.cancelled is not None
            job.cancelled.set()
            raise

    def astream(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncTextStream:
        """Like `stream`, for an event loop: `async for delta in runtime.astream(...)`."""
        stream = AsyncTextStream(asyncio.get_running_loop())
        row = self._row(prompt, params, stream.put, stream.cancelled)
        self.executor.submit(self._stream_worker, row, stream)
        return stream


def _template_role(role: str) -> str:
    return "system" if role in SYSTEM_ROLES else role


def _drop_oldest_turn(messages: Sequence[ChatMessage]) -> list[ChatMessage] | None:
    """Without the oldest non-system message (and an assistant reply it leaves orphaned).

    The last message is never dropped; None when nothing else is left to drop.
    """
    candidates = [index for index, m in enumerate(messages[:-1]) if m.role not in SYSTEM_ROLES]
    if not candidates:
        return None
    kept = [m for index, m in enumerate(messages) if index != candidates[0]]
    following = [index for index, m in enumerate(kept[:-1]) if m.role not in SYSTEM_ROLES]
    if following and kept[following[0]].role == "assistant":
        del kept[following[0]]
    return kept


def render_instruction_chat(messages: Sequence[ChatMessage]) -> str:
    """A conversation in the instruction format the model was fine-tuned on.

    System (and developer) messages are the instruction and the last user message its input;
    earlier user/assistant exchanges come first as answered instructions (few-shot examples).
    """
    instruction = "\n\n".join(m.content for m in messages if m.role in SYSTEM_ROLES)
    turns = [m for m in messages if m.role not in SYSTEM_ROLES]
    if not turns or turns[-1].role != "user":
        raise RequestError(
            "this model was fine-tuned on instructions: the last message must be from the user",
            param="messages",
        )

    def block(user_text: str) -> str:
        if instruction:
            return data.render_instruction_prompt(instruction, user_text or None)
        return data.render_instruction_prompt(user_text)

    parts: list[str] = []
    pending: list[str] = []
    for message in turns:
        if message.role == "user":
            pending.append(message.content)
        else:
            parts.append(block("\n\n".join(pending)) + message.content + "\n\n")
            pending = []
    parts.append(block("\n\n".join(pending)))
    return "".join(parts)
