"""spec.guardrails.pii through the real gateway with the official openai client: PII in a prompt reaches
the model redacted (or the request is refused, or served and counted), and PII in an answer is redacted
even when the stream splits it across chunks of one to a few characters.

The model server is the scripted double of test_gateway_guardrails.py (it keeps what it received and
streams its answer a few characters per chunk)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import test_gateway_guardrails
from gateway_doubles import GatewayServer
from test_gateway_guardrails import ScriptedModelServer, ask, client_for, config, decisions

PROMPT = "Refund my order please, I'm jane.roe@example.org, card 4111 1111 1111 1111."
REDACTED_PROMPT = "Refund my order please, I'm <EMAIL_ADDRESS>, card <CREDIT_CARD>."
ANSWER = (
    "Done. The refund goes to IBAN DE89 3704 0044 0532 0130 00 within 3 days; questions to "
    "billing@example.com or +1 415-555-0132. Reference 7731."
)
REDACTED_ANSWER = (
    "Done. The refund goes to IBAN <IBAN_CODE> within 3 days; questions to "
    "<EMAIL_ADDRESS> or <PHONE_NUMBER>. Reference 7731."
)


# The scripted model server's fixtures, shared with the other guards' tests.
model_server = test_gateway_guardrails.model_server
scripted = test_gateway_guardrails.scripted


def pii(**settings: Any) -> dict[str, Any]:
    return {"pii": {"input": "off", "output": "off", **settings}}


def last_user_message(server: ScriptedModelServer) -> str:
    return str(server.received[-1]["messages"][-1]["content"])


@pytest.mark.parametrize("stream", [False, True])
def test_pii_in_a_prompt_reaches_the_model_redacted(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, stream: bool
) -> None:
    with gateway_server(config(scripted, pii(input="redact"))) as (url, _):
        assert ask(client_for(url), PROMPT, stream=stream) == "All good."
        assert last_user_message(scripted) == REDACTED_PROMPT
        assert ask(client_for(url), "Where is my parcel?", stream=stream) == "All good."
        assert last_user_message(scripted) == "Where is my parcel?"
        assert decisions(url, "pii", "redact", "input") == 1
        assert decisions(url, "pii", "pass", "input") == 1


def test_pii_in_a_prompt_is_refused_with_pii_detected_when_input_is_block(
    scripted: ScriptedModelServer, gateway_server: GatewayServer
) -> None:
    with gateway_server(config(scripted, pii(input="block"))) as (url, _):
        client = client_for(url)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                ask(client, PROMPT, stream=stream)
            assert refused.value.code == "pii_detected"
            assert "jane.roe" not in str(refused.value.body)
        assert scripted.received == []
        assert decisions(url, "pii", "block", "input") == 2


def test_flagged_pii_in_a_prompt_is_served_unchanged_and_counted(
    scripted: ScriptedModelServer, gateway_server: GatewayServer
) -> None:
    with gateway_server(config(scripted, pii(input="flag"))) as (url, _):
        assert ask(client_for(url), PROMPT) == "All good."
        assert last_user_message(scripted) == PROMPT
        assert decisions(url, "pii", "flag", "input") == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("piece", [1, 3, 8])
def test_pii_in_an_answer_is_redacted_even_split_across_chunks(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, stream: bool, piece: int
) -> None:
    scripted.answer, scripted.piece = ANSWER, piece
    with gateway_server(config(scripted, pii(output="redact"))) as (url, _):
        assert ask(client_for(url), "my refund?", stream=stream) == REDACTED_ANSWER
        assert decisions(url, "pii", "redact", "output") == 1


def test_a_streamed_answer_with_pii_stops_before_it_when_output_is_block(
    scripted: ScriptedModelServer, gateway_server: GatewayServer
) -> None:
    scripted.answer, scripted.piece = ANSWER, 2
    with gateway_server(config(scripted, pii(output="block"))) as (url, _):
        client = client_for(url)
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, "my refund?")
        assert refused.value.code == "pii_detected"
        chunks = client.chat.completions.create(
            model="support-bot", messages=[{"role": "user", "content": "my refund?"}], stream=True
        )
        received = ""
        with pytest.raises(openai.APIError) as refused_stream:
            for chunk in chunks:
                received += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert "pii_detected" in str(refused_stream.value.body)
        assert "DE89" not in received and "billing@" not in received
        assert decisions(url, "pii", "block", "output") == 2
