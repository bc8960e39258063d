"""The fine-tuning step: PEFT (LoRA, prefix tuning, prompt tuning, IA3) or full fine-tuning.

Trains on the curated `data/train.jsonl` of the run's workspace and writes `trained/` (the adapter or
the full model, the tokenizer and a training record). The pieces live next door: the method registry
(methods.py), the loop (loop.py), checkpoints (checkpoints.py) and stopping on SIGTERM (signals.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import DatasetError
from kubetune_components.common.jobs import parse_finetune_spec
from kubetune_components.common.models import pick_device
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.finetune import distributed, fsdp, preference, qlora
from kubetune_components.finetune.checkpoints import fsync_tree, remove_stale_staging
from kubetune_components.finetune.distillation import load_teacher
from kubetune_components.finetune.forgetting import replay_features
from kubetune_components.finetune.loop import (
    Feature,
    StepHook,
    check_packing_isolates_examples,
    check_precision_supported,
    token_loss_sum,
    train,
)
from kubetune_components.finetune.methods import apply_method, trainable_parameters
from kubetune_components.finetune.selection import selection_fingerprint
from kubetune_components.finetune.signals import StopRequest, stop_on_sigterm
from kubetune_contract.finetune import MERGEABLE_METHODS, PEFT_METHODS, DatasetFormat, FineTuneJobSpec
from kubetune_contract.workspace import WorkspaceLayout

TRAINING_RECORD = "kubetune-training.json"
NOT_FINGERPRINTED = ("checkpointEverySteps", "keepCheckpoints")
"""Training settings that change how often we save, not the weights trained."""


def configuration_fingerprint(spec: FineTuneJobSpec, train_file: Path) -> str:
    """What decides the trained weights; checkpoints and `trained/` of other configurations are not reused."""
    training = {key: value for key, value in spec.training.to_wire().items() if key not in NOT_FINGERPRINTED}
    relevant = {
        "baseModel": spec.base_model.uri,
        "format": spec.dataset.format,
        "method": spec.method.to_wire(),
        "training": training,
        "trainData": storage.sha256_of(str(train_file)),
        **selection_fingerprint(spec, train_file.parent.parent / WorkspaceLayout.VALIDATION_SPLIT),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def tokenize_examples(
    examples: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any, max_seq_length: int
) -> list[Feature]:
    features: list[Feature] = []
    for example in examples:
        feature = data.tokenize_for_training(
            dict(example), cast(DatasetFormat, fmt), tokenizer, max_seq_length
        )
        if feature is not None:
            features.append(feature)
    return features


def read_training_record(trained_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((trained_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_trained(
    model: torch.nn.Module,
    tokenizer: Any,
    trained_dir: Path,
    record: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter (PEFT) or the full model, the tokenizer and the training record, atomically.

    `state_dict`: the whole weights of a sharded model (fsdp.py), saved in place of its shards."""
    trained_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{trained_dir.name}.", suffix=".tmp", dir=trained_dir.parent))
    try:
        if state_dict is not None:
            model.save_pretrained(str(staging), state_dict=dict(state_dict))  # type: ignore[operator]
        else:
            model.save_pretrained(str(staging))  # type: ignore[operator]
        tokenizer.save_pretrained(str(staging))
        storage.atomic_write_json(staging / TRAINING_RECORD, dict(record))
        fsync_tree(staging)
        if trained_dir.exists():
            shutil.rmtree(trained_dir)
        os.rename(staging, trained_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_trained_model(trained_dir: Path, base_model_uri: str, *, merge: bool = True) -> torch.nn.Module:
    """The tuned model in `trained/`: the base plus the adapter (merged when possible), or the full model."""
    record = read_training_record(trained_dir)
    if record is None:
        raise DatasetError(f"{trained_dir} holds no trained model; run the finetune step first")
    method = str(record.get("method", "lora"))
    adapter = record.get("adapter") == "lora"  # dpo and kto with weights lora
    if method not in PEFT_METHODS and not adapter:
        return models.load_causal_lm(str(trained_dir))
    from peft import PeftModel

    base = models.load_causal_lm(base_model_uri)
    peft_model = PeftModel.from_pretrained(base, str(trained_dir))
    if merge and (method in MERGEABLE_METHODS or adapter):
        merged: torch.nn.Module = peft_model.merge_and_unload()
        return merged
    return peft_model


def run_finetune(
    spec: FineTuneJobSpec | Mapping[str, Any],
    workspace_dir: Path,
    *,
    progress: ProgressReporter | None = None,
    on_step: StepHook | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train on `data/train.jsonl` of the workspace and write `trained/`; returns the training summary.

    `spec` is the FineTuneJob's spec, parsed or as its wire dict.
    """
    if not isinstance(spec, FineTuneJobSpec):
        spec = parse_finetune_spec(spec)
    settings = spec.training
    ranks = distributed.ranks_from_environment()
    device = distributed.training_device(ranks) if ranks.distributed else pick_device()
    check_precision_supported(settings.precision, device)
    quantization = qlora.quantization_of(spec.method)
    if quantization is not None:
        qlora.check_quantized_training_possible(quantization, device)
    if not ranks.is_main:
        progress = None  # rank 0 reports for every process
    train_file = workspace_dir / WorkspaceLayout.TRAIN_SPLIT
    if not train_file.is_file():
        raise DatasetError(f"{train_file} is missing; the curate step must run before finetune")

    fingerprint = configuration_fingerprint(spec, train_file)
    trained_dir = workspace_dir / WorkspaceLayout.TRAINED
    record = read_training_record(trained_dir)
    if record is not None and record.get("fingerprint") == fingerprint:
        if progress is not None:
            progress.training_update(
                step=int(record.get("steps", 0)),
                total_steps=int(record.get("totalSteps", 0)),
                epoch=float(record.get("epochs", 0.0)),
                train_loss=record.get("trainLoss"),
                learning_rate=None,
                tokens_seen=int(record.get("tokensSeen", 0)),
                force=True,
            )
        return {**record, "cached": True}

    with distributed.process_group(ranks, device):
        return _train_and_save(spec, workspace_dir, fingerprint, device, ranks, progress, on_step, stop)


def _train_and_save(
    spec: FineTuneJobSpec,
    workspace_dir: Path,
    fingerprint: str,
    device: torch.device,
    ranks: distributed.Ranks,
    progress: ProgressReporter | None,
    on_step: StepHook | None,
    stop: StopRequest | None,
) -> dict[str, Any]:
    settings = spec.training
    base_uri = spec.base_model.uri
    fmt = spec.dataset.format
    train_file = workspace_dir / WorkspaceLayout.TRAIN_SPLIT
    trained_dir = workspace_dir / WorkspaceLayout.TRAINED
    if ranks.is_main:
        remove_stale_staging(workspace_dir)
    torch.manual_seed(settings.seed)
    tokenizer = models.load_tokenizer(base_uri)
    distillation = spec.method.distillation
    teacher = load_teacher(distillation, tokenizer, base_uri, device) if distillation is not None else None
    examples = data.load_examples(str(train_file), fmt)
    if spec.method.preference is not None:
        features = preference.tokenize_preference_rows(examples, fmt, tokenizer, settings.max_seq_length)
    else:
        features = tokenize_examples(examples, fmt, tokenizer, settings.max_seq_length)
    if not features:
        raise DatasetError(
            f"{train_file}: no example has a response to train on within training.maxSeqLength"
        )
    task_examples = len(features)
    if settings.replay is not None:
        features += replay_features(
            settings.replay, task_examples, tokenizer, settings.max_seq_length, settings.seed
        )
    example_count = len(features)
    if settings.packing:
        features = data.pack_features(features, settings.max_seq_length, settings.seed)
    # Imported here: the evaluation it runs loads trained models with this module's helpers.
    from kubetune_components.finetune.periodic import periodic_evaluator

    evaluator = periodic_evaluator(spec, workspace_dir, tokenizer, device, write_reports=ranks.is_main)
    quantization = qlora.quantization_of(spec.method)
    if quantization is not None:
        model = qlora.load_quantized_base(base_uri, quantization, device)
        model = apply_method(model, spec.method, tokenizer)  # type: ignore[assignment]
    else:
        model = models.load_causal_lm(base_uri)
        model = apply_method(model, spec.method, tokenizer)  # type: ignore[assignment]
        model.to(device)  # type: ignore[arg-type]
    if settings.packing:
        check_packing_isolates_examples(model, features[0]["input_ids"])
    loss_fn = teacher.loss if teacher is not None else token_loss_sum
    if spec.method.preference is not None:
        reference = preference.reference_model(model, spec.method.preference)
        loss_fn = preference.preference_loss(model, spec.method, int(tokenizer.pad_token_id), reference)

    stop = stop or StopRequest()
    with stop_on_sigterm(stop):
        result = train(
            model,
            features,
            settings,
            pad_token_id=int(tokenizer.pad_token_id),
            checkpoint_dir=workspace_dir / WorkspaceLayout.CHECKPOINTS,
            fingerprint=fingerprint,
            progress=progress,
            on_step=on_step,
            stop=stop,
            device=device,
            ranks=ranks,
            evaluator=evaluator,
            loss_fn=loss_fn,
        )
    selection: dict[str, Any] = {}
    if evaluator is not None:
        selection = evaluator.select_weights(
            model,
            result.steps,
            result.early_stopped_at_step,
            workspace_dir / WorkspaceLayout.CHECKPOINTS,
            fingerprint,
        )
    summary = {
        **result.to_json(),
        "method": spec.method.type,
        "baseModel": base_uri,
        **({"teacher": distillation.teacher.uri} if distillation is not None else {}),
        **({"adapter": "lora"} if spec.method.preference is not None and spec.method.trains_adapter else {}),
        "examples": example_count,
        "replayExamples": example_count - task_examples,
        **({"packedSequences": len(features)} if settings.packing else {}),
        **selection,
        "trainableParameters": sum(param.numel() for param in trainable_parameters(model).values()),
        "fingerprint": fingerprint,
    }
    if ranks.distributed:
        summary["processes"] = ranks.world_size
        if settings.distributed is not None:
            summary["strategy"] = settings.distributed.strategy
        summary["parameterBytesPerProcess"] = fsdp.parameter_bytes_held(model)
    model.train(False)
    # Sharded (fsdp): every process takes part in gathering the whole weights for rank 0 to save.
    whole_weights = fsdp.full_model_state(model) if fsdp.is_sharded(model) else None
    if ranks.is_main:
        save_trained(model, tokenizer, trained_dir, summary, whole_weights)
    distributed.barrier()  # trained/ is complete before any process reports success
    return summary
