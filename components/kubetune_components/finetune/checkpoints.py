"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG state and the position in the data.

Each checkpoint is written to a temporary directory and renamed into place, so a kill mid-save leaves
either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainingPosition:
    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    """Index of the next micro-batch of `epoch` to train on."""
    tokens_seen: int = 0


@dataclass(frozen=True)
class GatheredState:
    """Whole trainable weights and optimizer state gathered from the shards of every process."""

    weights: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any]


RestoreSharded = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], None]
"""(whole trainable weights, whole optimizer state) -> None: every process keeps its own shards."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(checkpoint_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    found: list[Checkpoint] = []
    if not checkpoint_dir.is_dir():
        return found
    for path in checkpoint_dir.iterdir():
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if not path.name.startswith(CHECKPOINT_PREFIX) or not suffix.isdigit():
            continue
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append(Checkpoint(path=path, step=int(suffix), state=state))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def remove_stale_staging(directory: Path) -> None:
    """Delete the temporary directories of saves that a kill cut short (`.name.XXXX.tmp`)."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    checkpoint_dir: Path,
    position: TrainingPosition,
    parameters: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    fingerprint: str,
    keep: int,
    extra: Mapping[str, Any] | None = None,
    protected_steps: Collection[int] = frozenset(),
    *,
    gathered: GatheredState | None = None,
) -> Path:
    """Write `checkpoints/step-N` via a temporary directory and a rename; drop the oldest beyond `keep`,
    except those of `protected_steps` (the best checkpoint, which output.select best publishes).

    `gathered`: the whole weights and optimizer state of sharded training (fsdp.py), written instead of
    `parameters` and `optimizer`'s own, which hold this process's shards only."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final_path = checkpoint_dir / f"{CHECKPOINT_PREFIX}{position.step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=checkpoint_dir))
    try:
        weights = (
            gathered.weights
            if gathered is not None
            else {name: param.detach().contiguous().cpu() for name, param in parameters.items()}
        )
        save_safetensors(dict(weights), str(staging / "trainable.safetensors"))
        optimizer_state = gathered.optimizer if gathered is not None else optimizer.state_dict()
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), staging / "scaler.pt")
        state = {
            "step": position.step,
            "epoch": position.epoch,
            "microBatch": position.micro_batch,
            "tokensSeen": position.tokens_seen,
            "fingerprint": fingerprint,
            **(extra or {}),
        }
        (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        fsync_tree(staging)
        if final_path.exists():
            shutil.rmtree(final_path)
        os.rename(staging, final_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in list_checkpoints(checkpoint_dir)[:-keep]:
        if stale.step not in protected_steps:
            shutil.rmtree(stale.path, ignore_errors=True)
    return final_path


def load_trainable_weights(checkpoint: Checkpoint, parameters: Mapping[str, torch.nn.Parameter]) -> None:
    """Copy the checkpoint's trainable weights into `parameters` (the same names, or ValueError)."""
    weights = load_safetensors(str(checkpoint.path / "trainable.safetensors"))
    if set(weights) != set(parameters):
        raise ValueError("the checkpoint holds different trainable parameters")
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(weights[name].to(param.device, param.dtype))


def load_checkpoint(
    checkpoint: Checkpoint,
    parameters: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    *,
    restore_sharded: RestoreSharded | None = None,
) -> TrainingPosition:
    """Restore the training state of `checkpoint`; `restore_sharded` (fsdp.py) takes the whole weights and
    optimizer state in place of `parameters` and `optimizer` when training is sharded."""
    optimizer_state = torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
    if restore_sharded is not None:
        restore_sharded(load_safetensors(str(checkpoint.path / "trainable.safetensors")), optimizer_state)
    else:
        load_trainable_weights(checkpoint, parameters)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(checkpoint.path / "scheduler.pt", weights_only=True))
    rng = torch.load(checkpoint.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if scaler is not None and (checkpoint.path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint.path / "scaler.pt", weights_only=True))
    state = checkpoint.state
    return TrainingPosition(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        micro_batch=int(state["microBatch"]),
        tokens_seen=int(state.get("tokensSeen", 0)),
    )
