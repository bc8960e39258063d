"""Saving a quantized model and loading it back, whichever method made it.

Artifact format (what `save_quantized` writes and `load_quantized` reads):

- `kubetune-quantization.json`: {format, method, options, torchDtype, tiedEmbeddings, libraries};
- format `hf-safetensors` (models whose weights are plain tensors: mixed-precision, pruning alone):
  a regular `save_pretrained` directory that any transformers install loads;
- format `torchao-state-dict` (weights are torchao tensor subclasses): `config.json`,
  `generation_config.json`, the tokenizer and `quantized_model.pt`, the state dict written with
  `torch.save` (safetensors cannot hold tensor subclasses). It is read back with
  `torch.load(weights_only=True)` (torchao registers its tensor types as safe globals) into a model
  built from the config and swapped in with `load_state_dict(assign=True)`. Needs torchao (same
  minor version) to load. transformers' TorchAoConfig save/load path was not evaluated; this format
  is the one whose round trip (identical greedy generations) the tests check for every method.

On a GPU, a 2:4 pruned model without quantization is stored as dense weights and converted to the
semi-structured layout when it is loaded on CUDA.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch

from kubetune_components.common import models, storage
from kubetune_components.common.errors import ConfigError, ModelLoadError
from kubetune_components.quantize.layers import has_tied_output_head
from kubetune_components.quantize.torchao_ops import import_torchao, sparsify_semi_structured, torchao_version

ArtifactFormat = Literal["hf-safetensors", "torchao-state-dict"]

QUANTIZATION_RECORD = "kubetune-quantization.json"
TORCHAO_WEIGHTS_FILE = "quantized_model.pt"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def holds_tensor_subclasses(model: torch.nn.Module) -> bool:
    return any(
        type(tensor) not in (torch.Tensor, torch.nn.Parameter) for tensor in model.state_dict().values()
    )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ConfigError(f"unsupported model dtype {dtype}")


def save_quantized(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, record: Mapping[str, Any]
) -> ArtifactFormat:
    """Write `model` so that `load_quantized(out_dir)` gives it back; returns the format used."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pretrained: Any = model
    fmt: ArtifactFormat = "torchao-state-dict" if holds_tensor_subclasses(model) else "hf-safetensors"
    if fmt == "hf-safetensors":
        pretrained.save_pretrained(str(out_dir))
    else:
        pretrained.config.save_pretrained(str(out_dir))
        generation_config = getattr(pretrained, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(out_dir))
        # torch.save keeps tensors that share storage (a tied embedding and head) once.
        torch.save(model.state_dict(), out_dir / TORCHAO_WEIGHTS_FILE)
    tokenizer.save_pretrained(str(out_dir))
    storage.atomic_write_json(
        out_dir / QUANTIZATION_RECORD,
        {
            **record,
            "format": fmt,
            "torchDtype": dtype_name(model_dtype(model)),
            "tiedEmbeddings": has_tied_output_head(model),
            "libraries": {"torch": str(torch.__version__), "torchao": torchao_version()},
        },
    )
    return fmt


def read_quantization_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads((path / QUANTIZATION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} holds no quantized model ({QUANTIZATION_RECORD}: {error})") from error
    if not isinstance(record, dict):
        raise ModelLoadError(f"{path / QUANTIZATION_RECORD} is not a JSON object")
    return record


def _is_dense_semi_structured(record: Mapping[str, Any]) -> bool:
    options = record.get("options") or {}
    return bool(
        record.get("method") == "pruning"
        and options.get("pattern") == "2:4"
        and options.get("then") == "none"
    )


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model `save_quantized` wrote to `path` (either format), in eval mode on `device`."""
    root = Path(path)
    record = read_quantization_record(root)
    dtype = DTYPES.get(str(record.get("torchDtype", "float32")), torch.float32)
    fmt = record.get("format")
    model: Any
    if fmt == "hf-safetensors":
        model = models.load_causal_lm(str(root), dtype=dtype)
    elif fmt == "torchao-state-dict":
        import_torchao()
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        auto_model: Any = AutoModelForCausalLM
        model = auto_model.from_config(config, dtype=dtype)
        if (root / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(root), local_files_only=True)
        try:
            state = torch.load(root / TORCHAO_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelLoadError(
                f"cannot read {root / TORCHAO_WEIGHTS_FILE} (written with torchao "
                f"{(record.get('libraries') or {}).get('torchao')}, this is {torchao_version()}): {error}"
            ) from error
        model.load_state_dict(state, strict=True, assign=True)
        if record.get("tiedEmbeddings"):
            model.tie_weights()
    else:
        raise ModelLoadError(f"{root}: unknown quantized model format {fmt!r}")
    model.to(device)
    if _is_dense_semi_structured(record) and torch.device(device).type == "cuda":
        sparsify_semi_structured(model)
    model.eval()
    return cast(torch.nn.Module, model)


def weights_size_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors, torch pickles) in the directory `path`."""
    sizes = [
        file.stat().st_size
        for file in path.rglob("*")
        if file.is_file() and file.name.endswith(WEIGHT_FILE_SUFFIXES)
    ]
    if not sizes:
        raise ModelLoadError(f"{path} holds no weight files")
    return sum(sizes)
