"""Which base model a version's adapter is served on (kubetune.plan.versions): known from the job that
published it, carried to the serving backend only with that job's model."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.plan.versions import resolve_versions, served_models, version_servings
from kubetune_contract.deployment import ModelDeployment

ADAPTER = "pvc://artifacts/ml/support-lora/v1"
BASE = "pvc://models/tiny-base"


def deployment(model: dict[str, Any]) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "support-bot", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": {"versions": [{"name": "tuned", "model": model, "weight": 100}]},
        }
    )


def succeeded(spec: dict[str, Any], uri: str = ADAPTER) -> dict[str, Any]:
    return {
        "spec": spec,
        "status": {"conditions": [{"type": "Succeeded", "status": "True"}], "output": {"uri": uri}},
    }


def finetune_spec(**overrides: Any) -> dict[str, Any]:
    return {"baseModel": {"uri": BASE}, "dataset": {"uri": "pvc://data/tickets.jsonl"}, **overrides}


@pytest.mark.parametrize(
    ("spec", "base"),
    [
        (finetune_spec(), BASE),  # lora by default, published unmerged by default
        (finetune_spec(method={"type": "prompt-tuning"}), BASE),
        (finetune_spec(output={"mergeAdapter": False}), BASE),
        (finetune_spec(output={"mergeAdapter": True}), None),  # full weights: no base needed
        (finetune_spec(method={"type": "full"}), None),
    ],
    ids=["lora-default", "prompt-tuning", "unmerged", "merged", "full"],
)
def test_a_finetune_jobs_adapter_is_served_on_its_base_model(spec: dict[str, Any], base: str | None) -> None:
    model_deployment = deployment({"fineTuneJobRef": {"name": "support-lora"}})
    resolved = resolve_versions(model_deployment.spec, "ml", lambda kind, namespace, name: succeeded(spec))
    assert resolved["tuned"].base_model_uri == base
    (serving,) = version_servings(model_deployment, served_models(resolved, None), resolved)
    assert (serving.model_uri, serving.base_model_uri) == (ADAPTER, base)


@pytest.mark.parametrize(
    ("spec", "lora"),
    [
        (finetune_spec(), True),
        (finetune_spec(method={"type": "lora", "lora": {"r": 8}}), True),
        (finetune_spec(method={"type": "prompt-tuning"}), False),  # PEFT mixes only LoRA in a batch
        (finetune_spec(output={"mergeAdapter": True}), False),
    ],
    ids=["lora-default", "lora", "prompt-tuning", "merged"],
)
def test_only_an_unmerged_lora_adapter_may_share_its_base_models_server(
    spec: dict[str, Any], lora: bool
) -> None:
    model_deployment = deployment({"fineTuneJobRef": {"name": "support-lora"}})
    resolved = resolve_versions(model_deployment.spec, "ml", lambda kind, namespace, name: succeeded(spec))
    (serving,) = version_servings(model_deployment, served_models(resolved, None), resolved)
    assert (resolved["tuned"].lora_adapter, serving.lora_adapter) == (lora, lora)


def test_a_quantize_jobs_model_has_full_weights_and_no_base() -> None:
    model_deployment = deployment({"quantizeJobRef": {"name": "support-int8"}})
    job = succeeded(
        {"model": {"uri": ADAPTER}, "method": {"type": "int8-weight-only"}}, "pvc://artifacts/int8"
    )
    resolved = resolve_versions(model_deployment.spec, "ml", lambda kind, namespace, name: job)
    assert resolved["tuned"].base_model_uri is None


def test_a_uri_versions_base_is_not_known_to_the_planner() -> None:
    """The planner cannot read a claim: such an adapter's base must be on its own claim or the hub."""
    model_deployment = deployment({"uri": ADAPTER})
    resolved = resolve_versions(model_deployment.spec, "ml", lambda kind, namespace, name: None)
    (serving,) = version_servings(model_deployment, served_models(resolved, None), resolved)
    assert serving.base_model_uri is None


def test_a_version_still_served_with_its_previous_model_does_not_get_the_new_models_base() -> None:
    model_deployment = deployment({"fineTuneJobRef": {"name": "support-lora"}})
    resolved = resolve_versions(
        model_deployment.spec, "ml", lambda kind, namespace, name: succeeded(finetune_spec())
    )
    served = {"tuned": "pvc://artifacts/ml/support-lora/v0"}  # the new model is not served yet
    (serving,) = version_servings(model_deployment, served, resolved)
    assert (serving.model_uri, serving.base_model_uri) == ("pvc://artifacts/ml/support-lora/v0", None)
