"""What a model directory holds, and loading it for serving.

`inspect_model_dir` reads `kubetune-manifest.json` to tell what the directory holds:

- a PEFT adapter (format `peft-adapter`): loaded onto its base model (the copy a Bento bundles in
  `base/`, else the manifest's `baseModel.uri`); LoRA and IA3 adapters are merged into the weights;
- merged or full weights (`merged`, `full`): a plain `from_pretrained` directory;
- a QuantizeJob's output: read back with `quantize.load_quantized`.

A directory without a manifest is recognised by its files (a quantization record, an
`adapter_config.json` or a `config.json`), so any Hugging Face model directory can be served too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components import quantize
from kubetune_components.common import models
from kubetune_components.common.artifacts import MANIFEST_FILE
from kubetune_components.common.errors import ModelLoadError
from kubetune_contract.finetune import MERGEABLE_METHODS

BUNDLED_BASE_DIR = "base"
"""Where a Bento's copy of an adapter's model keeps the base model the adapter applies to."""
ArtifactKind = Literal["peft-adapter", "merged", "full", "quantized"]
ARTIFACT_FORMATS: tuple[str, ...] = ("peft-adapter", "merged", "full")
QUANTIZED_FORMATS: tuple[str, ...] = ("hf-safetensors", "torchao-state-dict")


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return value


def _dataset_format(manifest: Mapping[str, Any] | None) -> str | None:
    """The training data format of the model, following a QuantizeJob's manifest to its source's."""
    current: Any = manifest
    while isinstance(current, Mapping):
        dataset = current.get("dataset")
        if isinstance(dataset, Mapping) and dataset.get("format"):
            return str(dataset["format"])
        current = current.get("parent")
    return None


@dataclass(frozen=True)
class ModelArtifact:
    path: Path
    kind: ArtifactKind
    base_uri: str | None
    """The base model of an adapter."""
    dataset_format: str | None


def inspect_model_dir(path: str | Path) -> ModelArtifact:
    """What `path` holds; raises ModelLoadError when it is not a model directory."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory")
    manifest = _read_json_object(root / MANIFEST_FILE)
    kind: ArtifactKind
    if manifest is not None:
        artifact = manifest.get("artifact") if isinstance(manifest.get("artifact"), dict) else {}
        fmt = str((artifact or {}).get("format"))
        if manifest.get("kind") == "QuantizeJob" or fmt in QUANTIZED_FORMATS:
            kind = "quantized"
        elif fmt in ARTIFACT_FORMATS:
            kind = cast(ArtifactKind, fmt)
        else:
            known = ", ".join((*ARTIFACT_FORMATS, *QUANTIZED_FORMATS))
            raise ModelLoadError(f"{root / MANIFEST_FILE}: artifact.format {fmt!r} is not one of {known}")
    elif (root / quantize.QUANTIZATION_RECORD).is_file():
        kind = "quantized"
    elif (root / "adapter_config.json").is_file():
        kind = "peft-adapter"
    elif (root / "config.json").is_file():
        kind = "full"
    else:
        raise ModelLoadError(
            f"{root} holds no model: none of {MANIFEST_FILE}, adapter_config.json or config.json is there"
        )
    base_uri: str | None = None
    if kind == "peft-adapter":
        bundled = root / BUNDLED_BASE_DIR
        base_model = (manifest or {}).get("baseModel")
        adapter_config = _read_json_object(root / "adapter_config.json") or {}
        if (bundled / "config.json").is_file():
            base_uri = str(bundled)
        elif isinstance(base_model, Mapping) and base_model.get("uri"):
            base_uri = str(base_model["uri"])
        elif adapter_config.get("base_model_name_or_path"):
            base_uri = str(adapter_config["base_model_name_or_path"])
        else:
            raise ModelLoadError(
                f"{root} is an adapter, but neither its manifest (baseModel.uri) nor adapter_config.json "
                "(base_model_name_or_path) names the base model"
            )
    return ModelArtifact(
        path=root,
        kind=kind,
        base_uri=base_uri,
        dataset_format=_dataset_format(manifest),
    )


def quantization_format(artifact: ModelArtifact) -> str | None:
    """The format a quantized model was saved in (its quantization record's), None for other models."""
    if artifact.kind != "quantized":
        return None
    record = _read_json_object(artifact.path / quantize.QUANTIZATION_RECORD) or {}
    return str(record.get("format") or "") or None


def load_model(artifact: ModelArtifact, device: torch.device) -> torch.nn.Module:
    """The model of `artifact` on `device`, in eval mode."""
    model: Any
    if artifact.kind == "quantized":
        model = quantize.load_quantized(artifact.path, device)
    elif artifact.kind in ("merged", "full"):
        model = models.load_causal_lm(str(artifact.path))
    else:
        from peft import PeftModel

        assert artifact.base_uri is not None
        base = models.load_causal_lm(artifact.base_uri)
        try:
            model = PeftModel.from_pretrained(base, str(artifact.path))
        except Exception as error:
            raise ModelLoadError(
                f"cannot apply the adapter in {artifact.path} to {artifact.base_uri}: {error}"
            ) from error
        peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", "")).lower()
        if peft_type.rsplit(".", 1)[-1] in MERGEABLE_METHODS:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    return cast(torch.nn.Module, model)


def load_serving_tokenizer(artifact: ModelArtifact) -> PreTrainedTokenizerBase:
    """The tokenizer published with the model; an adapter without one uses its base model's."""
    has_tokenizer = any(
        (artifact.path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")
    )
    if not has_tokenizer and artifact.base_uri is not None:
        return models.load_tokenizer(artifact.base_uri)
    return models.load_tokenizer(str(artifact.path))


def context_size(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Positions the model can attend to, less the virtual tokens of prompt or prefix tuning."""
    config = getattr(model, "config", None)
    size: int | None = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            size = value
            break
    if size is None:
        limit = getattr(tokenizer, "model_max_length", None)
        size = limit if isinstance(limit, int) and 0 < limit < 10**7 else None
    peft_configs = getattr(model, "peft_config", None)
    if size is not None and isinstance(peft_configs, Mapping):
        virtual = max(
            (int(getattr(cfg, "num_virtual_tokens", 0) or 0) for cfg in peft_configs.values()), default=0
        )
        size -= virtual
    return size
