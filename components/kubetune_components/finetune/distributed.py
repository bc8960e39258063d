"""Training in several processes: torchrun starts them, torch.distributed connects them.

``training.distributed: {workers, processesPerWorker, strategy}`` asks for workers x processesPerWorker
training processes. The finetune step does not start them itself: it runs its own command line again under
torchrun (``python -m torch.distributed.run``), which sets RANK, WORLD_SIZE and LOCAL_RANK in every
process. Locally torchrun runs them all on this machine (``--standalone``); in a Kubeflow Trainer TrainJob
(torch-distributed runtime) the Trainer sets torchrun's PET_* variables (nodes, processes per node, the
master's address) and the same command line starts torchrun on every node.

Inside, the loop (loop.py) keeps one global batch: each optimizer step takes the next
gradientAccumulationSteps x world-size micro-batches of the one seeded plan, and process r trains on every
world-size-th of them from the r-th; DDP averages the gradients across processes, or, with strategy
fsdp (full fine-tuning), FSDP2 shards the weights, gradients and optimizer state (fsdp.py).
So a step sees the examples one process would see with world-size times the accumulation, and rank 0
alone writes checkpoints, progress and ``trained/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kubetune_contract.finetune import Distributed

TORCHRUN_MODULE = "torch.distributed.run"
TRAINER_NODES_VARIABLE = "PET_NNODES"
"""Set by Kubeflow Trainer's torch runtime for torchrun: present, torchrun takes its topology from PET_*."""
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)
"""How long a process waits for the others at a collective (a slow checkpoint write on rank 0)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, progress and the trained model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def ranks_from_environment() -> Ranks:
    """The ranks torchrun set for this process (RANK, WORLD_SIZE, LOCAL_RANK); one process if unset."""
    try:
        return Ranks(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except (KeyError, ValueError):
        return SINGLE


def needs_launch(settings: Distributed | None) -> bool:
    """Whether this step must start its training processes under torchrun (it is not one of them yet)."""
    return settings is not None and settings.world_size > 1 and not ranks_from_environment().distributed


def torchrun_command(settings: Distributed, step_command: Sequence[str]) -> list[str]:
    """torchrun running `step_command` (``-m module args...``) in every training process.

    In a Trainer TrainJob the topology comes from the PET_* variables the Trainer sets; here every
    process runs on this machine.
    """
    if os.environ.get(TRAINER_NODES_VARIABLE):
        topology: list[str] = []
    else:
        topology = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(settings.world_size)]
    return [sys.executable, "-m", TORCHRUN_MODULE, *topology, *step_command]


def training_device(ranks: Ranks) -> torch.device:
    """One GPU per process (by local rank) when there are GPUs; the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank if ranks.distributed else 0)
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the training processes (gloo on CPU, nccl on GPU) for the duration; nothing for one process."""
    if not ranks.distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def sum_across(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every process (itself when alone)."""
    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any: a stop on one rank stops them all at one step."""
    if not active():
        return flag
    return bool(sum_across(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def wrap_model(model: torch.nn.Module, device: torch.device, settings: Distributed | None) -> torch.nn.Module:
    """The model as the training processes share it: DDP (gradients averaged) or, with strategy fsdp,
    sharded in place (fsdp.py; build the optimizer from its parameters afterwards); itself alone."""
    if not active():
        return model
    if settings is not None and settings.strategy == "fsdp":
        from kubetune_components.finetune import fsdp

        return fsdp.shard_model(model, device, dist.get_world_size())
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync_deferral(
    model: torch.nn.Module,
) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """What defers the exchange of gradients to a step's last micro-batch: DDP's no_sync, FSDP's
    counterpart; None for one process."""
    from kubetune_components.finetune import fsdp

    if fsdp.is_sharded(model):
        return functools.partial(fsdp.gradient_sync_deferred, model)
    no_sync = getattr(model, "no_sync", None)
    return no_sync if callable(no_sync) else None
