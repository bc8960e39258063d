"""kubetune up refuses a version with spec.serving.engine vllm on a machine that cannot run vLLM,
naming the field, instead of building and starting a server that cannot serve."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.local import vllm_check
from kubetune.local.serving import LocalServing
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import Serving

ROUTER = DeploymentRef(name="router", namespace="default")
VLLM_VERSION = VersionServing(
    name="tuned",
    model_uri="/models/tuned",
    bento="router-tuned",
    env={},
    serving=Serving(target="gpu", engine="vllm"),
)


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    vllm_check.local_vllm_problem.cache_clear()
    yield
    vllm_check.local_vllm_problem.cache_clear()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")
def test_a_vllm_version_is_refused_without_a_gpu_and_nothing_is_built(tmp_path: Path) -> None:
    said: list[str] = []
    serving = LocalServing(tmp_path / "home", notify=said.append, python=sys.executable, stop_grace_s=2.0)
    try:
        observation = serving.ensure_versions(ROUTER, [VLLM_VERSION])["tuned"]
    finally:
        serving.close()
    assert (observation.ready, observation.failed, observation.url) == (False, True, None)
    assert observation.message == (
        "spec.serving.engine: vllm needs an NVIDIA GPU and this machine has none (nvidia-smi lists no GPU); "
        "kubetune up serves it only on a GPU machine: use engine transformers and target cpu here"
    )
    assert not [line for line in said if "Bento" in line or "bentoml serve" in line]


def test_with_a_gpu_the_python_that_serves_must_have_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "bin" / "nvidia-smi"  # stands in for the driver's tool: one GPU listed
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")
    problem = vllm_check.local_vllm_problem(sys.executable)  # this venv has no vllm
    assert problem == (
        f"spec.serving.engine: vllm is not installed in {sys.executable}, which serves the versions; "
        "install vllm there (it brings its own CUDA torch), or use engine transformers"
    )
