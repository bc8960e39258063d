"""Generated requests against the real gateway app (served by uvicorn, lifespan on) in front of the
stub model servers: whatever a client sends — any JSON type in any field, deep nesting, long and
odd unicode, other encodings, bytes that are not JSON — the answer is a success or a well-formed
OpenAI error, the gateway never fails on it itself (500), and no 5xx quotes an internal exception.

Seeded (``derandomize``) and bounded, so a run is repeatable and takes seconds.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from gateway_doubles import GatewayServer, StubModelServer, base_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

Stubs = dict[str, StubModelServer]
CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/v1/feedback"
INTERNALS = re.compile(r"[A-Z][A-Za-z]*(Error|Exception)\b|Errno|errno|aiohttp|Traceback|Connect call failed")
GENERATED = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,  # one example is a loopback HTTP round trip: its time is the machine's, not the code's
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# text from every plane, lone surrogates included (JSON can escape them; UTF-8 cannot carry them)
any_text = st.text(st.characters(codec=None), max_size=40) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | any_text
content = (
    any_text
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text}), max_size=3)
    | json_values
)
message = st.fixed_dictionaries({"role": roles, "content": content}) | json_values
FIELDS = {
    "model": st.just("support-bot") | json_values,
    "messages": st.lists(message, max_size=4) | json_values,
    "prompt": any_text | st.lists(any_text, max_size=3) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.just({"include_usage": True}) | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": st.floats(min_value=-1, max_value=2) | json_values,
    "max_tokens": st.integers(min_value=-5, max_value=2**40) | json_values,
    "max_completion_tokens": st.integers(min_value=-5, max_value=100) | json_values,
    "user": any_text | json_values,
    "metadata": st.dictionaries(any_text, any_text, max_size=3) | json_values,
    "stop": any_text | st.lists(any_text, max_size=6) | json_values,
    "n": st.integers(min_value=-1, max_value=5) | json_values,
    "seed": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
    "requestId": any_text | json_values,
    "score": st.floats(allow_nan=True) | json_values,
}


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request the gateway passes on: odd text, but every field of the right type and range."""
    document: dict[str, Any] = {
        "model": "support-bot",
        "messages": [{"role": "user", "content": draw(any_text)}],
        "prompt": draw(any_text),
        "metadata": {"customer": draw(any_text)},
    }
    optional = {
        "stream": st.booleans(),
        "temperature": st.sampled_from([0, 0.5, 1.5]),
        "max_tokens": st.integers(min_value=1, max_value=1024),
        "user": any_text,
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        document[name] = draw(optional[name])
    return document


@st.composite
def request_documents(draw: st.DrawFn) -> Any:
    """A valid request, one with some fields changed, added or removed, or any JSON value at all."""
    shape = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "any"]))
    if shape == "any":
        return draw(json_values)
    document = draw(valid_requests())
    if shape == "valid":
        return document
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True)):
        document[name] = draw(FIELDS[name])
    for name in draw(st.lists(st.sampled_from(sorted(document)), max_size=2, unique=True)):
        del document[name]
    document.update(draw(st.dictionaries(any_text, json_values, max_size=2)))
    return document


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """The bytes of a request body: a document in some encoding, cut short, nested very deep, or
    bytes that are no JSON at all."""
    kind = draw(st.sampled_from(["document"] * 6 + ["truncated", "nested", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "nested":
        # around Python's recursion limit, or far past it
        depth = draw(st.integers(min_value=900, max_value=1100) | st.integers(min_value=1, max_value=200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    text = json.dumps(draw(request_documents()), ensure_ascii=draw(st.booleans()))
    encoded = text.encode(draw(st.sampled_from(["utf-8", "utf-16", "utf-32"])), errors="surrogatepass")
    if kind == "truncated":
        return encoded[: draw(st.integers(min_value=0, max_value=max(0, len(encoded) - 1)))]
    return encoded


headers = st.fixed_dictionaries(
    {},
    optional={
        "x-kubetune-version": st.sampled_from(["alpha", "beta", "nope", "", "ALPHA"]),
        "content-type": st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded"]
        ),
        "x-user-id": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
    },
)


def assert_well_formed(response: httpx.Response) -> None:
    """A success, or an OpenAI error that is the client's (4xx) or names no internals (5xx)."""
    assert response.status_code != 500, f"the gateway failed on a request: {response.text}"
    if response.status_code < 300 and response.headers["content-type"].startswith("text/event-stream"):
        for block in response.text.split("\n\n"):
            if block.startswith("data: ") and block != "data: [DONE]":
                event = json.loads(block[len("data: ") :])
                if "error" in event:
                    assert not INTERNALS.search(event["error"]["message"]), event
        return
    body = response.json()
    if response.status_code < 300:
        assert isinstance(body, dict)
        return
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if response.status_code >= 500:
        assert not INTERNALS.search(error["message"]), error


def sticky_by_header_with_prompts_and_limits(stubs: Stubs) -> dict[str, Any]:
    config: dict[str, Any] = base_config(stubs, routing={"stickyBy": "header", "header": "x-user-id"})
    config["generation"] = {
        "defaults": {"maxTokens": 16},
        "limits": {"maxTemperature": 1.5, "maxTokens": 1024},
    }
    config["prompts"] = [{"name": "ticket", "system": "Be brief.", "template": "{{input}} ({{customer}})"}]
    config["versions"][1]["prompt"] = "ticket"
    return config


def sticky_by_user_with_cache_and_fallback(stubs: Stubs) -> dict[str, Any]:
    config: dict[str, Any] = base_config(
        stubs, cache={"enabled": True}, fallback={"version": "beta", "timeoutSeconds": 5}
    )
    return config


@pytest.mark.parametrize(
    "make_config", [sticky_by_header_with_prompts_and_limits, sticky_by_user_with_cache_and_fallback]
)
def test_generated_requests_get_a_success_or_a_well_formed_error(
    stubs: Stubs, gateway_server: GatewayServer, make_config: Callable[[Stubs], dict[str, Any]]
) -> None:
    config = make_config(stubs)

    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:

        @GENERATED
        @given(
            endpoint=st.sampled_from([CHAT, CHAT, COMPLETIONS, COMPLETIONS, FEEDBACK]),
            body=request_bodies(),
            request_headers=headers,
        )
        def answers_are_well_formed(endpoint: str, body: bytes, request_headers: dict[str, str]) -> None:
            response = client.post(endpoint, content=body, headers=request_headers)
            statuses[response.status_code] += 1
            assert_well_formed(response)

        statuses: Counter[int] = Counter()
        answers_are_well_formed()
    # the generator reaches the versions, not only the gateway's own refusals
    assert statuses[200] >= 10, statuses


def test_generated_requests_with_no_version_ready_get_503_with_retry_after(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs)
    for version in config["versions"]:
        version["ready"] = False

    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:

        @settings(GENERATED, max_examples=60)
        @given(
            endpoint=st.sampled_from([CHAT, COMPLETIONS]),
            document=request_documents(),
            request_headers=headers,
        )
        def refused_or_unavailable(endpoint: str, document: Any, request_headers: dict[str, str]) -> None:
            response = client.post(endpoint, content=json.dumps(document).encode(), headers=request_headers)
            assert_well_formed(response)
            assert response.status_code != 200
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "service_unavailable"

        refused_or_unavailable()
    assert stubs["alpha"].received == [] and stubs["beta"].received == []


def test_every_nesting_depth_gets_a_success_or_a_400(stubs: Stubs, gateway_server: GatewayServer) -> None:
    # Around Python's recursion limit a body decodes but may not encode again for the version; the
    # depth where that happens depends on the stack, so sweep past it rather than pin one number.
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for depth in range(900, 1050, 3):
            for stream in ("false", "true"):
                deep = "[" * depth + "1" + "]" * depth
                body = (
                    f'{{"model":"support-bot","stream":{stream},"messages":[{{"role":"user","content":"hi"}}],'
                    f'"deep":{deep}}}'
                )
                response = client.post(CHAT, content=body.encode())
                assert response.status_code in (200, 400), (depth, response.text)
                if response.status_code == 400:
                    assert response.json()["error"]["message"] == (
                        "the request body nests arrays or objects too deeply"
                    )
