"""Planning a distillation FineTuneJob whose teacher is another FineTuneJob: it waits for that job to
succeed, then the steps get the model it published as teacher.uri (as a QuantizeJob gets its source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.config import OperatorConfig
from kubetune.plan.finetune import Observed, plan_finetune

T0 = "2026-01-01T00:00:00Z"
T_LATE = "2026-01-01T01:00:00Z"


def student_body(teacher: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "student",
            "namespace": "team-a",
            "uid": "5678",
            "generation": 1,
            "creationTimestamp": T0,
        },
        "spec": {
            "baseModel": {"uri": "models/tiny-small"},
            "dataset": {"uri": "data/train.jsonl"},
            "method": {"type": "distillation", "distillation": {"teacher": teacher, "alpha": "0.7"}},
        },
    }


def teacher_job(
    state: str, reason: str = "", output: str | None = "/store/team-a/teacher/v1"
) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Succeeded", "status": state, "reason": reason}]}
    if output is not None:
        status["output"] = {"uri": output}
    return {"spec": {}, "status": status}


@pytest.fixture
def settings(tmp_path: Path) -> OperatorConfig:
    return OperatorConfig(home=tmp_path, default_executor="local", artifact_store="/store")


def succeeded(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Succeeded")


BY_REF = {"fineTuneJobRef": {"name": "teacher"}}


def test_the_teacher_reference_resolves_to_the_model_that_job_published(settings: OperatorConfig) -> None:
    decision = plan_finetune(
        student_body(BY_REF), Observed(), settings, T0, lookup=lambda _ns, _name: teacher_job("True")
    )
    assert decision.action == "submit" and decision.request is not None
    distillation = decision.request.config["spec"]["method"]["distillation"]
    assert distillation == {
        "teacher": {"uri": "/store/team-a/teacher/v1"},
        "temperature": "2.0",
        "alpha": "0.7",
    }


def test_a_teacher_by_uri_is_made_absolute_like_the_base_model(
    settings: OperatorConfig, tmp_path: Path
) -> None:
    decision = plan_finetune(student_body({"uri": "models/teacher"}), Observed(), settings, T0, tmp_path)
    assert decision.request is not None
    teacher = decision.request.config["spec"]["method"]["distillation"]["teacher"]
    assert teacher == {"uri": str(tmp_path / "models" / "teacher")}


@pytest.mark.parametrize(
    ("found", "state", "reason", "message"),
    [
        (
            teacher_job("Unknown"),
            "Unknown",
            "WaitingForTeacher",
            "waiting for FineTuneJob/teacher to succeed",
        ),
        (teacher_job("False", "QualityGateFailed"), "False", "TeacherFailed", "FineTuneJob/teacher failed"),
        (teacher_job("True", output=None), "False", "TeacherFailed", "succeeded but published no output"),
        (None, "Unknown", "WaitingForTeacher", "FineTuneJob/teacher does not exist (yet)"),
    ],
)
def test_the_student_waits_for_its_teacher_or_fails_with_it(
    settings: OperatorConfig, found: dict[str, Any] | None, state: str, reason: str, message: str
) -> None:
    decision = plan_finetune(student_body(BY_REF), Observed(), settings, T0, lookup=lambda _ns, _name: found)
    assert decision.action == "none"
    condition = succeeded(decision.status)
    assert (condition["status"], condition["reason"]) == (state, reason)
    assert message in condition["message"]


def test_a_teacher_job_that_never_appears_fails_the_student_naming_the_field(
    settings: OperatorConfig,
) -> None:
    decision = plan_finetune(
        student_body(BY_REF), Observed(), settings, T_LATE, lookup=lambda _ns, _name: None
    )
    condition = succeeded(decision.status)
    assert (condition["status"], condition["reason"]) == ("False", "TeacherNotFound")
    assert condition["message"].startswith(
        "spec.method.distillation.teacher.fineTuneJobRef: FineTuneJob/teacher does not exist in namespace "
        "team-a"
    )
    assert "delete and apply FineTuneJob/student again" in condition["message"]
