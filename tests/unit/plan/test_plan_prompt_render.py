"""Composed system messages and constitutions reach the gateway config, and ``kubetune prompt render``
shows what the gateway sends for an input (the gateway's own rendering)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main as kubetune_main
from kubetune.gateway.config import parse_gateway_config
from kubetune.gateway.system import SAFETY_PREAMBLE
from kubetune.plan.gateway import gateway_config
from kubetune.plan.prompt import UnknownVersion, render_request
from kubetune_contract.deployment import ModelDeployment

MANIFEST: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "bot", "namespace": "team-a"},
    "spec": {
        "versions": [
            {"name": "v1", "model": {"uri": "hf://org/model"}, "weight": 100, "prompt": "support"},
            {"name": "raw", "model": {"uri": "hf://org/model"}, "weight": 0},
        ],
        "promptParts": [{"name": "role", "text": "You answer support tickets."}],
        "prompts": [
            {
                "name": "support",
                "systemParts": ["role", "safety-preamble", "format-instructions"],
                "system": "Sign as Kim.",
                "template": "Ticket ({{team}}): {{input}}",
                "constitution": {"principles": [{"name": "polite", "text": "Be polite."}]},
            }
        ],
    },
}
DEPLOYMENT = ModelDeployment.model_validate(MANIFEST)


def test_parts_are_resolved_into_the_gateway_config_and_the_constitution_goes_with_them() -> None:
    config = gateway_config(DEPLOYMENT, {"v1": "http://v1:3000"}, {"v1": 100})
    assert config is not None
    prompt = config["prompts"][0]
    assert prompt["systemParts"] == [
        {"name": "role", "text": "You answer support tickets."},
        {"name": "safety-preamble"},
        {"name": "format-instructions"},
    ]
    assert prompt["constitution"] == {
        "principles": [{"name": "polite", "text": "Be polite."}],
        "revise": True,
    }
    parsed = parse_gateway_config(json.dumps(config)).prompt_for("v1")
    assert parsed is not None and parsed.constitution is not None


def test_render_shows_the_system_message_and_the_templated_input() -> None:
    body = render_request(DEPLOYMENT, "v1", "I was charged twice", {"metadata": {"team": "billing"}})
    assert body["messages"] == [
        {"role": "system", "content": f"You answer support tickets.\n\n{SAFETY_PREAMBLE}\n\nSign as Kim."},
        {"role": "user", "content": "Ticket (billing): I was charged twice"},
    ]
    assert render_request(DEPLOYMENT, "raw", "hi")["messages"] == [{"role": "user", "content": "hi"}]


def test_render_names_an_unknown_version() -> None:
    with pytest.raises(UnknownVersion, match=r"no version 'v9' \(versions: v1, raw\)"):
        render_request(DEPLOYMENT, "v9", "hi")


def run_cli(arguments: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        kubetune_main(arguments)
    return int(exited.value.code or 0)


def test_the_command_prints_the_messages_and_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "bot.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    common = ["prompt", "render", "mdep/bot", "-n", "team-a", "-f", str(manifest), "--input", "Hello"]
    assert run_cli([*common, "--version", "v1", "--metadata", '{"team": "ops"}', "-o", "text"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("--- system\nYou answer support tickets.")
    assert printed.endswith("--- user\nTicket (ops): Hello\n")

    assert run_cli([*common, "--version", "v1"]) == 1
    assert "uses {{team}}, but the request's metadata has no 'team'" in capsys.readouterr().err
    assert run_cli([*common, "--version", "v1", "--response-format", "{json"]) == 1
    assert "--response-format is not JSON" in capsys.readouterr().err
    assert run_cli([*common, "--version", "v2"]) == 1
    assert "has no version 'v2'" in capsys.readouterr().err
    assert run_cli([*common[:2], "mdep/other", *common[3:], "--version", "v1"]) == 1
    assert "no ModelDeployment 'other' in namespace 'team-a'" in capsys.readouterr().err
