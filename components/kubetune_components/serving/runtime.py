"""A published model, loaded for serving: the runtime the OpenAI API generates with.

`ModelRuntime` ties the seams together: `artifacts` (what a model directory holds and loading it),
`chat` (messages rendered into the prompt the model was fine-tuned on), `generation` (the rows of a
Hugging Face `generate` call: sampling, stop sequences, token limits, cancellation) and `streams`
(text deltas handed to a thread or an event loop). It fits prompts into the context window and
runs generations on a thread pool, non-streamed ones micro-batched when batching is on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components.common import models
from kubetune_components.common.errors import ModelLoadError
from kubetune_components.serving.artifacts import (
    ModelArtifact,
    context_size,
    inspect_model_dir,
    load_model,
    load_serving_tokenizer,
)
from kubetune_components.serving.batching import MicroBatcher
from kubetune_components.serving.chat import drop_oldest_turn, prompt_style, render_chat_text
from kubetune_components.serving.config import RuntimeLimits
from kubetune_components.serving.generation import GenerationRow, generate_rows
from kubetune_components.serving.requests import (
    ChatMessage,
    Completion,
    PreparedPrompt,
    RequestError,
    SamplingParams,
)
from kubetune_components.serving.streams import AsyncTextStream, TextStream

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 4
"""Generations running at once (streams and batches); more wait for a thread."""
UNKNOWN_CONTEXT_MAX_TOKENS = 256
"""Token limit of a request without max_tokens when the model does not say how long its context is."""


@dataclass
class _Job:
    prompt: PreparedPrompt
    params: SamplingParams
    result: Completion | None = field(default=None)
    cancelled: threading.Event | None = None
    adapter: str | None = None


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
        self.prompt_style = prompt_style(artifact.dataset_format if artifact is not None else None, tokenizer)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        eos_ids.update(int(token) for token in (eos if isinstance(eos, list) else [eos]) if token is not None)
        self.eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.adapter: str | None = None
        """The named adapter of a shared base model this runtime generates with (`adapters`)."""
        self.generation_lock: threading.Lock | None = None
        """Held around every `generate` call when set: a shared base's adapters are chosen per call
        by hooks on its layers, which concurrent calls would trample."""
        self.in_flight = 0
        """Async and streamed requests generating or waiting to: what unloading an adapter waits for."""
        self._in_flight_lock = threading.Lock()
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
        target = torch.device(device) if device is not None else models.pick_device()
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
        text = render_chat_text(messages, self.prompt_style, self.tokenizer)
        # the instruction format is plain text; a chat template writes its own special tokens
        return self._encode(text, add_special_tokens=self.prompt_style == "instruction")

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
        while len(ids) > limit and (dropped := drop_oldest_turn(kept)) is not None:
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
        adapter: str | None = None,
    ) -> GenerationRow:
        return GenerationRow(
            prompt,
            params,
            self._room(prompt, params),
            self.tokenizer,
            self.eos_ids,
            on_delta,
            cancelled,
            adapter=adapter,
        )

    def run_rows(self, rows: Sequence[GenerationRow]) -> None:
        """One `generate` call over left-padded rows (blocking; call it off the event loop)."""
        if self.generation_lock is None:
            generate_rows(self.model, rows, pad_id=self.pad_id, eos_ids=self.eos_ids, device=self.device)
            return
        with self.generation_lock:
            generate_rows(self.model, rows, pad_id=self.pad_id, eos_ids=self.eos_ids, device=self.device)

    def _run_jobs(self, jobs: Sequence[_Job]) -> list[Completion]:
        rows = [
            self._row(job.prompt, job.params, cancelled=job.cancelled, adapter=job.adapter) for job in jobs
        ]
        self.run_rows(rows)
        return [row.completion() for row in rows]

    def generate(self, prompt: PreparedPrompt, params: SamplingParams) -> Completion:
        """Blocking generation of one request."""
        return self._run_jobs([_Job(prompt, params, adapter=self.adapter)])[0]

    def generate_batch(self, requests: Sequence[tuple[PreparedPrompt, SamplingParams]]) -> list[Completion]:
        """Blocking generation of several requests in one padded batch."""
        return self._run_jobs([_Job(prompt, params, adapter=self.adapter) for prompt, params in requests])

    def stream(self, prompt: PreparedPrompt, params: SamplingParams) -> TextStream:
        """Generate on a worker thread; iterate the returned stream for the text deltas."""
        stream = TextStream()
        row = self._row(prompt, params, stream.put, stream.cancelled, self.adapter)
        self._count(1)
        self.executor.submit(self._stream_worker, row, stream)
        return stream

    def _count(self, change: int) -> None:
        with self._in_flight_lock:
            self.in_flight += change

    def _stream_worker(self, row: GenerationRow, stream: TextStream | AsyncTextStream) -> None:
        try:
            self.run_rows([row])
            stream.close(row.completion())
        except BaseException as error:
            logger.exception("generation failed")
            stream.close(None, error)
        finally:
            self._count(-1)

    async def agenerate(self, prompt: PreparedPrompt, params: SamplingParams) -> Completion:
        """Generation off the event loop; with batching on, requests share `generate` calls.

        Cancelling the awaiting task stops the generation at its next token: the worker thread
        would otherwise run on to max_tokens for a caller that is gone."""
        self._room(prompt, params)  # refuse what cannot run before it waits for a batch
        job = _Job(prompt, params, cancelled=threading.Event(), adapter=self.adapter)
        self._count(1)
        try:
            if self.batcher is not None:
                return await self.batcher.submit(job)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, lambda: self._run_jobs([job])[0])
        except asyncio.CancelledError:
            assert job.cancelled is not None
            job.cancelled.set()
            raise
        finally:
            self._count(-1)

    def astream(self, prompt: PreparedPrompt, params: SamplingParams) -> AsyncTextStream:
        """Like `stream`, for an event loop: `async for delta in runtime.astream(...)`."""
        stream = AsyncTextStream(asyncio.get_running_loop())
        row = self._row(prompt, params, stream.put, stream.cancelled, self.adapter)
        self._count(1)
        self.executor.submit(self._stream_worker, row, stream)
        return stream
