"""The training loop: a plain torch loop rather than the HF Trainer, so it adds next to nothing on top of
the forward and backward passes.

- examples are tokenized once; each epoch shuffles them with a seeded generator and groups similar
  lengths into micro-batches (little padding), then shuffles the micro-batch order; with
  training.packing the "examples" are packed sequences (data.pack_features) whose position ids keep
  each example's attention to itself;
- the loss is the sum of token losses over the response tokens divided by the number of response
  tokens in the whole optimizer step, so gradient accumulation gives the same gradient as one big batch;
- a resumable checkpoint (see checkpoints.py) is written every `checkpointEverySteps` optimizer steps
  and when a stop is requested (see signals.py); on start the newest complete checkpoint of the same
  configuration is resumed, so a job killed mid-run ends with the same weights as an uninterrupted one.

Every setting is the API's `Training` model (kubetune_contract.finetune): no defaults of its own here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kubetune_components import data
from kubetune_components.common.errors import ConfigError, DatasetError
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.data import IGNORE_INDEX
from kubetune_components.finetune import distributed, fsdp
from kubetune_components.finetune.checkpoints import (
    TrainingPosition,
    list_checkpoints,
    load_checkpoint,
    remove_stale_staging,
    save_checkpoint,
)
from kubetune_components.finetune.distributed import SINGLE, Ranks
from kubetune_components.finetune.methods import trainable_parameters
from kubetune_components.finetune.signals import StopRequest, TrainingInterrupted
from kubetune_contract.common import as_float
from kubetune_contract.finetune import Scheduler, Training

Feature = dict[str, list[int]]
Batch = dict[str, torch.Tensor]
StepHook = Callable[[int], bool]
TokenLoss = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
"""(model, batch) -> (sum of the token losses over the labelled positions, how many there are)."""
"""Called after every optimizer step with the step number; returning True stops training like SIGTERM."""


class StepEvaluator(Protocol):
    """The periodic evaluations of training.evalEverySteps (finetune/periodic.py), as the loop uses them."""

    every_steps: int

    def restore(self, state: Mapping[str, Any] | None, step: int) -> None: ...
    def evaluate(self, model: torch.nn.Module, step: int, train_loss: float | None) -> None: ...
    def should_stop(self) -> bool: ...
    def protected_steps(self) -> set[int]: ...
    def checkpoint_state(self) -> dict[str, Any]: ...


SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
"""The API's scheduler types -> transformers' `get_scheduler` names."""
LENGTH_GROUP_BATCHES = 64
"""Micro-batches per length-sorted group: large enough to cut padding, small enough to stay random."""


def check_precision_supported(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "training.precision: fp16 needs a CUDA GPU and none is available here; use bf16 or fp32"
        )


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Batches and the loss.


def target_token_count(feature: Feature) -> int:
    """Tokens that carry a loss: labels other than -100, after the shift by one; or the feature's own
    loss units (a preference row's loss is one per row, finetune/preference.py)."""
    if data.LOSS_UNITS in feature:
        return sum(feature[data.LOSS_UNITS])
    return sum(1 for label in feature["labels"][1:] if label != IGNORE_INDEX)


def plan_micro_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each micro-batch of one epoch: shuffled, length-grouped, deterministic in (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group_size = batch_size * LENGTH_GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), group_size):
        group = sorted(order[start : start + group_size], key=lambda index: -lengths[index])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    batch_order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in batch_order]


def collate(features: Sequence[Feature], pad_token_id: int, device: torch.device) -> Batch:
    batch = data.pad_batch(list(features), pad_token_id)
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The forward pass's inputs: packed sequences (training.packing) give position ids and no attention
    mask, from which transformers keeps attention inside each example; that needs no cache either."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def check_packing_isolates_examples(model: torch.nn.Module, token_ids: Sequence[int]) -> None:
    """Refuse training.packing for a model that attends across packed examples (one that does not derive
    its attention mask from the position ids): the second of two packed examples must see what it sees
    alone."""
    first, second = list(token_ids[:6]), list(token_ids[:5])
    device = next(model.parameters()).device
    packed_ids = torch.tensor([first + second], device=device)
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits
    finally:
        model.train(was_training)
    packed_second = packed[0, len(first) :].float()
    alone_second = alone[0, -len(second) :].float()
    tolerance = 1e-2 * max(1.0, float(alone_second.abs().max()))
    if float((packed_second - alone_second).abs().max()) > tolerance:
        config = getattr(model, "config", None)
        name = getattr(config, "model_type", None) or type(model).__name__
        raise ConfigError(
            f"training.packing: the {name} model attends across packed examples (its attention does not "
            "follow the position ids); train it without packing"
        )


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token losses over the labelled positions, and how many there are."""
    outputs = model(**model_inputs(batch))
    logits = outputs.logits
    labels = batch["labels"]
    if logits.shape[1] != labels.shape[1]:
        # Prompt tuning prepends virtual tokens to the sequence: keep the positions of real tokens.
        logits = logits[:, -labels.shape[1] :, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    selected_logits = logits[:, :-1, :][mask]
    loss_sum = F.cross_entropy(selected_logits.float(), shift_labels[mask], reduction="sum")
    return loss_sum, mask.sum()


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[Batch],
    target_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    gradient_factor: float = 1.0,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    loss_fn: TokenLoss = token_loss_sum,
) -> torch.Tensor:
    """Backward over every micro-batch of one optimizer step; returns the step's mean token loss.

    Every micro-batch's loss sum is divided by the target tokens of the whole step, so accumulating
    k micro-batches gives the same gradient as one batch holding all of them. Across processes,
    `target_tokens` counts the whole step's and `gradient_factor` is the world size, which undoes
    DDP's averaging of the gradients (0: this process has no micro-batch of the step and runs one only
    to take part in the gradient exchange); `no_sync` (DDP's) defers the exchange to the last micro-batch.
    `loss_fn` computes a micro-batch's token loss sum (distillation's adds the teacher's distributions).
    """
    denominator = max(1, target_tokens)
    total = torch.zeros((), dtype=torch.float32)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        deferred = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with deferred:
            with autocast():
                loss_sum, _ = loss_fn(model, batch)
            loss = loss_sum / denominator
            weighted = loss * gradient_factor if gradient_factor != 1.0 else loss
            torch.autograd.backward(scale(weighted) if scale is not None else weighted)
        if gradient_factor != 0.0:
            total += loss.detach().float().cpu()
    return total


# --------------------------------------------------------------------------------------------------
# Optimizer and scheduler.


def build_optimizer(parameters: Mapping[str, torch.nn.Parameter], settings: Training) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not to biases, norms or scalars)."""
    decayed = [param for param in parameters.values() if param.ndim >= 2]
    not_decayed = [param for param in parameters.values() if param.ndim < 2]
    groups: list[dict[str, Any]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": as_float(settings.weight_decay)})
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("the method leaves no trainable parameters")
    return torch.optim.AdamW(groups, lr=as_float(settings.learning_rate))


def warmup_step_count(scheduler: Scheduler, total_steps: int) -> int:
    if scheduler.warmup_steps is not None:
        return min(scheduler.warmup_steps, total_steps)
    warmup_ratio = as_float(scheduler.warmup_ratio, 0.0)
    if warmup_ratio:
        return min(math.ceil(warmup_ratio * total_steps), total_steps)
    return 0


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: Training, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    scheduler = get_scheduler(
        SCHEDULER_NAMES[settings.scheduler.type],
        optimizer,
        num_warmup_steps=warmup_step_count(settings.scheduler, total_steps),
        num_training_steps=total_steps,
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    return scheduler


def steps_per_epoch(example_count: int, settings: Training, processes: int = 1) -> int:
    """Optimizer steps per epoch; `processes` training processes share each step's micro-batches."""
    micro_batches = math.ceil(example_count / settings.batch_size)
    return math.ceil(micro_batches / (settings.gradient_accumulation_steps * processes))


def total_step_count(example_count: int, settings: Training, processes: int = 1) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    return (settings.epochs or 1) * steps_per_epoch(example_count, settings, processes)


# --------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    epochs: float
    train_loss: float | None
    tokens_seen: int
    train_seconds: float
    resumed_from_step: int | None
    losses: list[float] = field(default_factory=list)
    early_stopped_at_step: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "totalSteps": self.total_steps,
            "epochs": round(self.epochs, 4),
            "trainLoss": self.train_loss,
            "tokensSeen": self.tokens_seen,
            "trainSeconds": round(self.train_seconds, 3),
            "tokensPerSecond": round(self.tokens_per_second, 1),
            "resumedFromStep": self.resumed_from_step,
            "earlyStoppedAtStep": self.early_stopped_at_step,
        }


def train(
    model: torch.nn.Module,
    features: Sequence[Feature],
    settings: Training,
    *,
    pad_token_id: int,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    progress: ProgressReporter | None = None,
    on_step: StepHook | None = None,
    stop: StopRequest | None = None,
    device: torch.device | None = None,
    record_losses: bool = False,
    ranks: Ranks = SINGLE,
    evaluator: StepEvaluator | None = None,
    loss_fn: TokenLoss = token_loss_sum,
) -> TrainResult:
    """Train `model` in place on tokenized `features`, resuming from a checkpoint in `checkpoint_dir`.

    Raises TrainingInterrupted (after writing a checkpoint) when `stop` is requested or `on_step`
    returns True. With several `ranks` (torch.distributed initialised by the caller) every process
    calls this with the same features and settings: each trains on its share of every step's
    micro-batches, and only rank 0 reports progress and writes checkpoints.

    With an `evaluator`, the model is evaluated every `evaluator.every_steps` steps and at the last one,
    a checkpoint is saved with each evaluation (pruning keeps the evaluator's protected ones), and
    training ends early when the evaluator says so. `loss_fn` is the token loss (the labels'
    cross-entropy unless the method brings its own, as distillation does).
    """
    if not features:
        raise DatasetError("no training examples left after tokenization")
    device = device or next(model.parameters()).device
    check_precision_supported(settings.precision, device)
    stop = stop or StopRequest()
    # With fsdp the model is sharded in place, its parameters replaced by shards: wrap it first.
    forward_model = model
    if ranks.distributed:
        forward_model = distributed.wrap_model(model, device, settings.distributed)
    sharded = fsdp.is_sharded(forward_model)
    parameters = trainable_parameters(model)
    optimizer = build_optimizer(parameters, settings)
    sharded_state = fsdp.ShardedTrainingState(model, optimizer, list(parameters)) if sharded else None
    world = ranks.world_size
    total_steps = total_step_count(len(features), settings, world)
    scheduler = build_scheduler(optimizer, settings, total_steps)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    step_micro_batches = settings.gradient_accumulation_steps * world
    no_sync = distributed.gradient_sync_deferral(forward_model) if ranks.distributed else None
    if not ranks.is_main:
        progress = None
    lengths = [len(feature["input_ids"]) for feature in features]
    targets = [target_token_count(feature) for feature in features]
    real_tokens = [sum(1 for mask in feature["attention_mask"] if mask) for feature in features]

    position = TrainingPosition()
    resumed_from: int | None = None
    resumed_state: Mapping[str, Any] | None = None
    if checkpoint_dir is not None:
        if ranks.is_main:
            remove_stale_staging(checkpoint_dir)
        for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
            if checkpoint.state.get("fingerprint") != fingerprint:
                continue
            try:
                position = load_checkpoint(
                    checkpoint,
                    parameters,
                    optimizer,
                    scheduler,
                    scaler,
                    restore_sharded=sharded_state.restore if sharded_state is not None else None,
                )
            except (OSError, ValueError, RuntimeError, KeyError):
                continue
            resumed_from = position.step
            resumed_state = checkpoint.state
            break
    distributed.barrier()  # every rank has read its checkpoint before rank 0 may write the next
    if progress is not None:
        progress.training_started(resumed_from)
    if evaluator is not None:
        evaluator.restore(resumed_state, position.step)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return autocast_context(settings.precision, device)

    scale = scaler.scale if scaler is not None else None
    max_grad_norm = as_float(settings.max_grad_norm)
    model.train()
    losses: list[float] = []
    last_loss: torch.Tensor | None = None
    epoch_progress = float(position.epoch)
    started = time.perf_counter()

    def report(force: bool = False) -> None:
        if progress is None or not (force or progress.due()):
            return
        progress.training_update(
            step=position.step,
            total_steps=total_steps,
            epoch=epoch_progress,
            train_loss=float(last_loss) if last_loss is not None else None,
            learning_rate=float(scheduler.get_last_lr()[0]),
            tokens_seen=position.tokens_seen,
            force=True,
        )

    def checkpoint_now() -> Path | None:
        assert checkpoint_dir is not None
        # Sharded: every process takes part in gathering the whole state; rank 0 alone writes it.
        gathered = sharded_state.gather() if sharded_state is not None else None
        if not ranks.is_main:
            return None
        saved = save_checkpoint(
            checkpoint_dir,
            position,
            parameters,
            optimizer,
            scheduler,
            scaler,
            fingerprint,
            settings.keep_checkpoints,
            extra={
                "totalSteps": total_steps,
                "trainLoss": float(last_loss) if last_loss is not None else None,
                **(evaluator.checkpoint_state() if evaluator is not None else {}),
            },
            protected_steps=evaluator.protected_steps() if evaluator is not None else frozenset(),
            gathered=gathered,
        )
        if progress is not None:
            progress.checkpoint_saved(position.step)
        return saved

    report(force=True)
    early_stopped_at: int | None = None
    if evaluator is not None and resumed_from is not None and evaluator.should_stop():
        early_stopped_at = resumed_from  # stopped early, then interrupted before the weights were saved
    while position.step < total_steps and early_stopped_at is None:
        plan = plan_micro_batches(lengths, settings.batch_size, settings.seed, position.epoch)
        while position.micro_batch < len(plan) and position.step < total_steps:
            window = plan[position.micro_batch : position.micro_batch + step_micro_batches]
            own = window[ranks.rank :: world]
            micro_batches = [
                collate([features[index] for index in indices], pad_token_id, device)
                for indices in own or window[:1]
            ]
            if sharded:  # every process runs as many forwards (collectives) as the others
                micro_batches = fsdp.pad_micro_batches(micro_batches, math.ceil(len(window) / world))
            step_targets = sum(targets[index] for indices in window for index in indices)
            loss = accumulate_gradients(
                forward_model,
                micro_batches,
                step_targets,
                autocast,
                scale,
                gradient_factor=float(world) if own else 0.0,
                no_sync=no_sync,
                loss_fn=loss_fn,
            )
            loss = distributed.sum_across(loss)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters.values(), max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            last_loss = loss
            if record_losses:
                losses.append(float(loss))
            position.step += 1
            position.micro_batch += len(window)
            position.tokens_seen += sum(real_tokens[index] for indices in window for index in indices)
            epoch_progress = position.epoch + position.micro_batch / len(plan)
            epoch_finished = position.micro_batch >= len(plan)
            if epoch_finished:
                position.epoch += 1
                position.micro_batch = 0
            report()

            if on_step is not None and on_step(position.step):
                stop.request("step hook")
            if ranks.distributed and distributed.any_process(stop.requested) and not stop.requested:
                stop.request("another training process stopped")
            evaluated = evaluator is not None and (
                position.step % evaluator.every_steps == 0 or position.step == total_steps
            )
            if evaluator is not None and evaluated:
                evaluator.evaluate(model, position.step, float(last_loss))
                model.train()
                if evaluator.should_stop():
                    early_stopped_at = position.step
            checkpoint_path: Path | None = None
            due = position.step % settings.checkpoint_every_steps == 0 or evaluated
            if checkpoint_dir is not None and (ranks.is_main or sharded) and (due or stop.requested):
                checkpoint_path = checkpoint_now()
            if stop.requested:
                report(force=True)
                raise TrainingInterrupted(position.step, checkpoint_path, stop.reason)
            if epoch_finished or early_stopped_at is not None:
                break  # the next epoch has its own shuffle
    elapsed = time.perf_counter() - started
    report(force=True)
    return TrainResult(
        steps=position.step,
        total_steps=total_steps,
        epochs=epoch_progress,
        train_loss=float(last_loss) if last_loss is not None else None,
        tokens_seen=position.tokens_seen,
        train_seconds=elapsed,
        resumed_from_step=resumed_from,
        losses=losses,
        early_stopped_at_step=early_stopped_at,
    )
