"""Where a local gateway keeps the rated completions of spec.feedback.capture: under $KUBETUNE_HOME,
beside the deployment's keys, unless the config names Redis (then the file is unused) or a path."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.gateway.config import parse_gateway_config
from kubetune.local.gateway_process import GatewayProcess
from kubetune.local.serving_host import ServingHost
from kubetune.plan.versions import DeploymentRef

CONFIG = {
    "deployment": "support-bot",
    "versions": [{"name": "v1", "url": "http://127.0.0.1:1", "weight": 100}],
}


def local_config(tmp_path: Path, **extra: object) -> dict[str, object]:
    gateway = GatewayProcess(
        DeploymentRef("support-bot", "team-a"), host=ServingHost(home=tmp_path, notify=print)
    )
    gateway.configure({**CONFIG, **extra})
    written: dict[str, object] = json.loads(gateway.config_path.read_text())
    return written


def test_captured_feedback_lives_under_kubetune_home_beside_the_keys(tmp_path: Path) -> None:
    written = local_config(tmp_path, feedback={"capture": True})
    config = parse_gateway_config(json.dumps(written))
    assert config.feedback.path == str(tmp_path / "access" / "team-a" / "support-bot" / "feedback.jsonl")
    assert config.access.keys_file == str(tmp_path / "access" / "team-a" / "support-bot" / "keys.json")


def test_no_file_is_named_when_nothing_is_captured(tmp_path: Path) -> None:
    written = local_config(tmp_path, feedback={"capture": False})
    assert parse_gateway_config(json.dumps(written)).feedback.path is None
