"""Pure request handling: generation defaults and limits, prompt rendering, the response cache."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.gateway.cache import ResponseCache, cache_key, is_deterministic
from kubetune.gateway.config import GenerationConfig, PromptConfig
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.generation import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    apply_generation,
    parse_openai_request,
)
from kubetune.gateway.prompts import render_chat_messages, render_completion_prompt

GENERATION = GenerationConfig.model_validate(
    {
        "defaults": {"temperature": 0.7, "topP": 0.9, "maxTokens": 128},
        "limits": {"maxTemperature": 1.5, "maxTopP": 0.95, "maxTokens": 512},
    }
)


def test_defaults_fill_only_what_the_request_omits() -> None:
    body: dict[str, Any] = {"temperature": 0, "top_p": None}
    apply_generation(COMPLETIONS_ENDPOINT, body, GENERATION)
    assert body == {"temperature": 0, "top_p": 0.9, "max_tokens": 128}
    chat: dict[str, Any] = {"max_completion_tokens": 64}
    apply_generation(CHAT_ENDPOINT, chat, GENERATION)
    assert "max_tokens" not in chat and chat["max_completion_tokens"] == 64


def test_no_defaults_configured_leaves_the_request_alone() -> None:
    body: dict[str, Any] = {"prompt": "x"}
    apply_generation(COMPLETIONS_ENDPOINT, body, GenerationConfig())
    assert body == {"prompt": "x"}


@pytest.mark.parametrize(
    ("endpoint", "fields", "param", "message"),
    [
        (
            CHAT_ENDPOINT,
            {"temperature": 1.6},
            "temperature",
            "temperature 1.6 is above this deployment's limit of 1.5",
        ),
        (CHAT_ENDPOINT, {"temperature": "hot"}, "temperature", "temperature must be a number"),
        (CHAT_ENDPOINT, {"temperature": True}, "temperature", "temperature must be a number"),
        (CHAT_ENDPOINT, {"temperature": -0.1}, "temperature", "at least 0"),
        (CHAT_ENDPOINT, {"top_p": 0.99}, "top_p", "top_p 0.99 is above this deployment's limit of 0.95"),
        (CHAT_ENDPOINT, {"top_p": 2}, "top_p", "between 0 and 1"),
        (COMPLETIONS_ENDPOINT, {"max_tokens": 513}, "max_tokens", "max_tokens 513 is above"),
        (COMPLETIONS_ENDPOINT, {"max_tokens": 1.5}, "max_tokens", "must be an integer"),
        (CHAT_ENDPOINT, {"max_completion_tokens": 1000}, "max_completion_tokens", "limit of 512"),
        (CHAT_ENDPOINT, {"max_tokens": 0}, "max_tokens", "at least 1"),
    ],
)
def test_values_out_of_bounds_are_refused_naming_the_param(
    endpoint: str, fields: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(GatewayError) as raised:
        apply_generation(endpoint, dict(fields), GENERATION)
    assert raised.value.status_code == 400
    assert raised.value.param == param
    assert message in raised.value.message
    assert raised.value.to_openai()["error"]["param"] == param


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (CHAT_ENDPOINT, {}, "messages"),
        (CHAT_ENDPOINT, {"messages": []}, "messages"),
        (CHAT_ENDPOINT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
        (CHAT_ENDPOINT, {"messages": ["hi"]}, "messages[0]"),
        (COMPLETIONS_ENDPOINT, {}, "prompt"),
        (COMPLETIONS_ENDPOINT, {"prompt": "x", "stream": "yes"}, "stream"),
        (COMPLETIONS_ENDPOINT, {"prompt": "x", "user": 7}, "user"),
        (COMPLETIONS_ENDPOINT, {"prompt": "x", "n": 0}, "n"),
        (COMPLETIONS_ENDPOINT, {"prompt": "x", "metadata": ["a"]}, "metadata"),
    ],
)
def test_malformed_requests_name_the_field(endpoint: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as raised:
        parse_openai_request(endpoint, body)
    assert raised.value.param == param


PROMPT = PromptConfig.model_validate(
    {
        "name": "v1",
        "system": "You are a support assistant.",
        "template": "Ticket for {{ team }}: {{input}} ({{input}})",
        "examples": [{"user": "My card was charged twice", "assistant": "billing"}],
    }
)


def test_chat_prompt_prepends_system_keeps_the_clients_and_templates_the_last_user_turn() -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Where is {{my}} parcel?", "name": "vera"},
    ]
    rendered = render_chat_messages(messages, PROMPT, "tuned", {"team": "shipping"})
    assert rendered == [
        {"role": "system", "content": "You are a support assistant."},
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "My card was charged twice"},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            # single pass: the {{my}} the user typed stays literal
            "content": "Ticket for shipping: Where is {{my}} parcel? (Where is {{my}} parcel?)",
            "name": "vera",
        },
    ]
    assert messages[3]["content"] == "Where is {{my}} parcel?"  # the caller's list is not modified


def test_chat_template_reads_text_parts() -> None:
    prompt = PromptConfig(name="p", template="T: {{input}}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat_messages(messages, prompt, "v", None)[-1]["content"] == "T: a\nb"
    with pytest.raises(GatewayError) as raised:
        render_chat_messages(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            prompt,
            "v",
            None,
        )
    assert raised.value.param == "messages[0].content"


def test_missing_template_variable_is_a_400_naming_it() -> None:
    with pytest.raises(GatewayError) as raised:
        render_chat_messages([{"role": "user", "content": "x"}], PROMPT, "tuned", {"other": "y"})
    assert raised.value.status_code == 400
    assert raised.value.param == "metadata.team"
    assert "uses {{team}}" in raised.value.message and "'tuned'" in raised.value.message
    with pytest.raises(GatewayError, match="but the request has none") as no_user:
        render_chat_messages([{"role": "system", "content": "x"}], PROMPT, "tuned", {"team": "t"})
    assert no_user.value.param == "messages"
    with pytest.raises(GatewayError) as bad_value:
        render_chat_messages([{"role": "user", "content": "x"}], PROMPT, "tuned", {"team": ["a"]})
    assert bad_value.value.param == "metadata.team"


def test_a_prompt_without_template_only_adds_system_and_examples() -> None:
    prompt = PromptConfig(name="p", system="S")
    rendered = render_chat_messages([{"role": "user", "content": "hi {{x}}"}], prompt, "v", None)
    assert rendered == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi {{x}}"}]


def test_completion_prompt_rendering() -> None:
    rendered = render_completion_prompt("Where is it?", PROMPT, "tuned", {"team": 7})
    assert rendered == (
        "You are a support assistant.\n\nMy card was charged twice\nbilling\n\n"
        "Ticket for 7: Where is it? (Where is it?)"
    )
    assert render_completion_prompt(
        ["a", "b"], PromptConfig(name="p", template="<{{input}}>"), "v", None
    ) == [
        "<a>",
        "<b>",
    ]
    with pytest.raises(GatewayError) as raised:
        render_completion_prompt([1, 2, 3], PROMPT, "tuned", {"team": "x"})
    assert raised.value.param == "prompt"


@pytest.mark.parametrize(
    ("body", "deterministic"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "n": 1}, True),
        ({"temperature": 0, "n": 2}, False),
        ({"temperature": 0, "stream": True}, False),
        ({"temperature": 0.2}, False),
        ({}, False),  # no temperature after defaults: the server's default is not greedy
    ],
)
def test_only_greedy_single_unstreamed_requests_are_cacheable(
    body: dict[str, Any], deterministic: bool
) -> None:
    assert is_deterministic(body) is deterministic


def test_cache_key_is_normalized() -> None:
    one = cache_key("/v1/completions", "a", "http://x", {"prompt": "p", "temperature": 0, "user": "u1"})
    two = cache_key("/v1/completions", "a", "http://x", {"temperature": 0, "prompt": "p", "user": "u2"})
    assert one == two
    assert one != cache_key("/v1/completions", "b", "http://x", {"prompt": "p", "temperature": 0})
    assert one != cache_key("/v1/completions", "a", "http://y", {"prompt": "p", "temperature": 0})
    assert one != cache_key("/v1/chat/completions", "a", "http://x", {"prompt": "p", "temperature": 0})
    assert one != cache_key("/v1/completions", "a", "http://x", {"prompt": "q", "temperature": 0})


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_expires_entries_and_evicts_the_least_recently_used() -> None:
    clock = FakeClock()
    cache = ResponseCache(max_entries=2, ttl_seconds=10, clock=clock)
    cache.put("a", "v1", {"n": 1})
    cache.put("b", "v1", {"n": 2})
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", "v2", {"n": 3})
    assert cache.get("b") is None
    hit = cache.get("c")
    assert hit is not None and hit.version == "v2" and hit.body == {"n": 3}
    clock.now += 10
    assert cache.get("a") is None and len(cache) == 1
    cache.configure(max_entries=1, ttl_seconds=5)
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0
