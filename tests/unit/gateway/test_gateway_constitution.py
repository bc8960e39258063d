"""Critique and revise, the pieces: the critique's schema (enforceable by constrained decoding), its
verdicts, the revision request, usage added over passes, and the answer as a stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.gateway.config import ConstitutionConfig
from kubetune.gateway.constitution import (
    CritiqueUnreadable,
    as_event_stream,
    check_request,
    critique_request,
    revision_request,
    total_usage,
    violated_principles,
)
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.generation import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT
from kubetune_components.serving.constrained import enforceable_schema

CONSTITUTION = ConstitutionConfig.model_validate(
    {
        "principles": [
            {"name": "no-refunds", "text": "Never promise a refund."},
            {"name": "polite", "text": "Be polite."},
        ]
    }
)
SENT: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Refund me"}],
    "temperature": 0.7,
    "seed": 3,
    "max_tokens": 20,
    "tools": [],
    "response_format": {"type": "json_object"},
}


def answer(content: str | None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content, **extra}}]}


def test_the_critique_asks_one_verdict_per_principle_under_an_enforceable_schema() -> None:
    critique = critique_request(SENT, "We will refund you.", CONSTITUTION)
    schema = critique["response_format"]["json_schema"]["schema"]
    assert enforceable_schema(schema, "response_format.json_schema.schema") == schema
    assert schema["required"] == ["no-refunds", "polite"]
    assert "We will refund you." in critique["messages"][1]["content"]
    assert "Refund me" in critique["messages"][1]["content"]
    assert (critique["temperature"], critique["seed"]) == (0.7, 3)  # the request's sampling


def test_violated_principles_are_read_in_the_constitutions_order() -> None:
    verdicts = json.dumps({"polite": "violates", "no-refunds": "violates"})
    assert violated_principles(answer(verdicts), CONSTITUTION) == ["no-refunds", "polite"]
    assert violated_principles(answer('{"polite": "complies", "no-refunds": "complies"}'), CONSTITUTION) == []


@pytest.mark.parametrize("text", ['{"polite": "violates"', '{"polite": "complies"}', None])
def test_a_critique_without_every_verdict_is_unreadable(text: str | None) -> None:
    with pytest.raises(CritiqueUnreadable):
        violated_principles(answer(text), CONSTITUTION)


def test_the_revision_continues_the_conversation_keeping_the_format_but_not_the_tools() -> None:
    revision = revision_request(SENT, "We will refund you.", ["no-refunds"], CONSTITUTION)
    assert revision["messages"][:2] == SENT["messages"]
    assert revision["messages"][2] == {"role": "assistant", "content": "We will refund you."}
    assert "no-refunds: Never promise a refund." in revision["messages"][3]["content"]
    assert "polite" not in revision["messages"][3]["content"]
    assert "tools" not in revision and revision["response_format"] == {"type": "json_object"}


def test_usage_adds_every_pass_nested_details_included() -> None:
    usages = [
        {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "total_tokens": 12,
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
        {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
        None,
    ]
    assert total_usage(usages) == {
        "prompt_tokens": 35,
        "completion_tokens": 16,
        "total_tokens": 51,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def test_what_would_go_unchecked_is_refused() -> None:
    with pytest.raises(GatewayError) as refused:
        check_request(CHAT_ENDPOINT, {"n": 2}, "v1")
    assert refused.value.param == "n"
    with pytest.raises(GatewayError, match=r"'v1' critiques .* use /v1/chat/completions") as refused:
        check_request(COMPLETIONS_ENDPOINT, {"prompt": "hi"}, "v1")
    assert refused.value.status_code == 400
    check_request(CHAT_ENDPOINT, {"n": 1}, "v1")


def test_a_finished_answer_streams_as_chunks_with_usage_when_asked() -> None:
    body = {**answer("Sorry."), "id": "chatcmpl-1", "model": "m", "created": 1, "usage": {"total_tokens": 3}}
    body["choices"][0]["finish_reason"] = "stop"
    events = as_event_stream(body, include_usage=True).decode().split("\n\n")
    chunks = [
        json.loads(event.removeprefix("data: ")) for event in events if event and event != "data: [DONE]"
    ]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Sorry."}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2] == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"total_tokens": 3},
    }
    assert events[-2] == "data: [DONE]"
    assert (
        len(
            json.loads(
                as_event_stream(body, include_usage=False).decode().split("\n\n")[1].removeprefix("data: ")
            )["choices"]
        )
        == 1
    )
