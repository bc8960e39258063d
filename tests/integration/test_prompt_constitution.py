"""Composed system messages and critique-and-revise, through the real gateway to a real model server
(uvicorn on loopback) serving the random tiny Llama, with the official ``openai`` client.

The gateway config is the operator's rendering of a ModelDeployment (``plan.gateway.gateway_config``).
What the model is given is watched on the server: its runtime's ``prepare_chat`` (the messages it
tokenizes) and its own metrics (``kubetune_serving_requests_total``, ``kubetune_serving_tokens_total``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from fixtures.model_server import tiny_model_runtime_server
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from asgi_server import serve_app
from kubetune.cli import main as kubetune_main
from kubetune.gateway.app import create_app as create_gateway
from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.constitution import VIOLATED_HEADER
from kubetune.gateway.system import SAFETY_PREAMBLE
from kubetune.plan.gateway import gateway_config
from kubetune.plan.prompt import render_request
from kubetune_components.serving.requests import ChatMessage
from kubetune_components.serving.runtime import ModelRuntime
from kubetune_contract.deployment import ModelDeployment

DEPLOYMENT = "critic-bot"
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"queue": {"enum": ["billing", "technical"]}},
    "required": ["queue"],
}
PRINCIPLES = ["no-refunds", "polite"]
MANIFEST: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": DEPLOYMENT, "namespace": "default"},
    "spec": {
        "versions": [
            {"name": "composed", "model": {"uri": "file:///models/tiny"}, "weight": 50, "prompt": "routing"},
            {"name": "critic", "model": {"uri": "file:///models/tiny"}, "weight": 50, "prompt": "careful"},
        ],
        "promptParts": [
            {"name": "role", "text": "You route support tickets to one team."},
            {"name": "rules", "text": "Answer in one short sentence."},
        ],
        "prompts": [
            {
                "name": "routing",
                "systemParts": ["role", "safety-preamble", "rules", "format-instructions"],
                "system": "Teams: billing, technical.",
                "template": "Ticket: {{input}}",
            },
            {
                "name": "careful",
                "system": "You answer customers.",
                "constitution": {
                    "principles": [
                        {"name": "no-refunds", "text": "Never promise a refund."},
                        {"name": "polite", "text": "Be polite."},
                    ],
                    "revise": True,
                },
            },
        ],
    },
}


@dataclass
class Watched:
    """The server side: what the runtime was asked to tokenize, in order."""

    url: str
    runtime: ModelRuntime
    conversations: list[list[tuple[str, str]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """One model server serving the tiny model, both versions' URL, watching its runtime's inputs."""
    with tiny_model_runtime_server(tmp_path_factory.mktemp("tiny"), DEPLOYMENT, "critic") as (url, runtime):
        watched = Watched(url, runtime)
        prepare = runtime.prepare_chat

        def recording(messages: Sequence[ChatMessage]) -> Any:
            watched.conversations.append([(message.role, message.content) for message in messages])
            return prepare(messages)

        runtime.prepare_chat = recording  # type: ignore[method-assign]
        yield watched


@pytest.fixture(scope="module")
def deployment() -> ModelDeployment:
    return ModelDeployment.model_validate(MANIFEST)


@pytest.fixture(scope="module")
def gateway_url(server: Watched, deployment: ModelDeployment) -> Iterator[str]:
    rendered = gateway_config(deployment, {"composed": server.url, "critic": server.url}, {"critic": 100})
    assert rendered is not None
    rendered["timeouts"] = {"firstByteSeconds": 120, "responseSeconds": 240, "streamIdleSeconds": 120}
    with serve_app(create_gateway(GatewayConfig.model_validate(rendered))) as url:
        yield url


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=240)


def served(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"deployment": DEPLOYMENT, "version": "critic", **labels})
    return value or 0.0


def generations() -> float:
    return served("kubetune_serving_requests_total", endpoint="/v1/chat/completions", code="200")


def gateway_metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def ask(client: openai.OpenAI, seed: int, **fields: Any) -> Any:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "I was charged twice, fix it"}]
    return client.chat.completions.with_raw_response.create(
        model=DEPLOYMENT,
        messages=messages,
        max_tokens=16,
        temperature=1.0,
        seed=seed,
        extra_headers={"x-kubetune-version": "critic"},
        **fields,
    )


def test_the_critique_pass_runs_and_a_violation_is_revised(server: Watched, gateway_url: str) -> None:
    client = client_for(gateway_url)
    outcomes: dict[str, int] = {"complies": 0, "revised": 0}
    revisions_seen = dict.fromkeys(PRINCIPLES, 0)
    for seed in range(8):
        before, tokens_before = generations(), served("kubetune_serving_tokens_total", direction="out")
        watched_before = len(server.conversations)
        raw = ask(client, seed)
        answer = raw.parse()
        violated = [name for name in raw.headers[VIOLATED_HEADER].split(",") if name]
        passes = generations() - before
        critique = server.conversations[watched_before + 1]
        # the second generation is the critique of the draft against every principle
        assert critique[0][0] == "system" and "complies" in critique[0][1]
        assert "Never promise a refund." in critique[1][1] and "Be polite." in critique[1][1]
        if violated:
            assert passes == 3  # draft, critique, revision
            outcomes["revised"] += 1
            for name in violated:
                revisions_seen[name] += 1
            revision = server.conversations[watched_before + 2]
            assert revision[-1][0] == "user" and "violates these principles" in revision[-1][1]
        else:
            assert passes == 2  # draft, critique: the draft is the answer
            outcomes["complies"] += 1
        # usage counts the tokens of every pass, as the model server counted them
        assert (
            answer.usage.completion_tokens
            == served("kubetune_serving_tokens_total", direction="out") - tokens_before
        )
        assert answer.choices[0].message.content
    assert outcomes["revised"] > 0 and outcomes["complies"] > 0, outcomes  # both paths, seeded
    for name, count in revisions_seen.items():
        counted = gateway_metric(
            gateway_url,
            "kubetune_gateway_constitution_revisions_total",
            deployment=DEPLOYMENT,
            version="critic",
            principle=name,
        )
        assert counted == count
    critiques = sum(
        gateway_metric(
            gateway_url, "kubetune_gateway_constitution_critiques_total", version="critic", verdict=verdict
        )
        for verdict in ("complies", "violates")
    )
    assert critiques == 8
    client.close()


def test_a_streamed_request_gets_the_revised_answer(gateway_url: str) -> None:
    client = client_for(gateway_url)
    for seed in range(8):
        raw = ask(client, seed)
        if raw.headers[VIOLATED_HEADER]:
            break
    else:
        pytest.fail("no seed of 8 drew a violation")
    revised = raw.parse()
    with client.chat.completions.with_streaming_response.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "I was charged twice, fix it"}],
        max_tokens=16,
        temperature=1.0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-kubetune-version": "critic"},
    ) as streamed:
        assert streamed.headers[VIOLATED_HEADER] == raw.headers[VIOLATED_HEADER]
        chunks = list(streamed.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == revised.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == revised.usage.completion_tokens
    client.close()


def test_the_composed_system_message_reaches_the_model_as_prompt_render_shows_it(
    server: Watched,
    gateway_url: str,
    deployment: ModelDeployment,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA}}
    client = client_for(gateway_url)
    watched_before = len(server.conversations)
    answer = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "My card was charged twice"}],
        max_tokens=24,
        temperature=0,
        response_format=response_format,
        extra_headers={"x-kubetune-version": "composed"},
    )
    client.close()
    assert json.loads(answer.choices[0].message.content or "")["queue"] in ("billing", "technical")
    assert len(server.conversations) == watched_before + 1  # no constitution: one generation
    model_saw = server.conversations[-1]
    assert model_saw[0][0] == "system"
    role, safety, rules, format_instructions, own = model_saw[0][1].split("\n\n")
    assert (role, safety, rules, own) == (
        "You route support tickets to one team.",
        SAFETY_PREAMBLE,
        "Answer in one short sentence.",
        "Teams: billing, technical.",
    )
    # derived from the request's response_format: its schema, keys sorted
    assert format_instructions.startswith("Answer with one JSON value")
    assert json.dumps(TICKET_SCHEMA, sort_keys=True, separators=(", ", ": ")) in format_instructions
    assert model_saw[1] == ("user", "Ticket: My card was charged twice")

    rendered = render_request(
        deployment, "composed", "My card was charged twice", {"response_format": response_format}
    )
    assert [(m["role"], m["content"]) for m in rendered["messages"]] == model_saw

    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    capsys.readouterr()  # what the gateway printed (its audit lines) is not the command's output
    with pytest.raises(SystemExit) as exit_code:
        kubetune_main(
            [
                "prompt",
                "render",
                f"mdep/{DEPLOYMENT}",
                "--version",
                "composed",
                "--input",
                "My card was charged twice",
                "--response-format",
                json.dumps(response_format),
                "-f",
                str(manifest),
            ]
        )
    assert exit_code.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(m["role"], m["content"]) for m in printed] == model_saw


def test_what_a_constitution_cannot_check_is_refused_not_answered_unchecked(
    server: Watched, gateway_url: str
) -> None:
    client = client_for(gateway_url)
    before = generations()
    with pytest.raises(openai.BadRequestError, match="critiques and revises its answers"):
        client.completions.create(
            model=DEPLOYMENT, prompt="hi", max_tokens=4, extra_headers={"x-kubetune-version": "critic"}
        )
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, 0, n=2)
    assert refused.value.param == "n"
    assert generations() == before  # nothing reached the model
    client.close()
