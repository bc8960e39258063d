"""The Argo CD health check runs as Lua (lupa) against job status fixtures, as Argo CD would run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

HEALTH_SCRIPT = Path(__file__).resolve().parents[3] / "manifests" / "argocd" / "health-job.lua"


def health(obj: dict[str, Any]) -> dict[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return runtime.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return runtime.table_from([table(v) for v in value])
        return value

    runtime.globals()["obj"] = table(obj)
    result = runtime.execute(HEALTH_SCRIPT.read_text())
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


def test_the_argocd_cm_patch_embeds_the_script_for_every_job_kind() -> None:
    patch = yaml.safe_load((HEALTH_SCRIPT.parent / "argocd-cm-health.yaml").read_text())
    for kind in ("FineTuneJob", "QuantizeJob"):
        assert (
            patch["data"][f"resource.customizations.health.kubetune.dev_{kind}"] == HEALTH_SCRIPT.read_text()
        )
