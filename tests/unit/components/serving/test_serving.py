"""The serving runtime and its OpenAI-compatible API, in process, on tiny models.

The adapter (conftest's ``published_adapter``) is trained and published by the real finetune and
publish steps (two optimizer steps on the random tiny Llama), so the runtime reads the same manifest
a FineTuneJob writes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from kubetune_components import data, quantize
from kubetune_components.common import models, storage
from kubetune_components.common.artifacts import MANIFEST_FILE
from kubetune_components.common.errors import ConfigError, ModelLoadError
from kubetune_components.finetune import train as ft
from kubetune_components.serving.artifacts import inspect_model_dir
from kubetune_components.serving.batching import RECENT_BATCHES, MicroBatcher
from kubetune_components.serving.chat import render_instruction_chat
from kubetune_components.serving.config import RuntimeLimits, ServingSettings
from kubetune_components.serving.generation import GenerationRow
from kubetune_components.serving.openai_api import RuntimeSlot, ServingIdentity, create_app
from kubetune_components.serving.requests import ChatMessage, PreparedPrompt, RequestError, SamplingParams
from kubetune_components.serving.runtime import ModelRuntime
from tiny_adapter import ROUTING_INSTRUCTION

INSTRUCTION = ROUTING_INSTRUCTION  # what conftest's published_adapter is trained on
GREEDY = SamplingParams(max_tokens=12, temperature=0)
CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_module() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_runtime(published_adapter: Path) -> Iterator[ModelRuntime]:
    runtime = ModelRuntime.load(published_adapter, device="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def chat_runtime(tiny_model_dir: Path) -> Iterator[ModelRuntime]:
    """The random tiny Llama as a full model without a manifest: chat goes through its chat template."""
    runtime = ModelRuntime.load(tiny_model_dir, device="cpu")
    yield runtime
    runtime.close()


def small_runtime(runtime: ModelRuntime, **limits: Any) -> ModelRuntime:
    """The same model and tokenizer under other limits."""
    return ModelRuntime(
        runtime.model, runtime.tokenizer, artifact=runtime.artifact, limits=RuntimeLimits(**limits)
    )


# --------------------------------------------------------------------------------------------------
# Loading.


def test_published_adapter_loads_onto_its_base_and_generates_like_the_trained_model(
    published_adapter: Path, adapter_runtime: ModelRuntime, chat_runtime: ModelRuntime, tiny_model_dir: Path
) -> None:
    artifact = inspect_model_dir(published_adapter)
    assert (artifact.kind, artifact.base_uri, artifact.dataset_format) == (
        "peft-adapter",
        str(tiny_model_dir),
        "instruction",
    )
    assert adapter_runtime.prompt_style == "instruction"

    prompt = adapter_runtime.prepare_completion(
        data.render_instruction_prompt(INSTRUCTION, "ticket about billing")
    )
    reference = ft.load_trained_model(
        published_adapter.parent.parent.parent.parent / "workspace" / "trained", str(tiny_model_dir)
    )
    generate: Any = reference.generate  # type: ignore[operator]
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        output = generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=3,
        )
    expected = adapter_runtime.tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=True)

    first = adapter_runtime.generate(prompt, GREEDY)
    assert first.text == expected
    assert adapter_runtime.generate(prompt, GREEDY) == first  # greedy is deterministic
    assert first.prompt_tokens == len(prompt.token_ids)
    assert first.completion_tokens <= 12
    assert first.finish_reason in ("stop", "length")
    assert chat_runtime.generate(prompt, GREEDY).text != first.text  # the base alone answers otherwise


def test_quantized_model_follows_its_manifest_chain(
    tmp_path: Path, tiny_model_dir: Path, published_adapter: Path
) -> None:
    model = models.load_causal_lm(str(tiny_model_dir))
    quantize.apply_quantization(model, "int8-weight-only", 128, "cpu")
    out = tmp_path / "int8"
    fmt = quantize.save_quantized(
        model, models.load_tokenizer(str(tiny_model_dir)), out, {"method": "int8-weight-only"}
    )
    parent = json.loads((published_adapter / MANIFEST_FILE).read_text())
    storage.atomic_write_json(
        out / MANIFEST_FILE, {"kind": "QuantizeJob", "artifact": {"format": fmt}, "parent": parent}
    )
    runtime = ModelRuntime.load(out, device="cpu")
    try:
        assert runtime.artifact is not None and runtime.artifact.kind == "quantized"
        assert runtime.prompt_style == "instruction"  # the source was fine-tuned on instructions
        prompt = runtime.prepare_chat([ChatMessage("user", "ticket about billing")])
        first = runtime.generate(prompt, GREEDY)
        assert first.completion_tokens >= 1
        assert runtime.generate(prompt, GREEDY).text == first.text
    finally:
        runtime.close()


def test_model_dirs_that_are_not_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds no model"):
        inspect_model_dir(tmp_path)
    storage.atomic_write_json(tmp_path / MANIFEST_FILE, {"artifact": {"format": "onnx"}})
    with pytest.raises(ModelLoadError, match=r"artifact\.format 'onnx' is not one of"):
        inspect_model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="is not a directory"):
        inspect_model_dir(tmp_path / "missing")


def test_settings_name_the_malformed_variable() -> None:
    settings = ServingSettings.from_env(
        {
            "KUBETUNE_DEPLOYMENT": "support-bot",
            "KUBETUNE_VERSION": "tuned",
            "KUBETUNE_MAX_PROMPT_TOKENS": "256",
            "KUBETUNE_CONTEXT_OVERFLOW": "refuse",
            "KUBETUNE_MAX_BATCH_SIZE": "8",
            "KUBETUNE_MAX_LATENCY_MS": "0",
        }
    )
    assert (settings.deployment, settings.version, settings.model_id, settings.model_dir) == (
        "support-bot",
        "tuned",
        "support-bot",
        None,
    )
    assert settings.limits == RuntimeLimits(256, "refuse", 8, 0)
    assert ServingSettings.from_env({}).limits == RuntimeLimits()
    with pytest.raises(ConfigError, match="KUBETUNE_CONTEXT_OVERFLOW must be one of truncate, refuse"):
        ServingSettings.from_env({"KUBETUNE_CONTEXT_OVERFLOW": "drop"})
    with pytest.raises(ConfigError, match="KUBETUNE_MAX_PROMPT_TOKENS must be an integer, got 'many'"):
        ServingSettings.from_env({"KUBETUNE_MAX_PROMPT_TOKENS": "many"})
    with pytest.raises(ConfigError, match="KUBETUNE_MAX_BATCH_SIZE must be at least 1, got 0"):
        ServingSettings.from_env({"KUBETUNE_MAX_BATCH_SIZE": "0"})


# --------------------------------------------------------------------------------------------------
# Generation.


def test_streamed_deltas_concatenate_to_the_non_streamed_text(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("My order has not arrived yet and")
    for params in (GREEDY, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=7)):
        whole = chat_runtime.generate(prompt, params)
        stream = chat_runtime.stream(prompt, params)
        deltas = list(stream)
        assert len(deltas) > 1  # token by token, not one final piece
        assert "".join(deltas) == whole.text
        assert stream.result == whole


async def test_async_stream_and_generate_agree(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("Thank you for your help with")
    stream = chat_runtime.astream(prompt, GREEDY)
    deltas = [delta async for delta in stream]
    whole = await chat_runtime.agenerate(prompt, GREEDY)
    assert "".join(deltas) == whole.text == chat_runtime.generate(prompt, GREEDY).text
    assert stream.result is not None and stream.result.completion_tokens == whole.completion_tokens


def test_stop_sequences_end_the_text_before_them(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("The weather today is")
    free = chat_runtime.generate(prompt, SamplingParams(max_tokens=20, temperature=0))
    assert len(free.text) > 8
    stop = free.text[5:8]
    stopped = chat_runtime.generate(
        prompt, SamplingParams(max_tokens=20, temperature=0, stop=(stop, "never"))
    )
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.finish_reason == "stop"
    stream = chat_runtime.stream(prompt, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    assert "".join(stream) == stopped.text


def test_seeded_sampling_repeats_and_temperature_zero_is_greedy(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("Once upon a time")
    seeded = [
        chat_runtime.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=seed)).text
        for seed in (1, 1, 2)
    ]
    assert seeded[0] == seeded[1]
    assert seeded[0] != seeded[2]
    greedy = chat_runtime.generate(prompt, GREEDY)
    generate: Any = chat_runtime.model.generate  # type: ignore[operator]
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        output = generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    new_tokens = output[0, ids.shape[1] :].tolist()
    assert greedy.text == chat_runtime.tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_max_tokens_and_the_context_end_give_length(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("Please reset my password because")
    result = chat_runtime.generate(prompt, SamplingParams(max_tokens=5, temperature=0))
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert chat_runtime.context_tokens == 512
    long_prompt = PreparedPrompt(tuple([1] + [300] * 508), 509)
    near_end = chat_runtime.generate(long_prompt, SamplingParams(max_tokens=50, temperature=0))
    assert near_end.completion_tokens <= 3
    with pytest.raises(RequestError, match="leave no room to generate"):
        chat_runtime.generate(PreparedPrompt(tuple([1] * 512), 512), GREEDY)


def test_rows_stop_at_eos_and_never_split_characters(chat_runtime: ModelRuntime) -> None:
    tokenizer = chat_runtime.tokenizer
    text = "Grüße 🙂 naïve café"
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas: list[str] = []
    row = GenerationRow(
        PreparedPrompt((1,), 1),
        SamplingParams(max_tokens=100),
        100,
        tokenizer,
        chat_runtime.eos_ids,
        deltas.append,
    )
    assert not any(row.accept(token) for token in token_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert row.accept(int(tokenizer.eos_token_id)) is True
    completion = row.completion()
    assert "".join(deltas) == completion.text == text
    assert (completion.finish_reason, completion.completion_tokens) == ("stop", len(token_ids))


def test_cancelled_stream_stops_generating(chat_runtime: ModelRuntime) -> None:
    prompt = chat_runtime.prepare_completion("The meeting is scheduled for")
    stream = chat_runtime.stream(prompt, SamplingParams(max_tokens=400, temperature=0))
    for index, _ in enumerate(stream):
        if index == 2:
            break
    assert stream.finished.wait(30)
    assert stream.result is not None and stream.result.completion_tokens < 50


# --------------------------------------------------------------------------------------------------
# The context window.


def test_long_completion_prompts_keep_bos_and_their_last_tokens_or_are_refused(
    chat_runtime: ModelRuntime,
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 4
    full = chat_runtime.prepare_completion(text).token_ids
    assert len(full) > 12
    truncating = small_runtime(chat_runtime, max_prompt_tokens=12)
    kept = truncating.prepare_completion(text)
    assert kept.token_ids == (full[0], *full[-11:])
    assert full[0] == chat_runtime.tokenizer.bos_token_id
    assert kept.truncated and kept.original_tokens == len(full)

    refusing = small_runtime(chat_runtime, max_prompt_tokens=12, context_overflow="refuse")
    with pytest.raises(RequestError) as refused:
        refusing.prepare_completion(text)
    assert refused.value.param == "prompt"
    assert refused.value.code == "context_length_exceeded"
    assert (
        f"the prompt is {len(full)} tokens long, more than the 12 max prompt tokens" in refused.value.message
    )


def test_long_chats_lose_their_oldest_turns_then_their_start(chat_runtime: ModelRuntime) -> None:
    system = ChatMessage("system", "You are a support assistant.")
    history = [
        ChatMessage("user", "first question about billing"),
        ChatMessage("assistant", "first answer"),
        ChatMessage("user", "second question about shipping"),
        ChatMessage("assistant", "second answer"),
    ]
    last = ChatMessage("user", "where is my parcel?")
    messages = [system, *history, last]
    full = chat_runtime.render_chat(messages)
    without_first_exchange = chat_runtime.render_chat([system, *history[2:], last])
    only_last = chat_runtime.render_chat([system, last])

    fits_after_one_drop = small_runtime(chat_runtime, max_prompt_tokens=len(without_first_exchange))
    prepared = fits_after_one_drop.prepare_chat(messages)
    assert list(prepared.token_ids) == without_first_exchange
    assert prepared.original_tokens == len(full)

    tight = small_runtime(chat_runtime, max_prompt_tokens=len(only_last) - 3)
    assert list(tight.prepare_chat(messages).token_ids) == only_last[3:]

    refusing = small_runtime(chat_runtime, max_prompt_tokens=len(only_last), context_overflow="refuse")
    with pytest.raises(RequestError, match=f"the prompt is {len(full)} tokens long") as refused:
        refusing.prepare_chat(messages)
    assert refused.value.param == "messages"


def test_chat_for_an_instruction_model_uses_the_training_format(adapter_runtime: ModelRuntime) -> None:
    messages = [ChatMessage("system", INSTRUCTION), ChatMessage("user", "ticket about billing")]
    assert render_instruction_chat(messages) == data.render_instruction_prompt(
        INSTRUCTION, "ticket about billing"
    )
    expected = adapter_runtime.tokenizer(data.render_instruction_prompt(INSTRUCTION, "ticket about billing"))
    assert list(adapter_runtime.prepare_chat(messages).token_ids) == expected["input_ids"]
    few_shot = render_instruction_chat(
        [
            messages[0],
            ChatMessage("user", "ticket about a refund"),
            ChatMessage("assistant", "billing"),
            messages[1],
        ]
    )
    assert few_shot == (
        data.render_instruction_prompt(INSTRUCTION, "ticket about a refund")
        + "billing\n\n"
        + data.render_instruction_prompt(INSTRUCTION, "ticket about billing")
    )
    assert render_instruction_chat([ChatMessage("user", "hi")]) == data.render_instruction_prompt("hi")
    with pytest.raises(RequestError, match="the last message must be from the user"):
        adapter_runtime.prepare_chat([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])


# --------------------------------------------------------------------------------------------------
# Batching.


def test_batched_greedy_generations_equal_unbatched_ones(chat_runtime: ModelRuntime) -> None:
    prompts = [
        chat_runtime.prepare_completion(text)
        for text in ("Hello", "My order has not arrived yet and I am worried", "The weather today is")
    ]
    params = [
        GREEDY,
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=9, temperature=0),
    ]
    alone = [chat_runtime.generate(prompt, param) for prompt, param in zip(prompts, params, strict=True)]
    together = chat_runtime.generate_batch(list(zip(prompts, params, strict=True)))
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]


async def test_concurrent_requests_share_a_batch(chat_runtime: ModelRuntime) -> None:
    batching = small_runtime(chat_runtime, max_batch_size=4, max_latency_ms=500)
    try:
        prompts = [
            batching.prepare_completion(text) for text in ("Hello", "Thank you for", "Once upon a time")
        ]
        results = await asyncio.gather(*(batching.agenerate(prompt, GREEDY) for prompt in prompts))
        assert batching.batcher is not None and list(batching.batcher.batch_sizes) == [3]
        assert [r.text for r in results] == [chat_runtime.generate(p, GREEDY).text for p in prompts]
    finally:
        batching.close()


# --------------------------------------------------------------------------------------------------
# The OpenAI API.


def api_client(runtime: ModelRuntime | None, version: str) -> httpx.AsyncClient:
    slot = RuntimeSlot(ServingIdentity("support-bot", version, "support-bot"))
    if runtime is not None:
        slot.set_runtime(runtime)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(slot)), base_url="http://serving")


def sse_events(body: str) -> list[Any]:
    events: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"deployment": "support-bot", **labels}) or 0.0


async def test_chat_completions_answer_plain_and_streamed(chat_runtime: ModelRuntime) -> None:
    request = {
        "model": "support-bot",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is my order?"},
        ],
        "max_tokens": 10,
        "temperature": 0,
    }
    async with api_client(chat_runtime, "chat-v1") as client:
        plain = await client.post("/v1/chat/completions", json=request)
        streamed = await client.post(
            "/v1/chat/completions",
            json={**request, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "support-bot"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert plain.headers["x-kubetune-version"] == "chat-v1"

    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [
        c["choices"][0]["delta"]["content"] for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"]
    ]
    assert len(content) > 1
    assert "".join(content) == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


async def test_completions_and_models(chat_runtime: ModelRuntime) -> None:
    async with api_client(chat_runtime, "completions-v1") as client:
        plain = await client.post(
            "/v1/completions", json={"prompt": "Hello", "max_tokens": 6, "temperature": 0}
        )
        streamed = await client.post(
            "/v1/completions", json={"prompt": ["Hello"], "max_tokens": 6, "temperature": 0, "stream": True}
        )
        listed = await client.get("/v1/models")
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["text"]
    assert plain.json()["object"] == "text_completion"
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    assert all(event["object"] == "text_completion" for event in events[:-1])
    assert "".join(event["choices"][0]["text"] for event in events[:-1]) == text
    assert events[-2]["choices"][0]["finish_reason"] == plain.json()["choices"][0]["finish_reason"]
    models_body = listed.json()
    assert models_body["object"] == "list"
    assert [m["id"] for m in models_body["data"]] == ["support-bot"]


@pytest.mark.parametrize(
    ("path", "request_body", "param", "message"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            "temperature",
            "temperature must be between 0 and 2, got 3",
        ),
        ("/v1/chat/completions", {"model": "x"}, "messages", "messages is required"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
            "messages[0].role 'robot' is not one of system, developer, user, assistant",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            "messages[0].content is required",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_p": 0},
            "top_p",
            "top_p must be greater than 0 and at most 1",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "n": 2},
            "n",
            "n is not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "web_search_options": {}},
            "web_search_options",
            "Unrecognized request argument supplied: web_search_options",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
        ("/v1/completions", {"prompt": 5}, "prompt", "prompt must be a string"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", ""]}, "stop", "stop sequences must not be empty"),
        (
            "/v1/completions",
            {"prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options",
            "stream_options is only allowed when stream is true",
        ),
    ],
)
async def test_bad_requests_get_openai_errors_naming_the_field(
    chat_runtime: ModelRuntime, path: str, request_body: dict[str, Any], param: str, message: str
) -> None:
    async with api_client(chat_runtime, "errors-v1") as client:
        response = await client.post(path, json=request_body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]


async def test_unknown_paths_methods_bodies_and_an_unloaded_model(chat_runtime: ModelRuntime) -> None:
    async with api_client(chat_runtime, "errors-v2") as client:
        missing = await client.get("/v1/embeddings")
        elsewhere = await client.post("/nothing/here", json={})
        wrong_method = await client.get("/v1/chat/completions")
        not_json = await client.post("/v1/chat/completions", content=b"{not json")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert "GET /v1/embeddings" in missing.json()["error"]["message"]
    assert elsewhere.status_code == 404 and "error" in elsewhere.json()
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "method_not_allowed")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]

    async with api_client(None, "loading-v1") as client:
        loading = await client.post("/v1/completions", json={"prompt": "hi"})
    assert loading.status_code == 503
    assert loading.json()["error"]["code"] == "model_not_ready"


async def test_context_refusal_and_truncation_over_http(chat_runtime: ModelRuntime) -> None:
    long_text = "please help me with my order " * 10
    refusing = small_runtime(chat_runtime, max_prompt_tokens=16, context_overflow="refuse")
    truncating = small_runtime(chat_runtime, max_prompt_tokens=16)
    request = {"messages": [{"role": "user", "content": long_text}], "max_tokens": 2}
    async with api_client(refusing, "context-v1") as client:
        refused = await client.post("/v1/chat/completions", json=request)
    async with api_client(truncating, "context-v2") as client:
        truncated = await client.post("/v1/chat/completions", json=request)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert "more than the 16 max prompt tokens" in error["message"]
    assert truncated.status_code == 200
    assert truncated.json()["usage"]["prompt_tokens"] == 16
    assert int(truncated.headers["x-kubetune-prompt-tokens-dropped"]) > 0


async def test_metrics_are_counted_per_version(chat_runtime: ModelRuntime) -> None:
    request = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
    usages = []
    async with api_client(chat_runtime, "metrics-a") as client:
        for _ in range(2):
            usages.append((await client.post("/v1/chat/completions", json=request)).json()["usage"])
        await client.post("/v1/chat/completions", json={**request, "temperature": -1})
    async with api_client(chat_runtime, "metrics-b") as client:
        streamed = await client.post("/v1/chat/completions", json={**request, "stream": True})
        assert streamed.status_code == 200

    endpoint = "/v1/chat/completions"
    assert counter("kubetune_serving_requests_total", version="metrics-a", endpoint=endpoint, code="200") == 2
    assert counter("kubetune_serving_requests_total", version="metrics-a", endpoint=endpoint, code="400") == 1
    assert counter("kubetune_serving_requests_total", version="metrics-b", endpoint=endpoint, code="200") == 1
    assert counter("kubetune_serving_tokens_total", version="metrics-a", direction="in") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert counter("kubetune_serving_tokens_total", version="metrics-a", direction="out") == sum(
        u["completion_tokens"] for u in usages
    )
    assert counter("kubetune_serving_time_to_first_token_seconds_count", version="metrics-a") == 2
    assert counter("kubetune_serving_time_to_first_token_seconds_count", version="metrics-b") == 1
    assert (
        counter("kubetune_serving_request_duration_seconds_count", version="metrics-a", endpoint=endpoint)
        == 3
    )


class RecordingRuntime(ModelRuntime):
    """Keeps the rows it generated, to see how far they got."""

    rows: list[GenerationRow]

    def run_rows(self, rows: Sequence[GenerationRow]) -> None:
        self.rows.extend(rows)
        super().run_rows(rows)


async def test_a_client_that_goes_away_stops_its_stream(chat_runtime: ModelRuntime) -> None:
    runtime = RecordingRuntime(chat_runtime.model, chat_runtime.tokenizer)
    runtime.rows = []
    slot = RuntimeSlot(ServingIdentity("support-bot", "gone-v1", "support-bot"))
    slot.set_runtime(runtime)
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    body = json.dumps(request)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": body.encode(), "more_body": False})
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) == 3:
                inbox.put_nowait({"type": "http.disconnect"})

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("serving", 80),
    }
    try:
        await asyncio.wait_for(create_app(slot)(scope, receive, send), 30)
        assert not any(b"[DONE]" in chunk for chunk in chunks)
        assert counter("kubetune_serving_requests_total", version="gone-v1", endpoint=CHAT, code="499") == 1
        deadline = time.monotonic() + 30
        while not runtime.rows or not runtime.rows[0].done:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert runtime.rows[0].generated < 100  # stopped long before max_tokens
    finally:
        runtime.close()


async def test_a_client_that_goes_away_stops_its_plain_generation(chat_runtime: ModelRuntime) -> None:
    """A non-streamed request whose client disconnects (a gateway timeout, say) stops generating
    instead of holding a worker thread until max_tokens."""
    runtime = RecordingRuntime(chat_runtime.model, chat_runtime.tokenizer)
    runtime.rows = []
    slot = RuntimeSlot(ServingIdentity("support-bot", "gone-plain-v1", "support-bot"))
    slot.set_runtime(runtime)
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "temperature": 0}
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "http.request", "body": json.dumps(request).encode(), "more_body": False})
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def disconnect_once_generating() -> None:
        while not runtime.rows or runtime.rows[0].generated < 3:
            await asyncio.sleep(0.005)
        inbox.put_nowait({"type": "http.disconnect"})

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("serving", 80),
    }
    watcher = asyncio.create_task(disconnect_once_generating())
    try:
        await asyncio.wait_for(create_app(slot)(scope, receive, send), 30)
        deadline = time.monotonic() + 30
        while not runtime.rows[0].done:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert runtime.rows[0].generated < 100  # stopped long before max_tokens
        labels = {"version": "gone-plain-v1", "endpoint": CHAT}
        assert counter("kubetune_serving_requests_total", **labels, code="499") == 1
        assert counter("kubetune_serving_requests_total", **labels, code="200") == 0
    finally:
        watcher.cancel()
        runtime.close()


async def test_the_batcher_keeps_only_recent_batch_sizes() -> None:
    """A long-running server records batch sizes for debugging without growing without bound."""
    executor = ThreadPoolExecutor(max_workers=1)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: [item * 2 for item in items], executor, max_batch_size=4, max_latency_s=0
    )
    try:
        for item in range(RECENT_BATCHES + 5):
            assert await batcher.submit(item) == item * 2
        assert len(batcher.batch_sizes) == RECENT_BATCHES
        assert list(batcher.batch_sizes)[-1] == 1
    finally:
        executor.shutdown()


async def test_a_reply_sent_back_as_the_openai_client_dumps_it_is_accepted(
    chat_runtime: ModelRuntime,
) -> None:
    """`messages.append(reply.choices[0].message.model_dump())` adds null refusal, audio,
    tool_calls, ... to the assistant turn; they carry nothing, so the turn is taken as it is."""
    from openai.types.chat import ChatCompletionMessage

    async with api_client(chat_runtime, "multi-turn-v1") as client:
        first = await client.post(
            CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        )
        reply = ChatCompletionMessage.model_validate(first.json()["choices"][0]["message"]).model_dump()
        conversation = [{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "more"}]
        second = await client.post(CHAT, json={"messages": conversation, "max_tokens": 3, "temperature": 0})
        with_tools = await client.post(
            CHAT,
            json={
                "messages": [*conversation[:1], {**reply, "tool_calls": [{"id": "c1"}]}, conversation[2]],
                "max_tokens": 3,
            },
        )
    assert second.status_code == 200, second.text
    assert with_tools.status_code == 400
    assert with_tools.json()["error"]["param"] == "messages[1].tool_calls[0].function"
