"""Model cards are generated from a published artifact's manifest, and published with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from kubetune_components.common.artifacts import MANIFEST_FILE, publish_with_manifest
from kubetune_components.common.model_card import NOT_STATED, build_model_card, render_markdown
from kubetune_contract.workspace import MODEL_CARD_FILE, MODEL_CARD_JSON_FILE

FINETUNE_MANIFEST: dict[str, Any] = {
    "schema": "kubetune.dev/manifest/v1",
    "kind": "FineTuneJob",
    "resource": {"namespace": "support", "name": "router", "uid": "u-1", "generation": 3},
    "baseModel": {"uri": "pvc://models/tiny-base", "revision": None},
    "dataset": {
        "uri": "pvc://data/tickets.jsonl",
        "sha256": "ab" * 32,
        "format": "instruction",
        "curation": {
            "total": 100,
            "duplicates": 2,
            "kept": 98,
            "pii": {
                "mode": "redact",
                "examplesWithPii": 7,
                "dropped": 0,
                "entities": {"EMAIL_ADDRESS": 5, "US_SSN": 2},
            },
        },
    },
    "method": {"type": "lora"},
    "hyperparameters": {"maxSteps": 10},
    "metrics": {
        "baseline": {"evalLoss": 3.5, "exactMatch": 0.0, "samples": 20},
        "final": {"evalLoss": 1.25, "exactMatch": 0.55, "samples": 20},
    },
    "gates": [{"metric": "exactMatch", "op": "min", "threshold": 0.35, "value": 0.55, "passed": True}],
    "modelCard": {"intendedUse": "Routing support tickets.", "limitations": ["English only."]},
    "artifact": {"format": "peft-adapter", "files": {}},
    "createdAt": "2026-12-03T03:00:00Z",
    "parent": None,
}

QUANTIZE_MANIFEST: dict[str, Any] = {
    "schema": "kubetune.dev/manifest/v1",
    "kind": "QuantizeJob",
    "resource": {"namespace": "support", "name": "router-int8", "uid": "u-2", "generation": 1},
    "source": {"uri": "pvc://artifacts/support/router/v3"},
    "dataset": None,
    "method": {"type": "int8-weight-only"},
    "target": "cpu",
    "report": {
        "sizeRatio": 0.3,
        "gates": [{"metric": "sizeRatio", "op": "max", "threshold": 0.5, "value": 0.3, "passed": True}],
    },
    "modelCard": {},
    "artifact": {"format": "torchao-state-dict", "files": {}},
    "createdAt": "2026-12-03T04:00:00Z",
    "parent": FINETUNE_MANIFEST,
}


def test_a_finetune_card_carries_use_lineage_data_pii_metrics_and_limitations() -> None:
    card = build_model_card(FINETUNE_MANIFEST)
    assert card["model"]["version"] == "v3" and card["intendedUse"] == "Routing support tickets."
    assert card["baseModel"]["uri"] == "pvc://models/tiny-base"
    assert card["trainingData"]["pii"]["entities"] == {"EMAIL_ADDRESS": 5, "US_SSN": 2}
    assert card["trainingData"]["curation"] == {"total": 100, "duplicates": 2, "kept": 98}
    assert card["metrics"]["final"]["exactMatch"] == 0.55
    assert card["limitations"][0] == "English only."
    assert any("replaced with <ENTITY> placeholders" in item for item in card["limitations"])
    assert any("on 20 held-out examples" in item for item in card["limitations"])

    markdown = render_markdown(card)
    assert markdown.startswith("# Model card: support/router v3\n")
    assert "## Intended use\n\nRouting support tickets.\n" in markdown
    assert "| EMAIL_ADDRESS | 5 |" in markdown and "7 examples held some, 0 dropped." in markdown
    assert "| exactMatch | 0 | 0.55 |" in markdown
    assert "| exactMatch | min 0.35 | 0.55 | yes |" in markdown


def test_a_card_without_an_intended_use_or_pii_screening_says_so() -> None:
    manifest = copy.deepcopy(FINETUNE_MANIFEST)
    manifest["modelCard"] = {}
    del manifest["dataset"]["curation"]["pii"]  # a manifest published before PII screening existed
    card = build_model_card(manifest)
    assert card["intendedUse"] is None and NOT_STATED in render_markdown(card)
    assert card["trainingData"]["pii"] == {"mode": "off"}
    assert "not screened for personal data" in card["limitations"][0]


def test_a_quantized_card_follows_the_lineage_back_to_the_training_data() -> None:
    card = build_model_card(QUANTIZE_MANIFEST)
    assert [(step["kind"], step["name"]) for step in card["lineage"]] == [
        ("QuantizeJob", "router-int8"),
        ("FineTuneJob", "router"),
    ]
    assert card["trainingData"]["pii"]["entities"] == {"EMAIL_ADDRESS": 5, "US_SSN": 2}
    assert card["quantization"]["report"] == {"sizeRatio": 0.3}
    assert card["gates"][0]["metric"] == "sizeRatio"
    assert card["intendedUse"] is None  # the quantize job's own card fields, not the parent's
    markdown = render_markdown(card)
    assert "## Quantization" in markdown and "| sizeRatio | 0.3 |" in markdown


def test_publishing_writes_the_card_beside_the_manifest(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "weights.bin").write_bytes(b"\0")
    destination = tmp_path / "store" / "router" / "v3"
    publish_with_manifest(export, str(destination), copy.deepcopy(FINETUNE_MANIFEST))
    assert sorted(path.name for path in destination.iterdir()) == sorted(
        ["weights.bin", MANIFEST_FILE, MODEL_CARD_FILE, MODEL_CARD_JSON_FILE]
    )
    manifest = json.loads((destination / MANIFEST_FILE).read_text())
    assert json.loads((destination / MODEL_CARD_JSON_FILE).read_text()) == build_model_card(manifest)


def test_counterfactual_fairness_before_and_after_is_on_the_card() -> None:
    manifest = copy.deepcopy(FINETUNE_MANIFEST)
    manifest["metrics"]["baseline"]["fairness"] = {"pairs": 12, "flipRate": 0.25, "scoreGap": 0.0833}
    manifest["metrics"]["final"]["fairness"] = {"pairs": 12, "flipRate": 0.0, "scoreGap": 0.0}
    card = build_model_card(manifest)
    assert card["fairness"]["final"] == {"pairs": 12, "flipRate": 0.0, "scoreGap": 0.0}
    assert not any("No fairness evaluation ran" in item for item in card["limitations"])
    markdown = render_markdown(card)
    assert "| Base model | 12 | 0.25 | 0.0833 |" in markdown and "| Tuned model | 12 | 0 | 0 |" in markdown
    assert "| fairness |" not in markdown  # not a row of the metrics table
    assert "No fairness evaluation ran" in render_markdown(build_model_card(FINETUNE_MANIFEST))
