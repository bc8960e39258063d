"""Hidden reasoning through the real gateway to a real model server (uvicorn on loopback) serving the
random tiny Llama, with the official ``openai`` client.

The version's prompt has ``reasoning``, so the gateway asks the server to hide what the model writes
between the markers. The markers are taken from what the model writes anyway (seeded), so the hidden
text is real: the client gets the answer without it, streamed or not, and usage counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fixtures.model_server import tiny_model_server
from openai.types.chat import ChatCompletionMessageParam

from asgi_server import serve_app
from kubetune.gateway.app import create_app as create_gateway
from kubetune.gateway.config import GatewayConfig

DEPLOYMENT = "support-bot"
HIDDEN_LENGTH = 15
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "File this: my invoice is wrong"}]


@pytest.fixture(scope="module")
def version_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A model server (one version) serving the random tiny model."""
    with tiny_model_server(tmp_path_factory.mktemp("tiny"), DEPLOYMENT) as url:
        yield url


def ask(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model=DEPLOYMENT, messages=QUESTION, max_tokens=40, temperature=1.0, seed=7, **fields
    )


def markers_in(text: str) -> tuple[str, str, int]:
    """Three-character open and close markers that occur first ``HIDDEN_LENGTH`` apart in ``text``."""
    for start in range(len(text) - HIDDEN_LENGTH - 3):
        open_marker = text[start : start + 3]
        close_marker = text[start + HIDDEN_LENGTH - 3 : start + HIDDEN_LENGTH]
        if (
            text.find(open_marker) == start
            and text.find(close_marker, start + 3) == start + HIDDEN_LENGTH - 3
        ):
            return open_marker, close_marker, start
    raise AssertionError(f"no markers in {text!r}")


def test_reasoning_between_the_prompts_markers_never_reaches_the_client(version_url: str) -> None:
    direct = openai.OpenAI(base_url=f"{version_url}/v1", api_key="unused", max_retries=0, timeout=120)
    plain = ask(direct).choices[0].message.content or ""
    direct.close()
    open_marker, close_marker, start = markers_in(plain)
    hidden_text = plain[start : start + HIDDEN_LENGTH]
    expected = plain[:start] + plain[start + HIDDEN_LENGTH :]

    config = GatewayConfig.model_validate(
        {
            "deployment": DEPLOYMENT,
            "versions": [{"name": "v1", "url": version_url, "weight": 100, "prompt": "thinking"}],
            # no system message or template: the model sees the very conversation it was asked directly
            "prompts": [{"name": "thinking", "reasoning": {"open": open_marker, "close": close_marker}}],
            "timeouts": {"firstByteSeconds": 60, "responseSeconds": 120, "streamIdleSeconds": 60},
        }
    )
    with serve_app(create_gateway(config)) as gateway_url:
        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = ask(client)
        assert answer.choices[0].message.content == expected
        assert hidden_text not in (answer.choices[0].message.content or "")
        assert answer.usage is not None and answer.usage.completion_tokens == 40
        details = answer.usage.completion_tokens_details
        assert details is not None and details.reasoning_tokens is not None and details.reasoning_tokens > 0

        chunks = list(ask(client, stream=True))
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == expected
        client.close()
