"""The gateway in front of real (double) model servers: routing, headers, limits, prompts, cache,
fallback and streaming."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx
import pytest
from gateway_doubles import (
    GatewayServer,
    StubModelServer,
    attempts,
    base_config,
    chat_body,
    metric_value,
    sse_events,
)

from asgi_server import free_port
from kubetune.gateway.routing import Router

Stubs = dict[str, StubModelServer]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def test_users_split_by_weight_and_stay_on_their_version(stubs: Stubs, gateway_server: GatewayServer) -> None:
    router = Router([("alpha", 80), ("beta", 20)])
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        seen: dict[str, str] = {}
        for index in range(300):
            user = f"customer-{index}"
            response = client.post("/v1/chat/completions", json=chat_body("hi", user=user))
            assert response.status_code == 200
            version = response.headers["x-kubetune-version"]
            assert response.json()["choices"][0]["message"]["content"] == f"{version}: hi"
            seen[user] = version
        assert seen == {user: router.sticky(user) for user in seen}
        assert Counter(seen.values())["alpha"] / len(seen) == pytest.approx(0.8, abs=0.08)
        for user in list(seen)[:20]:
            again = client.post("/v1/chat/completions", json=chat_body("again", user=user))
            assert again.headers["x-kubetune-version"] == seen[user]


def test_sticky_by_header_and_anonymous_requests(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, routing={"stickyBy": "header", "header": "X-User-Id"})
    router = Router([("alpha", 80), ("beta", 20)])
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for index in range(30):
            response = client.post(
                "/v1/completions",
                json={"model": "support-bot", "prompt": "p"},
                headers={"x-user-id": f"u{index}"},
            )
            assert response.headers["x-kubetune-version"] == router.sticky(f"u{index}")
        anonymous = Counter(
            client.post("/v1/completions", json={"model": "support-bot", "prompt": "p"}).headers[
                "x-kubetune-version"
            ]
            for _ in range(60)
        )
        assert set(anonymous) == {"alpha", "beta"}  # random by weight: both get some


def test_override_header_pins_and_unknown_names_are_refused(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs)
    config["versions"].append({"name": "gamma", "url": stubs["gamma"].url, "weight": 0})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for user in ("a", "b", "c"):
            pinned = client.post(
                "/v1/chat/completions", json=chat_body(user=user), headers={"X-Kubetune-Version": "gamma"}
            )
            assert pinned.headers["x-kubetune-version"] == "gamma"
            assert pinned.json()["choices"][0]["message"]["content"] == "gamma: hello there"
        unknown = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "delta"}
        )
        assert unknown.status_code == 400
        error = unknown.json()["error"]
        assert error["param"] == "x-kubetune-version"
        assert error["type"] == "invalid_request_error"
        assert "'delta'" in error["message"] and "alpha, beta, gamma" in error["message"]
        assert unknown.headers["x-kubetune-version"] == "-"
        assert unknown.headers["x-request-id"].startswith("chatcmpl-")
    assert stubs["gamma"].received and all(body["messages"] for body in stubs["gamma"].received)


def test_every_response_carries_the_request_id_and_version(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    with (
        gateway_server(base_config(stubs)) as (url, gateway),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        response = client.post("/v1/chat/completions", json=chat_body(user="u1"))
        body = response.json()
        assert body["id"] == response.headers["x-request-id"] and body["id"].startswith("chatcmpl-")
        assert body["id"] != "upstream-id"
        # the upstream sees the id the signed response id starts with, for log correlation
        version = response.headers["x-kubetune-version"]
        sent_id = stubs[version].received_headers[-1]["x-request-id"]
        assert body["id"].startswith(f"{sent_id}.{version}.")
        second = client.post("/v1/chat/completions", json=chat_body(user="u1"))
        assert second.headers["x-request-id"] != response.headers["x-request-id"]

        completion = client.post("/v1/completions", json={"model": "support-bot", "prompt": "x"})
        assert completion.json()["id"] == completion.headers["x-request-id"]
        assert completion.headers["x-request-id"].startswith("cmpl-")

        for method, path in [
            ("GET", "/nowhere"),
            ("GET", "/v1/chat/completions"),
            ("GET", "/healthz"),
            ("GET", "/metrics"),
        ]:
            other = client.request(method, path)
            assert other.headers["x-kubetune-version"] == "-", path
            assert other.headers["x-request-id"].startswith("req-"), path

        not_json = client.post(
            "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert "not valid JSON" in not_json.json()["error"]["message"]
        assert not_json.headers["x-kubetune-version"] == "-"

        wrong_model = client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-4"})
        assert wrong_model.status_code == 404
        assert wrong_model.json()["error"]["code"] == "model_not_found"
        assert wrong_model.json()["error"]["param"] == "model"
        no_messages = client.post("/v1/chat/completions", json={"model": "support-bot"})
        assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert gateway.response_ids.version_of(body["id"]) == response.headers["x-kubetune-version"]


def test_generation_defaults_and_limits(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(
        stubs,
        generation={
            "defaults": {"temperature": 0.7, "topP": 0.9, "maxTokens": 64},
            "limits": {"maxTemperature": 1.0, "maxTopP": 1.0, "maxTokens": 256},
        },
    )
    pin = {"x-kubetune-version": "alpha"}
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        client.post("/v1/chat/completions", json=chat_body(), headers=pin)
        assert stubs["alpha"].received[-1]["temperature"] == 0.7
        assert stubs["alpha"].received[-1]["top_p"] == 0.9
        assert stubs["alpha"].received[-1]["max_tokens"] == 64
        client.post("/v1/chat/completions", json=chat_body(temperature=0.2, max_tokens=200), headers=pin)
        assert stubs["alpha"].received[-1]["temperature"] == 0.2
        assert stubs["alpha"].received[-1]["max_tokens"] == 200
        received = len(stubs["alpha"].received)
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"temperature": 1.2}, "temperature"),
            ({"max_tokens": 257}, "max_tokens"),
        ]
        for fields, param in refusals:
            refused = client.post("/v1/chat/completions", json=chat_body(**fields), headers=pin)
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == param
            assert refused.headers["x-kubetune-version"] == "alpha"
        refused_stream = client.post(
            "/v1/chat/completions", json=chat_body(stream=True, temperature=5), headers=pin
        )
        assert refused_stream.status_code == 400 and refused_stream.json()["error"]["param"] == "temperature"
        assert len(stubs["alpha"].received) == received  # refused requests never reach the model


PROMPTED = {
    "prompts": [
        {
            "name": "v1",
            "system": "You route tickets.",
            "template": "Ticket ({{channel}}): {{input}}",
            "examples": [{"user": "Charged twice", "assistant": "billing"}],
        }
    ]
}


def test_prompt_templates_render_for_the_versions_that_have_one(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, **PROMPTED)
    config["versions"][0]["prompt"] = "v1"
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        answer = client.post(
            "/v1/chat/completions",
            json=chat_body("Where is my parcel?", metadata={"channel": "email"}),
            headers={"x-kubetune-version": "alpha"},
        )
        assert (
            answer.json()["choices"][0]["message"]["content"] == "alpha: Ticket (email): Where is my parcel?"
        )
        sent = stubs["alpha"].received[-1]
        assert sent["messages"] == [
            {"role": "system", "content": "You route tickets."},
            {"role": "user", "content": "Charged twice"},
            {"role": "assistant", "content": "billing"},
            {"role": "user", "content": "Ticket (email): Where is my parcel?"},
        ]
        assert "metadata" not in sent

        missing = client.post(
            "/v1/chat/completions", json=chat_body("x"), headers={"x-kubetune-version": "alpha"}
        )
        assert missing.status_code == 400
        assert missing.json()["error"]["param"] == "metadata.channel"
        assert "{{channel}}" in missing.json()["error"]["message"]

        plain = client.post(
            "/v1/completions",
            json={"model": "support-bot", "prompt": "raw", "metadata": {"channel": "x"}},
            headers={"x-kubetune-version": "beta"},
        )
        assert plain.json()["choices"][0]["text"] == "beta: raw"  # beta has no prompt
        templated = client.post(
            "/v1/completions",
            json={"model": "support-bot", "prompt": "raw", "metadata": {"channel": "x"}},
            headers={"x-kubetune-version": "alpha"},
        )
        assert (
            stubs["alpha"].received[-1]["prompt"]
            == "You route tickets.\n\nCharged twice\nbilling\n\nTicket (x): raw"
        )
        assert templated.status_code == 200


def test_cache_answers_only_deterministic_requests(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, cache={"enabled": True, "ttlSeconds": 60, "maxEntries": 16})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        greedy = chat_body("same question", temperature=0, user="u-1")
        first = client.post("/v1/chat/completions", json=greedy)
        version = first.headers["x-kubetune-version"]
        stub = stubs[version]
        assert len(stub.received) == 1
        # another user with the same sticky version shares the entry (user is not part of the key)
        other_user = next(
            f"u-{i}"
            for i in range(2, 100)
            if Router([("alpha", 80), ("beta", 20)]).sticky(f"u-{i}") == version
        )
        second = client.post("/v1/chat/completions", json={**greedy, "user": other_user})
        assert len(stub.received) == 1
        assert second.headers["x-kubetune-version"] == version
        assert second.json()["choices"] == first.json()["choices"]
        assert second.json()["id"] == second.headers["x-request-id"] != first.headers["x-request-id"]

        for fields in ({"temperature": 0.5}, {"temperature": 0, "n": 2}, {}):
            for _ in range(2):
                client.post("/v1/chat/completions", json=chat_body("same question", user="u-1", **fields))
        assert len(stub.received) == 7  # 1 + 3 kinds x 2, none from the cache
        streamed = client.post("/v1/chat/completions", json={**greedy, "stream": True})
        assert streamed.status_code == 200 and len(stub.received) == 8

        metrics = client.get("/metrics").text
        assert metric_value(metrics, "kubetune_gateway_cache_hits_total", deployment="support-bot") == 1
        assert metric_value(metrics, "kubetune_gateway_cache_misses_total", deployment="support-bot") == 1
        # the hit counts as a 200 of the version that produced it
        assert attempts(metrics, version, "200", CHAT) == 9


def test_cache_applies_a_greedy_default(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, cache={"enabled": True}, generation={"defaults": {"temperature": 0}})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(3):
            client.post(
                "/v1/completions",
                json={"model": "support-bot", "prompt": "q"},
                headers={"x-kubetune-version": "beta"},
            )
    assert len(stubs["beta"].received) == 1


def test_fallback_on_server_error_timeout_and_connect_error(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, fallback={"version": "beta", "timeoutSeconds": 0.3})
    config["versions"].append({"name": "dead", "url": f"http://127.0.0.1:{free_port()}", "weight": 0})
    with gateway_server(config) as (url, gateway), httpx.Client(base_url=url, timeout=10) as client:
        stubs["alpha"].behavior = "error"
        rescued = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "alpha"}
        )
        assert rescued.status_code == 200
        assert rescued.headers["x-kubetune-version"] == "beta"
        assert rescued.json()["choices"][0]["message"]["content"] == "beta: hello there"
        assert gateway.response_ids.version_of(rescued.headers["x-request-id"]) == "beta"

        # alpha stalls far beyond the 0.3 s fallback timeout and the client's 10 s: the client gets
        # an answer only because the gateway gave up on alpha, and the 504 counted for alpha below
        # says that a timeout is why beta answered (no wall-clock bound to break on a busy machine)
        stubs["alpha"].behavior = "slow"
        stubs["alpha"].delay_seconds = 30
        slow = client.post(
            "/v1/completions",
            json={"model": "support-bot", "prompt": "p"},
            headers={"x-kubetune-version": "alpha"},
        )
        assert slow.status_code == 200 and slow.headers["x-kubetune-version"] == "beta"
        assert slow.json()["choices"][0]["text"] == "beta: p"

        refused = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "dead"}
        )
        assert refused.status_code == 200 and refused.headers["x-kubetune-version"] == "beta"

        stubs["alpha"].behavior = "error"
        streamed = client.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers={"x-kubetune-version": "alpha"}
        )
        assert streamed.headers["x-kubetune-version"] == "beta"
        events = sse_events(streamed.text)
        assert (
            "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
            == "beta: hello there"
        )

        metrics = client.get("/metrics").text
    fallbacks = {"deployment": "support-bot", "to_version": "beta"}
    assert metric_value(metrics, "kubetune_gateway_fallbacks_total", from_version="alpha", **fallbacks) == 3
    assert metric_value(metrics, "kubetune_gateway_fallbacks_total", from_version="dead", **fallbacks) == 1
    assert attempts(metrics, "alpha", "500", CHAT) == 2
    assert attempts(metrics, "alpha", "504", COMPLETIONS) == 1
    assert attempts(metrics, "dead", "502", CHAT) == 1
    assert attempts(metrics, "beta", "200", CHAT) == 3
    assert attempts(metrics, "beta", "200", COMPLETIONS) == 1


def test_clear_errors_when_no_version_can_answer(stubs: Stubs, gateway_server: GatewayServer) -> None:
    config = base_config(stubs, fallback={"version": "beta", "timeoutSeconds": 5})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        stubs["alpha"].behavior = "error"
        stubs["beta"].behavior = "error"
        both = client.post("/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "alpha"})
        assert both.status_code == 502
        error = both.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "upstream_error"
        assert "version 'alpha' failed: HTTP 500" in error["message"]
        assert "the fallback version 'beta' failed too: HTTP 500" in error["message"]
        assert both.headers["x-kubetune-version"] == "alpha"

        # the fallback version itself failing is not retried on itself
        alone = client.post("/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "beta"})
        assert alone.status_code == 502 and "fallback" not in alone.json()["error"]["message"]
        assert len(stubs["beta"].received) == 2

        # a client error from the model is the client's answer: passed on, no fallback
        stubs["alpha"].behavior = "reject"
        rejected = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "alpha"}
        )
        assert rejected.status_code == 400
        assert rejected.json()["error"]["message"] == "prompt too long"
        assert rejected.headers["x-kubetune-version"] == "alpha"
        assert len(stubs["beta"].received) == 2


def test_timeout_without_fallback_is_a_504_naming_the_setting(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, timeouts={"responseSeconds": 0.3, "firstByteSeconds": 0.6})
    stubs["beta"].behavior = "slow"
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "beta"}
        )
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert "no answer within timeouts.responseSeconds (0.3s)" in response.json()["error"]["message"]
        streamed = client.post(
            "/v1/chat/completions", json=chat_body(stream=True), headers={"x-kubetune-version": "beta"}
        )
        assert streamed.status_code == 504
        assert streamed.headers["x-kubetune-version"] == "beta"
        assert "no answer within timeouts.firstByteSeconds (0.6s)" in streamed.json()["error"]["message"]


def collect_text(events: list[Any], field: str) -> str:
    pieces = []
    for event in events:
        if event == "[DONE]" or not event["choices"]:
            continue
        choice = event["choices"][0]
        pieces.append(choice["delta"].get("content") or "" if field == "delta" else choice["text"])
    return "".join(pieces)


def test_streaming_passes_chunks_through_with_the_gateway_id(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    pin = {"x-kubetune-version": "alpha"}
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=chat_body("one two three", stream=True), headers=pin
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            request_id = response.headers["x-request-id"]
            events = sse_events(response.read().decode())
        assert events[-1] == "[DONE]"
        assert collect_text(events, "delta") == "alpha: one two three"
        assert {event["id"] for event in events[:-1]} == {request_id}
        assert all(
            event["choices"] for event in events[:-1]
        )  # the usage chunk the gateway asked for is dropped
        assert stubs["alpha"].received[-1]["stream_options"] == {"include_usage": True}

        asked = client.post(
            "/v1/completions",
            json={
                "model": "support-bot",
                "prompt": "a b",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers=pin,
        )
        completion_events = sse_events(asked.text)
        assert collect_text(completion_events, "text") == "alpha: a b"
        assert completion_events[-2]["usage"] == {
            "prompt_tokens": 2,
            "completion_tokens": 3,
            "total_tokens": 5,
        }

        metrics = client.get("/metrics").text
    assert metric_value(metrics, "kubetune_gateway_time_to_first_token_seconds_count", version="alpha") == 2
    assert metric_value(metrics, "kubetune_gateway_tokens_total", version="alpha", direction="out") == 4 + 3
    assert metric_value(metrics, "kubetune_gateway_tokens_total", version="alpha", direction="in") == 3 + 2
    assert attempts(metrics, "alpha", "200", CHAT) == 1


def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    stubs["alpha"].behavior = "break-stream"
    config = base_config(stubs, fallback={"version": "beta", "timeoutSeconds": 5})
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions",
            json=chat_body("one two", stream=True),
            headers={"x-kubetune-version": "alpha"},
        )
        assert response.status_code == 200
        assert response.headers["x-kubetune-version"] == "alpha"
        events = sse_events(response.text)
        assert events[-1]["error"]["type"] == "server_error"
        assert "stopped answering mid-stream" in events[-1]["error"]["message"]
        metrics = client.get("/metrics").text
    assert not stubs["beta"].received  # too late to fall back: the client already has alpha's tokens
    assert attempts(metrics, "alpha", "502", CHAT) == 1


def test_a_stream_that_stalls_after_it_started_times_out_with_an_error_event(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    stubs["alpha"].behavior = "stall-stream"
    stubs["alpha"].delay_seconds = 30
    config = base_config(stubs, timeouts={"streamIdleSeconds": 2})  # the most a stream may be silent
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions",
            json=chat_body("one two", stream=True),
            headers={"x-kubetune-version": "alpha"},
        )
        assert response.status_code == 200
        events = sse_events(response.text)
        assert collect_text(events[:-1], "delta") == "alpha:"  # the first word, then nothing
        assert events[-1]["error"]["code"] == "upstream_timeout"
        assert (
            "stopped answering mid-stream: no bytes within timeouts.streamIdleSeconds (2s)"
            in (events[-1]["error"]["message"])
        )
        metrics = client.get("/metrics").text
    assert attempts(metrics, "alpha", "504", CHAT) == 1


def test_a_client_leaving_mid_stream_closes_the_upstream_and_is_counted(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    stubs["alpha"].behavior = "drip"
    with (
        gateway_server(base_config(stubs)) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body("one two three four five six", stream=True),
            headers={"x-kubetune-version": "alpha"},
        ) as response:
            first = next(response.iter_bytes())
            assert b"data: " in first
        # The client hung up after the first chunk; the attempt is still recorded once, not lost.
        deadline = time.monotonic() + 5
        while attempts(client.get("/metrics").text, "alpha", "200", CHAT) != 1:
            assert time.monotonic() < deadline, "the abandoned stream was never recorded"
            time.sleep(0.05)
        stubs["alpha"].behavior = "echo"
        assert (
            client.post(
                "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "alpha"}
            ).status_code
            == 200
        )


def test_a_non_json_answer_counts_as_a_failure(stubs: Stubs, gateway_server: GatewayServer) -> None:
    stubs["beta"].behavior = "garbage"
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        response = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "beta"}
        )
        assert response.status_code == 502
        assert "the answer is not a JSON object" in response.json()["error"]["message"]
        metrics = client.get("/metrics").text
    assert metric_value(metrics, "kubetune_gateway_requests_total", version="beta", code="502") == 1


def test_oversized_bodies_are_refused(
    stubs: Stubs, gateway_server: GatewayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.gateway import responses as gateway_responses

    monkeypatch.setattr(gateway_responses, "MAX_BODY_BYTES", 1000)
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/v1/chat/completions", json=chat_body("x" * 2000))
        assert response.status_code == 413
        assert "larger than 1000 bytes" in response.json()["error"]["message"]
    assert not stubs["alpha"].received and not stubs["beta"].received


def test_a_refusal_from_the_fallback_is_passed_on_and_not_cached(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, cache={"enabled": True}, fallback={"version": "beta", "timeoutSeconds": 5})
    stubs["alpha"].behavior = "error"
    stubs["beta"].behavior = "reject"
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(2):
            response = client.post(
                "/v1/chat/completions", json=chat_body(temperature=0), headers={"x-kubetune-version": "alpha"}
            )
            assert response.status_code == 400
            assert response.headers["x-kubetune-version"] == "beta"
    assert len(stubs["beta"].received) == 2


def test_a_fallback_that_cannot_take_the_request_is_not_counted(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(
        stubs,
        fallback={"version": "beta", "timeoutSeconds": 5},
        prompts=[{"name": "ticket", "template": "{{input}} (customer {{customer}})"}],
    )
    config["versions"][1]["prompt"] = "ticket"
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        stubs["alpha"].behavior = "error"
        failed = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-kubetune-version": "alpha"}
        )
        metrics = client.get("/metrics").text
    assert failed.status_code == 502
    assert "the fallback 'beta' cannot take it" in failed.json()["error"]["message"]
    assert stubs["beta"].received == []
    assert metric_value(metrics, "kubetune_gateway_fallbacks_total", from_version="alpha") == 0
