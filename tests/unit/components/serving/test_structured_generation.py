"""Constrained decoding and hidden reasoning inside the generation rows, on the random tiny Llama.

What lm-format-enforcer can enforce is decided before generating (``enforceable_schema``); rows with
and without a constraint share a batch; hidden reasoning is cut out of the deltas as they are sent,
with markers split across tokens held back until they are known."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kubetune_components.serving.constrained import (
    JsonConstraint,
    RowConstraint,
    ToolCallOrText,
    UnenforceableSchema,
    enforceable_schema,
    tool_call_schema,
)
from kubetune_components.serving.generation import GenerationRow, hide_reasoning
from kubetune_components.serving.requests import ChatMessage, PreparedPrompt, SamplingParams
from kubetune_components.serving.runtime import ModelRuntime

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "quantity": {"type": "integer"},
        "gift": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "maxItems": 2},
    },
    "required": ["sku", "quantity", "gift", "note", "lines"],
    "$defs": {"line": {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}},
}


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> Iterator[ModelRuntime]:
    loaded = ModelRuntime.load(tiny_model_dir, device="cpu")
    yield loaded
    loaded.close()


@pytest.mark.parametrize(
    ("schema", "param", "wording"),
    [
        ({"type": "integer", "minimum": 1}, "s.minimum", 'the keyword "minimum" cannot be enforced'),
        ({"type": "object", "patternProperties": {}}, "s.patternProperties", "cannot be enforced"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "format": "date"}}},
            "s.properties.a.format",
            'the keyword "format"',
        ),
        ({"type": "array", "items": {"type": "number", "multipleOf": 2}}, "s.items.multipleOf", "multipleOf"),
        ({"type": "object", "required": ["b"], "properties": {"a": {"type": "string"}}}, "s.required", "'b'"),
        ({"$ref": "#/$defs/missing"}, "s.$ref", "must name an entry"),
        ({"const": 3}, "s.const", "only a string const"),
        ({"enum": ["a", 1]}, "s.enum", "strings or of numbers"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "s.pattern", "cannot be combined"),
        ({}, "s", "allows any JSON value"),
        ({"type": "object", "properties": {"a": {}}}, "s.properties.a", None),
        (
            {"type": "object", "properties": {"a": {"description": "no type"}}},
            "s.properties.a",
            "needs a type",
        ),
        ({"type": 5}, "s.type", "is not a valid JSON Schema"),
        (["type"], "s", "must be an object"),
    ],
)
def test_a_schema_is_refused_where_enforcement_would_fall_short(
    schema: Any, param: str, wording: str | None
) -> None:
    if wording is None:  # an empty subschema (any value) is fine below the top
        enforceable_schema(schema, "s")
        return
    with pytest.raises(UnenforceableSchema) as refused:
        enforceable_schema(schema, "s")
    assert refused.value.param == param
    assert refused.value.message.startswith(f"{param}: ")
    assert wording in refused.value.message


def test_constrained_rows_validate_next_to_free_rows_in_one_batch(runtime: ModelRuntime) -> None:
    enforceable_schema(ORDER_SCHEMA, "schema")
    prompt = runtime.prepare_chat([ChatMessage("user", "order please")])
    constrained = SamplingParams(max_tokens=150, temperature=1.0, constraint=JsonConstraint.of(ORDER_SCHEMA))
    requests = [(prompt, SamplingParams(max_tokens=150, temperature=1.0, seed=seed)) for seed in range(3)]
    requests += [(prompt, replace(constrained, seed=seed)) for seed in range(6)]
    completions = runtime.generate_batch(requests)
    for completion in completions[3:]:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), ORDER_SCHEMA)
    free = [completion.text for completion in completions[:3]]
    assert all(not text.lstrip().startswith("{") for text in free)


def test_tool_choice_auto_lets_the_first_token_choose_a_call_or_text(runtime: ModelRuntime) -> None:
    calls = JsonConstraint.of(tool_call_schema([("lookup", {"type": "object", "properties": {}})]))
    tokenizer = runtime.tokenizer
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    word = tokenizer.encode("Hello", add_special_tokens=False)[0]

    as_text = RowConstraint(ToolCallOrText(calls), tokenizer, runtime.eos_ids)
    first = as_text.allowed([])
    assert first is not None and brace in first and word in first
    as_text.accepted(word)
    assert as_text.allowed([word]) is None  # free text from here on

    as_call = RowConstraint(ToolCallOrText(calls), tokenizer, runtime.eos_ids)
    as_call.accepted(brace)
    following = as_call.allowed([brace])
    assert following is not None and word not in following
    assert {str(tokenizer.decode([token])).strip()[:1] for token in following} <= {"", '"'}

    prompt = runtime.prepare_chat([ChatMessage("user", "hello")])
    for seed in range(6):
        params = SamplingParams(max_tokens=30, temperature=1.0, seed=seed, constraint=ToolCallOrText(calls))
        text = runtime.generate(prompt, params).text
        if text.lstrip().startswith("{"):
            assert json.loads(text) == {"name": "lookup", "arguments": {}}


@pytest.mark.parametrize(
    ("text", "visible", "open_at_end"),
    [
        ("a<think>b</think>c", "ac", False),
        ("<think>b</think>c<think>d</think>e", "ce", False),
        ("a<think>unfinished", "a", True),
        ("a</think>b", "a</think>b", False),
        ("plain", "plain", False),
    ],
)
def test_hide_reasoning_cuts_every_section(text: str, visible: str, open_at_end: bool) -> None:
    assert hide_reasoning(text, "<think>", "</think>") == (visible, open_at_end)


def test_deltas_never_carry_reasoning_even_when_markers_span_tokens(runtime: ModelRuntime) -> None:
    tokenizer = runtime.tokenizer
    text = "Sure. <think>the secret plan</think> The answer is 4."
    tokens = tokenizer.encode(text, add_special_tokens=False)
    marker_tokens = tokenizer.encode("<think>", add_special_tokens=False)
    assert len(marker_tokens) > 1, "the marker is split across tokens, which is the case under test"
    deltas: list[str] = []
    params = SamplingParams(max_tokens=len(tokens), hidden_reasoning=("<think>", "</think>"))
    row = GenerationRow(
        PreparedPrompt((1,), 1), params, len(tokens), tokenizer, runtime.eos_ids, on_delta=deltas.append
    )
    for token in tokens:
        row.accept(token)
    completion = row.completion()
    assert "".join(deltas) == completion.text == "Sure.  The answer is 4."
    assert not any(part in delta for delta in deltas for part in ("<", "secret", "think"))
    hidden_tokens = len(tokenizer.encode("<think>the secret plan</think>", add_special_tokens=False))
    # the tokens that spell the section, give or take one a marker shares with the text beside it
    assert abs(completion.reasoning_tokens - hidden_tokens) <= 1
    assert completion.completion_tokens == len(tokens)
