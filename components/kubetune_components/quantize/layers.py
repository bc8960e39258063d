"""Which layers a method touches: every linear layer except an output head tied to the input embedding.

Quantizing (or pruning) a tied head would untie it from the embedding and store the embedding twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


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


def quantizable_linears(model: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    """The linear layers `linear_layer_filter` lets through, in module order."""
    keep = linear_layer_filter(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and keep(module, name):
            yield module
