"""The running gateway re-sends a request whose version cannot be connected to, puts few-shot examples
from a prompt's pool into the prompt, and asks for hidden reasoning.

Through the real app served on loopback, with the official ``openai`` client, in front of
model-server doubles that record what reached them (and a port where nothing listens).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_doubles import GatewayServer, StubModelServer, base_config, metric_value
from openai.types.chat import ChatCompletionMessageParam

from asgi_server import free_port
from kubetune.gateway.fewshot import FEW_SHOT_HEADER
from kubetune.gateway.upstream import RETRIED_FROM_HEADER
from kubetune_contract.openai import HIDDEN_REASONING_FIELD

Stubs = dict[str, StubModelServer]
RETRIES = "kubetune_gateway_connect_retries_total"
POOL = [
    {"user": "how do I reset my password", "assistant": "Use the reset link on the sign-in page."},
    {"user": "my invoice shows the wrong amount", "assistant": "Billing will correct the invoice."},
    {"user": "the app crashes when I upload a photo", "assistant": "Update the app, then retry."},
    {"user": "can I get a refund on my invoice", "assistant": "Refunds take five working days."},
]


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)


def write_pool(directory: Path) -> Path:
    path = directory / "pool.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in POOL))
    return path


def test_requests_for_a_version_nothing_listens_on_are_answered_by_the_other(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config: dict[str, Any] = base_config(stubs)
    config["versions"] = [
        {"name": "alpha", "url": f"http://127.0.0.1:{free_port()}", "weight": 50},
        {"name": "beta", "url": stubs["beta"].url, "weight": 50},
    ]
    # marked down only briefly, so later requests still pick alpha and are re-sent each time
    config["health"] = {"markDownSeconds": 0.001}
    with gateway_server(config) as (url, _):
        client = openai_client(url)
        retried_from: Counter[str | None] = Counter()
        for number in range(16):
            raw = client.chat.completions.with_raw_response.create(
                model="support-bot", messages=[{"role": "user", "content": f"question {number}"}]
            )
            assert raw.headers["x-kubetune-version"] == "beta"
            assert raw.parse().choices[0].message.content == f"beta: question {number}"
            retried_from[raw.headers.get(RETRIED_FROM_HEADER)] += 1
        with client.chat.completions.with_streaming_response.create(
            model="support-bot", messages=[{"role": "user", "content": "a stream"}], stream=True
        ) as streamed:
            assert streamed.headers["x-kubetune-version"] == "beta"
            retried_from[streamed.headers.get(RETRIED_FROM_HEADER)] += 1
            text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
            assert text == "beta: a stream"

        # weights 50/50: 17 requests that all picked beta happen 1 time in 131072
        assert retried_from["alpha"] > 0
        assert set(retried_from) <= {"alpha", None}
        metrics = httpx.get(f"{url}/metrics").text
        counted = metric_value(
            metrics, RETRIES, deployment="support-bot", from_version="alpha", to_version="beta"
        )
        assert counted == retried_from["alpha"]

        # pinned to alpha: the client asked for that version, so it gets the failure, not beta
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(
                model="support-bot",
                messages=[{"role": "user", "content": "only alpha"}],
                extra_headers={"x-kubetune-version": "alpha"},
            )
        assert refused.value.status_code == 503
        assert RETRIED_FROM_HEADER not in refused.value.response.headers
        assert metric_value(httpx.get(f"{url}/metrics").text, RETRIES) == counted
        assert "only alpha" not in json.dumps(stubs["beta"].received)
        client.close()


def prompt_config(stubs: Stubs, **prompt: Any) -> dict[str, Any]:
    config: dict[str, Any] = base_config(stubs)
    config["versions"] = [{"name": "alpha", "url": stubs["alpha"].url, "weight": 100, "prompt": "support"}]
    config["prompts"] = [{"name": "support", "system": "You answer support tickets.", **prompt}]
    config["cache"] = {"enabled": True}
    return config


def sent_turns(stub: StubModelServer) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in stub.received[-1]["messages"]]


def test_examples_from_the_pool_nearest_the_question_go_into_the_prompt(
    stubs: Stubs, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    pool = write_pool(tmp_path)
    config = prompt_config(stubs, fewShot={"uri": pool.as_uri(), "k": 2, "select": "similar"})
    with gateway_server(config) as (url, _):
        client = openai_client(url)
        question: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "why is my invoice amount wrong"}
        ]
        raw = client.chat.completions.with_raw_response.create(
            model="support-bot", messages=question, temperature=0
        )
        assert raw.headers[FEW_SHOT_HEADER] == "2,4"
        assert sent_turns(stubs["alpha"]) == [
            ("system", "You answer support tickets."),
            ("user", POOL[1]["user"]),
            ("assistant", POOL[1]["assistant"]),
            ("user", POOL[3]["user"]),
            ("assistant", POOL[3]["assistant"]),
            ("user", "why is my invoice amount wrong"),
        ]
        answer = raw.parse()
        assert answer.choices[0].message.content == "alpha: why is my invoice amount wrong"

        # the same question again is a cache hit (the upstream is not asked) with the same header
        received = len(stubs["alpha"].received)
        again = client.chat.completions.with_raw_response.create(
            model="support-bot", messages=question, temperature=0
        )
        assert len(stubs["alpha"].received) == received
        assert again.headers[FEW_SHOT_HEADER] == "2,4"
        assert again.parse().choices[0].message.content == answer.choices[0].message.content

        with client.chat.completions.with_streaming_response.create(
            model="support-bot",
            messages=[{"role": "user", "content": "the app crashes on upload"}],
            stream=True,
        ) as streamed:
            assert streamed.headers[FEW_SHOT_HEADER].split(",")[0] == "3"
            assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)

        completion = client.completions.with_raw_response.create(
            model="support-bot", prompt="reset my password please"
        )
        assert completion.headers[FEW_SHOT_HEADER].split(",")[0] == "1"
        sent_prompt = stubs["alpha"].received[-1]["prompt"]
        assert f"{POOL[0]['user']}\n{POOL[0]['assistant']}" in sent_prompt
        assert sent_prompt.endswith("reset my password please")
        client.close()


def test_examples_that_would_not_fit_the_context_window_are_left_out(
    stubs: Stubs, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    pool = write_pool(tmp_path)
    config = prompt_config(stubs, fewShot={"uri": str(pool), "k": 4, "select": "fixed"})
    question = [{"role": "user", "content": "hello"}]
    # room for the system message, the question and the first example only (bytes bound tokens)
    config["generation"] = {"maxPromptTokens": 150}
    with gateway_server(config) as (url, _):
        raw = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "support-bot", "messages": question}, timeout=20
        )
        assert raw.status_code == 200
        assert raw.headers[FEW_SHOT_HEADER] == "1"
        assert [role for role, _ in sent_turns(stubs["alpha"])] == ["system", "user", "assistant", "user"]

    config["generation"] = {"maxPromptTokens": 40}
    with gateway_server(config) as (url, _):
        raw = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "support-bot", "messages": question}, timeout=20
        )
        assert raw.status_code == 200
        assert raw.headers[FEW_SHOT_HEADER] == ""
        assert sent_turns(stubs["alpha"]) == [("system", "You answer support tickets."), ("user", "hello")]


def test_a_pool_that_cannot_be_read_is_a_server_error_naming_it(
    stubs: Stubs, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.jsonl"
    config = prompt_config(stubs, fewShot={"uri": str(missing)})
    with gateway_server(config) as (url, _):
        client = openai_client(url)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="support-bot", messages=[{"role": "user", "content": "x"}])
        assert failed.value.status_code == 500
        assert "few-shot pool" in failed.value.message and "missing.jsonl" in failed.value.message
        assert stubs["alpha"].received == []
        client.close()


def test_a_prompt_without_a_pool_or_reasoning_sends_neither(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = prompt_config(stubs)
    with gateway_server(config) as (url, _):
        raw = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]},
            timeout=20,
        )
        assert raw.status_code == 200
        assert FEW_SHOT_HEADER not in raw.headers
        assert HIDDEN_REASONING_FIELD not in stubs["alpha"].received[-1]


def test_a_prompt_with_reasoning_asks_the_version_to_hide_it(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = prompt_config(stubs, reasoning={"open": "<t>", "close": "</t>"})
    with gateway_server(config) as (url, _):
        for stream in (False, True):
            raw = httpx.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "support-bot",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream,
                },
                timeout=20,
            )
            assert raw.status_code == 200
            assert stubs["alpha"].received[-1][HIDDEN_REASONING_FIELD] == {"open": "<t>", "close": "</t>"}
