"""The Argo CD health checks run as Lua (lupa) against status fixtures, as Argo CD would run them.

Job fixtures are hand-written here and also produced by the real planning code (status_fixtures.py);
ModelDeployment fixtures are the contract's (fixtures/modeldeployment-statuses.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml
from status_fixtures import Case, job_cases, modeldeployment_cases

from kubetune.api.registry import all_definitions

ARGOCD = Path(__file__).resolve().parents[3] / "manifests" / "argocd"
HEALTH_SCRIPT = ARGOCD / "health-job.lua"
MODELDEPLOYMENT_SCRIPT = ARGOCD / "health-modeldeployment.lua"
SCRIPTS = {
    "FineTuneJob": HEALTH_SCRIPT,
    "QuantizeJob": HEALTH_SCRIPT,
    "ModelDeployment": MODELDEPLOYMENT_SCRIPT,
}


def health(obj: dict[str, Any], script: Path = HEALTH_SCRIPT) -> dict[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([table(v) for v in value])
        return value

    runtime.globals()["obj"] = table(obj)
    result = runtime.execute(script.read_text())
    return {"status": str(result["status"]), "message": str(result["message"])}


def job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "tune", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


def succeeded(state: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "observedGeneration": 1,
        "conditions": [{"type": "Succeeded", "status": state, "reason": reason, "message": message}],
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (job(None), "Progressing"),
        (job(succeeded("Unknown", "Running", "training: step 3/10")), "Progressing"),
        (job(succeeded("Unknown", "WaitingForSource", "waiting for FineTuneJob/x")), "Progressing"),
        (job(succeeded("True", "Completed", "published s3://m/v1")), "Healthy"),
        (job(succeeded("False", "QualityGateFailed", "exactMatch 0.1 < 0.5")), "Degraded"),
        (job(succeeded("True", "Completed"), generation=2), "Progressing"),  # not yet observed
    ],
)
def test_health_follows_the_succeeded_condition(obj: dict[str, Any], expected: str) -> None:
    assert health(obj)["status"] == expected


def test_message_carries_reason_and_message() -> None:
    result = health(job(succeeded("False", "QualityGateFailed", "exactMatch 0.1 < 0.5")))
    assert result["message"] == "QualityGateFailed: exactMatch 0.1 < 0.5"


def test_the_argocd_cm_patch_embeds_the_script_for_every_kind() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-health.yaml").read_text())
    kinds = {definition.kind for definition in all_definitions()}
    assert set(SCRIPTS) == kinds
    assert patch["data"] == {
        f"resource.customizations.health.kubetune.dev_{kind}": script.read_text()
        for kind, script in SCRIPTS.items()
    }


@pytest.mark.parametrize("case", [*job_cases(), *modeldeployment_cases()], ids=lambda case: case.name)
def test_health_of_planned_jobs_and_contract_deployments(case: Case) -> None:
    result = health(case.obj, SCRIPTS[case.obj["kind"]])
    assert result["status"] == case.argocd
    assert case.message in result["message"]


@pytest.mark.parametrize(
    ("conditions", "expected", "message"),
    [
        # Progressing wins over Ready False: versions still starting are not a failure yet.
        ({"Ready": "False", "Progressing": "True"}, "Progressing", "P: p"),
        # Ready False with nothing in progress and no Stalled condition (e.g. a version crashed).
        ({"Ready": "False", "Progressing": "False"}, "Degraded", "R: r"),
        ({"Ready": "False"}, "Degraded", "R: r"),
        ({"Ready": "Unknown"}, "Progressing", "Waiting for the Ready condition"),
        ({"Ready": "True", "Stalled": "True"}, "Degraded", "S: s"),
        ({"Progressing": "False"}, "Progressing", "Waiting for the Ready condition"),
    ],
)
def test_modeldeployment_condition_combinations(
    conditions: dict[str, str], expected: str, message: str
) -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            {"type": type_, "status": state, "reason": type_[0], "message": type_[0].lower()}
            for type_, state in conditions.items()
        ],
    }
    result = health(job(status), MODELDEPLOYMENT_SCRIPT)
    assert (result["status"], result["message"]) == (expected, message)
