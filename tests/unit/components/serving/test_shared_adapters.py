"""Many LoRA versions on one base: one server holds the base once and answers each version with its own
adapter, as that adapter's own server would; versions are loaded and unloaded while the others serve.

The adapters are trained and published by the real finetune and publish steps (``tiny_adapter``) on the
random tiny Llama, each from another seed, so each answers differently; the server is the real shared
API served by uvicorn, asked through the real openai client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from asgi_server import serve_app
from kubetune_components.common.errors import ConfigError, ModelLoadError
from kubetune_components.dev import tinylm
from kubetune_components.serving.adapters import SharedAdapters
from kubetune_components.serving.adapters_file import AdaptersFileWatch, read_adapters_file
from kubetune_components.serving.config import RuntimeLimits
from kubetune_components.serving.requests import SamplingParams
from kubetune_components.serving.runtime import ModelRuntime
from kubetune_components.serving.shared_api import SharedSlot, create_shared_app, version_url
from tiny_adapter import ROUTING_INSTRUCTION, ROUTING_ROWS, publish_lora_adapter

VERSIONS = ("v1", "v2", "v3")
PROMPTS = tuple(f"{ROUTING_INSTRUCTION}\nticket {index} about my invoice" for index in range(3))
MAX_TOKENS = 10


def publish(root: Path, base: Path, seed: int) -> Path:
    published: Path = publish_lora_adapter(
        root,
        base,
        ROUTING_ROWS[seed:],
        lora={"r": 4},
        training={"maxSteps": 4, "batchSize": 4, "learningRate": "2e-1", "seed": seed, "maxSeqLength": 64},
    )
    return published


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Four adapters of the random tiny Llama: v1..v3 served from the start, v4 added later."""
    return {
        f"v{seed}": publish(tmp_path_factory.mktemp(f"adapter-{seed}"), tiny_model_dir, seed)
        for seed in range(1, 5)
    }


@pytest.fixture(scope="module")
def alone(adapters: dict[str, Path]) -> dict[str, list[str]]:
    """Each adapter's greedy answers to PROMPTS, served by a runtime of its own (merged, as today)."""
    answers: dict[str, list[str]] = {}
    for version, directory in adapters.items():
        runtime = ModelRuntime.load(directory, device="cpu")
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        answers[version] = [runtime.generate(runtime.prepare_completion(p), params).text for p in PROMPTS]
        runtime.close()
    return answers


@pytest.fixture
def server(adapters: dict[str, Path]) -> Iterator[tuple[str, SharedSlot]]:
    shared = SharedAdapters.load(
        {version: adapters[version] for version in VERSIONS},
        device="cpu",
        limits=RuntimeLimits(max_batch_size=8, max_latency_ms=50),
    )
    slot = SharedSlot("router-bot", "router-bot")
    slot.set_shared(shared)
    with serve_app(create_shared_app(slot)) as url:
        yield url, slot
    shared.close()


def completion_of(url: str, version: str, prompt: str) -> tuple[str, str]:
    """(text, x-kubetune-version) of a greedy completion from `version` on the server at `url`."""
    client = openai.OpenAI(base_url=version_url(url, version) + "/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(
        model="router-bot", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    return raw.parse().choices[0].text, raw.headers["x-kubetune-version"]


def test_the_adapters_answer_differently(alone: dict[str, list[str]]) -> None:
    # otherwise a request answered with the wrong adapter could not be told from a right one
    assert len({tuple(answers) for answers in alone.values()}) == len(alone)


def test_each_version_is_answered_with_its_own_adapter_as_if_served_alone(
    server: tuple[str, SharedSlot], alone: dict[str, list[str]]
) -> None:
    url, slot = server
    for version in VERSIONS:
        for index, prompt in enumerate(PROMPTS):
            assert completion_of(url, version, prompt) == (alone[version][index], version)
    assert slot.shared is not None and slot.shared.versions == list(VERSIONS)


async def test_concurrent_requests_of_all_versions_share_batches_and_keep_their_adapters(
    server: tuple[str, SharedSlot], alone: dict[str, list[str]]
) -> None:
    url, slot = server
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    asked = [(version, index) for _ in range(2) for version in VERSIONS for index in range(len(PROMPTS))]

    async def ask(version: str, index: int) -> str:
        answer = await client.with_options(base_url=version_url(url, version) + "/v1").completions.create(
            model="router-bot", prompt=PROMPTS[index], max_tokens=MAX_TOKENS, temperature=0
        )
        return answer.choices[0].text

    answers = await asyncio.gather(*(ask(version, index) for version, index in asked))
    assert answers == [alone[version][index] for version, index in asked]
    shared = slot.shared
    assert shared is not None
    root = shared.runtime("v1")
    assert root is not None and root.batcher is not None
    assert max(root.batcher.batch_sizes) > 1  # versions were mixed in one generate call


def test_versions_are_added_and_removed_while_the_others_serve(
    server: tuple[str, SharedSlot], adapters: dict[str, Path], alone: dict[str, list[str]]
) -> None:
    url, _ = server
    with httpx.Client(base_url=url, timeout=120) as http:
        added = http.put("/adapters/v4", json={"modelDir": str(adapters["v4"])})
        assert added.status_code == 200, added.text
        assert added.json()["adapters"] == ["v1", "v2", "v3", "v4"]
        assert completion_of(url, "v4", PROMPTS[0]) == (alone["v4"][0], "v4")

        removed = http.delete("/adapters/v2")
        assert removed.status_code == 200 and removed.json()["adapters"] == ["v1", "v3", "v4"]
        gone = http.post("/adapters/v2/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
        assert gone.status_code == 404
        assert "version 'v2' is not loaded on this server" in gone.json()["error"]["message"]
        assert http.delete("/adapters/v2").status_code == 404
        for version in ("v1", "v3", "v4"):
            assert completion_of(url, version, PROMPTS[1]) == (alone[version][1], version)

        # a version loaded again under the same name serves the new adapter
        assert http.put("/adapters/v1", json={"modelDir": str(adapters["v2"])}).status_code == 200
        assert completion_of(url, "v1", PROMPTS[2]) == (alone["v2"][2], "v1")

        refused = http.put("/adapters/v5", json={"modelDir": str(adapters["v4"].parent)})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "modelDir"
        assert http.get("/adapters").json()["adapters"] == ["v1", "v3", "v4"]
        lost = http.post("/v1/completions", json={"prompt": PROMPTS[0]})
        assert lost.status_code == 404
        assert "each under /adapters/<version>/v1/... (loaded: v1, v3, v4)" in lost.json()["error"]["message"]


def test_a_watched_adapters_file_loads_and_unloads_versions_as_it_changes(
    tmp_path: Path, server: tuple[str, SharedSlot], adapters: dict[str, Path], alone: dict[str, list[str]]
) -> None:
    # On a cluster the group's ConfigMap is that file; the pods follow it without a restart.
    url, slot = server
    assert slot.shared is not None
    listed = tmp_path / "adapters.json"
    watch = AdaptersFileWatch(listed, slot.shared, {version: str(adapters[version]) for version in VERSIONS})
    missing = tmp_path / "no-adapter-here"
    wanted = {"v1": str(adapters["v1"]), "v3": str(adapters["v3"]), "v4": str(adapters["v4"])}
    listed.write_text(json.dumps({**wanted, "v5": str(missing)}), encoding="utf-8")
    watch.sync()
    assert slot.shared.versions == ["v1", "v3", "v4"]
    assert watch.problems["v5"].startswith(str(missing))  # left out and logged; the others serve on
    assert completion_of(url, "v4", PROMPTS[0]) == (alone["v4"][0], "v4")
    assert completion_of(url, "v1", PROMPTS[1]) == (alone["v1"][1], "v1")
    # what the gateway probes while a version wakes from zero: its own readiness on the shared server
    assert httpx.get(version_url(url, "v4") + "/readyz").status_code == 200
    assert httpx.get(version_url(url, "v2") + "/readyz").status_code == 503

    listed.write_text("{not json", encoding="utf-8")  # a broken file changes nothing
    watch.sync()
    assert slot.shared.versions == ["v1", "v3", "v4"]
    with pytest.raises(ConfigError, match=r"adapters\.json is not valid JSON"):
        read_adapters_file(listed)


def test_an_adapter_of_another_base_is_refused(
    tmp_path: Path, adapters: dict[str, Path], server: tuple[str, SharedSlot]
) -> None:
    other_base = tinylm.build_random_tiny(tmp_path / "other-base", seed=1)
    other = publish(tmp_path / "other", other_base, 1)
    _, slot = server
    assert slot.shared is not None
    with pytest.raises(ModelLoadError, match=f"is an adapter of {other_base}, not of"):
        slot.shared.add("v9", other)
    with pytest.raises(ModelLoadError, match="only PEFT adapters share a base model"):
        slot.shared.add("v9", other_base)


async def test_unloading_a_version_lets_its_running_requests_finish_first(
    server: tuple[str, SharedSlot], alone: dict[str, list[str]]
) -> None:
    _, slot = server
    shared = slot.shared
    assert shared is not None
    leaving = shared.runtime("v2")
    assert leaving is not None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    stream = leaving.astream(leaving.prepare_completion(PROMPTS[0]), params)
    batched = asyncio.create_task(leaving.agenerate(leaving.prepare_completion(PROMPTS[1]), params))
    await asyncio.sleep(0)  # the batched request is queued before the removal starts
    removal = asyncio.create_task(asyncio.to_thread(shared.remove, "v2"))
    deltas = [delta async for delta in stream]
    assert "".join(deltas) == alone["v2"][0]
    assert (await batched).text == alone["v2"][1]
    assert await removal is True and shared.versions == ["v1", "v3"]
    assert leaving.in_flight == 0
