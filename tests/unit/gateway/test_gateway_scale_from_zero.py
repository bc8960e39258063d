"""A version scaled to zero: the gateway holds its requests until it is ready, within bounds.

With ``scaleFromZero`` in the config (spec.serving.autoscaling.minReplicas 0), a version the config marks
not ready is asleep, not broken: its requests wait until its ``/readyz`` answers (or the config says it
is ready), at most ``maxHeldRequests`` of them and each at most ``holdSeconds``; then 503 with
Retry-After and the OpenAI error body. While held a request counts in the open-requests gauge KEDA
scales on, and each held request is counted by outcome.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from gateway_doubles import GatewayServer, chat_body, metric_value
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_server import free_port, serve_app

CHAT = "/v1/chat/completions"
OPEN = "kubetune_gateway_open_requests"
HELD = "kubetune_gateway_held_requests_total"


class SleepingServer:
    """A model server that is starting: /readyz answers 503 until ``wake()``."""

    def __init__(self) -> None:
        self.awake = threading.Event()
        self.release = threading.Event()  # answers wait for it
        self.release.set()
        self.answered = 0
        self.app = Starlette(
            routes=[
                Route("/readyz", self.readyz, methods=["GET"]),
                Route(CHAT, self.chat, methods=["POST"]),
            ]
        )

    async def readyz(self, request: Request) -> Response:
        return Response(status_code=200 if self.awake.is_set() else 503)

    async def chat(self, request: Request) -> Response:
        await asyncio.to_thread(self.release.wait)
        self.answered += 1
        body = await request.json()
        text = body["messages"][-1]["content"]
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "tiny",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"woke: {text}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


@pytest.fixture
def sleeper() -> Iterator[tuple[SleepingServer, str]]:
    server = SleepingServer()
    with serve_app(server.app) as url:
        yield server, url


def config(url: str, **scale_from_zero: Any) -> dict[str, Any]:
    return {
        "deployment": "support-bot",
        "versions": [{"name": "tuned", "url": url, "weight": 100, "ready": False}],
        "timeouts": {"firstByteSeconds": 10, "responseSeconds": 10, "streamIdleSeconds": 10},
        "scaleFromZero": {"maxHeldRequests": 4, "holdSeconds": 60, **scale_from_zero},
    }


def poll(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def metrics(client: httpx.Client) -> str:
    return client.get("/metrics").text


def test_a_request_for_a_sleeping_version_waits_until_it_is_ready_then_is_answered(
    sleeper: tuple[SleepingServer, str], gateway_server: GatewayServer
) -> None:
    server, url = sleeper
    with (
        gateway_server(config(url)) as (gateway_url, _),
        httpx.Client(base_url=gateway_url, timeout=60) as client,
    ):
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.post, CHAT, json=chat_body("hi"))
            # held, and visible to KEDA (or kubetune up) as demand for the version
            poll(lambda: metric_value(metrics(client), OPEN, deployment="support-bot", version="tuned") == 1)
            assert not held.done() and server.answered == 0
            server.awake.set()
            response = held.result(timeout=30)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "woke: hi"
        text = metrics(client)
    assert metric_value(text, OPEN, version="tuned") == 0
    assert metric_value(text, HELD, deployment="support-bot", version="tuned", outcome="ready") == 1


def test_a_request_held_past_hold_seconds_gets_503_with_retry_after(
    sleeper: tuple[SleepingServer, str], gateway_server: GatewayServer
) -> None:
    _, url = sleeper
    with (
        gateway_server(config(url, holdSeconds=1)) as (gateway_url, _),
        httpx.Client(base_url=gateway_url, timeout=30) as client,
    ):
        started = time.monotonic()
        response = client.post(CHAT, json=chat_body())
        waited = time.monotonic() - started
        text = metrics(client)
    assert response.status_code == 503 and waited >= 1
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "version_scaling_from_zero")
    assert "holdTimeout" in error["message"] and "'tuned'" in error["message"]
    assert metric_value(text, HELD, version="tuned", outcome="timeout") == 1


def test_one_request_more_than_max_held_requests_is_refused_at_once(
    sleeper: tuple[SleepingServer, str], gateway_server: GatewayServer
) -> None:
    server, url = sleeper
    with (
        gateway_server(config(url, maxHeldRequests=2)) as (gateway_url, _),
        httpx.Client(base_url=gateway_url, timeout=60) as client,
    ):
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.post, CHAT, json=chat_body(f"m{n}")) for n in range(2)]
            poll(lambda: metric_value(metrics(client), OPEN, version="tuned") == 2)
            refused = client.post(CHAT, json=chat_body("one too many"))
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "version_scaling_from_zero"
            assert "maxHeldRequests" in refused.json()["error"]["message"]
            server.awake.set()
            assert [future.result(timeout=30).status_code for future in held] == [200, 200]
        text = metrics(client)
    assert metric_value(text, HELD, version="tuned", outcome="full") == 1
    assert metric_value(text, HELD, version="tuned", outcome="ready") == 2


def test_without_scale_from_zero_a_version_not_ready_is_not_waited_for(
    sleeper: tuple[SleepingServer, str], gateway_server: GatewayServer
) -> None:
    _, url = sleeper
    plain = config(url)
    del plain["scaleFromZero"]
    with gateway_server(plain) as (gateway_url, _), httpx.Client(base_url=gateway_url, timeout=30) as client:
        started = time.monotonic()
        response = client.post(CHAT, json=chat_body())
    assert response.status_code == 503 and time.monotonic() - started < 5
    assert response.json()["error"]["code"] == "no_version_ready"


def test_a_request_in_flight_counts_as_open_until_it_is_answered(
    sleeper: tuple[SleepingServer, str], gateway_server: GatewayServer
) -> None:
    server, url = sleeper
    server.awake.set()
    server.release.clear()
    awake = config(url)
    awake["versions"][0]["ready"] = True
    with gateway_server(awake) as (gateway_url, _), httpx.Client(base_url=gateway_url, timeout=60) as client:
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(client.post, CHAT, json=chat_body())
            poll(lambda: metric_value(metrics(client), OPEN, version="tuned") == 1)
            server.release.set()
            assert sent.result(timeout=30).status_code == 200
        text = metrics(client)
    assert metric_value(text, OPEN, version="tuned") == 0
    assert metric_value(text, HELD, version="tuned", outcome="ready") == 0  # it was never held


def bound_to(port: int) -> socket.socket:
    """A socket bound to ``port`` again, for a server that comes back where it was."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def test_a_version_gone_to_zero_before_the_config_says_so_holds_its_requests_until_it_is_back(
    gateway_server: GatewayServer,
) -> None:
    # KEDA scaled the version to zero; the gateway's config still marks it ready: nothing listens.
    server = SleepingServer()
    server.awake.set()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    marked_ready = config(url)
    marked_ready["versions"][0]["ready"] = True
    with (
        gateway_server(marked_ready) as (gateway_url, _),
        httpx.Client(base_url=gateway_url, timeout=60) as client,
    ):
        with serve_app(server.app, bound_to(port)):
            assert client.post(CHAT, json=chat_body("before")).status_code == 200
        # the server went away: the next requests are held, not answered 503 at once
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.post, CHAT, json=chat_body(f"m{n}")) for n in range(2)]
            poll(lambda: metric_value(metrics(client), OPEN, deployment="support-bot", version="tuned") == 2)
            assert not any(future.done() for future in held)
            with serve_app(server.app, bound_to(port)):  # KEDA scaled it up again
                answers = [future.result(timeout=30) for future in held]
        text = metrics(client)
        health = client.get("/healthz").json()
    assert [answer.status_code for answer in answers] == [200, 200]
    assert sorted(a.json()["choices"][0]["message"]["content"] for a in answers) == ["woke: m0", "woke: m1"]
    assert metric_value(text, HELD, version="tuned", outcome="ready") == 2
    assert metric_value(text, OPEN, version="tuned") == 0
    assert health["notRouted"] == []  # asleep, never marked down


def test_a_version_gone_to_zero_that_does_not_come_back_gets_503_with_retry_after_once_held_too_long(
    gateway_server: GatewayServer,
) -> None:
    gone = config(f"http://127.0.0.1:{free_port()}", holdSeconds=1)
    gone["versions"][0]["ready"] = True
    with gateway_server(gone) as (gateway_url, _), httpx.Client(base_url=gateway_url, timeout=30) as client:
        started = time.monotonic()
        response = client.post(CHAT, json=chat_body())
        waited = time.monotonic() - started
        text = metrics(client)
    assert response.status_code == 503 and waited >= 1
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "version_scaling_from_zero"
    assert metric_value(text, HELD, version="tuned", outcome="timeout") == 1
