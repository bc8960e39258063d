"""Model cards: MODEL_CARD.md and model-card.json, generated from a published artifact's manifest alone.

The card says what the model is for (spec.modelCard), where it came from (base model, the chain of
kubetune jobs, the data and its curation, personal data found and what was done with it), how it
measured (metrics before and after, gates, the quantization report) and what it cannot be trusted with
(the limitations the job spec lists, then those kubetune knows from the manifest), and how its answers
change when demographic terms in the prompt do (evaluation.fairness), when that was measured. Nothing on
the card is typed twice: change the manifest and the card follows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune_components.common import storage
from kubetune_contract.workspace import MODEL_CARD_FILE, MODEL_CARD_JSON_FILE

MODEL_CARD_SCHEMA = "kubetune.dev/model-card/v1"
NOT_STATED = "Not stated (set spec.modelCard.intendedUse)."


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _lineage(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kubetune jobs behind the artifact, newest first (this one, then its parent's, ...)."""
    chain: list[dict[str, Any]] = []
    current: Mapping[str, Any] | None = manifest
    while current:
        resource = _mapping(current.get("resource"))
        chain.append(
            {
                "kind": current.get("kind"),
                "namespace": resource.get("namespace"),
                "name": resource.get("name"),
                "generation": resource.get("generation"),
                "artifactFormat": _mapping(current.get("artifact")).get("format"),
            }
        )
        parent = current.get("parent")
        current = parent if isinstance(parent, Mapping) else None
    return chain


def _training_manifest(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The nearest manifest in the chain that trained weights (a FineTuneJob's), if any."""
    current: Mapping[str, Any] | None = manifest
    while current:
        if current.get("kind") == "FineTuneJob":
            return current
        parent = current.get("parent")
        current = parent if isinstance(parent, Mapping) else None
    return None


def _data_record(dataset: Mapping[str, Any]) -> dict[str, Any]:
    curation = _mapping(dataset.get("curation"))
    pii = _mapping(curation.get("pii")) or {"mode": "off"}
    return {
        "uri": dataset.get("uri"),
        "sha256": dataset.get("sha256"),
        "format": dataset.get("format"),
        "curation": {key: value for key, value in curation.items() if key != "pii"},
        "pii": dict(pii),
    }


def _fairness(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """evaluation.fairness of the base and the tuned model, when the job measured it."""
    found = {which: _mapping(metrics.get(which)).get("fairness") for which in ("baseline", "final")}
    return found if any(isinstance(value, Mapping) for value in found.values()) else None


def _held_out_count(metrics: Mapping[str, Any]) -> int | None:
    for which in ("final", "baseline"):
        samples = _mapping(metrics.get(which)).get("samples")
        if isinstance(samples, int):
            return samples
    return None


def _generated_limitations(card: Mapping[str, Any]) -> list[str]:
    limitations: list[str] = []
    training_data = card.get("trainingData")
    if isinstance(training_data, Mapping):
        pii = _mapping(training_data.get("pii"))
        mode = pii.get("mode", "off")
        if mode == "off":
            limitations.append(
                "The training data was not screened for personal data (dataset.curation.pii was off)."
            )
        else:
            done = {"redact": "replaced with <ENTITY> placeholders", "drop": "dropped", "fail": "refused"}
            limitations.append(
                f"Personal data in the training data was {done.get(str(mode), str(mode))} where pattern "
                "recognizers found it (e-mail, phone, card, IBAN, US SSN, IP); names, postal addresses "
                "and other data without a fixed pattern were not looked for and may remain."
            )
    else:
        limitations.append("No kubetune training record: the data the weights were trained on is unknown.")
    metrics = _mapping(card.get("metrics"))
    if metrics:
        held_out = _held_out_count(metrics)
        size = f"{held_out} " if held_out is not None else ""
        limitations.append(
            f"Measured only on {size}held-out examples of the training data's own distribution; "
            "quality on other inputs is unmeasured."
        )
    if card.get("quantization"):
        limitations.append(
            "Quantized: outputs can differ from the unquantized model's; see the quality before and after."
        )
    if card.get("fairness"):
        limitations.append(
            "Fairness was measured only as answers changing when the listed demographic terms are swapped "
            "in held-out prompts; other groups, and bias that shows without such a term, were not measured."
        )
    else:
        limitations.append("No fairness evaluation ran (evaluation.fairness: counterfactual flip rate).")
    return limitations


def build_model_card(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The card (model-card.json) of the artifact `manifest` describes."""
    spec_card = _mapping(manifest.get("modelCard"))
    training = _training_manifest(manifest)
    resource = _mapping(manifest.get("resource"))
    card: dict[str, Any] = {
        "schema": MODEL_CARD_SCHEMA,
        "model": {
            "kind": manifest.get("kind"),
            "namespace": resource.get("namespace"),
            "name": resource.get("name"),
            "version": f"v{resource.get('generation')}",
            "format": _mapping(manifest.get("artifact")).get("format"),
            "createdAt": manifest.get("createdAt"),
        },
        "intendedUse": spec_card.get("intendedUse"),
        "outOfScopeUse": spec_card.get("outOfScopeUse"),
        "baseModel": dict(_mapping(training.get("baseModel"))) if training else None,
        "source": manifest.get("source"),
        "lineage": _lineage(manifest),
        "trainingData": _data_record(_mapping(training.get("dataset"))) if training else None,
        "training": {"method": training.get("method"), "hyperparameters": training.get("hyperparameters")}
        if training
        else None,
        "metrics": dict(_mapping(training.get("metrics"))) if training else {},
        "gates": manifest.get("gates") or _mapping(manifest.get("report")).get("gates") or [],
        "fairness": _fairness(_mapping(training.get("metrics"))) if training else None,
    }
    if manifest.get("kind") == "QuantizeJob":
        card["quantization"] = {
            "method": manifest.get("method"),
            "target": manifest.get("target"),
            "report": {
                key: value for key, value in _mapping(manifest.get("report")).items() if key != "gates"
            },
        }
        calibration = manifest.get("dataset")
        card["calibrationData"] = _data_record(calibration) if isinstance(calibration, Mapping) else None
    card["limitations"] = [*spec_card.get("limitations", []), *_generated_limitations(card)]
    return card


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {name} | {_value(value)} |" for name, value in rows)]


def _data_section(title: str, data: Mapping[str, Any]) -> list[str]:
    lines = [f"## {title}", ""]
    lines += _table(
        [("URI", data.get("uri")), ("SHA-256", data.get("sha256")), ("Format", data.get("format"))]
    )
    curation = _mapping(data.get("curation"))
    if curation:
        lines += ["", "Curation: " + ", ".join(f"{key} {_value(value)}" for key, value in curation.items())]
    pii = _mapping(data.get("pii"))
    mode = pii.get("mode", "off")
    lines += ["", f"Personal data (dataset.curation.pii: {mode}):"]
    entities = _mapping(pii.get("entities"))
    if mode == "off":
        lines.append("not screened.")
    elif entities:
        lines += [
            f"{pii.get('examplesWithPii', 0)} examples held some, {pii.get('dropped', 0)} dropped.",
            "",
            "| Entity | Found |",
            "|---|---|",
        ]
        lines += [f"| {entity} | {count} |" for entity, count in entities.items()]
    else:
        lines.append("none found.")
    return [*lines, ""]


def render_markdown(card: Mapping[str, Any]) -> str:
    """MODEL_CARD.md: the card for people, in the order they ask (what for, from what, how good, caveats)."""
    model = _mapping(card.get("model"))
    lines = [
        f"# Model card: {model.get('namespace')}/{model.get('name')} {model.get('version')}",
        "",
        f"Generated by kubetune from the artifact's manifest ({model.get('kind')}, "
        f"format {model.get('format')}, published {model.get('createdAt')}).",
        "",
        "## Intended use",
        "",
        str(card.get("intendedUse") or NOT_STATED),
        "",
    ]
    if card.get("outOfScopeUse"):
        lines += ["## Out-of-scope use", "", str(card["outOfScopeUse"]), ""]
    base = _mapping(card.get("baseModel"))
    lines += ["## Lineage", ""]
    if base:
        lines += [
            f"Base model: {_value(base.get('uri'))}"
            + (f" (revision {base['revision']})" if base.get("revision") else ""),
            "",
        ]
    lines += ["| Job | Resource | Artifact |", "|---|---|---|"]
    lines += [
        f"| {step.get('kind')} | {step.get('namespace')}/{step.get('name')} v{step.get('generation')} "
        f"| {step.get('artifactFormat')} |"
        for step in card.get("lineage", [])
    ]
    lines.append("")
    training_data = card.get("trainingData")
    if isinstance(training_data, Mapping):
        lines += _data_section("Training data", training_data)
    calibration = card.get("calibrationData")
    if isinstance(calibration, Mapping):
        lines += _data_section("Calibration and evaluation data", calibration)
    training = _mapping(card.get("training"))
    if training:
        lines += ["## Training", "", f"Method: {_value(training.get('method'))}", ""]
        lines += [f"Hyperparameters: {_value(training.get('hyperparameters'))}", ""]
    metrics = _mapping(card.get("metrics"))
    baseline, final = _mapping(metrics.get("baseline")), _mapping(metrics.get("final"))
    if baseline or final:
        names = [
            name
            for name in dict.fromkeys([*baseline, *final])
            if name != "samples" and not isinstance(baseline.get(name, final.get(name)), (dict, list))
        ]
        lines += ["## Metrics (held-out split)", "", "| Metric | Base model | Tuned model |", "|---|---|---|"]
        lines += [f"| {name} | {_value(baseline.get(name))} | {_value(final.get(name))} |" for name in names]
        lines.append("")
    fairness = _mapping(card.get("fairness"))
    if fairness:
        lines += [
            "## Fairness (counterfactual)",
            "",
            "Held-out prompts asked again with demographic terms swapped (evaluation.fairness)"
            + (
                ", measured on the fine-tuned model before quantization." if card.get("quantization") else "."
            ),
            "",
            "| Model | Pairs | Flip rate | Score gap (A - B) |",
            "|---|---|---|---|",
        ]
        for which, label in (("baseline", "Base model"), ("final", "Tuned model")):
            result = _mapping(fairness.get(which))
            if result:
                lines.append(
                    f"| {label} | {_value(result.get('pairs'))} | {_value(result.get('flipRate'))} | "
                    f"{_value(result.get('scoreGap'))} |"
                )
        lines.append("")
    quantization = _mapping(card.get("quantization"))
    if quantization:
        report = _mapping(quantization.get("report"))
        lines += [
            "## Quantization",
            "",
            f"Method: {_value(quantization.get('method'))}, target {quantization.get('target')}",
            "",
        ]
        lines += _table(list(report.items()))
        lines.append("")
    gates = card.get("gates") or []
    if gates:
        lines += ["## Gates", "", "| Metric | Bound | Value | Passed |", "|---|---|---|---|"]
        lines += [
            f"| {gate.get('metric')} | {gate.get('op')} {_value(gate.get('threshold'))} | "
            f"{_value(gate.get('value'))} | {'yes' if gate.get('passed') else 'no'} |"
            for gate in gates
            if isinstance(gate, Mapping)
        ]
        lines.append("")
    lines += ["## Limitations", ""]
    lines += [f"- {limitation}" for limitation in card.get("limitations", [])]
    return "\n".join(lines) + "\n"


def write_model_card(export_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write MODEL_CARD.md and model-card.json into `export_dir`; returns the card."""
    card = build_model_card(manifest)
    storage.atomic_write_json(export_dir / MODEL_CARD_JSON_FILE, card)
    storage.atomic_write_text(export_dir / MODEL_CARD_FILE, render_markdown(card))
    return card
