"""The OpenAI request models of kubetune_contract are the one protocol of the gateway and the model
server: a body that breaks it gets the same message and field from both, and what the protocol
leaves open (unknown fields, roles, content parts) the gateway forwards for the server to judge."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.gateway.errors import GatewayError
from kubetune.gateway.generation import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, parse_openai_request
from kubetune_components.serving.openai_requests import ApiError, chat_messages, parse_generation_request
from kubetune_contract.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestFieldError,
    parse_request,
)

HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("chat", "body", "param", "message"),
    [
        (
            True,
            {"messages": HELLO, "temperature": 2.5},
            "temperature",
            "temperature must be between 0 and 2, got 2.5",
        ),
        (
            True,
            {"messages": HELLO, "temperature": "hot"},
            "temperature",
            "temperature must be a number, got a string",
        ),
        (True, {"messages": HELLO, "top_p": 0}, "top_p", "top_p must be greater than 0 and at most 1, got 0"),
        (True, {"messages": []}, "messages", "messages must not be empty"),
        (True, {"messages": [{"content": "hi"}]}, "messages[0].role", "messages[0].role is required"),
        (
            True,
            {"messages": [{"role": "user", "content": 7}]},
            "messages[0].content",
            "messages[0].content must be",
        ),
        (
            True,
            {"messages": HELLO, "max_completion_tokens": 0},
            "max_completion_tokens",
            "must be at least 1, got 0",
        ),
        (
            False,
            {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "stop takes at most 4 sequences, got 5",
        ),
        (False, {"prompt": "x", "seed": 2**64}, "seed", "seed must fit in 64 bits"),
        (False, {"prompt": "x", "stream": "yes"}, "stream", "stream must be a boolean, got a string"),
        (False, {"prompt": "x", "stream_options": {}}, "stream_options", "only allowed when stream is true"),
        (False, {"prompt": {"text": "x"}}, "prompt", "prompt must be a string, an array of strings"),
        (False, {"max_tokens": 4}, "prompt", "prompt is required"),
    ],
)
def test_gateway_and_model_server_refuse_protocol_errors_alike(
    chat: bool, body: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(GatewayError) as at_gateway:
        parse_openai_request(CHAT_ENDPOINT if chat else COMPLETIONS_ENDPOINT, {**body, "model": "bot"})
    with pytest.raises(ApiError) as at_server:
        parse_generation_request({**body, "model": "bot"}, chat=chat)
    assert (at_gateway.value.status_code, at_gateway.value.param) == (400, param)
    assert message in at_gateway.value.message
    assert (at_server.value.status, at_server.value.param, at_server.value.message) == (
        400,
        param,
        at_gateway.value.message,
    )


def test_the_gateway_forwards_what_the_protocol_leaves_to_the_version() -> None:
    body = {
        "model": "bot",
        "messages": [{"role": "function", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "web_search_options": {},
        "n": 2,
    }
    parsed = parse_openai_request(CHAT_ENDPOINT, body)
    assert isinstance(parsed, ChatCompletionRequest)
    assert parsed.model_extra == {"web_search_options": {}}
    with pytest.raises(ApiError, match="Unrecognized request argument supplied: web_search_options"):
        parse_generation_request(body, chat=True)
    without_tools = {name: value for name, value in body.items() if name != "web_search_options"}
    with pytest.raises(ApiError, match="n is not supported"):
        parse_generation_request(without_tools, chat=True)
    server_request = parse_generation_request({**without_tools, "n": 1}, chat=True).request
    assert isinstance(server_request, ChatCompletionRequest)
    with pytest.raises(ApiError) as role:
        chat_messages(server_request)
    assert role.value.param == "messages[0].role"


def test_sampling_fields_are_typed_once() -> None:
    request = parse_request(
        CompletionRequest,
        {"prompt": ["a"], "temperature": 1, "stop": "\n", "stream": True, "stream_options": {}},
    )
    assert request.temperature == 1.0 and isinstance(request.temperature, float)
    assert request.stop_sequences == ("\n",)
    asked = parse_generation_request(
        {"prompt": "a", "temperature": 0, "top_p": 0.5, "stop": ["x", "y"], "seed": 3, "max_tokens": 7},
        chat=False,
    )
    assert (asked.params.temperature, asked.params.top_p, asked.params.stop, asked.params.seed) == (
        0.0,
        0.5,
        ("x", "y"),
        3,
    )
    assert asked.params.max_tokens == 7
    with pytest.raises(RequestFieldError) as nan:
        parse_request(CompletionRequest, {"prompt": "a", "temperature": float("nan")})
    assert nan.value.param == "temperature"
