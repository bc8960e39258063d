"""The torchao operations the methods are built from: post-training quantization, QAT's fake
quantization and its conversion, and the semi-structured sparse layout.

- int8-weight-only: `Int8WeightOnlyConfig` (per-row int8 weights, activations stay float);
- int8-dynamic: `Int8DynamicActivationInt8WeightConfig` (activations quantized per token at run time);
- int4-weight-only: on CPU the prototype `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`, packed for
  `aten._weight_int4pack_mm_for_cpu`); on a GPU `Int4WeightOnlyConfig` with the tinygemm
  `tile_packed_to_4d` packing. torchao 0.18's default int4 packings (plain, preshuffled) need the mslk
  kernels and plain_int32 has no CPU implementation, hence the CPU path.

torchao is imported where it is used: importing this module does not load it.
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune_components.quantize.layers import linear_layer_filter
from kubetune_contract.quantize import QuantScheme, Target


def import_torchao() -> None:
    """Importing torchao registers its tensor subclasses (also as safe globals for torch.load)."""
    import torchao  # noqa: F401


def torchao_version() -> str:
    import torchao

    return str(torchao.__version__)


def quantization_config(scheme: QuantScheme, group_size: int, target: Target) -> Any:
    """The torchao post-training quantization config of `scheme` for `target`."""
    import_torchao()
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


def fake_quantize_configs(scheme: QuantScheme, group_size: int) -> tuple[Any, Any]:
    """(activation, weight) fake-quantize configs that simulate the real quantization of `scheme`.

    torchao 0.18 infers them from the PTQ config only for Int4WeightOnlyConfig's mslk packings, so
    they are spelled out. int8-dynamic's activations are quantized symmetrically per token for real,
    but the fake quantizer only supports asymmetric per-token ranges: a close simulation, not exact.
    """
    import_torchao()
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


def sparsify_semi_structured(model: torch.nn.Module) -> None:
    """Convert the (2:4 pruned, dense) linear weights to torchao's semi-structured layout (CUDA only)."""
    from torchao.sparsity import SemiSparseWeightConfig, sparsify_

    sparsify_(model, SemiSparseWeightConfig(), filter_fn=linear_layer_filter(model))
