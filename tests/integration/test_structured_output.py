"""Structured output with the official ``openai`` client, through the real gateway to a real model
server (uvicorn on loopback) serving the random tiny Llama, which left to itself writes no JSON.

``response_format`` (json_object and json_schema, plain and streamed) answers validate with
``jsonschema``; a schema constrained decoding cannot enforce is refused with a 400 naming the
keyword; the client's tool-calling loop (call, run the tool, send its result back) works.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from fixtures.model_server import tiny_model_server

from asgi_server import serve_app
from kubetune.gateway.app import create_app as create_gateway
from kubetune.gateway.config import GatewayConfig
from kubetune_contract.openai import HIDDEN_REASONING_FIELD

DEPLOYMENT = "support-bot"
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "queue": {"enum": ["billing", "technical", "account"]},
        "urgent": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "maxItems": 3},
    },
    "required": ["queue", "urgent", "summary", "tags"],
}
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
NAMED_CHOICE: Any = {"type": "function", "function": {"name": "get_weather"}}
SEEDS = range(6)


@pytest.fixture(scope="module")
def version_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A model server (one version) serving the random tiny model."""
    with tiny_model_server(tmp_path_factory.mktemp("tiny"), DEPLOYMENT) as url:
        yield url


@pytest.fixture(scope="module")
def client(version_url: str) -> Iterator[openai.OpenAI]:
    """The official client against a gateway in front of that version."""
    config = GatewayConfig.model_validate(
        {
            "deployment": DEPLOYMENT,
            "namespace": "default",
            "versions": [{"name": "v1", "url": version_url, "weight": 100}],
            "timeouts": {"firstByteSeconds": 60, "responseSeconds": 120, "streamIdleSeconds": 60},
        }
    )
    with serve_app(create_gateway(config)) as gateway_url:
        api = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield api
        api.close()


def ask(client: openai.OpenAI, seed: int, **fields: Any) -> Any:
    settings: dict[str, Any] = {"max_tokens": 120, "temperature": 1.0, "seed": seed, **fields}
    return client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "File this: my invoice is wrong"}], **settings
    )


def test_the_tiny_model_writes_no_json_of_its_own(client: openai.OpenAI) -> None:
    """What the constraint is measured against: without it the answers do not parse."""
    for seed in SEEDS:
        text = ask(client, seed, max_tokens=40).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_schema_answers_validate_plain_and_streamed(client: openai.OpenAI) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA}}
    for seed in SEEDS:
        answer = ask(client, seed, response_format=response_format).choices[0]
        assert answer.finish_reason == "stop"
        jsonschema.validate(json.loads(answer.message.content or ""), TICKET_SCHEMA)

        stream = ask(client, seed, response_format=response_format, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == answer.message.content  # same seed, same constrained answer


def test_json_object_answers_are_json_objects(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        answer = ask(client, seed, response_format={"type": "json_object"}, max_tokens=200).choices[0]
        if answer.finish_reason == "stop":
            assert isinstance(json.loads(answer.message.content or ""), dict)
        else:  # an object the model kept adding keys to until max_tokens: cut, and said so
            assert answer.finish_reason == "length"


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        (
            {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}},
            "response_format.json_schema.schema.properties.age.minimum",
        ),
        ({"type": "string", "format": "email"}, "response_format.json_schema.schema.format"),
        ({"type": "object", "not": {"required": ["a"]}}, "response_format.json_schema.schema.not"),
        (
            {"type": "object", "required": ["a"], "properties": {}},
            "response_format.json_schema.schema.required",
        ),
        ({"type": "bogus"}, "response_format.json_schema.schema.type"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_naming_the_keyword(
    client: openai.OpenAI, schema: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(
            client, 0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        )
    assert refused.value.param == param
    assert param in refused.value.message


def test_the_tool_calling_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=DEPLOYMENT, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})})
    second = client.chat.completions.create(
        model=DEPLOYMENT, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content


def test_a_named_tool_choice_streams_its_call_whole(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Oslo weather?"}],
        tools=[WEATHER_TOOL],
        tool_choice=NAMED_CHOICE,
        stream=True,
        seed=3,
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments or ""), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(chunk.choices[0].delta.content for chunk in chunks)


def test_under_tool_choice_auto_an_answer_is_a_valid_call_or_text(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        choice = ask(client, seed, tools=[WEATHER_TOOL], max_tokens=60).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            arguments = json.loads(choice.message.tool_calls[0].function.arguments)
            jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
        else:
            assert not (choice.message.content or "").lstrip().startswith("{")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
def test_bad_tool_requests_are_refused_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, 0, **fields)
    assert refused.value.param == param


def test_a_tool_message_must_answer_an_earlier_call(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "x", "content": "1"},
            ],
        )
    assert refused.value.param == "messages[1].tool_call_id"


def markers_in(text: str, hidden_length: int) -> tuple[str, str, int]:
    """Three-character open and close markers that occur first ``hidden_length`` apart in ``text``."""
    for start in range(len(text) - hidden_length - 3):
        open_marker, close_marker = (
            text[start : start + 3],
            text[start + hidden_length - 3 : start + hidden_length],
        )
        if (
            text.find(open_marker) == start
            and text.find(close_marker, start + 3) == start + hidden_length - 3
        ):
            return open_marker, close_marker, start
    raise AssertionError(f"no markers in {text!r}")


def test_hidden_reasoning_never_reaches_the_client_and_is_counted(version_url: str) -> None:
    """Sent to the version as the gateway sends it for a prompt with ``reasoning: {mode: hidden}``;
    the markers are taken from what the model writes anyway (seeded), so the hidden text is real."""
    version = openai.OpenAI(base_url=f"{version_url}/v1", api_key="unused", max_retries=0, timeout=120)
    plain = ask(version, 7, max_tokens=40).choices[0].message.content or ""
    open_marker, close_marker, start = markers_in(plain, 15)
    expected = plain[:start] + plain[start + 15 :]
    hidden = {HIDDEN_REASONING_FIELD: {"open": open_marker, "close": close_marker}}

    answer = ask(version, 7, max_tokens=40, extra_body=hidden)
    assert answer.choices[0].message.content == expected
    assert answer.usage is not None and answer.usage.completion_tokens == 40
    details = answer.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens is not None and details.reasoning_tokens > 0

    chunks = list(ask(version, 7, max_tokens=40, extra_body=hidden, stream=True))
    deltas = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(deltas) == expected
    version.close()
