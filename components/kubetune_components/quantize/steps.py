"""The pipeline steps of a QuantizeJob, one function each, and the command line that runs them.

Every step takes the QuantizeJob as a wire dict (`config`; the operator has resolved spec.model.uri and
spec.output.uri, and copied a FineTuneJob's dataset into spec.dataset), parses it with the API's models
(kubetune_contract.quantize), and the run's workspace directory. Steps hand their results to each other
through the workspace (named in kubetune_contract.workspace.WorkspaceLayout):

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
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kubetune_components import data, quantize
from kubetune_components.common import models, storage
from kubetune_components.common.artifacts import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    destination_uri,
    export_staging,
    file_digests,
    library_versions,
    publish_with_manifest,
    read_json,
    resource_record,
)
from kubetune_components.common.errors import ComponentError, ConfigError, ModelLoadError
from kubetune_components.common.gates import check_gates, evaluate_gates
from kubetune_components.common.jobs import parse_quantize_job
from kubetune_components.common.progress import ProgressReporter, utc_now_iso
from kubetune_components.finetune.steps import (
    add_step_arguments,
    finish_step,
    publish_workspace_report,
    start_step_process,
    workspace_dir,
    write_jsonl,
)
from kubetune_components.finetune.train import tokenize_examples
from kubetune_contract.common import GateOp, as_float
from kubetune_contract.finetune import MERGEABLE_METHODS, Dataset, DatasetFormat
from kubetune_contract.quantize import QuantizeGate, QuantizeJobSpec
from kubetune_contract.workspace import WorkspaceLayout

EVAL_MAX_SEQ_LENGTH = 2048
ROUND_TRIP_NEW_TOKENS = 8


def dataset_format(spec: QuantizeJobSpec) -> DatasetFormat:
    """The format of spec.dataset; without a dataset, the API's default format (for the built-in prompts)."""
    if spec.dataset is not None:
        return spec.dataset.format
    default: DatasetFormat = Dataset.model_fields["format"].default
    return default


def _read_split(root: Path, split: str, fmt: DatasetFormat) -> list[dict[str, Any]]:
    path = root / split
    if not path.is_file() or not path.read_bytes().strip():
        return []
    return data.load_examples(str(path), fmt)


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
    download = root / WorkspaceLayout.SOURCE_DOWNLOAD
    if download.exists():
        shutil.rmtree(download)
    return storage.download_dir(uri, download)


def load_source(uri: str, root: Path) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(full model, tokenizer, the source's kubetune manifest or None); an adapter is merged into its base."""
    directory = local_model_dir(uri, root)
    if directory is None:
        return models.load_causal_lm(uri), models.load_tokenizer(uri), None
    manifest = read_json(directory / MANIFEST_FILE)
    manifest = manifest if isinstance(manifest, dict) else None
    tokenizer = models.load_tokenizer(str(directory))
    adapter_config = read_json(directory / "adapter_config.json")
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


def prepare_splits(spec: QuantizeJobSpec, tokenizer: Any, root: Path) -> dict[str, Any]:
    """data/train.jsonl, validation.jsonl and curation.json from spec.dataset (empty without one)."""
    dataset = spec.dataset
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    if dataset is not None:

        def curated(examples: Sequence[dict[str, Any]], split: float) -> data.CurationResult:
            return data.curate_per_spec(examples, tokenizer, dataset, split)

        screened = data.load_screened_examples(dataset.uri, dataset)
        if dataset.validation_uri:
            result = curated(screened.examples, 0.0)
            held_out_screened = data.load_screened_examples(dataset.validation_uri, dataset)
            held_out = curated(held_out_screened.examples, 0.0)
            train, validation = result.train, held_out.train
            report = {**result.report, "validationFile": {**held_out.report, "pii": held_out_screened.report}}
        else:
            result = curated(screened.examples, as_float(dataset.validation_split))
            train, validation = result.train, result.validation
            report = dict(result.report)
        report["pii"] = screened.report
    report.update(train=len(train), validation=len(validation))
    write_jsonl(root / WorkspaceLayout.TRAIN_SPLIT, train)
    write_jsonl(root / WorkspaceLayout.VALIDATION_SPLIT, validation)
    storage.atomic_write_json(root / WorkspaceLayout.CURATION, report)
    return report


def _eval_max_seq_length(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    positions = int(getattr(config, "max_position_embeddings", EVAL_MAX_SEQ_LENGTH) or EVAL_MAX_SEQ_LENGTH)
    return min(positions, EVAL_MAX_SEQ_LENGTH)


def measure_model(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: QuantizeJobSpec,
    root: Path,
    size_bytes: int,
    device: torch.device,
) -> dict[str, Any]:
    """Size, latency per generated token and quality of `model`, as report/{before,after}.json hold them."""
    evaluation = spec.evaluation
    fmt = dataset_format(spec)
    validation = _read_split(root, WorkspaceLayout.VALIDATION_SPLIT, fmt)
    prompts = quantize.latency_prompt_ids(tokenizer, validation, fmt, evaluation.latency_prompts)
    new_tokens = evaluation.latency_new_tokens
    latency = quantize.seconds_per_token(model, prompts, new_tokens, device)
    quality = quantize.measure_quality(
        model,
        tokenizer,
        validation,
        fmt,
        max_samples=evaluation.max_samples,
        max_new_tokens=evaluation.max_new_tokens,
        max_seq_length=_eval_max_seq_length(model),
        device=device,
    )
    return {
        "sizeBytes": size_bytes,
        "latencySecondsPerToken": latency,
        "perplexity": quality["perplexity"],
        "exactMatch": quality["exactMatch"],
        "samples": min(len(validation), evaluation.max_samples),
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
    spec = parse_quantize_job(config).spec  # refuse an impossible job before any work
    plan = quantize.QuantizationPlan.for_job(spec)
    root = workspace_dir(workspace)
    ProgressReporter(root).set_phase("evaluating-baseline")
    device = quantize.device_for(plan.target)
    model, tokenizer, manifest = load_source(source_uri(spec), root)
    prepare_splits(spec, tokenizer, root)
    staging = Path(tempfile.mkdtemp(prefix=f".{WorkspaceLayout.SOURCE}.", dir=root))
    try:
        pretrained: Any = model
        pretrained.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        _replace_dir(staging, root / WorkspaceLayout.SOURCE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    storage.atomic_write_json(root / WorkspaceLayout.SOURCE_MANIFEST, manifest)
    model.to(device)
    before = measure_model(
        model, tokenizer, spec, root, quantize.weights_size_bytes(root / WorkspaceLayout.SOURCE), device
    )
    storage.atomic_write_json(root / WorkspaceLayout.MEASURED_BEFORE, before)
    return before


def quantize_step(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Apply the method to source/ (QAT trains on data/train.jsonl first); writes quantized/."""
    spec = parse_quantize_job(config).spec
    plan = quantize.QuantizationPlan.for_job(spec)
    root = workspace_dir(workspace)
    progress = ProgressReporter(root)
    progress.set_phase("training")
    device = quantize.device_for(plan.target)
    source = root / WorkspaceLayout.SOURCE
    if not (source / "config.json").is_file():
        raise ConfigError(f"{source} is missing; the measure-source step must run before quantize")
    model: torch.nn.Module = models.load_causal_lm(str(source))
    model.to(device)
    tokenizer = models.load_tokenizer(str(source))
    train_features = None
    on_step: Callable[[int, float], None] | None = None
    fmt = dataset_format(spec)
    qat = spec.method.qat
    if qat is not None:
        train_features = tokenize_examples(
            _read_split(root, WorkspaceLayout.TRAIN_SPLIT, fmt), fmt, tokenizer, qat.max_seq_length
        )

        def on_step(step: int, loss: float) -> None:
            progress.training_update(
                step=step,
                total_steps=qat.steps,
                epoch=step * qat.batch_size / max(1, len(train_features or [])),
                train_loss=loss,
                learning_rate=as_float(qat.learning_rate),
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
    probe = quantize.latency_prompt_ids(tokenizer, [], fmt, 1)[0]
    expected = quantize.greedy_tokens(model, probe, ROUND_TRIP_NEW_TOKENS, device)
    record = {
        "method": plan.type,
        "options": plan.options(),
        "details": details,
        "source": {"uri": source_uri(spec)},
        "createdAt": utc_now_iso(),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{WorkspaceLayout.QUANTIZED}.", dir=root))
    try:
        artifact_format = quantize.save_quantized(model, tokenizer, staging, record)
        reloaded = quantize.load_quantized(staging, device)
        if quantize.greedy_tokens(reloaded, probe, ROUND_TRIP_NEW_TOKENS, device) != expected:
            raise ComponentError(
                "the saved quantized model generates differently from the one in memory; not keeping it",
                reason="QuantizationRoundTripFailed",
            )
        _replace_dir(staging, root / WorkspaceLayout.QUANTIZED)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "method": plan.type,
        "format": artifact_format,
        "details": details,
        "sizeBytes": quantize.weights_size_bytes(root / WorkspaceLayout.QUANTIZED),
    }


def measure_quantized(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """The measurements of measure-source on the reloaded quantized/ model; writes report/after.json."""
    spec = parse_quantize_job(config).spec
    plan = quantize.QuantizationPlan.for_job(spec)
    root = workspace_dir(workspace)
    ProgressReporter(root).set_phase("evaluating")
    device = quantize.device_for(plan.target)
    quantized_dir = root / WorkspaceLayout.QUANTIZED
    model = quantize.load_quantized(quantized_dir, device)
    tokenizer = models.load_tokenizer(str(quantized_dir))
    after = measure_model(model, tokenizer, spec, root, quantize.weights_size_bytes(quantized_dir), device)
    storage.atomic_write_json(root / WorkspaceLayout.MEASURED_AFTER, after)
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


def evaluate_quantize_gates(gates: list[QuantizeGate], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One result per bound of every gate: {metric, op, threshold, value, passed}."""
    values = gate_values(report)

    def value_of(metric: str, op: GateOp) -> float | None:
        return values[metric]

    return evaluate_gates(gates, value_of)


def describe_gate_failure(result: Mapping[str, Any]) -> str:
    metric, op, threshold, value = result["metric"], result["op"], result["threshold"], result["value"]
    if value is None:
        return f"{metric} could not be measured (quality metrics need spec.dataset with held-out examples)"
    return f"{metric} is {value:.6g}, {'below min' if op == 'min' else 'above max'} {threshold:g}"


def source_uri(spec: QuantizeJobSpec) -> str:
    uri = spec.model.uri
    assert uri is not None, "parse_quantize_job requires the resolved spec.model.uri"
    return uri


def publish_quantized(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """Report, check the gates, then publish quantized/ with a manifest chaining to the source's."""
    job = parse_quantize_job(config)
    spec = job.spec
    root = workspace_dir(workspace)
    progress = ProgressReporter(root)
    progress.set_phase("publishing")
    before = read_json(root / WorkspaceLayout.MEASURED_BEFORE)
    after = read_json(root / WorkspaceLayout.MEASURED_AFTER)
    if not isinstance(before, dict) or not isinstance(after, dict):
        raise ConfigError("report/before.json or report/after.json is missing; run both measure steps first")
    report = build_report(before, after)
    gates = evaluate_quantize_gates(spec.evaluation.gates, report)
    report["gates"] = gates
    storage.atomic_write_json(root / WorkspaceLayout.QUANTIZE_REPORT, report)
    storage.atomic_write_json(root / WorkspaceLayout.GATES, gates)
    check_gates(gates, describe_gate_failure)

    dest_uri, version = destination_uri(job.metadata, spec.output.uri)
    quantized_dir = root / WorkspaceLayout.QUANTIZED
    record = quantize.read_quantization_record(quantized_dir)
    with export_staging(root) as export_dir:
        shutil.copytree(quantized_dir, export_dir, dirs_exist_ok=True)
        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "kind": job.kind,
            "resource": resource_record(job.metadata),
            "source": {"uri": source_uri(spec)},
            "dataset": None
            if spec.dataset is None
            else {
                "uri": spec.dataset.uri,
                "format": spec.dataset.format,
                "curation": read_json(root / WorkspaceLayout.CURATION),
            },
            "method": spec.method.to_wire(),
            "target": spec.target,
            "report": report,
            "modelCard": spec.model_card.to_wire(),
            "artifact": {
                "format": record.get("format"),
                "loader": "kubetune_components.quantize.load_quantized",
                "files": file_digests(export_dir),
            },
            "libraries": {**library_versions(), "torchao": quantize.torchao_version()},
            "createdAt": utc_now_iso(),
            "parent": read_json(root / WorkspaceLayout.SOURCE_MANIFEST),
        }
        publish_with_manifest(export_dir, dest_uri, manifest)
    output = {"uri": dest_uri, "version": version}
    storage.atomic_write_json(root / WorkspaceLayout.OUTPUT, output)
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
    error_path = root / WorkspaceLayout.ERROR
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
    add_step_arguments(parser, list(QUANTIZE_STEPS), "QuantizeJob")
    args = parser.parse_args(argv)
    config = start_step_process(args.config, args.config_json)
    if config is None:
        return 2
    try:
        result = run_quantize_step(args.step, config, args.workspace)
    except ComponentError as error:
        print(f"{args.step} failed ({error.reason}): {error.message}", file=sys.stderr)
        return 1
    finish_step(result, args.report)
    publish_workspace_report(args.workspace, args.workspace_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
