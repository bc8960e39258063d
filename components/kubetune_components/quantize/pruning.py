"""Magnitude pruning of the linear layers: unstructured at a given sparsity, or 2:4 semi-structured.

The weights stay dense tensors with zeros in them; a 2:4 model is converted to the semi-structured
sparse layout only when it is loaded on a GPU (see serialization.load_quantized).
"""

from __future__ import annotations

from typing import Any

import torch

from kubetune_components.quantize.layers import quantizable_linears
from kubetune_contract.quantize import PruningPattern


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 for the weights kept, 0 for the `sparsity` share of smallest magnitude (ties may prune fewer)."""
    pruned = round(weight.numel() * sparsity)
    if pruned == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.detach().abs().flatten().kthvalue(pruned).values
    return weight.detach().abs() > threshold


def prune(model: torch.nn.Module, sparsity: float, pattern: PruningPattern) -> dict[str, Any]:
    """Zero weights of the linear layers in place; returns {sparsity (measured), prunedLayers}."""
    zeros = 0
    total = 0
    layers = 0
    with torch.no_grad():
        for linear in quantizable_linears(model):
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
    """Share of zeros in the plain (not quantized) weights of the linear layers."""
    zeros = 0
    total = 0
    for linear in quantizable_linears(model):
        weight = linear.weight
        if type(weight) is torch.nn.Parameter or type(weight) is torch.Tensor:
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0
