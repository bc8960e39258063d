"""A prompt's fewShot and reasoning and the context window's maxPromptTokens reach the gateway config."""

from __future__ import annotations

import json
from typing import Any

from kubetune.gateway.config import DEFAULT_MAX_PROMPT_TOKENS, parse_gateway_config
from kubetune.plan.gateway import gateway_config
from kubetune_contract.deployment import ModelDeployment


def _deployment(spec_extra: dict[str, Any]) -> ModelDeployment:
    version = {"name": "tuned", "model": {"uri": "hf://org/model"}, "weight": 100, "prompt": "support"}
    return ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "bot", "namespace": "team-a"},
            "spec": {"versions": [version], **spec_extra},
        }
    )


def test_few_shot_reasoning_and_the_prompt_budget_reach_the_gateway() -> None:
    deployment = _deployment(
        {
            "generation": {"contextWindow": {"maxPromptTokens": 4096}},
            "prompts": [
                {
                    "name": "support",
                    "fewShot": {"uri": "file:///pools/support.jsonl", "k": 5, "select": "random"},
                    "reasoning": {"mode": "hidden", "open": "<reason>", "close": "</reason>"},
                }
            ],
        }
    )
    config = gateway_config(deployment, {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None
    assert config["generation"]["maxPromptTokens"] == 4096
    assert config["prompts"][0]["fewShot"] == {
        "uri": "file:///pools/support.jsonl",
        "k": 5,
        "select": "random",
    }
    assert config["prompts"][0]["reasoning"] == {"open": "<reason>", "close": "</reason>"}
    prompt = parse_gateway_config(json.dumps(config)).prompt_for("tuned")
    assert prompt is not None and prompt.few_shot is not None and prompt.reasoning is not None
    assert (prompt.few_shot.k, prompt.few_shot.select) == (5, "random")


def test_the_contract_defaults_fill_what_the_spec_leaves_out() -> None:
    deployment = _deployment(
        {"prompts": [{"name": "support", "fewShot": {"uri": "/pools/support.jsonl"}, "reasoning": {}}]}
    )
    config = gateway_config(deployment, {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None
    parsed = parse_gateway_config(json.dumps(config))
    assert parsed.generation.max_prompt_tokens == DEFAULT_MAX_PROMPT_TOKENS == 2048
    prompt = parsed.prompt_for("tuned")
    assert prompt is not None and prompt.few_shot is not None and prompt.reasoning is not None
    assert (prompt.few_shot.k, prompt.few_shot.select) == (3, "similar")
    assert (prompt.reasoning.open, prompt.reasoning.close) == ("<think>", "</think>")


def test_a_prompt_without_them_sends_neither() -> None:
    deployment = _deployment({"prompts": [{"name": "support", "system": "Be brief."}]})
    config = gateway_config(deployment, {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None
    assert "fewShot" not in config["prompts"][0] and "reasoning" not in config["prompts"][0]
