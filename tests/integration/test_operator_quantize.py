"""QuantizeJob through the real operator against kmock: it waits for its FineTuneJob, then runs.

As in test_operator_finetune.py, the pipeline runs on the local executor with fast stand-in steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf
import pytest

from kubetune.config import OperatorConfig
from kubetune.reconcile.jobs import Backends

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")

HANDLERS = "kubetune.handlers.jobs"
FAKE_STEPS = Path(__file__).parent / "fake_steps"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_STEPS), os.environ.get("PYTHONPATH", "")]))
    return OperatorConfig(home=tmp_path, default_executor="local", reconcile_interval_s=0.5)


def memo(settings: OperatorConfig) -> kopf.Memo:
    return kopf.Memo(backends=Backends(settings))


FTJ: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "router"},
    "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
}
QJ: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "QuantizeJob",
    "metadata": {"name": "router-int8"},
    "spec": {"model": {"fineTuneJobRef": {"name": "router"}}, "method": {"type": "int8-weight-only"}},
}


def condition(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Succeeded")


async def test_waits_for_its_finetunejob_then_quantizes_its_output(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig
) -> None:
    async with run_operator(HANDLERS, memo=memo(settings)):
        await k8s.create("quantizejobs", QJ)
        waiting = await k8s.wait_for("quantizejobs", "router-int8", lambda o: "conditions" in o["status"])
        assert condition(waiting)["reason"] == "WaitingForSource"
        assert "FineTuneJob/router does not exist" in condition(waiting)["message"]
        await k8s.create("finetunejobs", FTJ)
        done = await k8s.wait_for(
            "quantizejobs", "router-int8", lambda o: condition(o)["status"] != "Unknown", timeout=90
        )
    ftj = await k8s.get("finetunejobs", "router")
    assert condition(ftj)["reason"] == "Completed"
    assert (condition(done)["status"], condition(done)["reason"]) == ("True", "Completed")
    assert done["status"]["source"] == {"uri": ftj["status"]["output"]["uri"], "fineTuneJob": "router"}
    assert done["status"]["report"]["sizeRatio"] == 0.25
    assert done["status"]["output"]["version"] == "v1"
    assert any(e["reason"] == "WaitingForSource" for e in k8s.events("router-int8"))


async def test_fails_with_a_reason_when_its_finetunejob_failed(
    k8s: Cluster, run_operator: OperatorRunner, settings: OperatorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL_STEP", "publish")
    async with run_operator(HANDLERS, memo=memo(settings)):
        await k8s.create("finetunejobs", FTJ)
        await k8s.create("quantizejobs", QJ)
        done = await k8s.wait_for(
            "quantizejobs", "router-int8", lambda o: condition(o)["status"] == "False", timeout=90
        )
    assert condition(done)["reason"] == "SourceFailed"
    assert "FineTuneJob/router failed (QualityGateFailed" in condition(done)["message"]
    assert "pipelineRun" not in done["status"]


async def test_stalls_with_source_not_found_when_its_finetunejob_never_appears(
    k8s: Cluster, run_operator: OperatorRunner, tmp_path: Path
) -> None:
    settings = OperatorConfig(
        home=tmp_path, default_executor="local", reconcile_interval_s=0.5, missing_reference_grace_s=1
    )
    async with run_operator(HANDLERS, memo=memo(settings)):
        await k8s.create("quantizejobs", QJ)
        done = await k8s.wait_for(
            "quantizejobs", "router-int8", lambda o: condition(o)["status"] == "False", timeout=30
        )
    assert condition(done)["reason"] == "SourceNotFound"
    assert "FineTuneJob/router does not exist in namespace default" in condition(done)["message"]
    stalled = next(c for c in done["status"]["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "SourceNotFound")
    assert "pipelineRun" not in done["status"]
    assert any(e["reason"] == "SourceNotFound" for e in k8s.events("router-int8"))
