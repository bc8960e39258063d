"""The quantization methods: one table maps a QuantizeJob's `method.type` to what applies it.

Like PEFT's mapping from a method type to its tuner, `METHODS` is the one place that says what each
method does to a model; the appliers read the method's options block as the API parsed it (every
default is the API's):

- int8-weight-only, int8-dynamic, int4-weight-only: torchao post-training quantization (torchao_ops);
- qat: fake-quantized layers, a short training loop on the train split (qat.py), then the scheme's
  real quantization;
- pruning: magnitude masks per linear layer (pruning.py), optionally followed by a quantization;
- mixed-precision: the whole model cast to bf16 (fp16 only for GPU targets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_components.common.errors import ConfigError, DatasetError
from kubetune_components.quantize.pruning import prune
from kubetune_components.quantize.qat import train_fake_quantized
from kubetune_components.quantize.torchao_ops import apply_quantization, convert_qat, prepare_qat
from kubetune_contract.common import as_float
from kubetune_contract.quantize import (
    QuantizeJobSpec,
    QuantizeMethod,
    QuantizeMethodType,
    QuantScheme,
    Target,
)

TrainingStepHook = Callable[[int, float], None]
"""Called after each QAT step with (step, loss)."""


@dataclass(frozen=True)
class QuantizationPlan:
    """The method of a QuantizeJob (as the API parsed it) and the target it quantizes for."""

    method: QuantizeMethod
    target: Target = "cpu"

    @classmethod
    def for_job(cls, spec: QuantizeJobSpec) -> QuantizationPlan:
        return cls(method=spec.method, target=spec.target)

    @property
    def type(self) -> QuantizeMethodType:
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


def device_for(target: Target) -> torch.device:
    """CPU for target cpu; CUDA for target gpu (refused when the step runs without one)."""
    if target == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("target gpu: this step runs without a CUDA device; schedule it on a GPU node")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class TrainingData:
    """What a method that trains (qat) needs besides the model; the others ignore it."""

    features: Sequence[Mapping[str, list[int]]] | None
    pad_token_id: int
    device: torch.device
    on_step: TrainingStepHook | None


MethodApplier = Callable[[torch.nn.Module, QuantizationPlan, TrainingData], dict[str, Any]]
"""Applies a plan to a model in place; returns what happened, for the quantization record."""


def _quantize_weights(model: torch.nn.Module, plan: QuantizationPlan, _data: TrainingData) -> dict[str, Any]:
    scheme = plan.scheme
    assert scheme is not None, f"{plan.type} is a quantization scheme"
    apply_quantization(model, scheme, plan.method.int4_group_size, plan.target)
    return {}


def _quantization_aware_training(
    model: torch.nn.Module, plan: QuantizationPlan, data: TrainingData
) -> dict[str, Any]:
    qat = plan.method.qat
    assert qat is not None, "the API fills in the qat block of a qat method"
    if data.features is None:
        raise DatasetError("qat trains: the QuantizeJob needs a dataset (spec.dataset)")
    prepare_qat(model, qat.scheme, qat.group_size)
    result = train_fake_quantized(
        model, data.features, qat, pad_token_id=data.pad_token_id, device=data.device, on_step=data.on_step
    )
    convert_qat(model, qat.scheme, qat.group_size, plan.target)
    return {"training": {"steps": result.steps, "firstLoss": result.first_loss, "lastLoss": result.last_loss}}


def _prune(model: torch.nn.Module, plan: QuantizationPlan, data: TrainingData) -> dict[str, Any]:
    pruning = plan.method.pruning
    assert pruning is not None, "the API fills in the pruning block of a pruning method"
    details = prune(model, as_float(pruning.sparsity), pruning.pattern)
    if plan.scheme is not None:  # pruning.then
        _quantize_weights(model, plan, data)
    return details


def _cast_to_16_bit(model: torch.nn.Module, plan: QuantizationPlan, _data: TrainingData) -> dict[str, Any]:
    mixed_precision = plan.method.mixed_precision
    assert mixed_precision is not None, "the API fills in the mixedPrecision block of its method"
    model.to(torch.bfloat16 if mixed_precision.dtype == "bf16" else torch.float16)
    return {}


METHODS: dict[QuantizeMethodType, MethodApplier] = {
    "int8-weight-only": _quantize_weights,
    "int8-dynamic": _quantize_weights,
    "int4-weight-only": _quantize_weights,
    "qat": _quantization_aware_training,
    "pruning": _prune,
    "mixed-precision": _cast_to_16_bit,
}


def quantize_model(
    model: torch.nn.Module,
    plan: QuantizationPlan,
    *,
    train_features: Sequence[Mapping[str, list[int]]] | None = None,
    pad_token_id: int = 0,
    device: torch.device | None = None,
    on_step: TrainingStepHook | None = None,
) -> dict[str, Any]:
    """Apply `plan` to `model` in place; returns what happened (for the record)."""
    model.eval()
    data = TrainingData(
        features=train_features,
        pad_token_id=pad_token_id,
        device=device or torch.device("cpu"),
        on_step=on_step,
    )
    return METHODS[plan.type](model, plan, data)
