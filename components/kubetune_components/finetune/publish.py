"""The publish step: quality gates, export of the tuned model and its lineage manifest.

Nothing is published unless every gate passes. The export lands at
`{spec.output.uri}/{namespace}/{name}/v{generation}/` in one atomic move and holds the adapter
(or merged / full weights), the tokenizer and `kubetune-manifest.json`, which records where the
model came from: base model, dataset, method, hyperparameters, metrics, gates, file digests and
library versions.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubetune_components import __version__ as components_version
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ComponentError, ConfigError, GateFailedError
from kubetune_components.common.progress import ProgressReporter, utc_now_iso
from kubetune_components.finetune.train import (
    MERGEABLE_METHODS,
    TRAINING_RECORD,
    load_trained_model,
    read_training_record,
)

MANIFEST_FILE = "kubetune-manifest.json"
MANIFEST_SCHEMA = "kubetune.dev/manifest/v1"
GATE_OPS = ("min", "max", "minImprovement")
LOWER_IS_BETTER = frozenset({"evalLoss", "perplexity"})
GATE_TOLERANCE = 1e-9
"""Slack for float noise: exactMatch going from 0.3 to 0.6 improves by 0.3, not by 0.29999999999999993."""
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


def evaluate_gates(
    gates: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any], final: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One result per bound of every gate: {metric, op, threshold, value, passed}.

    For `minImprovement` the value is the improvement over the baseline: a decrease for evalLoss
    and perplexity, an increase for exactMatch. A metric that was not computed fails its gate.
    """
    results: list[dict[str, Any]] = []
    for gate in gates:
        metric = str(gate["metric"])
        for op in GATE_OPS:
            if gate.get(op) is None:
                continue
            threshold = float(Decimal(str(gate[op])))
            final_value = _finite(final.get(metric))
            value: float | None
            if op == "minImprovement":
                base_value = _finite(baseline.get(metric))
                if final_value is None or base_value is None:
                    value = None
                elif metric in LOWER_IS_BETTER:
                    value = base_value - final_value
                else:
                    value = final_value - base_value
            else:
                value = final_value
            results.append(
                {
                    "metric": metric,
                    "op": op,
                    "threshold": threshold,
                    "value": value,
                    "passed": within_bound(value, op, threshold),
                }
            )
    return results


def within_bound(value: float | None, op: str, threshold: float) -> bool:
    """Whether a gate's value meets its bound: `max` is an upper bound, `min` and `minImprovement`
    lower bounds (the improvement is already a value). A value that could not be measured fails."""
    if value is None:
        return False
    if op == "max":
        return value <= threshold + GATE_TOLERANCE
    return value >= threshold - GATE_TOLERANCE


def describe_failure(result: Mapping[str, Any]) -> str:
    metric, op, threshold, value = result["metric"], result["op"], result["threshold"], result["value"]
    if value is None:
        return f"{metric} was not computed (add it to evaluation.metrics and make sure both evaluations ran)"
    if op == "minImprovement":
        return f"{metric} improved by {value:.6g} over the baseline, less than minImprovement {threshold:g}"
    if op == "min":
        return f"{metric} is {value:.6g}, below min {threshold:g}"
    return f"{metric} is {value:.6g}, above max {threshold:g}"


def check_gates(results: Sequence[Mapping[str, Any]]) -> None:
    failed = [result for result in results if not result["passed"]]
    if failed:
        reasons = "; ".join(describe_failure(result) for result in failed)
        raise GateFailedError(f"{len(failed)} quality gate(s) failed, nothing was published: {reasons}")


# --------------------------------------------------------------------------------------------------
# Export.


def artifact_format(method_type: str, merge_adapter: bool) -> str:
    if method_type == "full":
        return "full"
    if merge_adapter:
        if method_type not in MERGEABLE_METHODS:
            raise ConfigError(
                f"output.mergeAdapter: a {method_type} adapter cannot be merged into the base weights; "
                "only lora and ia3 can"
            )
        return "merged"
    return "peft-adapter"


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


def file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): storage.sha256_of(str(path))
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


# --------------------------------------------------------------------------------------------------
# Manifest.


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "peft": str(peft.__version__),
        "kubetune_components": components_version,
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_manifest(
    config: Mapping[str, Any],
    workspace_dir: Path,
    *,
    gates: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    artifact: Mapping[str, Any],
) -> dict[str, Any]:
    metadata = config.get("metadata") or {}
    spec = config["spec"]
    dataset = spec.get("dataset") or {}
    curation = _read_json(workspace_dir / "data" / "curation.json")
    splits = {
        split: storage.sha256_of(str(path))
        for split in ("train", "validation")
        if (path := workspace_dir / "data" / f"{split}.jsonl").is_file()
    }
    dataset_record: dict[str, Any] = {
        "uri": dataset.get("uri"),
        "sha256": storage.sha256_of(str(dataset["uri"])) if dataset.get("uri") else None,
        "format": dataset.get("format"),
        "curation": curation,
        "splitsSha256": splits,
    }
    if dataset.get("validationUri"):
        dataset_record["validationUri"] = dataset["validationUri"]
        dataset_record["validationSha256"] = storage.sha256_of(str(dataset["validationUri"]))
    return {
        "schema": MANIFEST_SCHEMA,
        "kind": config.get("kind", "FineTuneJob"),
        "resource": {
            "namespace": metadata.get("namespace"),
            "name": metadata.get("name"),
            "uid": metadata.get("uid"),
            "generation": metadata.get("generation"),
        },
        "baseModel": models.snapshot_info(str(spec["baseModel"]["uri"])),
        "dataset": dataset_record,
        "method": spec.get("method"),
        "hyperparameters": spec.get("training"),
        "metrics": {"baseline": baseline, "final": final},
        "gates": list(gates),
        "artifact": dict(artifact),
        "libraries": library_versions(),
        "createdAt": utc_now_iso(),
        "parent": None,
    }


def _existing_manifest(dest_uri: str) -> dict[str, Any] | None:
    manifest_uri = f"{dest_uri}/{MANIFEST_FILE}"
    try:
        if not storage.exists(manifest_uri):
            return None
        existing = json.loads(storage.read_bytes(manifest_uri))
    except (OSError, ValueError, ComponentError):
        return None
    return existing if isinstance(existing, dict) else None


def _same_apart_from_time(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    def comparable(manifest: Mapping[str, Any]) -> Any:
        return json.loads(json.dumps({key: value for key, value in manifest.items() if key != "createdAt"}))

    return bool(comparable(first) == comparable(second))


# --------------------------------------------------------------------------------------------------
# The step.


def destination_uri(config: Mapping[str, Any]) -> tuple[str, str]:
    """`{output.uri}/{namespace}/{name}/v{generation}` and the version `v{generation}`."""
    metadata = config.get("metadata") or {}
    output_uri = ((config.get("spec") or {}).get("output") or {}).get("uri")
    if not output_uri:
        raise ConfigError("spec.output.uri is not set; the operator fills it in from its artifact store")
    generation = metadata.get("generation")
    if generation is None or not metadata.get("name"):
        raise ConfigError("metadata.name and metadata.generation are needed to name the published version")
    version = f"v{int(generation)}"
    namespace = metadata.get("namespace") or "default"
    return f"{str(output_uri).rstrip('/')}/{namespace}/{metadata['name']}/{version}", version


def run_publish(
    config: Mapping[str, Any], workspace_dir: Path, *, progress: ProgressReporter | None = None
) -> dict[str, Any]:
    """Check the gates (write gates.json), then export and publish; returns {uri, version}."""
    if progress is not None:
        progress.set_phase("publishing")
    spec = config["spec"]
    evaluation = spec.get("evaluation") or {}
    baseline = _read_json(workspace_dir / "evaluation" / "baseline.json")
    final = _read_json(workspace_dir / "evaluation" / "final.json")
    gates = evaluate_gates(evaluation.get("gates") or [], baseline or {}, final or {})
    storage.atomic_write_json(workspace_dir / "gates.json", gates)
    check_gates(gates)

    dest_uri, version = destination_uri(config)
    trained_dir = workspace_dir / "trained"
    record = read_training_record(trained_dir)
    if record is None:
        raise ComponentError(
            f"{trained_dir} holds no trained model; the finetune step must run before publish"
        )
    method_type = str(record.get("method") or (spec.get("method") or {}).get("type", "lora"))
    fmt = artifact_format(method_type, bool((spec.get("output") or {}).get("mergeAdapter")))

    staging_root = workspace_dir / "export"
    staging_root.mkdir(parents=True, exist_ok=True)
    export_dir = Path(tempfile.mkdtemp(prefix="artifact-", dir=staging_root))
    try:
        export_trained(trained_dir, str(spec["baseModel"]["uri"]), export_dir, fmt)
        manifest = build_manifest(
            config,
            workspace_dir,
            gates=gates,
            baseline=baseline,
            final=final,
            artifact={"format": fmt, "files": file_digests(export_dir)},
        )
        existing = _existing_manifest(dest_uri)
        if existing is not None and _same_apart_from_time(existing, manifest):
            # Publishing the same thing again: keep the first timestamp so the content is identical.
            manifest["createdAt"] = existing.get("createdAt")
        storage.atomic_write_json(export_dir / MANIFEST_FILE, manifest)
        storage.publish_dir_atomically(export_dir, dest_uri)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging_root.rmdir()  # only when no other export is in progress
    output = {"uri": dest_uri, "version": version}
    storage.atomic_write_json(workspace_dir / "output.json", output)
    if progress is not None:
        progress.set_phase("done")
    return output
