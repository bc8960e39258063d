"""Canary rollouts end to end: the real gateway, a real Prometheus scraping it, and the controller.

Two OpenAI-compatible upstreams stand in for model servers (one healthy, one answering 500s); a
thread drives traffic through the gateway; ``reconcile_deployment`` ticks with a ServingBackend that
maps model paths to the upstreams and writes the gateway's config file (the gateway reloads it).
The canary analysis queries Prometheus with the contract's PromQL, awaited on the test's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_server import bound_socket, serve_app
from kubetune.gateway.app import create_app
from kubetune.reconcile.deployment import (
    DeploymentOutcome,
    DeploymentRef,
    GatewayObservation,
    VersionObservation,
    VersionServing,
    reconcile_deployment,
)
from kubetune.rollout.prometheus import PrometheusClient
from prometheus_server import PrometheusServer, PrometheusUnavailable, running_prometheus

DEPLOYMENT = "support-bot"


# -- upstream doubles ------------------------------------------------------------------------------


def upstream(name: str, status: int) -> Starlette:
    """A model-server double: answers every chat completion with ``status``."""

    async def chat(request: Request) -> Response:
        body = await request.json()
        if status != 200:
            return JSONResponse(
                {"error": {"message": f"{name} crashed", "type": "server_error"}}, status_code=status
            )
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return JSONResponse(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1700000000,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"{name} ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# -- the serving backend of this test ---------------------------------------------------------------


class LoopbackServing:
    """Versions are the upstreams named by their model path; the gateway runs in a thread and
    reads the config file this backend writes."""

    def __init__(
        self, upstreams: Mapping[str, str], config_path: Path, gateway_socket: socket.socket
    ) -> None:
        self.upstreams = upstreams
        self.config_path = config_path
        self.gateway_socket = gateway_socket
        self.gateway: Any = None
        self.gateway_url: str | None = None
        self.configs: list[dict[str, Any]] = []

    async def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        return {
            v.name: VersionObservation(url=self.upstreams[Path(v.model_uri).name], ready=True)
            for v in versions
        }

    async def ensure_gateway(
        self, deployment: DeploymentRef, config: Mapping[str, Any], replicas: int = 1
    ) -> GatewayObservation:
        if not self.configs or self.configs[-1] != config:
            temporary = self.config_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(config))
            os.replace(temporary, self.config_path)  # atomic, as a ConfigMap update is
            self.configs.append(dict(config))
        if self.gateway is None:
            self.gateway = serve_app(
                create_app(self.config_path, reload_interval_seconds=0.2), self.gateway_socket
            )
            self.gateway_url = self.gateway.__enter__()
        return GatewayObservation(endpoint=f"{self.gateway_url}/v1", ready=True)

    async def remove(self, deployment: DeploymentRef) -> None:
        if self.gateway is not None:
            self.gateway.__exit__(None, None, None)
            self.gateway = None


class Traffic:
    """A thread sending chat completions through the gateway, each from a different user."""

    def __init__(self, gateway_url: str) -> None:
        self.url = f"{gateway_url}/v1/chat/completions"
        self.stop = threading.Event()
        self.answered_by: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            for number in itertools.count():
                if self.stop.is_set():
                    return
                body = {
                    "model": DEPLOYMENT,
                    "messages": [{"role": "user", "content": "hi"}],
                    "user": f"u{number}",
                }
                try:
                    response = client.post(self.url, json=body)
                    self.answered_by.append(response.headers.get("x-kubetune-version", "?"))
                except httpx.HTTPError:
                    self.answered_by.append("error")
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@dataclass
class Rig:
    prometheus: PrometheusServer
    serving: LoopbackServing
    client: PrometheusClient
    body: dict[str, Any]

    async def tick(self) -> DeploymentOutcome:
        outcome = await reconcile_deployment(
            self.body,
            lookup=lambda kind, ns, name: None,
            serving=self.serving,
            prometheus=self.client,
            now=datetime.now(UTC),
        )
        self.body["status"] = outcome.status
        return outcome

    def update_spec(self, spec: dict[str, Any]) -> None:
        self.body["spec"] = spec
        self.body["metadata"]["generation"] += 1

    async def tick_until(
        self, done: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> list[dict[str, Any]]:
        """Reconcile every 0.25 s until ``done(status)``; returns every status seen."""
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen.append((await self.tick()).status)
            if done(seen[-1]):
                return seen
            await asyncio.sleep(0.25)
        raise AssertionError(f"not done within {timeout_s}s; last status: {json.dumps(seen[-1], indent=1)}")


STABLE = {"name": "stable", "model": {"uri": "/models/healthy"}, "weight": 100}


def rollout_spec(canary_model: str, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "versions": [
            {**STABLE, "weight": 70},
            {"name": "canary", "model": {"uri": f"/models/{canary_model}"}, "weight": 30},
        ],
        "rollout": {
            "steps": [{"weight": 10, "pause": "3s"}, {"weight": 50, "pause": "3s"}],
            # Prometheus needs a couple of scrapes of the canary's series before rate() has data: the
            # analyses of the first seconds are inconclusive, which the limit tolerates.
            "analysis": {"interval": "1s", "window": "5s", "metrics": metrics, "inconclusiveLimit": 10},
            "autoRollback": True,
        },
    }


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    gateway_socket = bound_socket()
    gateway_port = gateway_socket.getsockname()[1]
    try:
        prometheus_context = running_prometheus([f"127.0.0.1:{gateway_port}"], tmp_path / "prometheus")
        with (
            serve_app(upstream("healthy", 200)) as healthy,
            serve_app(upstream("healthy-too", 200)) as healthy_too,
            serve_app(upstream("failing", 500)) as failing,
            prometheus_context as prometheus,
        ):
            upstreams = {"healthy": healthy, "healthy-too": healthy_too, "failing": failing}
            serving = LoopbackServing(upstreams, tmp_path / "gateway.json", gateway_socket)
            body = {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": DEPLOYMENT, "namespace": "default", "uid": "uid-1", "generation": 1},
                "spec": {"versions": [STABLE]},
            }
            try:
                async with PrometheusClient(prometheus.url, timeout_s=5) as client:
                    yield Rig(prometheus, serving, client, body)
            finally:
                await serving.remove(DeploymentRef(DEPLOYMENT, "default"))
    except PrometheusUnavailable as missing:
        pytest.skip(str(missing))
    finally:
        gateway_socket.close()


async def start_serving(rig: Rig) -> str:
    first = (await rig.tick()).status
    assert first["weights"] == "stable=100" and first["endpoint"] is not None
    assert rig.serving.gateway_url is not None
    rig.prometheus.wait_for_targets_up()
    return rig.serving.gateway_url


async def test_a_canary_answering_500s_is_rolled_back_on_its_error_rate(rig: Rig) -> None:
    gateway_url = await start_serving(rig)
    with Traffic(gateway_url) as traffic:
        rig.update_spec(rollout_spec("failing", [{"name": "errorRate", "max": "0.05"}]))
        seen = await rig.tick_until(lambda status: status["rollout"]["state"] != "Progressing", timeout_s=25)
        status = seen[-1]
        rollout = status["rollout"]
        assert rollout["state"] == "RolledBack", rollout
        analysis = rollout["lastAnalysis"]
        assert (analysis["passed"], analysis["metric"], analysis["threshold"]) == (False, "errorRate", "0.05")
        assert analysis["value"] > 0.05
        assert "errorRate" in rollout["message"] and "above max 0.05" in rollout["message"]
        assert status["weights"] == "stable=100,canary=0"
        assert {v["name"]: v["weight"] for v in status["versions"]} == {"stable": 100, "canary": 0}
        assert any(s["weights"] == "stable=90,canary=10" for s in seen)
        assert [v["weight"] for v in rig.serving.configs[-1]["versions"]] == [100, 0]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "RolledBack"
        # The gateway picked the new weights up: from now on only the stable version answers.
        await asyncio.sleep(0.5)
        after = len(traffic.answered_by)
        await asyncio.sleep(1.0)
    recent = traffic.answered_by[after:]
    assert recent and set(recent) == {"stable"}, recent
    assert "canary" in traffic.answered_by[:after]  # the canary did get traffic during its step


async def test_a_healthy_canary_is_promoted_through_the_steps(rig: Rig) -> None:
    gateway_url = await start_serving(rig)
    metrics = [{"name": "errorRate", "max": "0.05"}, {"name": "p95Latency", "max": "2"}]
    with Traffic(gateway_url) as traffic:
        rig.update_spec(rollout_spec("healthy-too", metrics))
        seen = await rig.tick_until(lambda status: status["rollout"]["state"] != "Progressing", timeout_s=25)
    status = seen[-1]
    assert status["rollout"]["state"] == "Promoted", status["rollout"]
    weights = [s["weights"] for s in seen]
    assert weights[-1] == "stable=70,canary=30"
    assert weights.index("stable=90,canary=10") < weights.index("stable=50,canary=50")
    analysis = status["rollout"]["lastAnalysis"]
    assert analysis["passed"] is True
    p95 = next(result for result in analysis["results"] if result["name"] == "p95Latency")
    assert p95["passed"] is True and 0 < p95["value"] <= 2
    error_rate = next(result for result in analysis["results"] if result["name"] == "errorRate")
    assert (error_rate["passed"], error_rate["value"]) == (True, 0.0)  # measured, not "no data"
    assert [v["weight"] for v in rig.serving.configs[-1]["versions"]] == [70, 30]
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "RolloutComplete")
    assert "canary" in traffic.answered_by and "error" not in traffic.answered_by
