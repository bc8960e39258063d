"""A prompt's system message composed from named parts: the prompt's order, then its own system text;
generated parts from the request; the same spec and request always give the same bytes."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.gateway.config import GatewayConfigError, PromptConfig, parse_gateway_config
from kubetune.gateway.fewshot import PoolCache
from kubetune.gateway.generation import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT
from kubetune.gateway.prompts import apply_prompt
from kubetune.gateway.system import SAFETY_PREAMBLE, format_instructions, system_message

PROMPT = PromptConfig.model_validate(
    {
        "name": "routing",
        "systemParts": [
            {"name": "role", "text": "You route tickets."},
            {"name": "format-instructions"},
            {"name": "safety-preamble"},
        ],
        "system": "Teams: billing, technical.",
    }
)
SCHEMA = {
    "type": "object",
    "required": ["queue"],
    "properties": {"queue": {"enum": ["billing", "technical"]}},
}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Find an order.", "parameters": {"type": "object"}},
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_parts_come_in_order_then_the_prompts_own_system_text() -> None:
    response_format = {"type": "json_object"}
    assert system_message(PROMPT, chat(response_format=response_format)) == (
        f"You route tickets.\n\nAnswer with one JSON object and nothing else.\n\n{SAFETY_PREAMBLE}\n\n"
        "Teams: billing, technical."
    )


def test_format_instructions_are_left_out_when_the_request_asks_for_no_format() -> None:
    assert format_instructions(chat()) is None
    assert (
        system_message(PROMPT, chat())
        == f"You route tickets.\n\n{SAFETY_PREAMBLE}\n\nTeams: billing, technical."
    )


def test_format_instructions_carry_the_schema_with_sorted_keys_whatever_the_request_order() -> None:
    shuffled = {"properties": SCHEMA["properties"], "required": ["queue"], "type": "object"}
    first = format_instructions(
        chat(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
    )
    second = format_instructions(
        chat(response_format={"type": "json_schema", "json_schema": {"schema": shuffled, "name": "t"}})
    )
    assert first == second
    assert first == (
        "Answer with one JSON value and nothing else, valid against the JSON schema 't': "
        '{"properties": {"queue": {"enum": ["billing", "technical"]}}, "required": ["queue"], '
        '"type": "object"}'
    )


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", "You may call these tools: lookup (Find an order.)."),
        ("required", "You must call one of these tools: lookup (Find an order.)."),
        ({"type": "function", "function": {"name": "lookup"}}, "Call the tool lookup."),
        ("none", None),
    ],
)
def test_format_instructions_name_the_tools_the_request_offers(
    tool_choice: Any, expected: str | None
) -> None:
    assert format_instructions(chat(tools=[TOOL], tool_choice=tool_choice)) == expected


def test_the_gateway_sends_the_composed_system_message_first_in_chat_and_completions() -> None:
    sent = apply_prompt(CHAT_ENDPOINT, chat(metadata={"x": 1}), PROMPT, "v1", PoolCache(), 4096).body
    assert "metadata" not in sent
    assert sent["messages"] == [
        {"role": "system", "content": system_message(PROMPT, chat())},
        {"role": "user", "content": "hi"},
    ]
    completion = apply_prompt(
        COMPLETIONS_ENDPOINT, {"model": "m", "prompt": "hi"}, PROMPT, "v1", PoolCache(), 4096
    ).body
    assert completion["prompt"] == f"{system_message(PROMPT, {})}\n\nhi"


def test_a_prompt_with_only_system_text_is_rendered_as_before() -> None:
    plain = PromptConfig.model_validate({"name": "p", "system": "Be brief."})
    assert system_message(plain, chat(response_format={"type": "json_object"})) == "Be brief."
    assert system_message(PromptConfig.model_validate({"name": "p"}), chat()) is None


def test_a_config_part_without_text_must_be_a_generated_one() -> None:
    config = (
        '{"deployment": "d", "versions": [{"name": "v1", "url": "http://127.0.0.1:1", "weight": 100}], '
        '"prompts": [{"name": "p", "systemParts": [{"name": "role"}]}]}'
    )
    with pytest.raises(GatewayConfigError, match=r"prompts\.0\.systemParts\.0: .*'role' needs text"):
        parse_gateway_config(config)
