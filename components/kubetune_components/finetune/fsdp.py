"""training.distributed.strategy fsdp: the weights, gradients and optimizer state sharded across processes.

torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every transformer block (the model's
``_no_split_modules`` classes, e.g. LlamaDecoderLayer) as its own group and the rest (embeddings, final
norm, head) with the root, each parameter a DTensor split on dim 0 over all processes. A block's weights
are gathered for its forward and backward only, and its gradients are reduce-scattered (averaged, as
DDP's are), so no process ever holds every weight, gradient and optimizer state at once. It runs on CPU
with gloo as on GPUs with nccl.

Kept as the loop (loop.py) keeps DDP: the same micro-batches per step and process, the same loss
normalisation. FSDP adds two constraints the loop follows through this module:

- every forward and backward is a collective, so every process runs the same number of micro-batches
  per optimizer step; a process with fewer real ones (the end of an epoch) runs copies without labels,
  which add nothing to the loss or the gradients (:func:`pad_micro_batches`);
- checkpoints and ``trained/`` hold whole tensors, as one process writes them: every process takes part
  in gathering the full weights and optimizer state (:class:`ShardedTrainingState`), rank 0 alone writes
  them, and on resume every process reads them and keeps its own shard. ``trained/`` is a normal
  ``save_pretrained`` directory, loadable without torch.distributed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from kubetune_components.common.errors import ConfigError
from kubetune_components.data import IGNORE_INDEX
from kubetune_components.finetune.checkpoints import GatheredState

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors, on the CPU: what one process would save (rank 0 gets them; the others get nothing)."""
FULL_LOADED_EVERYWHERE = StateDictOptions(full_state_dict=True)
"""Whole tensors every process read from the same checkpoint: each keeps its own shard."""


def block_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer block classes to shard one by one: those transformers keeps whole on one device."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(module) for module in model.modules() if type(module).__name__ in names}


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Shard `model` in place (every block, then the root) over the `world_size` processes; returns it.

    The model's parameters are replaced by DTensor shards: build the optimizer from them afterwards.
    """
    blocks = block_classes(model)
    if not blocks:
        raise ConfigError(
            f"training.distributed.strategy: fsdp shards a model per transformer block, and the "
            f"{type(model).__name__} model names none (transformers' _no_split_modules); use ddp"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    for module in list(model.modules()):
        if type(module) in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync_deferred(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients unsharded; the step's last micro-batch reduce-scatters them."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def pad_micro_batches(
    micro_batches: Sequence[dict[str, torch.Tensor]], count: int
) -> list[dict[str, torch.Tensor]]:
    """`micro_batches` and copies of the first without labels, `count` in all (each process runs as many
    forwards as every other); a copy's loss sum is 0, so it changes neither the loss nor a gradient."""
    padded = list(micro_batches)
    if len(padded) >= count:
        return padded
    template = padded[0]
    unlabelled = {**template, "labels": torch.full_like(template["labels"], IGNORE_INDEX)}
    padded.extend(unlabelled for _ in range(count - len(padded)))
    return padded


class ShardedTrainingState:
    """The trainable weights and optimizer state of a sharded model, whole, as checkpoints hold them.

    Gathering (:meth:`gather`) and restoring (:meth:`restore`) are collectives:
    every process calls them, in the same order.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_names: Sequence[str]
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.trainable_names = list(trainable_names)

    def gather(self) -> GatheredState:
        """The trainable weights and the optimizer state (keyed by parameter name), whole, on rank 0
        (empty elsewhere)."""
        state = _tensors(get_model_state_dict(self.model, options=FULL_ON_CPU))
        weights = {name: state[name] for name in self.trainable_names if name in state}
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_ON_CPU)
        return GatheredState(weights=weights, optimizer=dict(optimizer))

    def restore(self, weights: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any]) -> None:
        """Restore from whole tensors every process read; ValueError when they name other parameters."""
        if set(weights) != set(self.trainable_names):
            raise ValueError("the checkpoint holds different trainable parameters")
        set_model_state_dict(self.model, dict(weights), options=_partial(FULL_LOADED_EVERYWHERE))
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=dict(optimizer_state), options=FULL_LOADED_EVERYWHERE
        )


def _partial(options: StateDictOptions) -> StateDictOptions:
    """`options` accepting a state dict of the trainable weights only (frozen embeddings are not saved)."""
    return StateDictOptions(
        full_state_dict=options.full_state_dict, cpu_offload=options.cpu_offload, strict=False
    )


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model, whole, on rank 0 (empty elsewhere): for ``save_pretrained``.

    A weight shared by two modules (tied input and output embeddings) is kept once, under the name
    ``named_parameters`` gives it, as ``save_pretrained`` of the unsharded model writes it."""
    state = _tensors(get_model_state_dict(model, options=FULL_ON_CPU))
    own_names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in own_names}


def parameter_bytes_held(model: torch.nn.Module) -> int:
    """Bytes of the weights this process holds between forwards: its shards when sharded, all otherwise."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def _tensors(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A model state dict's entries, which are tensors (its type admits nested values)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: a model state entry of type {type(value).__name__}")
        tensors[name] = value
    return tensors
