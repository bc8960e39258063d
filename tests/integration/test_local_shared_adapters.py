"""LoRA versions that share a base: `kubetune up` serves them with one real `bentoml serve` of the
shared adapter service, loading and unloading versions that join and leave while the same process
serves on; and the real gateway routes to them (weights, the override header, x-kubetune-version) as
to servers of their own. The adapters are trained and published by the real steps (tiny_adapter).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

from asgi_server import serve_app
from kubetune.gateway.app import create_app as create_gateway
from kubetune.gateway.config import GatewayConfig
from kubetune.local.serving import LocalServing
from kubetune.plan.versions import (
    DeploymentRef,
    VersionObservation,
    VersionServing,
    shared_adapter_groups,
)
from kubetune_components.dev import tinylm
from kubetune_components.serving.adapters import SharedAdapters
from kubetune_components.serving.requests import SamplingParams
from kubetune_components.serving.runtime import ModelRuntime
from kubetune_components.serving.shared_api import SharedSlot, create_shared_app, version_url
from kubetune_contract.deployment import Serving
from tiny_adapter import ROUTING_INSTRUCTION, ROUTING_ROWS, publish_lora_adapter

ROUTER = DeploymentRef(name="router", namespace="default")
PROMPT = f"{ROUTING_INSTRUCTION}\nticket about my invoice"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.build_random_tiny(tmp_path_factory.mktemp("base") / "model", seed=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, base: Path) -> dict[str, Path]:
    published: dict[str, Path] = {}
    for seed in range(1, 5):
        published[f"v{seed}"] = publish_lora_adapter(
            tmp_path_factory.mktemp(f"adapter-{seed}"),
            base,
            ROUTING_ROWS[seed:],
            lora={"r": 4},
            training={
                "maxSteps": 4,
                "batchSize": 4,
                "learningRate": "2e-1",
                "seed": seed,
                "maxSeqLength": 64,
            },
        )
    return published


@pytest.fixture(scope="module")
def alone(adapters: dict[str, Path]) -> dict[str, str]:
    """Each adapter's greedy answer to PROMPT from a runtime of its own."""
    answers: dict[str, str] = {}
    for name, directory in adapters.items():
        runtime = ModelRuntime.load(directory, device="cpu")
        prompt = runtime.prepare_completion(PROMPT)
        answers[name] = runtime.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)).text
        runtime.close()
    return answers


def lora_version(name: str, model_dir: Path, base: Path, serving: Serving | None = None) -> VersionServing:
    return VersionServing(
        name=name,
        model_uri=str(model_dir),
        bento=f"router-{name}",
        env={"KUBETUNE_DEPLOYMENT": "router", "KUBETUNE_VERSION": name, "KUBETUNE_MAX_BATCH_SIZE": "4"},
        serving=serving or Serving(),
        base_model_uri=str(base),
        lora_adapter=True,
    )


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[LocalServing]:
    serving = LocalServing(tmp_path / "home", stop_grace_s=5.0)
    yield serving
    serving.close()


def step_until_ready(
    serving: LocalServing, versions: Sequence[VersionServing], timeout_s: float = 300
) -> dict[str, VersionObservation]:
    deadline = time.monotonic() + timeout_s
    while True:
        observed = dict(serving.ensure_versions(ROUTER, versions))
        if all(observation.ready for observation in observed.values()):
            return observed
        assert time.monotonic() < deadline, f"not ready in {timeout_s}s: {observed}"
        assert not any(observation.failed for observation in observed.values()), observed
        time.sleep(0.5)


def answer(url: str) -> tuple[str, str]:
    response = httpx.post(
        url + "/v1/completions",
        json={"model": "router", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=120,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"], response.headers["x-kubetune-version"]


def test_lora_versions_of_one_base_share_one_server_that_loads_and_unloads_them_in_place(
    serving: LocalServing, adapters: dict[str, Path], base: Path, alone: dict[str, str]
) -> None:
    versions = [lora_version(name, adapters[name], base) for name in ("v1", "v2", "v3")]
    observed = step_until_ready(serving, versions)
    (server_process,) = serving.processes()  # one process for the three versions
    urls = {name: observation.url or "" for name, observation in observed.items()}
    for name in ("v1", "v2", "v3"):
        assert urls[name].endswith(f"/adapters/{name}")
        assert answer(urls[name]) == (alone[name], name)

    changed = [versions[0], versions[2], lora_version("v4", adapters["v4"], base)]
    observed = step_until_ready(serving, changed)
    assert serving.processes() == [server_process] and server_process.exit_code() is None
    assert answer(observed["v4"].url or "") == (alone["v4"], "v4")
    assert answer(urls["v2"]) == (alone["v2"], "v2")  # v2 serves on until the gateway has reloaded
    deadline = time.monotonic() + 60
    while httpx.get(urls["v2"] + "/v1/models", trust_env=False).status_code != 404:
        assert time.monotonic() < deadline, "v2 was not unloaded"
        serving.ensure_versions(ROUTER, changed)
        time.sleep(0.5)
    assert serving.processes() == [server_process]

    # the last versions leave: they serve on until the gateway has reloaded, then the server stops
    serving.ensure_versions(ROUTER, [])
    assert answer(urls["v1"]) == (alone["v1"], "v1")
    deadline = time.monotonic() + 60
    while serving.processes():
        assert time.monotonic() < deadline, "the shared server did not stop"
        serving.ensure_versions(ROUTER, [])
        time.sleep(0.5)
    assert server_process.exit_code() is not None


def test_only_lora_adapters_of_one_base_that_may_share_are_grouped(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-base"
    shared = [lora_version(name, tmp_path / name, base) for name in ("a", "b")]
    lone = lora_version("c", tmp_path / "c", other)  # the only adapter of its base
    full = VersionServing("d", str(tmp_path / "d"), "router-d", {}, Serving())  # full weights
    groups = shared_adapter_groups([*shared, lone, full])
    assert {key: [v.name for v in members] for key, members in groups.items()} == {str(base): ["a", "b"]}
    opted_out = Serving(share_base_model=False)
    assert shared_adapter_groups([lora_version(n, tmp_path / n, base, opted_out) for n in "ab"]) == {}
    not_lora = [lora_version(n, tmp_path / n, base) for n in "ab"]
    not_lora = [
        VersionServing(v.name, v.model_uri, v.bento, v.env, v.serving, base_model_uri=str(base))
        for v in not_lora
    ]
    assert shared_adapter_groups(not_lora) == {}  # e.g. prompt tuning: PEFT mixes only LoRA in a batch
    # the last version of a base whose shared server runs stays on it (no server of its own to wait for)
    assert shared_adapter_groups(shared[:1]) == {}
    assert [v.name for v in shared_adapter_groups(shared[:1], running={str(base)})[str(base)]] == ["a"]


def test_the_gateway_routes_to_versions_on_a_shared_server_as_to_servers_of_their_own(
    adapters: dict[str, Path], alone: dict[str, str]
) -> None:
    shared = SharedAdapters.load({name: adapters[name] for name in ("v1", "v2", "v3")}, device="cpu")
    slot = SharedSlot("router", "router")
    slot.set_shared(shared)
    with serve_app(create_shared_app(slot)) as server_url:
        config = GatewayConfig.model_validate(
            {
                "deployment": "router",
                "versions": [
                    {"name": name, "url": version_url(server_url, name), "weight": weight}
                    for name, weight in (("v1", 50), ("v2", 50), ("v3", 0))
                ],
                "timeouts": {"firstByteSeconds": 60, "responseSeconds": 120, "streamIdleSeconds": 60},
            }
        )
        with serve_app(create_gateway(config)) as gateway_url:
            client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
            for name in ("v1", "v2", "v3"):
                raw = client.completions.with_raw_response.create(
                    model="router",
                    prompt=PROMPT,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_headers={"x-kubetune-version": name},
                )
                assert (raw.parse().choices[0].text, raw.headers["x-kubetune-version"]) == (alone[name], name)
            client.close()
    shared.close()
