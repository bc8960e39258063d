"""Fixtures for the gateway tests (the doubles themselves live in gateway_doubles.py).

``upstreams`` (session): three StubModelServer instances (alpha, beta, gamma) served on free ports;
``stubs`` (function): the same, reset to echo with no recorded requests;
``gateway_server`` (function): ``with gateway_server(config) as (url, gateway)`` serves a gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from gateway_doubles import GatewayServer, StubModelServer

from asgi_server import serve_app
from kubetune.gateway.app import Gateway, create_app
from kubetune.gateway.config import GatewayConfig


@pytest.fixture(scope="session")
def upstreams() -> Iterator[dict[str, StubModelServer]]:
    stubs = {name: StubModelServer(name) for name in ("alpha", "beta", "gamma")}
    with (
        serve_app(stubs["alpha"].app) as alpha,
        serve_app(stubs["beta"].app) as beta,
        serve_app(stubs["gamma"].app) as gamma,
    ):
        for stub, url in zip(stubs.values(), (alpha, beta, gamma), strict=True):
            stub.url = url
        yield stubs


@pytest.fixture
def stubs(upstreams: dict[str, StubModelServer]) -> dict[str, StubModelServer]:
    """The session's model-server doubles, reset to echo with no recorded requests."""
    for stub in upstreams.values():
        stub.reset()
    return upstreams


@pytest.fixture
def gateway_server() -> GatewayServer:
    """``with gateway_server(config_dict_or_path) as (url, gateway): ...``"""

    @contextmanager
    def start(
        source: dict[str, Any] | Any, reload_interval_seconds: float = 1.0
    ) -> Iterator[tuple[str, Gateway]]:
        config_source = GatewayConfig.model_validate(source) if isinstance(source, dict) else source
        app = create_app(config_source, reload_interval_seconds=reload_interval_seconds)
        with serve_app(app) as url:
            yield url, app.state.gateway

    return start
