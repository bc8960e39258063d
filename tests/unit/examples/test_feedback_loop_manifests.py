"""examples/feedback-loop's manifests as loop.py applies them: the deployment before v2 exists is valid
and serves v1 alone with feedback capture, and the KTO job's validation set is the quickstart's held-out
tickets with their right team (the slow end-to-end run is tests/e2e/test_feedback_loop_example.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from kubetune.api.validation import validate_paths

REPO_ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = REPO_ROOT / "examples" / "feedback-loop"


@pytest.fixture(scope="module")
def loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("feedback_loop_driver", EXAMPLE / "loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_one_serves_v1_alone_with_capture_and_without_a_rollout(
    loop: ModuleType, tmp_path: Path
) -> None:
    before_v2: Path = loop.rendered(EXAMPLE / "03-canary.yaml", tmp_path / "01.yaml", loop.without_the_canary)
    result = validate_paths([EXAMPLE / "01-router.yaml", before_v2])
    assert result.ok, str(result)
    spec = json.loads(before_v2.read_text())["spec"]
    final = yaml.safe_load((EXAMPLE / "03-canary.yaml").read_text())["spec"]
    assert spec["versions"] == [{**final["versions"][0], "weight": 100}]
    assert spec["versions"][0]["model"] == {"fineTuneJobRef": {"name": loop.V1_JOB}}
    assert "rollout" not in spec and spec["feedback"] == {"capture": True}
    # Everything else is the final deployment's: only v2 and its rollout arrive in stage 5.
    assert {k: v for k, v in final.items() if k not in ("versions", "rollout")} == {
        k: v for k, v in spec.items() if k != "versions"
    }
    assert final["versions"][-1]["model"] == {"fineTuneJobRef": {"name": loop.KTO_JOB}}


def test_the_kto_job_is_validated_on_the_held_out_tickets_with_their_right_team(loop: ModuleType) -> None:
    job = yaml.safe_load((EXAMPLE / "02-kto.yaml").read_text())
    validation = REPO_ROOT / job["spec"]["dataset"]["validationUri"]
    rows = [json.loads(line) for line in validation.read_text().splitlines()]
    tickets = loop.tickets(loop.CANARY_TICKETS)
    assert len(rows) == len(tickets) == 60
    for row, (instruction, ticket, team) in zip(rows, tickets, strict=True):
        assert row == {
            "prompt": [{"role": "system", "content": instruction}, {"role": "user", "content": ticket}],
            "completion": [{"role": "assistant", "content": team}],
            "label": True,
        }


def test_the_reviewer_reads_the_first_word_of_an_answer(loop: ModuleType) -> None:
    assert loop.named_team(" Billing.") == "billing"
    assert loop.named_team("technical team") == "technical"
    assert loop.named_team("technic") is None  # a truncated answer is not a team
    assert loop.named_team("") is None
