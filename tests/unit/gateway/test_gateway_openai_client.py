"""The official ``openai`` client, unchanged, against the gateway."""

from __future__ import annotations

import httpx
import openai
import pytest
from gateway_doubles import GatewayServer, StubModelServer, base_config

Stubs = dict[str, StubModelServer]


def test_openai_client_talks_to_the_gateway(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, generation={"limits": {"maxTemperature": 1.0}})
    with gateway_server(config) as (url, gateway):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
        try:
            assert [model.id for model in client.models.list()] == ["support-bot"]

            chat = client.chat.completions.create(
                model="support-bot", messages=[{"role": "user", "content": "route me"}], user="vera"
            )
            version = gateway.state.router.sticky("vera")
            assert chat.choices[0].message.content == f"{version}: route me"
            assert chat.usage is not None and chat.usage.completion_tokens == 3

            completion = client.completions.create(model="support-bot", prompt="one two", user="vera")
            assert completion.choices[0].text == f"{version}: one two"

            stream = client.chat.completions.create(
                model="support-bot",
                messages=[{"role": "user", "content": "stream this please"}],
                stream=True,
                extra_headers={"x-kubetune-version": "beta"},
            )
            chunks = list(stream)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
                "beta: stream this please"
            )
            assert len({chunk.id for chunk in chunks}) == 1

            raw = client.chat.completions.with_raw_response.create(
                model="support-bot",
                messages=[{"role": "user", "content": "which one?"}],
                extra_headers={"x-kubetune-version": "alpha"},
            )
            assert raw.headers["x-kubetune-version"] == "alpha"
            parsed = raw.parse()
            assert parsed.id == raw.headers["x-request-id"]
            assert parsed.choices[0].message.content == "alpha: which one?"
            raw_completion = client.completions.with_raw_response.create(
                model="support-bot", prompt="p", user="vera"
            )
            assert raw_completion.headers["x-kubetune-version"] == version

            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model="support-bot", messages=[{"role": "user", "content": "x"}], temperature=1.5
                )
            assert refused.value.param == "temperature"
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

            stubs["beta"].behavior = "break-stream"
            broken = client.chat.completions.create(
                model="support-bot",
                messages=[{"role": "user", "content": "a b c"}],
                stream=True,
                extra_headers={"x-kubetune-version": "beta"},
            )
            with pytest.raises(openai.APIError, match="stopped answering mid-stream"):
                list(broken)
        finally:
            client.close()


def test_models_retrieve_and_unknown_routes_answer_openai_errors(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    with gateway_server(base_config(stubs)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
        try:
            assert client.models.retrieve("support-bot").id == "support-bot"
            with pytest.raises(openai.NotFoundError) as missing_model:
                client.models.retrieve("gpt-4o")
            assert missing_model.value.code == "model_not_found"
            with pytest.raises(openai.NotFoundError) as missing_path:
                client.embeddings.create(model="support-bot", input="x")
            assert missing_path.value.code == "not_found"
        finally:
            client.close()
        with httpx.Client(base_url=url) as http:
            wrong_method = http.get("/v1/chat/completions")
            unknown = http.post("/v2/anything", json={})
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}
