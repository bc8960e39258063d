"""A request whose version cannot be connected to is re-sent once to another ready version, by weight.

Nothing of the request reached that version (connection refused, or no connection within
``timeouts.connectSeconds``), so sending it elsewhere cannot do anything twice. The answer names the
first version (``Attempt.retried_from``, the ``x-kubetune-retried-from`` header), and each re-send is
reported to ``on_retry`` to be counted. A request that reached its version (an HTTP 500 came back)
is not re-sent elsewhere, nor is one pinned to its version (the caller passes no ``RetryElsewhere``).

These run against real sockets: model-server doubles served on loopback, a port where nothing
listens, and one whose connects hang.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from gateway_doubles import StubModelServer, base_config, chat_body, hanging_connect_url
from yarl import URL

from asgi_server import free_port
from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.routing import Router
from kubetune.gateway.upstream import (
    Attempt,
    AttemptLimits,
    RetryElsewhere,
    UpstreamBody,
    UpstreamClient,
    send_with_fallback,
)

Stubs = dict[str, StubModelServer]
CHAT = "/v1/chat/completions"


@dataclass
class Sent:
    """What one request through ``send_with_fallback`` did, as a gateway would see it."""

    attempt: Attempt | None = None
    error: GatewayError | None = None
    tried: list[str] = field(default_factory=list)
    retries: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)


def send_one(
    config: GatewayConfig, version: str, *, retry: bool, unavailable: frozenset[str] = frozenset()
) -> Sent:
    """Send a chat request to ``version`` over a real pooled client, as the gateway sends it."""
    urls = {v.name: URL(v.url.rstrip("/") + CHAT) for v in config.versions}
    router = Router(((v.name, v.weight) for v in config.versions), rng=random.Random(7))
    sent = Sent()
    unreachable: set[str] = set()

    def body_for(name: str) -> UpstreamBody:
        return UpstreamBody(name, chat_body("where is my order?"), added_usage=False)

    def not_ready() -> frozenset[str]:
        return unavailable | unreachable

    async def run() -> None:
        client = UpstreamClient()
        client.open()
        try:

            async def post(name: str, body: dict[str, Any], limits: AttemptLimits) -> Attempt:
                sent.tried.append(name)
                attempt = await client.post(urls[name], "req-1", name, body, limits)
                if attempt.unreachable:
                    unreachable.add(name)  # the gateway marks it down the same way
                return attempt

            retry_elsewhere = RetryElsewhere(
                choose=router.another_by_weight,
                on_retry=lambda failed, other: sent.retries.append((failed, other)),
            )
            sent.attempt, _ = await send_with_fallback(
                config,
                body_for(version),
                body_for,
                post,
                lambda failed, other: sent.fallbacks.append((failed, other)),
                not_ready,
                retry_elsewhere if retry else None,
            )
        except GatewayError as error:
            sent.error = error
        finally:
            await client.close()

    asyncio.run(run())
    return sent


def deployment(stubs: Stubs, dead_url: str, **overrides: Any) -> GatewayConfig:
    """alpha (weight 60) at ``dead_url``; beta (30) and gamma (10) answering."""
    config = base_config(stubs, **overrides)
    config["versions"] = [
        {"name": "alpha", "url": dead_url, "weight": 60},
        {"name": "beta", "url": stubs["beta"].url, "weight": 30},
        {"name": "gamma", "url": stubs["gamma"].url, "weight": 10},
    ]
    config["timeouts"]["connectSeconds"] = 1
    return GatewayConfig.model_validate(config)


def test_a_refused_connect_is_answered_by_another_version(stubs: Stubs) -> None:
    sent = send_one(deployment(stubs, f"http://127.0.0.1:{free_port()}"), "alpha", retry=True)
    assert sent.error is None and sent.attempt is not None
    assert sent.attempt.succeeded
    other = sent.attempt.version
    assert other in ("beta", "gamma")
    assert sent.attempt.retried_from == "alpha"
    assert sent.attempt.body["choices"][0]["message"]["content"] == f"{other}: where is my order?"
    assert sent.tried == ["alpha", other]
    assert sent.retries == [("alpha", other)]
    assert len(stubs[other].received) == 1


def test_a_connect_that_times_out_is_answered_by_another_version(stubs: Stubs) -> None:
    with hanging_connect_url() as hanging:
        sent = send_one(deployment(stubs, hanging), "alpha", retry=True)
    assert sent.attempt is not None and sent.attempt.succeeded
    assert sent.attempt.retried_from == "alpha"
    assert sent.retries == [("alpha", sent.attempt.version)]


def test_the_other_version_is_chosen_by_weight_among_the_ready(stubs: Stubs) -> None:
    config = deployment(stubs, f"http://127.0.0.1:{free_port()}")
    not_ready_gamma = send_one(config, "alpha", retry=True, unavailable=frozenset({"gamma"}))
    assert not_ready_gamma.attempt is not None and not_ready_gamma.attempt.version == "beta"

    router = Router([("alpha", 60), ("beta", 30), ("gamma", 10)], rng=random.Random(1))
    picks = Counter(router.another_by_weight(frozenset({"alpha"})) for _ in range(4000))
    assert picks.keys() == {"beta", "gamma"}
    assert picks["beta"] / 4000 == pytest.approx(0.75, abs=0.03)  # 30 / (30 + 10)
    assert router.another_by_weight(frozenset({"alpha", "beta", "gamma"})) is None


def test_a_pinned_request_is_not_sent_elsewhere(stubs: Stubs) -> None:
    sent = send_one(deployment(stubs, f"http://127.0.0.1:{free_port()}"), "alpha", retry=False)
    assert sent.error is not None and sent.error.status_code == 503
    assert sent.tried == ["alpha"] and sent.retries == []
    assert not stubs["beta"].received and not stubs["gamma"].received


def test_a_version_that_was_reached_is_not_sent_elsewhere(stubs: Stubs) -> None:
    """An HTTP 500 means the request got there (it may have been acted on): only the fallback, when
    the spec names one, may take it."""
    config = deployment(stubs, f"http://127.0.0.1:{free_port()}")
    stubs["beta"].behavior = "error"
    sent = send_one(config, "beta", retry=True)
    assert sent.error is not None and sent.error.status_code == 502
    assert sent.tried == ["beta"] and sent.retries == []
    assert not stubs["gamma"].received


def test_with_no_other_version_ready_the_client_gets_503(stubs: Stubs) -> None:
    config = deployment(stubs, f"http://127.0.0.1:{free_port()}")
    sent = send_one(config, "alpha", retry=True, unavailable=frozenset({"beta", "gamma"}))
    assert sent.error is not None and sent.error.status_code == 503
    assert sent.error.retry_after is not None and sent.error.retry_after >= 1
    assert sent.tried == ["alpha"] and sent.retries == []


def test_when_the_other_version_fails_too_the_fallback_answers(stubs: Stubs) -> None:
    # gamma takes no weighted traffic (weight 0) but is the fallback: the re-send can only go to beta.
    config = base_config(stubs, fallback={"version": "gamma"})
    config["versions"] = [
        {"name": "alpha", "url": f"http://127.0.0.1:{free_port()}", "weight": 60},
        {"name": "beta", "url": stubs["beta"].url, "weight": 40},
        {"name": "gamma", "url": stubs["gamma"].url, "weight": 0},
    ]
    stubs["beta"].behavior = "error"
    sent = send_one(GatewayConfig.model_validate(config), "alpha", retry=True)
    assert sent.attempt is not None and sent.attempt.succeeded
    assert sent.attempt.version == "gamma"
    assert sent.tried == ["alpha", "beta", "gamma"]
    assert sent.retries == [("alpha", "beta")]
    assert sent.fallbacks == [("beta", "gamma")]
