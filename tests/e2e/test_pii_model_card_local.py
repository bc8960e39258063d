"""A FineTuneJob whose data holds PII, then a QuantizeJob of its model, in local mode with real components:
the model is trained on redacted data, the curation report and the manifest count what was redacted,
counterfactual fairness is measured before and after and gated, and both published artifacts carry a
model card that says so."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import KubetuneCli

pytestmark = pytest.mark.slow

JOBS = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: private-router}
spec:
  baseModel: {uri: ./.kubetune/models/tiny-base}
  dataset:
    uri: tickets-with-pii.jsonl
    format: instruction
    validationSplit: "0.2"
    curation: {pii: redact}
  method: {type: lora, lora: {r: 4, alpha: 8}}
  training: {maxSteps: 6, batchSize: 4, learningRate: "1e-3", maxSeqLength: 256, checkpointEverySteps: 100}
  evaluation:
    metrics: [evalLoss]
    maxSamples: 4
    maxNewTokens: 4
    fairness: {maxSamples: 4, maxCounterfactualFlipRate: "1"}
  modelCard:
    intendedUse: Routing support tickets to a team, for the support desk's triage queue.
    limitations: [Trained on English tickets only.]
  executor: local
---
apiVersion: kubetune.dev/v1alpha1
kind: QuantizeJob
metadata: {name: private-router-int8}
spec:
  model: {fineTuneJobRef: {name: private-router}}
  method: {type: int8-weight-only}
  evaluation: {maxSamples: 4, maxNewTokens: 4, latencyPrompts: 2, latencyNewTokens: 4}
  executor: local
"""

SECRETS = ("jane.roe@example.org", "4111 1111 1111 1111", "+1 415-555-0132")


def tickets(project: Path) -> list[dict[str, Any]]:
    """Forty quickstart tickets, each mentioning the writer's wife, every fourth with an e-mail address,
    a card number or a phone number."""
    source = project / "examples" / "quickstart" / "data" / "support-tickets.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:40]]
    for index, row in enumerate(rows):
        row["input"] += " My wife placed the order."  # a demographic term, for evaluation.fairness to swap
        if index % 4 == 0:
            secret = SECRETS[(index // 4) % len(SECRETS)]
            row["input"] += f" You can reach me via {secret}."
    return rows


def succeeded(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Succeeded")


def test_a_model_trained_on_redacted_data_says_so_on_its_cards(project: Path, kubetune: KubetuneCli) -> None:
    rows = tickets(project)
    (project / "tickets-with-pii.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (project / "jobs.yaml").write_text(JOBS)
    kubetune("up", "-f", "jobs.yaml")

    tuned = json.loads(kubetune("get", "ftj", "private-router", "-o", "json").stdout)
    assert succeeded(tuned)["reason"] == "Completed", tuned["status"]
    published = Path(tuned["status"]["output"]["uri"])
    manifest = json.loads((published / "kubetune-manifest.json").read_text())
    assert manifest["dataset"]["curation"]["kept"] == 40  # every ticket trains, redacted where need be
    pii = manifest["dataset"]["curation"]["pii"]
    # ten tickets: four e-mail addresses, three cards, three phone numbers
    assert pii == {
        "mode": "redact",
        "examplesWithPii": 10,
        "dropped": 0,
        "entities": {"CREDIT_CARD": 3, "EMAIL_ADDRESS": 4, "PHONE_NUMBER": 3},
    }

    # The splits the model trained on are the ones the manifest fingerprints, and they hold no PII.
    splits = {
        path.name: path
        for path in (project / ".kubetune").rglob("data/*.jsonl")
        if hashlib.sha256(path.read_bytes()).hexdigest() in manifest["dataset"]["splitsSha256"].values()
    }
    assert set(splits) == {"train.jsonl", "validation.jsonl"}
    curated = "".join(path.read_text() for path in splits.values())
    assert not any(secret in curated for secret in SECRETS)
    assert curated.count("<EMAIL_ADDRESS>") == 4 and curated.count("<CREDIT_CARD>") == 3

    fairness = tuned["status"]["evaluation"]["fairness"]
    assert fairness["baseline"]["pairs"] == fairness["final"]["pairs"] == 4  # evaluation.fairness.maxSamples
    assert 0 <= fairness["final"]["flipRate"] <= 1
    gate = next(g for g in tuned["status"]["evaluation"]["gates"] if g["metric"] == "counterfactualFlipRate")
    assert gate["value"] == fairness["final"]["flipRate"] and gate["passed"]

    card = json.loads((published / "model-card.json").read_text())
    assert card["fairness"]["final"]["flipRate"] == fairness["final"]["flipRate"]
    assert card["intendedUse"].startswith("Routing support tickets")
    assert card["trainingData"]["pii"] == pii
    assert card["baseModel"]["uri"] == manifest["baseModel"]["uri"]
    assert card["metrics"]["final"]["evalLoss"] == manifest["metrics"]["final"]["evalLoss"]
    assert card["limitations"][0] == "Trained on English tickets only."
    markdown = (published / "MODEL_CARD.md").read_text()
    assert "Routing support tickets to a team" in markdown
    assert "Personal data (dataset.curation.pii: redact):" in markdown
    assert "| EMAIL_ADDRESS | 4 |" in markdown and "| CREDIT_CARD | 3 |" in markdown
    assert "## Fairness (counterfactual)" in markdown

    quantized = json.loads(kubetune("get", "qj", "private-router-int8", "-o", "json").stdout)
    assert succeeded(quantized)["reason"] == "Completed", quantized["status"]
    quantized_dir = Path(quantized["status"]["output"]["uri"])
    quantized_card = json.loads((quantized_dir / "model-card.json").read_text())
    # The quantized model's card follows the lineage back to the data the weights were trained on.
    assert [step["kind"] for step in quantized_card["lineage"]] == ["QuantizeJob", "FineTuneJob"]
    assert quantized_card["trainingData"]["pii"] == pii
    assert quantized_card["quantization"]["report"]["sizeRatio"] < 1
    assert "## Quantization" in (quantized_dir / "MODEL_CARD.md").read_text()
