"""The pipeline steps of a QuantizeJob, one function each, and the command line that runs them.

Every step takes the QuantizeJob as a wire dict with every default filled in (`config`; the operator
has resolved spec.model.uri and spec.output.uri, and copied a FineTuneJob's dataset into spec.dataset)
and the run's workspace directory. Steps hand their results to each other through the workspace:

    progress.json                       what is happening now
    data/train.jsonl, validation.jsonl  the dataset split: QAT trains on train, quality is measured on
                                        validation (the FineTuneJob's split when the settings match)
    source/                             the source as one full model (an adapter merged into its base)
    source-manifest.json                the source's kubetune-manifest.json, or null
    report/before.json, after.json      size, latency and quality of the source and of the result
    quantized/                          the quantized model (read it with quantize.load_quantized)
    report.json, gates.json, output.json                        (publish-quantized)
    error.json                          {step, reason, message} when a step fails

    python -m kubetune_components.quantize.steps measure-source --config job.json --workspace /work/run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import torch

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ComponentError, ConfigError, GateFailedError, ModelLoadError
from kubetune_components.common.progress import ProgressReporter, utc_now_iso
from kubetune_components.finetune.publish import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    destination_uri,
    file_digests,
    library_versions,
    within_bound,
)
from kubetune_components.finetune.steps import ERROR_FILE, start_step_process, workspace_dir, write_jsonl
from kubetune_components.finetune.train import MERGEABLE_METHODS, tokenize_examples
from kubetune_components.quantize import methods as quantize

SOURCE_DIR = "source"
SOURCE_MANIFEST = "source-manifest.json"
QUANTIZED_DIR = "quantized"
REPORT_DIR = "report"
EVAL_MAX_SEQ_LENGTH = 2048
ROUND_TRIP_NEW_TOKENS = 8
GATE_OPS = ("min", "max")


def quantize_spec(config: Mapping[str, Any]) -> Mapping[str, Any]:
    if config.get("kind") != "QuantizeJob":
        raise ConfigError(f"expected a QuantizeJob, got kind {config.get('kind')!r}")
    spec = config.get("spec")
    if not isinstance(spec, Mapping):
        raise ConfigError("the config has no spec")
    if not isinstance(spec.get("model"), Mapping) or not spec["model"].get("uri"):
        raise ConfigError("spec.model.uri is required (the operator resolves fineTuneJobRef to it)")
    return spec


def _evaluation(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], spec.get("evaluation") or {})


def _dataset_format(spec: Mapping[str, Any]) -> str:
    return str((spec.get("dataset") or {}).get("format", "instruction"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_split(root: Path, split: str, fmt: str) -> list[dict[str, Any]]:
    path = root / "data" / f"{split}.jsonl"
    if not path.is_file() or not path.read_bytes().strip():
        return []
    return data.load_examples(str(path), cast(data.DatasetFormat, fmt))


# --------------------------------------------------------------------------------------------------
# The source model.


def local_model_dir(uri: str, root: Path) -> Path | None:
    """A local directory holding the model at `uri` (object stores are downloaded); None for hf://."""
    if uri.startswith(models.HUB_SCHEME):
        return None
    if storage.is_local(uri):
        path = storage.resolve_local_path(uri)
        if not path.is_dir():
            raise ModelLoadError(f"spec.model.uri: {uri} is not a directory")
        return path
    download = root / "source-download"
    if download.exists():
        shutil.rmtree(download)
    return storage.download_dir(uri, download)


def load_source(uri: str, root: Path) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(full model, tokenizer, the source's kubetune manifest or None); an adapter is merged into its base."""
    directory = local_model_dir(uri, root)
    if directory is None:
        return models.load_causal_lm(uri), models.load_tokenizer(uri), None
    manifest = _read_json(directory / MANIFEST_FILE)
    manifest = manifest if isinstance(manifest, dict) else None
    tokenizer = models.load_tokenizer(str(directory))
    adapter_config = _read_json(directory / "adapter_config.json")
    if not isinstance(adapter_config, dict):
        return models.load_causal_lm(str(directory)), tokenizer, manifest
    base_uri = ((manifest or {}).get("baseModel") or {}).get("uri") or adapter_config.get(
        "base_model_name_or_path"
    )
    if not base_uri:
        raise ModelLoadError(f"{uri} is an adapter, but neither its manifest nor adapter_config names a base")
    peft_type = str(adapter_config.get("peft_type", "")).upper()
    if peft_type.lower() not in MERGEABLE_METHODS:
        raise ConfigError(
            f"{uri} is a {peft_type or 'PEFT'} adapter, which cannot be merged into its base weights; "
            "only LoRA and IA3 adapters (or full models) can be quantized"
        )
    from peft import PeftModel

    base = models.load_causal_lm(str(base_uri))
    try:
        adapted = PeftModel.from_pretrained(base, str(directory))
    except Exception as error:
        raise ModelLoadError(f"cannot apply the adapter {uri} to {base_uri}: {error}") from error
    merged: torch.nn.Module = adapted.merge_and_unload()
    return merged, tokenizer, manifest


def prepare_splits(spec: Mapping[str, Any], tokenizer: Any, root: Path) -> dict[str, int]:
    """data/train.jsonl and data/validation.jsonl from spec.dataset (empty files without one)."""
    dataset = spec.get("dataset") or {}
    fmt = cast(data.DatasetFormat, _dataset_format(spec))
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    if dataset.get("uri"):

        def curated(examples: Sequence[dict[str, Any]], split: float) -> data.CurationResult:
            return data.curate_per_spec(examples, fmt, tokenizer, dataset, split)

        examples = data.load_examples(str(dataset["uri"]), fmt)
        if dataset.get("validationUri"):
            train = curated(examples, 0.0).train
            validation = curated(data.load_examples(str(dataset["validationUri"]), fmt), 0.0).train
        else:
            result = curated(examples, float(Decimal(str(dataset.get("validationSplit", "0.1")))))
            train, validation = result.train, result.validation
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "validation.jsonl", validation)
    return {"train": len(train), "validation": len(validation)}


def _eval_max_seq_length(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    positions = int(getattr(config, "max_position_embeddings", EVAL_MAX_SEQ_LENGTH) or EVAL_MAX_SEQ_LENGTH)
    return min(positions, EVAL_MAX_SEQ_LENGTH)


def measure_model(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: Mapping[str, Any],
    root: Path,
    size_bytes: int,
    device: torch.device,
) -> dict[str, Any]:
    """Size, latency per generated token and quality of `model`, as report/{before,after}.json hold them."""
    evaluation = _evaluation(spec)
    fmt = _dataset_format(spec)
    validation = _read_split(root, "validation", fmt)
    prompts = quantize.latency_prompt_ids(
        tokenizer, validation, fmt, int(evaluation.get("latencyPrompts", 8))
    )
    new_tokens = int(evaluation.get("latencyNewTokens", 16))
    latency = quantize.seconds_per_token(model, prompts, new_tokens, device)
    quality = quantize.measure_quality(
        model,
        tokenizer,
        validation,
        fmt,
        max_samples=int(evaluation.get("maxSamples", 100)),
        max_new_tokens=int(evaluation.get("maxNewTokens", 32)),
        max_seq_length=_eval_max_seq_length(model),
        device=device,
    )
    return {
        "sizeBytes": size_bytes,
        "latencySecondsPerToken": latency,
        "perplexity": quality["perplexity"],
        "exactMatch": quality["exactMatch"],
        "samples": min(len(validation), int(evaluation.get("maxSamples", 100))),
        "latencyPrompts": len(prompts),
        "latencyNewTokens": new_tokens,
        "device": device.type,
        "threads": torch.get_num_threads(),
    }


def _replace_dir(staging: Path, destination: Path) -> None:
    if destination.exists():
        shutil.rmtree(destination)
    os.rename(staging, destination)


# --------------------------------------------------------------------------------------------------
# The steps.


def measure_source(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Load (and merge) the source, split the data, measure; writes source/, data/*, report/before.json."""
    spec = quantize_spec(config)
    plan = quantize.QuantizationPlan.from_spec(spec)  # refuse an impossible job before any work
    root = workspace_dir(workspace)
    ProgressReporter(root).set_phase("evaluating-baseline")
    device = quantize.device_for(plan.target)
    model, tokenizer, manifest = load_source(str(spec["model"]["uri"]), root)
    prepare_splits(spec, tokenizer, root)
    staging = Path(tempfile.mkdtemp(prefix=f".{SOURCE_DIR}.", dir=root))
    try:
        pretrained: Any = model
        pretrained.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _replace_dir(staging, root / SOURCE_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    storage.atomic_write_json(root / SOURCE_MANIFEST, manifest)
    model.to(device)
    before = measure_model(
        model, tokenizer, spec, root, quantize.weights_size_bytes(root / SOURCE_DIR), device
    )
    storage.atomic_write_json(root / REPORT_DIR / "before.json", before)
    return before


def quantize_step(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Apply the method to source/ (QAT trains on data/train.jsonl first); writes quantized/."""
    spec = quantize_spec(config)
    plan = quantize.QuantizationPlan.from_spec(spec)
    root = workspace_dir(workspace)
    progress = ProgressReporter(root)
    progress.set_phase("training")
    device = quantize.device_for(plan.target)
    source = root / SOURCE_DIR
    if not (source / "config.json").is_file():
        raise ConfigError(f"{source} is missing; the measure-source step must run before quantize")
    model: torch.nn.Module = models.load_causal_lm(str(source))
    model.to(device)
    tokenizer = models.load_tokenizer(str(source))
    train_features = None
    on_step: Callable[[int, float], None] | None = None
    if plan.qat is not None:
        qat = plan.qat
        train_features = tokenize_examples(
            _read_split(root, "train", _dataset_format(spec)),
            _dataset_format(spec),
            tokenizer,
            qat.max_seq_length,
        )

        def on_step(step: int, loss: float) -> None:
            progress.training_update(
                step=step,
                total_steps=qat.steps,
                epoch=step * qat.batch_size / max(1, len(train_features or [])),
                train_loss=loss,
                learning_rate=qat.learning_rate,
                tokens_seen=0,
                force=step == qat.steps,
            )

    details = quantize.quantize_model(
        model,
        plan,
        train_features=train_features,
        pad_token_id=int(tokenizer.pad_token_id),
        device=device,
        on_step=on_step,
    )
    probe = quantize.latency_prompt_ids(tokenizer, [], _dataset_format(spec), 1)[0]
    expected = quantize.greedy_tokens(model, probe, ROUND_TRIP_NEW_TOKENS, device)
    record = {
        "method": plan.method,
        "options": plan.options(),
        "details": details,
        "source": {"uri": spec["model"]["uri"]},
        "createdAt": utc_now_iso(),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{QUANTIZED_DIR}.", dir=root))
    try:
        artifact_format = quantize.save_quantized(model, tokenizer, staging, record)
        reloaded = quantize.load_quantized(staging, device)
        if quantize.greedy_tokens(reloaded, probe, ROUND_TRIP_NEW_TOKENS, device) != expected:
            raise ComponentError(
                "the saved quantized model generates differently from the one in memory; not keeping it",
                reason="QuantizationRoundTripFailed",
            )
        _replace_dir(staging, root / QUANTIZED_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "method": plan.method,
        "format": artifact_format,
        "details": details,
        "sizeBytes": quantize.weights_size_bytes(root / QUANTIZED_DIR),
    }


def measure_quantized(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """The measurements of measure-source on the reloaded quantized/ model; writes report/after.json."""
    spec = quantize_spec(config)
    plan = quantize.QuantizationPlan.from_spec(spec)
    root = workspace_dir(workspace)
    ProgressReporter(root).set_phase("evaluating")
    device = quantize.device_for(plan.target)
    quantized_dir = root / QUANTIZED_DIR
    model = quantize.load_quantized(quantized_dir, device)
    tokenizer = models.load_tokenizer(str(quantized_dir))
    after = measure_model(model, tokenizer, spec, root, quantize.weights_size_bytes(quantized_dir), device)
    storage.atomic_write_json(root / REPORT_DIR / "after.json", after)
    return after


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if numerator is None or denominator is None or not denominator:
        return None
    value = float(numerator) / float(denominator)
    return value if math.isfinite(value) else None


def build_report(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    def quality(measured: Mapping[str, Any]) -> dict[str, Any]:
        return {"perplexity": measured.get("perplexity"), "exactMatch": measured.get("exactMatch")}

    return {
        "sizeBytes": {"before": before.get("sizeBytes"), "after": after.get("sizeBytes")},
        "sizeRatio": _ratio(after.get("sizeBytes"), before.get("sizeBytes")),
        "latency": {
            "before": before.get("latencySecondsPerToken"),
            "after": after.get("latencySecondsPerToken"),
        },
        "quality": {"before": quality(before), "after": quality(after)},
    }


def gate_values(report: Mapping[str, Any]) -> dict[str, float | None]:
    """The value of every gate metric (None where it could not be measured, e.g. without data)."""
    quality_before = report["quality"]["before"]
    quality_after = report["quality"]["after"]
    perplexity_ratio = _ratio(quality_after.get("perplexity"), quality_before.get("perplexity"))
    exact_before, exact_after = quality_before.get("exactMatch"), quality_after.get("exactMatch")
    return {
        "perplexityIncrease": None if perplexity_ratio is None else perplexity_ratio - 1.0,
        "exactMatch": None if exact_after is None else float(exact_after),
        "exactMatchDrop": (
            None if exact_before is None or exact_after is None else float(exact_before) - float(exact_after)
        ),
        "sizeRatio": report.get("sizeRatio"),
        "latencyRatio": _ratio(report["latency"].get("after"), report["latency"].get("before")),
    }


def evaluate_quantize_gates(
    gates: Sequence[Mapping[str, Any]], report: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One result per bound of every gate: {metric, op, threshold, value, passed}."""
    values = gate_values(report)
    results: list[dict[str, Any]] = []
    for gate in gates:
        metric = str(gate["metric"])
        if metric not in values:
            raise ConfigError(f"evaluation.gates: unknown metric {metric!r}; known: {', '.join(values)}")
        for op in GATE_OPS:
            if gate.get(op) is None:
                continue
            threshold = float(Decimal(str(gate[op])))
            value = values[metric]
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


def describe_gate_failure(result: Mapping[str, Any]) -> str:
    metric, op, threshold, value = result["metric"], result["op"], result["threshold"], result["value"]
    if value is None:
        return f"{metric} could not be measured (quality metrics need spec.dataset with held-out examples)"
    return f"{metric} is {value:.6g}, {'below min' if op == 'min' else 'above max'} {threshold:g}"


def _existing_manifest(dest_uri: str) -> dict[str, Any] | None:
    manifest_uri = f"{dest_uri}/{MANIFEST_FILE}"
    try:
        if not storage.exists(manifest_uri):
            return None
        existing = json.loads(storage.read_bytes(manifest_uri))
    except (OSError, ValueError, ComponentError):
        return None
    return existing if isinstance(existing, dict) else None


def _without_time(manifest: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps({key: value for key, value in manifest.items() if key != "createdAt"}))


def publish_quantized(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Report, check the gates, then publish quantized/ with a manifest chaining to the source's."""
    spec = quantize_spec(config)
    plan = quantize.QuantizationPlan.from_spec(spec)
    root = workspace_dir(workspace)
    progress = ProgressReporter(root)
    progress.set_phase("publishing")
    before = _read_json(root / REPORT_DIR / "before.json")
    after = _read_json(root / REPORT_DIR / "after.json")
    if not isinstance(before, dict) or not isinstance(after, dict):
        raise ConfigError("report/before.json or report/after.json is missing; run both measure steps first")
    report = build_report(before, after)
    gates = evaluate_quantize_gates(_evaluation(spec).get("gates") or [], report)
    report["gates"] = gates
    storage.atomic_write_json(root / "report.json", report)
    storage.atomic_write_json(root / "gates.json", gates)
    failed = [result for result in gates if not result["passed"]]
    if failed:
        reasons = "; ".join(describe_gate_failure(result) for result in failed)
        raise GateFailedError(f"{len(failed)} quality gate(s) failed, nothing was published: {reasons}")

    dest_uri, version = destination_uri(config)
    quantized_dir = root / QUANTIZED_DIR
    record = quantize.read_quantization_record(quantized_dir)
    metadata = config.get("metadata") or {}
    staging_root = root / "export"
    staging_root.mkdir(parents=True, exist_ok=True)
    export_dir = Path(tempfile.mkdtemp(prefix="artifact-", dir=staging_root))
    try:
        shutil.copytree(quantized_dir, export_dir, dirs_exist_ok=True)
        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "kind": "QuantizeJob",
            "resource": {
                "namespace": metadata.get("namespace"),
                "name": metadata.get("name"),
                "uid": metadata.get("uid"),
                "generation": metadata.get("generation"),
            },
            "source": {"uri": spec["model"]["uri"]},
            "method": spec.get("method"),
            "target": plan.target,
            "report": report,
            "artifact": {
                "format": record.get("format"),
                "loader": "kubetune_components.quantize.methods.load_quantized",
                "files": file_digests(export_dir),
            },
            "libraries": {**library_versions(), "torchao": quantize.torchao_version()},
            "createdAt": utc_now_iso(),
            "parent": _read_json(root / SOURCE_MANIFEST),
        }
        existing = _existing_manifest(dest_uri)
        if existing is not None and _without_time(existing) == _without_time(manifest):
            manifest["createdAt"] = existing.get("createdAt")
        storage.atomic_write_json(export_dir / MANIFEST_FILE, manifest)
        storage.publish_dir_atomically(export_dir, dest_uri)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging_root.rmdir()
    output = {"uri": dest_uri, "version": version}
    storage.atomic_write_json(root / "output.json", output)
    progress.set_phase("done")
    return output


QUANTIZE_STEPS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "measure-source": measure_source,
    "quantize": quantize_step,
    "measure-quantized": measure_quantized,
    "publish-quantized": publish_quantized,
}


def run_quantize_step(name: str, config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Run step `name`; when it fails, error.json says why (the exception is re-raised)."""
    root = workspace_dir(workspace)
    error_path = root / ERROR_FILE
    with contextlib.suppress(FileNotFoundError):
        error_path.unlink()
    try:
        step = QUANTIZE_STEPS.get(name)
        if step is None:
            raise ConfigError(f"unknown step {name!r}; steps are {', '.join(QUANTIZE_STEPS)}")
        return step(config, workspace)
    except ComponentError as error:
        storage.atomic_write_json(
            error_path, {"step": name, "reason": error.reason, "message": error.message}
        )
        raise
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        storage.atomic_write_json(error_path, {"step": name, "reason": "InternalError", "message": message})
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_components.quantize.steps", description=__doc__.split("\n")[0]
    )
    parser.add_argument("step", choices=list(QUANTIZE_STEPS))
    parser.add_argument("--config", required=True, help="the QuantizeJob as JSON (a file, or - for stdin)")
    parser.add_argument("--workspace", required=True, help="the run's workspace directory (path or file://)")
    args = parser.parse_args(argv)
    config = start_step_process(args.config)
    if config is None:
        return 2
    try:
        result = run_quantize_step(args.step, config, args.workspace)
    except ComponentError as error:
        print(f"{args.step} failed ({error.reason}): {error.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
