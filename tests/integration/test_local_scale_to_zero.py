"""Scale to zero on a laptop (spec.serving.autoscaling.minReplicas 0): `kubetune up`'s LocalServing stops a
version's real `bentoml serve` after scaleToZeroAfter without requests, and the real gateway holds the
next request (an openai client's) while the server starts again, then answers it.

The test plays `up`'s reconcile loop in its own thread (the servers die with the thread that started
them): each pass steps the versions, then writes the gateway config from what they say, as the planner
does; the requests go from a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.local.serving import LocalServing
from kubetune.plan.versions import DeploymentRef, VersionObservation, VersionServing
from kubetune_components.dev import tinylm
from kubetune_contract.deployment import Autoscaling, Serving

ROUTER = DeploymentRef(name="router", namespace="default")
IDLE = "4s"
ASLEEP = "scaled to zero"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.build_random_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def serving(tmp_path: Path, said: list[str]) -> Iterator[LocalServing]:
    serving = LocalServing(tmp_path / "home", notify=said.append, stop_grace_s=5.0)
    yield serving
    serving.close()


def version(model: Path) -> VersionServing:
    return VersionServing(
        name="v1",
        model_uri=str(model),
        bento="router-v1",
        env={"KUBETUNE_DEPLOYMENT": "router", "KUBETUNE_VERSION": "v1", "KUBETUNE_MAX_BATCH_SIZE": "2"},
        serving=Serving(autoscaling=Autoscaling(min_replicas=0, scale_to_zero_after=IDLE, hold_timeout="5m")),
    )


def reconcile(serving: LocalServing, spec: VersionServing) -> tuple[VersionObservation, str]:
    """One pass of `up` for the deployment: its version, then its gateway; returns the version's
    observation and the gateway's URL."""
    observed = serving.ensure_versions(ROUTER, [spec])["v1"]
    config: dict[str, Any] = {
        "deployment": "router",
        "versions": [{"name": "v1", "url": observed.url, "weight": 100, "ready": observed.ready}],
        "access": {"auth": "disabled"},
        "scaleFromZero": {"maxHeldRequests": 8, "holdSeconds": 300},
    }
    gateway = serving.ensure_gateway(ROUTER, config)
    assert gateway.endpoint is not None, gateway.message
    return observed, gateway.endpoint.removesuffix("/v1")


def reconcile_until(
    serving: LocalServing, spec: VersionServing, done: Any, what: str, timeout_s: float = 600
) -> tuple[VersionObservation, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        observed, gateway_url = reconcile(serving, spec)
        assert not observed.failed, observed.message
        if done(observed, gateway_url):
            return observed, gateway_url
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s}s; last: {observed.message}"
        time.sleep(0.5)


def gateway_ready(gateway_url: str) -> bool:
    try:
        return httpx.get(gateway_url + "/readyz", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def ask(gateway_url: str) -> tuple[str, float]:
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=600)
    started = time.monotonic()
    completion = client.chat.completions.create(
        model="router", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert completion.choices[0].message.content is not None
    return completion.choices[0].message.content, time.monotonic() - started


def server_pids(serving: LocalServing) -> list[int]:
    return [process.pid for process in serving.processes() if "bentoml serve" in process.role]


def test_an_idle_version_stops_and_the_next_request_waits_for_it_to_start_and_is_answered(
    serving: LocalServing, model: Path, said: list[str]
) -> None:
    spec = version(model)
    _, gateway_url = reconcile_until(
        serving, spec, lambda seen, url: seen.ready and gateway_ready(url), "ready"
    )
    (first_server,) = server_pids(serving)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(ask, gateway_url)
        reconcile_until(serving, spec, lambda *_: first.done(), "first answer", timeout_s=300)
        first.result()

        # No request for scaleToZeroAfter: the server stops, and the version says why.
        observed, _ = reconcile_until(serving, spec, lambda seen, _: ASLEEP in (seen.message or ""), "asleep")
        assert not observed.ready and server_pids(serving) == []
        assert observed.scaled_to_zero  # asleep, not failing: the ModelDeployment stays Ready (ScaledToZero)
        assert any("to zero" in line for line in said), said

        # The next request is held by the gateway, wakes the version, and is answered.
        ready_before = held_outcomes(gateway_url)
        held: Future[tuple[str, float]] = pool.submit(ask, gateway_url)
        reconcile_until(serving, spec, lambda *_: held.done(), "held request answered", timeout_s=600)
        _, waited = held.result()
    (second_server,) = server_pids(serving)
    assert second_server != first_server
    assert waited > 1.0  # it waited for the server to start (loading the model takes seconds)
    assert any("waking" in line for line in said), said
    assert held_outcomes(gateway_url) == {"ready": ready_before["ready"] + 1}


def held_outcomes(gateway_url: str) -> dict[str, float]:
    """kubetune_gateway_held_requests_total of v1 by outcome, from the gateway's /metrics."""
    exposition = httpx.get(gateway_url + "/metrics", trust_env=False).text
    outcomes = {"ready": 0.0}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "kubetune_gateway_held_requests_total" and sample.labels["version"] == "v1":
                outcomes[sample.labels["outcome"]] = sample.value
    return outcomes
