"""GET /v1/models/{id} links the model card of what each version serves (read with the openai client)."""

from __future__ import annotations

import json
from typing import Any

import openai
from gateway_doubles import GatewayServer

from kubetune.gateway.config import parse_gateway_config
from kubetune.plan.gateway import gateway_config
from kubetune_contract.deployment import ModelDeployment

STORE = "pvc://artifacts/default"


def deployment() -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "support-bot", "namespace": "default"},
            "spec": {
                "versions": [
                    {"name": "stable", "model": {"quantizeJobRef": {"name": "router-int8"}}, "weight": 90},
                    {"name": "canary", "model": {"fineTuneJobRef": {"name": "router"}}, "weight": 10},
                    {"name": "hub", "model": {"uri": "hf://org/model"}, "weight": 0},
                ]
            },
        }
    )


def planned_config(upstream: str) -> dict[str, Any]:
    served = {
        "stable": f"{STORE}/router-int8/v2",
        "canary": f"{STORE}/router/v3/",
        "hub": "hf://org/model",
    }
    urls = {name: upstream for name in served}
    config = gateway_config(deployment(), urls, {"stable": 90, "canary": 10, "hub": 0}, model_uris=served)
    assert config is not None
    return config


def test_versions_serving_a_published_job_model_get_its_card_links() -> None:
    config = planned_config("http://upstream:3000")
    links = {version["name"]: version.get("modelCard") for version in config["versions"]}
    assert links == {
        "stable": {
            "markdown": f"{STORE}/router-int8/v2/MODEL_CARD.md",
            "json": f"{STORE}/router-int8/v2/model-card.json",
        },
        "canary": {
            "markdown": f"{STORE}/router/v3/MODEL_CARD.md",
            "json": f"{STORE}/router/v3/model-card.json",
        },
        "hub": None,  # a hub model carries no kubetune card
    }
    parse_gateway_config(json.dumps(config))  # the gateway accepts what the plan writes


def test_the_model_object_links_the_control_version_card_and_every_version_card(
    gateway_server: GatewayServer,
) -> None:
    with gateway_server(planned_config("http://127.0.0.1:9")) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=15)
        model = client.models.retrieve("support-bot")
        listed = client.models.list().data
    extra = model.model_extra or {}
    assert extra["model_card"] == {
        "version": "stable",
        "markdown": f"{STORE}/router-int8/v2/MODEL_CARD.md",
        "json": f"{STORE}/router-int8/v2/model-card.json",
    }
    assert set(extra["model_cards"]) == {"stable", "canary"}
    assert (listed[0].model_extra or {})["model_card"] == extra["model_card"]
