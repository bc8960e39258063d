"""The training half of quantization-aware training: a short AdamW loop on fake-quantized layers.

torchao_ops.prepare_qat swaps the layers in before it and torchao_ops.convert_qat quantizes for real
after it (methods.py strings the three together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from kubetune_components.common.errors import DatasetError
from kubetune_components.finetune.loop import collate, token_loss_sum
from kubetune_contract.common import as_float
from kubetune_contract.quantize import QatOptions


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
