"""The fine-tune publish step: quality gates, then the export of the tuned model with its lineage manifest.

Nothing is published unless every gate passes. The export (see common/artifacts.py) holds the adapter
(or merged / full weights), the tokenizer and `kubetune-manifest.json`, which records where the model
came from: base model, dataset, method, hyperparameters, metrics, gates, file digests and library
versions.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune_components.common import models, storage
from kubetune_components.common.artifacts import (
    MANIFEST_SCHEMA,
    destination_uri,
    export_staging,
    file_digests,
    library_versions,
    publish_with_manifest,
    read_json,
    resource_record,
)
from kubetune_components.common.errors import ComponentError
from kubetune_components.common.gates import check_gates, evaluate_gates
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.common.progress import ProgressReporter, utc_now_iso
from kubetune_components.finetune.fairness import FLIP_RATE_GATE, fairness_gates
from kubetune_components.finetune.forgetting import describe_reference_failure, reference_gates
from kubetune_components.finetune.harness import describe_harness_failure, harness_gates
from kubetune_components.finetune.train import TRAINING_RECORD, load_trained_model, read_training_record
from kubetune_contract.common import GateOp
from kubetune_contract.finetune import FineTuneJob, Gate
from kubetune_contract.workspace import WorkspaceLayout

LOWER_IS_BETTER = frozenset({"evalLoss", "perplexity"})
NOT_EXPORTED = frozenset({"README.md", TRAINING_RECORD})
"""Files of `trained/` that are not part of the artifact (PEFT's template model card, our training record)."""
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


# --------------------------------------------------------------------------------------------------
# Gates.


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def evaluate_finetune_gates(
    gates: list[Gate], baseline: Mapping[str, Any], final: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One result per bound of every gate: {metric, op, threshold, value, passed}.

    For `minImprovement` the value is the improvement over the baseline: a decrease for evalLoss
    and perplexity, an increase for exactMatch. A metric that was not computed fails its gate.
    """

    def value_of(metric: str, op: GateOp) -> float | None:
        final_value = _finite(final.get(metric))
        if op != "minImprovement":
            return final_value
        base_value = _finite(baseline.get(metric))
        if final_value is None or base_value is None:
            return None
        return base_value - final_value if metric in LOWER_IS_BETTER else final_value - base_value

    return evaluate_gates(gates, value_of)


def describe_failure(result: Mapping[str, Any]) -> str:
    if (reference := describe_reference_failure(result)) is not None:
        return reference
    if (harness := describe_harness_failure(result)) is not None:
        return harness
    if result["metric"] == FLIP_RATE_GATE and result["value"] is None:
        return (
            f"{FLIP_RATE_GATE} was not measured: no held-out prompt holds a term of "
            "evaluation.fairness.termPairs"
        )
    metric, op, threshold, value = result["metric"], result["op"], result["threshold"], result["value"]
    if value is None:
        return f"{metric} was not computed (add it to evaluation.metrics and make sure both evaluations ran)"
    if op == "minImprovement":
        return f"{metric} improved by {value:.6g} over the baseline, less than minImprovement {threshold:g}"
    if op == "min":
        return f"{metric} is {value:.6g}, below min {threshold:g}"
    return f"{metric} is {value:.6g}, above max {threshold:g}"


# --------------------------------------------------------------------------------------------------
# Export.


def artifact_format(job: FineTuneJob) -> str:
    """full, merged or peft-adapter (the API has already refused merging an adapter that cannot be).

    dpo and kto publish whole weights: their LoRA adapter is merged into the base, so servers and the
    operator see the same kind of model whatever weights trained."""
    if job.spec.method.preference is not None:
        return "merged" if job.spec.method.trains_adapter else "full"
    if not job.spec.method.is_peft:
        return "full"
    return "merged" if job.spec.output.merge_adapter else "peft-adapter"


def export_trained(trained_dir: Path, base_model_uri: str, export_dir: Path, fmt: str) -> None:
    """Fill `export_dir` with the model files of `fmt` plus the tokenizer."""
    export_dir.mkdir(parents=True, exist_ok=True)
    skipped = set(NOT_EXPORTED)
    if fmt == "merged":
        skipped.update(ADAPTER_FILES)
        merged = load_trained_model(trained_dir, base_model_uri, merge=True)
        merged.save_pretrained(str(export_dir))  # type: ignore[operator]
    elif fmt == "peft-adapter":
        missing = [name for name in ADAPTER_FILES if not (trained_dir / name).is_file()]
        if missing:
            raise ComponentError(
                f"{trained_dir} lacks {', '.join(missing)}; was the model trained with PEFT?"
            )
    for path in sorted(trained_dir.iterdir()):
        if path.is_file() and path.name not in skipped:
            shutil.copy2(path, export_dir / path.name)


# --------------------------------------------------------------------------------------------------
# Manifest.


def selected_checkpoint(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Which weights were published: the step, how it was chosen, its validation metrics, and where
    early stopping ended training (the training record's)."""
    record = record or {}
    return {
        "select": record.get("select", "last"),
        "selectMetric": record.get("selectMetric"),
        "step": record.get("selectedStep", record.get("steps")),
        "metrics": record.get("selectedMetrics"),
        "earlyStoppedAtStep": record.get("earlyStoppedAtStep"),
    }


def build_manifest(
    job: FineTuneJob,
    workspace_dir: Path,
    *,
    gates: list[dict[str, Any]],
    baseline: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    artifact: Mapping[str, Any],
) -> dict[str, Any]:
    spec = job.spec
    dataset = spec.dataset
    splits = {
        split: storage.sha256_of(str(path))
        for split, relative in (
            ("train", WorkspaceLayout.TRAIN_SPLIT),
            ("validation", WorkspaceLayout.VALIDATION_SPLIT),
        )
        if (path := workspace_dir / relative).is_file()
    }
    dataset_record: dict[str, Any] = {
        "uri": dataset.uri,
        "sha256": storage.sha256_of(dataset.uri),
        "format": dataset.format,
        "curation": read_json(workspace_dir / WorkspaceLayout.CURATION),
        "splitsSha256": splits,
    }
    if dataset.validation_uri:
        dataset_record["validationUri"] = dataset.validation_uri
        dataset_record["validationSha256"] = storage.sha256_of(dataset.validation_uri)
    if (replay := spec.training.replay) is not None:
        dataset_record["replay"] = {"uri": replay.uri, "sha256": storage.sha256_of(replay.uri)}
    if spec.evaluation.reference:
        dataset_record["reference"] = [
            {"name": ref.name, "uri": ref.uri, "sha256": storage.sha256_of(ref.uri)}
            for ref in spec.evaluation.reference
        ]
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": job.kind,
        "resource": resource_record(job.metadata),
        "baseModel": models.snapshot_info(spec.base_model.uri),
        "dataset": dataset_record,
        "method": spec.method.to_wire(),
        "hyperparameters": spec.training.to_wire(),
        "metrics": {"baseline": baseline, "final": final},
        "gates": gates,
        "checkpoint": selected_checkpoint(read_training_record(workspace_dir / WorkspaceLayout.TRAINED)),
        "crossValidation": read_json(workspace_dir / WorkspaceLayout.CROSS_VALIDATION),
        "modelCard": spec.model_card.to_wire(),
        "artifact": dict(artifact),
        "libraries": library_versions(),
        "createdAt": utc_now_iso(),
        "parent": None,
    }


# --------------------------------------------------------------------------------------------------
# The step.


def run_publish(
    job: FineTuneJob | Mapping[str, Any], workspace_dir: Path, *, progress: ProgressReporter | None = None
) -> dict[str, Any]:
    """Check the gates (write gates.json), then export and publish; returns {uri, version}.

    `job` is the FineTuneJob, parsed or as the config the operator hands the steps.
    """
    if not isinstance(job, FineTuneJob):
        job = parse_finetune_job(job)
    if progress is not None:
        progress.set_phase("publishing")
    spec = job.spec
    baseline = read_json(workspace_dir / WorkspaceLayout.BASELINE_EVALUATION)
    final = read_json(workspace_dir / WorkspaceLayout.FINAL_EVALUATION)
    gates = evaluate_finetune_gates(spec.evaluation.gates, baseline or {}, final or {})
    gates += reference_gates(spec.evaluation, baseline, final)
    gates += fairness_gates(spec.evaluation, final)
    gates += harness_gates(spec.evaluation.harness, baseline, final)
    storage.atomic_write_json(workspace_dir / WorkspaceLayout.GATES, gates)
    check_gates(gates, describe_failure)

    dest_uri, version = destination_uri(job.metadata, spec.output.uri)
    trained_dir = workspace_dir / WorkspaceLayout.TRAINED
    if read_training_record(trained_dir) is None:
        raise ComponentError(
            f"{trained_dir} holds no trained model; the finetune step must run before publish"
        )
    fmt = artifact_format(job)
    with export_staging(workspace_dir) as export_dir:
        export_trained(trained_dir, spec.base_model.uri, export_dir, fmt)
        manifest = build_manifest(
            job,
            workspace_dir,
            gates=gates,
            baseline=baseline,
            final=final,
            artifact={"format": fmt, "files": file_digests(export_dir)},
        )
        publish_with_manifest(export_dir, dest_uri, manifest)
    output = {"uri": dest_uri, "version": version}
    storage.atomic_write_json(workspace_dir / WorkspaceLayout.OUTPUT, output)
    if progress is not None:
        progress.set_phase("done")
    return output
