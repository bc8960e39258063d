"""The gateway routes only to versions that are ready, and every wait on a version is bounded.

Ready means: the config does not mark the version ``ready: false`` and the gateway has not failed to
connect to it within the last ``health.markDownSeconds``. With no version ready it answers 503 with
Retry-After; a version that hangs is given up on after the setting the 504 names.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from gateway_doubles import (
    GatewayServer,
    StubModelServer,
    attempts,
    base_config,
    chat_body,
    hanging_connect_url,
    metric_value,
)

from asgi_server import free_port
from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.health import UpstreamHealth
from kubetune.gateway.routing import Router

Stubs = dict[str, StubModelServer]
CHAT = "/v1/chat/completions"
# what a message quoting a Python or aiohttp exception looks like
INTERNALS = re.compile(r"[A-Z][A-Za-z]*(Error|Exception)\b|Errno|errno|aiohttp|Traceback|Connect call failed")


def assert_unavailable(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == code
    assert not INTERNALS.search(error["message"]), error["message"]
    return error


def test_versions_the_config_marks_not_ready_get_no_traffic(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs)
    config["versions"][0]["ready"] = False  # alpha carries 80 of the weight but does not answer yet
    router = Router([("alpha", 80), ("beta", 20)])
    users = [f"customer-{index}" for index in range(40)]
    assert any(router.sticky(user) == "alpha" for user in users)
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for user in users:
            response = client.post(CHAT, json=chat_body("hi", user=user))
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "beta: hi"
        pinned = client.post(CHAT, json=chat_body(), headers={"x-kubetune-version": "alpha"})
        error = assert_unavailable(pinned, "version_not_ready")
        assert "'alpha' is not ready" in error["message"]
        assert pinned.headers["x-kubetune-version"] == "alpha"
    assert stubs["alpha"].received == []


def test_with_no_version_ready_the_gateway_answers_503_with_retry_after(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, health={"markDownSeconds": 7})
    for version in config["versions"]:
        version["ready"] = False
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        for body in (chat_body(), chat_body(stream=True)):
            response = client.post(CHAT, json=body)
            error = assert_unavailable(response, "no_version_ready")
            assert response.headers["retry-after"] == "7"
            assert "no version of 'support-bot' is ready" in error["message"]
            assert response.headers["x-kubetune-version"] == "-"
    assert stubs["alpha"].received == [] and stubs["beta"].received == []


def test_a_ready_fallback_answers_while_no_weighted_version_is_ready(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, fallback={"version": "gamma", "timeoutSeconds": 5})
    config["versions"].append({"name": "gamma", "url": stubs["gamma"].url, "weight": 0})
    for version in config["versions"][:2]:
        version["ready"] = False
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        anyone = client.post(CHAT, json=chat_body("hi"))
        pinned = client.post(CHAT, json=chat_body("hi"), headers={"x-kubetune-version": "alpha"})
        metrics = client.get("/metrics").text
    for response in (anyone, pinned):
        assert response.status_code == 200 and response.headers["x-kubetune-version"] == "gamma"
        assert response.json()["choices"][0]["message"]["content"] == "gamma: hi"
    assert stubs["alpha"].received == [] and stubs["beta"].received == []
    # the pinned request is the one that names a version the fallback stood in for
    fallbacks = {"deployment": "support-bot", "to_version": "gamma"}
    assert metric_value(metrics, "kubetune_gateway_fallbacks_total", from_version="alpha", **fallbacks) == 1


def test_a_version_nothing_listens_on_is_marked_down_and_its_share_goes_to_the_others(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, health={"markDownSeconds": 1})
    config["versions"][0]["url"] = f"http://127.0.0.1:{free_port()}"  # alpha: nothing listens
    pin_alpha = {"x-kubetune-version": "alpha"}
    with gateway_server(config) as (url, gateway), httpx.Client(base_url=url, timeout=10) as client:
        refused = client.post(CHAT, json=chat_body(), headers=pin_alpha)
        error = assert_unavailable(refused, "version_unreachable")
        assert error["message"] == "version 'alpha' failed: could not connect to it"
        marked_down_at = time.monotonic()

        # while alpha is down, its users are served by beta, and nothing is sent to alpha
        for index in range(20):
            response = client.post(CHAT, json=chat_body("hi", user=f"customer-{index}"))
            assert response.status_code == 200 and response.headers["x-kubetune-version"] == "beta"
        assert client.get("/healthz").json()["notRouted"] == ["alpha"]
        if time.monotonic() - marked_down_at < 1:  # still inside the window on a slow machine
            assert_unavailable(client.post(CHAT, json=chat_body(), headers=pin_alpha), "version_not_ready")

        # after markDownSeconds the next request tries alpha again
        while gateway.health.down():
            time.sleep(0.05)
        again = client.post(CHAT, json=chat_body(), headers=pin_alpha)
        assert_unavailable(again, "version_unreachable")
        metrics = client.get("/metrics").text
    assert attempts(metrics, "alpha", "502", CHAT) == 2  # the two tries, nothing in between


def test_a_version_whose_connect_hangs_is_given_up_on_after_the_connect_timeout(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    config = base_config(stubs, timeouts={"connectSeconds": 0.3})
    with hanging_connect_url() as hanging:
        config["versions"][0]["url"] = hanging
        with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=5) as client:
            response = client.post(CHAT, json=chat_body(), headers={"x-kubetune-version": "alpha"})
            error = assert_unavailable(response, "version_unreachable")
            assert error["message"] == (
                "version 'alpha' failed: could not connect within timeouts.connectSeconds (0.3s)"
            )
            assert client.get("/healthz").json()["notRouted"] == ["alpha"]


def test_a_fallback_that_hangs_too_is_given_up_on_after_the_fallback_timeout(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    # responseSeconds is far above what the client waits: only fallback.timeoutSeconds can end this
    config = base_config(
        stubs, fallback={"version": "beta", "timeoutSeconds": 0.3}, timeouts={"responseSeconds": 60}
    )
    for stub in (stubs["alpha"], stubs["beta"]):
        stub.behavior, stub.delay_seconds = "slow", 30
    with gateway_server(config) as (url, _), httpx.Client(base_url=url, timeout=5) as client:
        response = client.post(CHAT, json=chat_body(), headers={"x-kubetune-version": "alpha"})
        streamed = client.post(CHAT, json=chat_body(stream=True), headers={"x-kubetune-version": "alpha"})
    for answer in (response, streamed):
        assert answer.status_code == 504
        error = answer.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "upstream_timeout"
        assert error["message"] == (
            "version 'alpha' failed: no answer within fallback.timeoutSeconds (0.3s); the fallback "
            "version 'beta' failed too: no answer within fallback.timeoutSeconds (0.3s)"
        )


def test_upstream_failures_reach_the_client_without_the_exception(
    stubs: Stubs, gateway_server: GatewayServer
) -> None:
    stubs["alpha"].behavior = "break-stream"
    stubs["beta"].behavior = "error"
    with gateway_server(base_config(stubs)) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        broken = client.post(
            CHAT, json=chat_body("one two", stream=True), headers={"x-kubetune-version": "alpha"}
        )
        crashed = client.post(CHAT, json=chat_body(), headers={"x-kubetune-version": "beta"})
    last_event = broken.text.strip().split("\n\n")[-1]
    assert "stopped answering mid-stream: the connection to it broke" in last_event
    assert not INTERNALS.search(last_event), last_event
    assert crashed.status_code == 502
    # the model server's own error body ("model crashed") stays in the gateway's log
    assert crashed.json()["error"]["message"] == "version 'beta' failed: HTTP 500"


def test_health_forgets_a_version_once_its_time_is_up() -> None:
    now = [100.0]
    health = UpstreamHealth(clock=lambda: now[0])
    config = GatewayConfig.model_validate(
        {
            "deployment": "d",
            "versions": [
                {"name": "a", "url": "http://a:1", "weight": 50},
                {"name": "b", "url": "http://b:1", "weight": 50, "ready": False},
            ],
            "health": {"markDownSeconds": 4},
        }
    )
    assert health.unavailable(config) == {"b"}
    assert health.retry_after(config) == 4  # none marked down: markDownSeconds
    health.mark_down("a", 2.5)
    assert health.unavailable(config) == {"a", "b"}
    now[0] += 1
    assert health.retry_after(config) == 2  # 1.5 s left, in whole seconds
    now[0] += 1.5
    assert health.down() == frozenset() and health.unavailable(config) == {"b"}
