"""Shrinking a causal LM with torchao: the methods, saving and loading the result, and measuring it.

Methods (spec.method.type of a QuantizeJob):

- int8-weight-only: `Int8WeightOnlyConfig` (per-row int8 weights, activations stay float);
- int8-dynamic: `Int8DynamicActivationInt8WeightConfig` (activations quantized per token at run time);
- int4-weight-only: on CPU the prototype `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`, packed for
  `aten._weight_int4pack_mm_for_cpu`); on a GPU `Int4WeightOnlyConfig` with the tinygemm
  `tile_packed_to_4d` packing. torchao 0.18's default int4 packings (plain, preshuffled) need the mslk
  kernels and plain_int32 has no CPU implementation, hence the CPU path;
- qat: `QATConfig(step="prepare")` with fake-quantize configs matching the scheme, a short training
  loop on the train split, `QATConfig(step="convert")`, then the scheme's real quantization;
- pruning: magnitude masks per linear layer (unstructured at `sparsity`, or 2:4 with
  `torchao.sparsity.utils.mask_creator`), optionally followed by one of the quantizations; on a GPU a
  2:4 model without quantization is stored as dense weights and converted to the semi-structured
  layout (`SemiSparseWeightConfig`) when loaded on CUDA;
- mixed-precision: the whole model cast to bf16 (fp16 only for GPU targets).

All linear layers are quantized except the output head when it shares its weights with the input
embedding (quantizing it would untie the two and store the embedding twice).

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
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from pydantic import ValidationError

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ConfigError, DatasetError, ModelLoadError
from kubetune_components.evaluate import MAX_PERPLEXITY_EXPONENT, exact_match, mean_token_loss
from kubetune_components.finetune.loop import collate, token_loss_sum
from kubetune_components.finetune.train import tokenize_examples
from kubetune_contract.common import as_float, describe_validation_error
from kubetune_contract.finetune import DatasetFormat
from kubetune_contract.quantize import (
    QatOptions,
    QuantizeJobSpec,
    QuantizeMethod,
    QuantScheme,
    Target,
    target_problem,
)

ArtifactFormat = Literal["hf-safetensors", "torchao-state-dict"]

QUANTIZATION_RECORD = "kubetune-quantization.json"
TORCHAO_WEIGHTS_FILE = "quantized_model.pt"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
BUILT_IN_LATENCY_PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "My order has not arrived yet and",
    "Please reset my password because",
    "The weather today is",
    "How do I change the billing address",
    "Thank you for your help with",
    "The meeting is scheduled for",
)


# --------------------------------------------------------------------------------------------------
# The plan: what the spec asks for, checked against the target.


@dataclass(frozen=True)
class QuantizationPlan:
    """The method of a QuantizeJob (as the API parsed it) and the target it quantizes for."""

    method: QuantizeMethod
    target: Target = "cpu"

    @classmethod
    def for_job(cls, spec: QuantizeJobSpec) -> QuantizationPlan:
        return cls(method=spec.method, target=spec.target)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> QuantizationPlan:
        """From the `method` and `target` of a QuantizeJob's wire spec, checked by the API's own rules."""
        try:
            method = QuantizeMethod.model_validate(spec.get("method") or {})
        except ValidationError as error:
            raise ConfigError(f"method: {describe_validation_error(error)}") from error
        target = spec.get("target", QuantizeJobSpec.model_fields["target"].default)
        if target not in get_args(Target):
            raise ConfigError(f"target must be one of {', '.join(get_args(Target))}, got {target!r}")
        unsupported = target_problem(method, cast(Target, target))
        if unsupported is not None:
            raise ConfigError(unsupported)
        return cls(method=method, target=cast(Target, target))

    @property
    def type(self) -> str:
        return self.method.type

    @property
    def scheme(self) -> QuantScheme | None:
        return self.method.scheme

    def options(self) -> dict[str, Any]:
        """The settings that shaped the result, for the record and the manifest."""
        method = self.method
        options: dict[str, Any] = {"target": self.target}
        if method.scheme == "int4-weight-only":
            options["groupSize"] = method.int4_group_size
        if method.qat is not None:
            options["qat"] = {
                "scheme": method.qat.scheme,
                "steps": method.qat.steps,
                "batchSize": method.qat.batch_size,
                "learningRate": as_float(method.qat.learning_rate),
                "maxSeqLength": method.qat.max_seq_length,
                "seed": method.qat.seed,
            }
        if method.pruning is not None:
            options.update(
                sparsity=as_float(method.pruning.sparsity),
                pattern=method.pruning.pattern,
                then=method.pruning.then,
            )
        if method.mixed_precision is not None:
            options["dtype"] = method.mixed_precision.dtype
        return options


def device_for(target: str) -> torch.device:
    """CPU for target cpu; CUDA for target gpu (refused when the step runs without one)."""
    if target == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("target gpu: this step runs without a CUDA device; schedule it on a GPU node")
        return torch.device("cuda")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Methods.


def has_tied_output_head(model: torch.nn.Module) -> bool:
    get_input: Any = getattr(model, "get_input_embeddings", None)
    get_output: Any = getattr(model, "get_output_embeddings", None)
    if get_input is None or get_output is None:
        return False
    embedding, head = get_input(), get_output()
    if embedding is None or head is None:
        return False
    return bool(embedding.weight is head.weight)


def linear_layer_filter(model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """quantize_'s filter: every nn.Linear, except an output head tied to the input embedding."""
    skipped: set[int] = set()
    if has_tied_output_head(model):
        get_output: Any = model.get_output_embeddings
        skipped.add(id(get_output()))

    def is_quantized(module: torch.nn.Module, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and id(module) not in skipped

    return is_quantized


def _torchao_imported() -> None:
    """Importing torchao registers its tensor subclasses (also as safe globals for torch.load)."""
    import torchao  # noqa: F401


def quantization_config(scheme: QuantScheme, group_size: int, target: Target) -> Any:
    """The torchao post-training quantization config of `scheme` for `target`."""
    _torchao_imported()
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if scheme == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if target == "cpu":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
    from torchao.quantization import Int4PackingFormat

    return Int4WeightOnlyConfig(
        group_size=group_size,
        int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
        set_inductor_config=False,
    )


def apply_quantization(model: torch.nn.Module, scheme: QuantScheme, group_size: int, target: Target) -> None:
    """Replace the weights of the linear layers by torchao quantized tensors, in place."""
    from torchao.quantization import quantize_

    if scheme == "int4-weight-only" and target == "gpu":
        model.to(torch.bfloat16)  # the tinygemm CUDA kernel takes bf16 activations only
    quantize_(model, quantization_config(scheme, group_size, target), filter_fn=linear_layer_filter(model))


def _prunable_linears(model: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    keep = linear_layer_filter(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and keep(module, name):
            yield module


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 for the weights kept, 0 for the `sparsity` share of smallest magnitude (ties may prune fewer)."""
    pruned = round(weight.numel() * sparsity)
    if pruned == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.detach().abs().flatten().kthvalue(pruned).values
    return weight.detach().abs() > threshold


def prune(model: torch.nn.Module, sparsity: float, pattern: str) -> dict[str, Any]:
    """Zero weights of the linear layers in place; returns {sparsity (measured), prunedLayers}."""
    zeros = 0
    total = 0
    layers = 0
    with torch.no_grad():
        for linear in _prunable_linears(model):
            weight = linear.weight
            if pattern == "2:4":
                from torchao.sparsity.utils import mask_creator

                mask = mask_creator(weight, N=2, M=4).to(torch.bool)
            else:
                mask = magnitude_mask(weight, sparsity)
            weight.mul_(mask.to(weight.dtype))
            zeros += int((weight == 0).sum())
            total += weight.numel()
            layers += 1
    return {"sparsity": zeros / total if total else 0.0, "prunedLayers": layers}


def measured_sparsity(model: torch.nn.Module) -> float:
    zeros = 0
    total = 0
    for linear in _prunable_linears(model):
        weight = linear.weight
        if type(weight) is torch.nn.Parameter or type(weight) is torch.Tensor:
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


def fake_quantize_configs(scheme: QuantScheme, group_size: int) -> tuple[Any, Any]:
    """(activation, weight) fake-quantize configs that simulate the real quantization of `scheme`.

    torchao 0.18 infers them from the PTQ config only for Int4WeightOnlyConfig's mslk packings, so
    they are spelled out. int8-dynamic's activations are quantized symmetrically per token for real,
    but the fake quantizer only supports asymmetric per-token ranges: a close simulation, not exact.
    """
    _torchao_imported()
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig

    per_channel_int8 = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    if scheme == "int8-weight-only":
        return None, per_channel_int8
    if scheme == "int8-dynamic":
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), per_channel_int8
    return None, Int4WeightFakeQuantizeConfig(group_size=group_size, activation_dtype=torch.bfloat16)


def prepare_qat(model: torch.nn.Module, scheme: QuantScheme, group_size: int) -> None:
    """Swap the linear layers for fake-quantized ones (training still updates float weights)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activation_config, weight_config = fake_quantize_configs(scheme, group_size)
    quantize_(
        model,
        QATConfig(activation_config=activation_config, weight_config=weight_config, step="prepare"),
        filter_fn=linear_layer_filter(model),
    )


def convert_qat(model: torch.nn.Module, scheme: QuantScheme, group_size: int, target: Target) -> None:
    """Back to plain linear layers with the trained weights, then the real quantization."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    # The default filter (every nn.Linear, FakeQuantizedLinear included) finds every layer prepare
    # swapped; convert leaves the other linear layers alone.
    quantize_(model, QATConfig(step="convert"))
    apply_quantization(model, scheme, group_size, target)


@dataclass(frozen=True)
class QatResult:
    steps: int
    first_loss: float
    last_loss: float


def train_fake_quantized(
    model: torch.nn.Module,
    features: Sequence[Mapping[str, list[int]]],
    settings: QatOptions,
    *,
    pad_token_id: int,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> QatResult:
    """`settings.steps` AdamW steps of mean token loss on shuffled batches of `features` (cycled)."""
    if not features:
        raise DatasetError("qat: the train split has no example with response tokens to train on")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=as_float(settings.learning_rate), weight_decay=0.0)
    model.train()
    order: list[int] = []
    first_loss = math.nan
    loss_value = math.nan
    for step in range(1, settings.steps + 1):
        batch_indices: list[int] = []
        while len(batch_indices) < min(settings.batch_size, len(features)):
            if not order:
                order = torch.randperm(len(features), generator=generator).tolist()
            batch_indices.append(order.pop())
        batch = collate([cast(Any, features[index]) for index in batch_indices], pad_token_id, device)
        loss_sum, tokens = token_loss_sum(model, batch)
        loss = loss_sum / tokens.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        if step == 1:
            first_loss = loss_value
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    return QatResult(steps=settings.steps, first_loss=first_loss, last_loss=loss_value)


def quantize_model(
    model: torch.nn.Module,
    plan: QuantizationPlan,
    *,
    train_features: Sequence[Mapping[str, list[int]]] | None = None,
    pad_token_id: int = 0,
    device: torch.device | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Apply `plan` to `model` in place; returns what happened (for the record)."""
    model.eval()
    device = device or torch.device("cpu")
    details: dict[str, Any] = {}
    method = plan.method
    if method.mixed_precision is not None:
        model.to(torch.bfloat16 if method.mixed_precision.dtype == "bf16" else torch.float16)
        return details
    if method.pruning is not None:
        details.update(prune(model, as_float(method.pruning.sparsity), method.pruning.pattern))
    if method.qat is not None:
        qat = method.qat
        if train_features is None:
            raise DatasetError("qat trains: the QuantizeJob needs a dataset (spec.dataset)")
        prepare_qat(model, qat.scheme, qat.group_size)
        result = train_fake_quantized(
            model, train_features, qat, pad_token_id=pad_token_id, device=device, on_step=on_step
        )
        details["training"] = {
            "steps": result.steps,
            "firstLoss": result.first_loss,
            "lastLoss": result.last_loss,
        }
        convert_qat(model, qat.scheme, qat.group_size, plan.target)
        return details
    scheme = method.scheme
    if scheme is not None:
        apply_quantization(model, scheme, method.int4_group_size, plan.target)
    return details


# --------------------------------------------------------------------------------------------------
# Saving and loading.


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


def torchao_version() -> str:
    _torchao_imported()
    import torchao

    return str(torchao.__version__)


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
        _torchao_imported()
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
    if (
        record.get("method") == "pruning"
        and (record.get("options") or {}).get("pattern") == "2:4"
        and (record.get("options") or {}).get("then") == "none"
        and torch.device(device).type == "cuda"
    ):
        from torchao.sparsity import SemiSparseWeightConfig, sparsify_

        sparsify_(model, SemiSparseWeightConfig(), filter_fn=linear_layer_filter(model))
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


# --------------------------------------------------------------------------------------------------
# Measurement.


def latency_prompt_ids(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], fmt: str, count: int
) -> list[list[int]]:
    """`count` prompts: those of the first validation examples, topped up with the built-in prompts."""
    dataset_format = cast(DatasetFormat, fmt)
    prompts: list[list[int]] = []
    for example in list(examples)[:count]:
        prompt, _ = data.render_prompt_and_response(dict(example), dataset_format, tokenizer)
        ids = data.prompt_token_ids(prompt, dataset_format, tokenizer)
        if ids:
            prompts.append(ids)
    index = 0
    while len(prompts) < count:
        text = BUILT_IN_LATENCY_PROMPTS[index % len(BUILT_IN_LATENCY_PROMPTS)]
        prompts.append(list(tokenizer(text, add_special_tokens=True)["input_ids"]))
        index += 1
    return prompts


def greedy_tokens(
    model: torch.nn.Module, prompt: list[int], new_tokens: int, device: torch.device
) -> list[int]:
    """Exactly `new_tokens` greedily generated tokens (eos does not stop it)."""
    generate: Any = model.generate
    input_ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        output = generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
        )
    return [int(token) for token in output[0, len(prompt) :].tolist()]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_token(
    model: torch.nn.Module, prompts: Sequence[list[int]], new_tokens: int, device: torch.device
) -> float:
    """Median over `prompts` of wall seconds per generated token (batch 1, greedy), after a warm-up."""
    model.eval()
    greedy_tokens(model, prompts[0], new_tokens, device)
    timings: list[float] = []
    for prompt in prompts:
        _synchronize(device)
        start = time.perf_counter()
        generated = greedy_tokens(model, prompt, new_tokens, device)
        _synchronize(device)
        timings.append((time.perf_counter() - start) / max(1, len(generated)))
    return float(statistics.median(timings))


def measure_quality(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    fmt: str,
    *,
    max_samples: int,
    max_new_tokens: int,
    max_seq_length: int,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, float | None]:
    """{perplexity, exactMatch} on the first `max_samples` held-out examples (None without any)."""
    chosen = list(examples)[:max_samples]
    if not chosen:
        return {"perplexity": None, "exactMatch": None}
    features = tokenize_examples(chosen, fmt, tokenizer, max_seq_length)
    perplexity: float | None = None
    if features:
        loss, _ = mean_token_loss(
            model, features, pad_token_id=int(tokenizer.pad_token_id), batch_size=batch_size, device=device
        )
        perplexity = math.exp(min(loss, MAX_PERPLEXITY_EXPONENT))
    score, _ = exact_match(
        model,
        tokenizer,
        chosen,
        fmt,
        max_new_tokens=max_new_tokens,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
    )
    return {"perplexity": perplexity, "exactMatch": score}
