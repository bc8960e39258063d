"""The README's quickstart (fine-tune, then quantize), end to end in local mode, real components."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import KubetuneCli

pytestmark = pytest.mark.slow


# Only the jobs: 03-deployment.yaml would keep `kubetune up` serving until interrupted (its e2e test is
# test_deployment_local.py).
JOBS = ("-f", "examples/quickstart/01-finetune.yaml", "-f", "examples/quickstart/02-quantize.yaml")


def succeeded(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Succeeded")


def test_quickstart_finetune_beats_the_base_model(project: Path, kubetune: KubetuneCli) -> None:
    result = kubetune("up", *JOBS)
    assert "finetunejob/support-router created" in result.stdout
    assert "Succeeded" in result.stdout

    obj = json.loads(kubetune("get", "ftj", "support-router", "-o", "json").stdout)
    status = obj["status"]
    assert (succeeded(obj)["status"], succeeded(obj)["reason"]) == ("True", "Completed"), status
    baseline, final = status["evaluation"]["baseline"], status["evaluation"]["final"]
    # Held-out tickets share no sentence with training: the gate asks for well above chance (0.2).
    assert final["exactMatch"] >= 0.35 > baseline["exactMatch"], status["evaluation"]
    assert final["lenientMatch"] >= final["exactMatch"]
    assert status["evaluation"]["referenceBaselines"]["majorityClass"] == pytest.approx(0.2)
    assert "exactMatch of trivial predictors on the same examples: majority class 0.2000" in result.stdout
    assert final["evalLoss"] < baseline["evalLoss"]
    assert all(gate["passed"] for gate in status["evaluation"]["gates"])
    assert (
        status["progress"]["percent"] == 100
        and status["progress"]["step"] == status["progress"]["totalSteps"]
    )

    published = Path(status["output"]["uri"])
    manifest = json.loads((published / "kubetune-manifest.json").read_text())
    assert manifest["resource"]["uid"] == obj["metadata"]["uid"]
    data = Path("examples/quickstart/data/support-tickets.jsonl").read_bytes()
    assert manifest["dataset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["metrics"]["final"]["exactMatch"] == pytest.approx(final["exactMatch"])
    # The trivial predictors the report reads the scores against, on the same held-out tickets.
    reference = manifest["metrics"]["baseline"]
    assert reference["majorityClass"] == pytest.approx(0.2)  # five teams, twelve tickets each
    assert reference["majorityClass"] < reference["nearestNeighbour"] < 1
    for name, digest in manifest["artifact"]["files"].items():
        assert hashlib.sha256((published / name).read_bytes()).hexdigest() == digest

    quantized = json.loads(kubetune("get", "qj", "support-router-int8", "-o", "json").stdout)
    report = quantized["status"]["report"]
    assert succeeded(quantized)["reason"] == "Completed", quantized["status"]
    assert quantized["status"]["source"]["uri"] == status["output"]["uri"]
    assert report["sizeRatio"] < 0.5 and all(gate["passed"] for gate in report["gates"])
    assert report["quality"]["after"]["exactMatch"] >= report["quality"]["before"]["exactMatch"] - 0.05
    quantized_manifest = json.loads(
        (Path(quantized["status"]["output"]["uri"]) / "kubetune-manifest.json").read_text()
    )
    assert quantized_manifest["kind"] == "QuantizeJob"
    assert quantized_manifest["parent"]["resource"]["uid"] == obj["metadata"]["uid"]  # lineage chain

    table = kubetune("get", "ftj").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "PROGRESS", "%", "BASE", "MODEL", "AGE"]
    assert table[1].split()[:3] == ["support-router", "Succeeded", "100"]

    again = kubetune("up", *JOBS)
    assert "finetunejob/support-router unchanged" in again.stdout
    assert "quantizejob/support-router-int8 unchanged" in again.stdout
