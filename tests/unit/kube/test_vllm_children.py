"""spec.serving.engine vllm on a cluster: what is refused (validate, the planner), and the version's
Deployment that serves the vLLM Bento on a GPU (kubetune.kube.vllm_serving)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.validation import validate_documents
from kubetune.kube.children import ChildImages, build_version_children
from kubetune.kube.vllm_serving import SHM_PATH, STARTUP_SECONDS
from kubetune.plan.versions import (
    DeploymentRef,
    resolve_versions,
    served_models,
    shared_adapter_groups,
    version_servings,
)
from kubetune_contract.deployment import ModelDeployment
from kubetune_contract.serving import VLLM_OPTIONS_ENV

REF = DeploymentRef(name="support-bot", namespace="ml", uid="0b4c7a52-9d7e-4d5c-8c36-4c1f0d9a1e01")
IMAGES = ChildImages(
    serving="registry.example/runtime:1",
    gateway="registry.example/operator:1",
    vllm_serving="registry.example/runtime-vllm:1",
)
BASE = "pvc://models/tiny-base"
GPU_SERVING: dict[str, Any] = {"target": "gpu", "engine": "vllm"}


def manifest(serving: dict[str, Any], *models: dict[str, Any]) -> dict[str, Any]:
    versions = [
        {"name": f"v{index}", "model": model, "weight": 100 if index == 0 else 0}
        for index, model in enumerate(models)
    ]
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot", "namespace": "ml", "uid": REF.uid, "generation": 1},
        "spec": {"versions": versions, "serving": serving},
    }


def succeeded(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "spec": spec,
        "status": {
            "conditions": [{"type": "Succeeded", "status": "True"}],
            "output": {"uri": f"pvc://artifacts/ml/{kind.lower()}/v1"},
        },
    }


def servings(
    serving: dict[str, Any], *models: dict[str, Any], jobs: dict[str, Any] | None = None
) -> list[Any]:
    deployment = ModelDeployment.model_validate(manifest(serving, *models))
    resolved = resolve_versions(deployment.spec, "ml", lambda kind, namespace, name: (jobs or {}).get(name))
    return version_servings(deployment, served_models(resolved, None), resolved)


def container(pod: dict[str, Any], name: str, kind: str = "containers") -> dict[str, Any]:
    return next(c for c in pod[kind] if c["name"] == name)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container["env"]}


# -- refused ---------------------------------------------------------------------------------------------


def test_validate_refuses_vllm_on_a_cpu_target_naming_the_field_and_the_target() -> None:
    issues = validate_documents([manifest({"engine": "vllm"}, {"uri": BASE})])
    assert [(issue.path, issue.message) for issue in issues] == [
        ("spec.serving.engine", "engine vllm needs target gpu; target is cpu")
    ]
    assert validate_documents([manifest(GPU_SERVING, {"uri": BASE})]) == []


QUANTIZE_SPEC = {"model": {"uri": BASE}}
FINETUNE_SPEC = {"baseModel": {"uri": BASE}, "dataset": {"uri": "pvc://data/tickets.jsonl"}}


@pytest.mark.parametrize(
    ("kind", "spec", "refusal"),
    [
        ("QuantizeJob", {**QUANTIZE_SPEC, "method": {"type": "int8-weight-only"}}, "int8-weight-only model"),
        ("QuantizeJob", {**QUANTIZE_SPEC, "method": {"type": "qat"}}, "qat model"),
        (
            "QuantizeJob",
            {**QUANTIZE_SPEC, "method": {"type": "pruning", "pruning": {"then": "int8-dynamic"}}},
            "pruning then int8-dynamic model",
        ),
        ("QuantizeJob", {**QUANTIZE_SPEC, "method": {"type": "mixed-precision"}}, None),
        ("QuantizeJob", {**QUANTIZE_SPEC, "method": {"type": "pruning"}}, None),
        (
            "FineTuneJob",
            {**FINETUNE_SPEC, "method": {"type": "prefix-tuning"}},
            "unmerged prefix-tuning adapter",
        ),
        ("FineTuneJob", {**FINETUNE_SPEC, "method": {"type": "ia3"}}, "unmerged ia3 adapter"),
        ("FineTuneJob", {**FINETUNE_SPEC, "method": {"type": "ia3"}, "output": {"mergeAdapter": True}}, None),
        ("FineTuneJob", FINETUNE_SPEC, None),  # an unmerged LoRA adapter: vLLM's LoRA support
    ],
)
def test_the_planner_refuses_a_jobs_model_vllm_cannot_read_before_the_job_has_run(
    kind: str, spec: dict[str, Any], refusal: str | None
) -> None:
    ref = {"fineTuneJobRef" if kind == "FineTuneJob" else "quantizeJobRef": {"name": "job"}}
    deployment = ModelDeployment.model_validate(manifest(GPU_SERVING, ref))
    running = {"spec": spec, "status": {"phase": "Running"}}
    resolved = resolve_versions(deployment.spec, "ml", lambda *_: running)["v0"]
    if refusal is None:
        assert resolved.state == "waiting"
        return
    assert (resolved.state, resolved.reason) == ("failed", "ModelFailed")
    assert resolved.message is not None
    assert resolved.message.startswith(f"spec.serving.engine: vllm cannot serve {kind}/job's {refusal}")
    # the transformers engine serves every one of them
    transformers = ModelDeployment.model_validate(manifest({}, ref))
    assert resolve_versions(transformers.spec, "ml", lambda *_: running)["v0"].state == "waiting"


# -- rendered ------------------------------------------------------------------------------------------


def test_a_vllm_version_runs_the_vllm_bento_on_one_gpu_with_its_engine_arguments() -> None:
    serving = {
        **GPU_SERVING,
        "vllm": {"dtype": "bfloat16", "maxModelLen": 2048, "gpuMemoryUtilization": "0.8"},
    }
    (version,) = servings(serving, {"uri": "pvc://artifacts/ml/merged/v1"})
    deployment, service = build_version_children(REF, version, IMAGES)
    pod = deployment["spec"]["template"]["spec"]
    fetch, serve = container(pod, "fetch-model", "initContainers"), container(pod, "serve")

    assert deployment["metadata"]["annotations"]["kubetune.dev/engine"] == "vllm"
    assert (fetch["image"], serve["image"]) == (IMAGES.vllm_serving, IMAGES.vllm_serving)
    assert fetch["args"][-2:] == ["--engine", "vllm"]  # the Bento's service is vllm_service
    assert serve["command"][:3] == ["bentoml", "serve", "support-bot-v0:latest"]
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == "1"  # target gpu
    options = json.loads(env_of(serve)[VLLM_OPTIONS_ENV])
    assert options == {
        "dtype": "bfloat16",
        "maxModelLen": 2048,
        "gpuMemoryUtilization": "0.8",
        "maxLoras": 4,
    }
    assert env_of(serve)["HF_HUB_OFFLINE"] == "1"
    assert env_of(serve)["VLLM_CACHE_ROOT"].startswith("/tmp/")  # the writable emptyDir
    assert {"name": "dshm", "mountPath": SHM_PATH} in serve["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert serve["securityContext"]["readOnlyRootFilesystem"] is True
    # probes on the service's paths; liveness waits for the engine's warm-up
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = serve["startupProbe"]
    assert startup["httpGet"]["path"] == "/livez"
    assert startup["periodSeconds"] * startup["failureThreshold"] == STARTUP_SECONDS >= 1800
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_defaults_of_spec_serving_vllm_reach_the_server_when_it_is_unset() -> None:
    (version,) = servings(GPU_SERVING, {"uri": "pvc://artifacts/ml/merged/v1"})
    serve = container(build_version_children(REF, version, IMAGES)[0]["spec"]["template"]["spec"], "serve")
    assert json.loads(env_of(serve)[VLLM_OPTIONS_ENV]) == {
        "dtype": "auto",
        "gpuMemoryUtilization": "0.9",
        "maxLoras": 4,
    }


def test_a_transformers_version_is_unchanged_but_gets_a_gpu_on_a_gpu_target() -> None:
    (cpu,) = servings({}, {"uri": "pvc://artifacts/ml/merged/v1"})
    (gpu,) = servings({"target": "gpu"}, {"uri": "pvc://artifacts/ml/merged/v1"})
    (counted,) = servings(
        {"target": "gpu", "resources": {"limits": {"nvidia.com/gpu": "2"}}},
        {"uri": "pvc://artifacts/ml/merged/v1"},
    )
    pods = [
        build_version_children(REF, v, IMAGES)[0]["spec"]["template"]["spec"] for v in (cpu, gpu, counted)
    ]
    serves = [container(pod, "serve") for pod in pods]
    assert [s["image"] for s in serves] == [IMAGES.serving] * 3
    assert all(VLLM_OPTIONS_ENV not in env_of(s) for s in serves)
    assert "--engine" not in container(pods[0], "fetch-model", "initContainers")["args"]
    assert [s["resources"].get("limits", {}).get("nvidia.com/gpu") for s in serves] == [None, "1", "2"]


def test_each_vllm_lora_version_keeps_a_server_of_its_own_holding_its_adapter_on_the_base() -> None:
    """vLLM versions are not put in the transformers engine's shared adapter servers: each one's server
    loads the base and its LoRA (--lora-modules, built by the service from the Bento's model)."""
    jobs = {"a": succeeded("a", FINETUNE_SPEC), "b": succeeded("b", FINETUNE_SPEC)}
    models = ({"fineTuneJobRef": {"name": "a"}}, {"fineTuneJobRef": {"name": "b"}})
    vllm_versions = servings(GPU_SERVING, *models, jobs=jobs)
    assert all(version.lora_adapter for version in vllm_versions)
    assert shared_adapter_groups(vllm_versions) == {}
    assert list(shared_adapter_groups(servings({}, *models, jobs=jobs))) == [BASE]  # transformers shares
    names = [build_version_children(REF, v, IMAGES)[0]["metadata"]["name"] for v in vllm_versions]
    assert names == ["support-bot-v0", "support-bot-v1"]
