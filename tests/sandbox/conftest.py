"""Fixtures of the sandbox tests: pods run from their rendered specs (see harness.py).

``cluster`` -> :class:`sandbox.harness.SandboxCluster` in the test's temp dir, closed after it.
``tiny_model`` (session): a random-weight tiny Llama with its tokenizer, the files `kubetune dev
    tiny-base` writes (without the minute of pretraining: serving does not need a good model).
``hub_adapter`` (session): a LoRA adapter published by the real finetune and publish steps whose
    lineage names the hub model ``hf://kubetune/tiny-base`` as its base (the same files as ``tiny_model``,
    which the hub mirror serves under that name).

Every test here is skipped with one reason when bubblewrap or nsenter is missing or cannot make user
namespaces on this machine.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_components.dev import tinylm
from sandbox.harness import BWRAP, MISSING_TOOLS, NSENTER, SandboxCluster
from sandbox.hub_mirror import TINY_BASE_REPO
from tiny_adapter import ROUTING_ROWS, publish_lora_adapter


def _sandbox_unavailable() -> str | None:
    if BWRAP is None or NSENTER is None:
        missing: str = MISSING_TOOLS
        return missing
    probe = subprocess.run(
        [BWRAP, "--unshare-user", "--unshare-net", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"bubblewrap cannot make user namespaces here ({probe.stderr.strip()}); {MISSING_TOOLS}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sandbox_items = [item for item in items if "sandbox" in item.path.parts]
    if not sandbox_items:
        return
    reason = _sandbox_unavailable()
    if reason is None:
        return
    print(f"\nSKIPPING the sandbox tests (pods run from their own specs): {reason}")
    for item in sandbox_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SandboxCluster]:
    sandbox = SandboxCluster(tmp_path / "cluster")
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.build_random_tiny(tmp_path_factory.mktemp("tiny") / "tiny-base", seed=0)


@pytest.fixture(scope="session")
def hub_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    published: Path = publish_lora_adapter(
        tmp_path_factory.mktemp("adapter"),
        tiny_model,
        ROUTING_ROWS,
        lora={"r": 4},
        training={"maxSteps": 1, "batchSize": 4, "learningRate": "5e-2", "seed": 1, "maxSeqLength": 64},
    )
    # Trained on the local copy of the files the mirror serves as the hub model: the lineage says so.
    manifest_path = published / "kubetune-manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["baseModel"] = {
        "uri": f"hf://{TINY_BASE_REPO}",
        "kind": "hub",
        "ref": TINY_BASE_REPO,
        "revision": None,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    adapter_config_path = published / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = TINY_BASE_REPO
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    return published
