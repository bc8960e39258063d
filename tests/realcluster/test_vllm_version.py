"""A version with spec.serving.engine vllm on a real kube-apiserver: the API server takes the
ModelDeployment (target gpu), and the operator's serving backend applies the vLLM version's
Deployment, which is stored whole (nothing pruned or refused: the memory-backed /dev/shm, the GPU
limit, the long startup probe). Switching the engine changes the pod template, so the version's pods
roll. No GPU, kubelet or controller runs here: the version is not ready, and what vLLM does is not
checked (benchmarks/device/vllm_check.py is the GPU check)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from lightkube import AsyncClient

from kubetune.kube import apply as kube
from kubetune.kube.children import ChildImages, build_version_deployment
from kubetune.kube.serving import KubernetesServing
from kubetune.kube.vllm_serving import vllm_deployment
from kubetune.plan.versions import DeploymentRef, resolve_versions, served_models, version_servings
from kubetune_contract.deployment import ModelDeployment
from realcluster.control_plane import ControlPlane

pytestmark = pytest.mark.realcluster

IMAGES = ChildImages(
    serving="registry.example/runtime:1",
    gateway="registry.example/operator:1",
    vllm_serving="registry.example/runtime-vllm:1",
)


def manifest(namespace: str, serving: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot", "namespace": namespace},
        "spec": {
            "versions": [{"name": "tuned", "model": {"uri": "pvc://models/support-bot/v3"}, "weight": 100}],
            "serving": serving,
        },
    }


def applied(plane: ControlPlane, namespace: str, serving: dict[str, Any]) -> ModelDeployment:
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest(namespace, serving)))
    stored = plane.kubectl("get", "modeldeployment", "support-bot", "-n", namespace, "-o", "json").stdout
    return ModelDeployment.model_validate(json.loads(stored))


async def test_the_vllm_versions_deployment_is_stored_whole_and_an_engine_switch_rolls_it(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, client: AsyncClient
) -> None:
    vllm = {"target": "gpu", "engine": "vllm", "vllm": {"dtype": "bfloat16", "maxModelLen": 4096}}
    deployment = applied(control_plane, namespace, vllm)
    assert deployment.spec.serving.vllm_options.gpu_memory_utilization == "0.9"  # the CRD's default
    ref = DeploymentRef("support-bot", namespace, deployment.metadata.uid)
    resolved = resolve_versions(deployment.spec, namespace, lambda *_: None)
    (version,) = version_servings(deployment, served_models(resolved, None), resolved)
    serving = KubernetesServing(client, IMAGES)

    observed = (await serving.ensure_versions(ref, [version]))["tuned"]
    assert not observed.ready and not observed.failed  # no controller or kubelet here
    stored = await kube.get(client, kube.DEPLOYMENTS, namespace, "support-bot-tuned")
    assert stored is not None
    rendered = vllm_deployment(build_version_deployment(ref, version, IMAGES), version, IMAGES.vllm_serving)
    template = stored["spec"]["template"]["spec"]
    wanted = rendered["spec"]["template"]["spec"]
    for key in ("volumes", "initContainers", "containers"):
        # the API server adds its defaults (protocol, terminationMessagePath...): every rendered field is kept
        assert _contains(template[key], wanted[key]), key
    (serve,) = template["containers"]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert stored["metadata"]["annotations"]["kubetune.dev/engine"] == "vllm"

    transformers = applied(control_plane, namespace, {"target": "gpu"})
    resolved = resolve_versions(transformers.spec, namespace, lambda *_: None)
    (plain,) = version_servings(transformers, served_models(resolved, None), resolved)
    await serving.ensure_versions(ref, [plain])
    switched = await kube.get(client, kube.DEPLOYMENTS, namespace, "support-bot-tuned")
    assert switched is not None
    assert switched["metadata"]["generation"] > stored["metadata"]["generation"]  # a new pod template
    (serve,) = switched["spec"]["template"]["spec"]["containers"]
    assert serve["image"] == IMAGES.serving
    assert "dshm" not in {volume["name"] for volume in switched["spec"]["template"]["spec"]["volumes"]}
    assert "kubetune.dev/engine" not in (switched["metadata"].get("annotations") or {})


def _contains(stored: Any, rendered: Any) -> bool:
    """Whether ``stored`` holds everything of ``rendered`` (dicts may have more keys; lists pair up)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(
            key in stored and _contains(stored[key], value) for key, value in rendered.items()
        )
    if isinstance(rendered, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(rendered)
            and all(_contains(s, r) for s, r in zip(stored, rendered, strict=True))
        )
    return bool(stored == rendered)
