"""The fine-tuning step: PEFT (LoRA, prefix tuning, prompt tuning, IA3) or full fine-tuning.

A plain torch loop rather than the HF Trainer, so the step adds next to nothing on top of the
forward and backward passes:

- examples are tokenized once; each epoch shuffles them with a seeded generator and groups
  similar lengths into micro-batches (little padding), then shuffles the micro-batch order;
- the loss is the sum of token losses over the response tokens divided by the number of response
  tokens in the whole optimizer step, so gradient accumulation gives the same gradient as one big
  batch;
- resumable checkpoints (trainable weights, optimizer, scheduler, RNG state, position in the
  data) are written to a temporary directory and renamed into place, every
  `checkpointEverySteps` optimizer steps and when SIGTERM arrives. On start the newest complete
  checkpoint of the same configuration is resumed, so a job killed mid-run ends with the same
  weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from kubetune_components import data
from kubetune_components.common import models, storage
from kubetune_components.common.errors import ConfigError, DatasetError
from kubetune_components.common.progress import ProgressReporter

Feature = dict[str, list[int]]
Batch = dict[str, torch.Tensor]
StepHook = Callable[[int], bool]
"""Called after every optimizer step with the step number; returning True stops training like SIGTERM."""

IGNORE_INDEX = -100
PEFT_METHODS = frozenset({"lora", "prefix-tuning", "prompt-tuning", "ia3"})
MERGEABLE_METHODS = frozenset({"lora", "ia3"})
METHOD_BLOCKS = {
    "lora": "lora",
    "prefix-tuning": "prefixTuning",
    "prompt-tuning": "promptTuning",
    "ia3": "ia3",
    "full": "full",
}
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
TRAINING_RECORD = "kubetune-training.json"
CHECKPOINT_PREFIX = "step-"
LENGTH_GROUP_BATCHES = 64
"""Micro-batches per length-sorted group: large enough to cut padding, small enough to stay random."""


# --------------------------------------------------------------------------------------------------
# Settings read from the FineTuneJob spec (camelCase wire dict, defaults already filled in).


def _decimal(value: Any, default: float) -> float:
    if value is None:
        return default
    return float(Decimal(str(value)))


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    precision: str = "fp32"
    seed: int = 42
    max_seq_length: int = 512
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2

    @classmethod
    def from_spec(cls, training: Mapping[str, Any]) -> TrainingSettings:
        scheduler = training.get("scheduler") or {}
        epochs = training.get("epochs")
        max_steps = training.get("maxSteps")
        settings = cls(
            epochs=int(epochs) if epochs is not None else None,
            max_steps=int(max_steps) if max_steps is not None else None,
            batch_size=int(training.get("batchSize", 8)),
            gradient_accumulation_steps=int(training.get("gradientAccumulationSteps", 1)),
            learning_rate=_decimal(training.get("learningRate"), 2e-4),
            weight_decay=_decimal(training.get("weightDecay"), 0.0),
            max_grad_norm=_decimal(training.get("maxGradNorm"), 1.0),
            scheduler=str(scheduler.get("type", "cosine")),
            warmup_ratio=_decimal(scheduler["warmupRatio"], 0.0) if scheduler.get("warmupRatio") else None,
            warmup_steps=int(scheduler["warmupSteps"]) if scheduler.get("warmupSteps") is not None else None,
            precision=str(training.get("precision", "fp32")),
            seed=int(training.get("seed", 42)),
            max_seq_length=int(training.get("maxSeqLength", 512)),
            checkpoint_every_steps=int(training.get("checkpointEverySteps", 100)),
            keep_checkpoints=int(training.get("keepCheckpoints", 2)),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise ConfigError(
                f"training.scheduler.type: {self.scheduler!r} is not one of {sorted(SCHEDULER_NAMES)}"
            )
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"training.precision: {self.precision!r} is not one of fp32, bf16, fp16")
        for name, value in (
            ("batchSize", self.batch_size),
            ("gradientAccumulationSteps", self.gradient_accumulation_steps),
            ("checkpointEverySteps", self.checkpoint_every_steps),
            ("keepCheckpoints", self.keep_checkpoints),
        ):
            if value < 1:
                raise ConfigError(f"training.{name} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learningRate must be positive, got {self.learning_rate}")

    def validate_for_device(self, device: torch.device) -> None:
        if self.precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                "training.precision: fp16 needs a CUDA GPU and none is available here; use bf16 or fp32"
            )


@dataclass(frozen=True)
class MethodSettings:
    type: str = "lora"
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, method: Mapping[str, Any]) -> MethodSettings:
        method_type = str(method.get("type", "lora"))
        if method_type not in METHOD_BLOCKS:
            raise ConfigError(f"method.type: {method_type!r} is not one of {sorted(METHOD_BLOCKS)}")
        return cls(type=method_type, options=dict(method.get(METHOD_BLOCKS[method_type]) or {}))

    @property
    def is_peft(self) -> bool:
        return self.type in PEFT_METHODS


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Applying the method to a model.


def apply_method(model: torch.nn.Module, method: MethodSettings, tokenizer: Any) -> torch.nn.Module:
    """Wrap `model` for the method: a PEFT model, or the model itself with the right parameters trainable."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    options = method.options
    if method.type == "full":
        model.requires_grad_(True)
        if options.get("freezeEmbeddings", False):
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
                if embedding is not None:
                    embedding.weight.requires_grad_(False)
        return model
    peft_config: Any
    try:
        if method.type == "lora":
            peft_config = LoraConfig(
                task_type="CAUSAL_LM",
                r=int(options.get("r", 8)),
                lora_alpha=int(options.get("alpha", 16)),
                lora_dropout=_decimal(options.get("dropout"), 0.05),
                target_modules=list(options.get("targetModules") or []) or None,
                use_rslora=bool(options.get("useRslora", False)),
            )
        elif method.type == "prefix-tuning":
            peft_config = PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=int(options.get("numVirtualTokens", 16))
            )
        elif method.type == "prompt-tuning":
            # Always RANDOM in the saved config: a TEXT init would make PEFT reload the tokenizer by
            # name whenever the adapter is loaded. The text init is applied by hand below instead.
            peft_config = PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=int(options.get("numVirtualTokens", 16))
            )
        else:
            target_modules = list(options.get("targetModules") or []) or None
            feedforward_modules = list(options.get("feedforwardModules") or []) or None
            if target_modules is not None and feedforward_modules is None:
                feedforward_modules = []
            peft_config = IA3Config(
                task_type="CAUSAL_LM", target_modules=target_modules, feedforward_modules=feedforward_modules
            )
        peft_model = get_peft_model(model, peft_config)
    except ValueError as error:
        block = METHOD_BLOCKS[method.type]
        raise ConfigError(f"method.{block}: {error}") from error
    if method.type == "prompt-tuning" and options.get("initText"):
        _init_prompt_from_text(peft_model, tokenizer, str(options["initText"]))
    wrapped: torch.nn.Module = peft_model
    return wrapped


def _init_prompt_from_text(peft_model: Any, tokenizer: Any, init_text: str) -> None:
    token_ids: list[int] = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    if not token_ids:
        raise ConfigError("method.promptTuning.initText tokenizes to nothing")
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    count = embedding.weight.shape[0]
    repeated = (token_ids * math.ceil(count / len(token_ids)))[:count]
    word_embeddings = peft_model.get_input_embeddings()
    with torch.no_grad():
        init = word_embeddings(torch.tensor(repeated, device=embedding.weight.device))
        embedding.weight.copy_(init.to(embedding.weight.dtype))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


# --------------------------------------------------------------------------------------------------
# Batches and the loss.


def target_token_count(feature: Feature) -> int:
    """Tokens that carry a loss: labels other than -100, after the shift by one."""
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
    return {
        key: batch[key].to(device, non_blocking=True) for key in ("input_ids", "attention_mask", "labels")
    }


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token losses over the labelled positions, and how many there are."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
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
) -> torch.Tensor:
    """Backward over every micro-batch of one optimizer step; returns the step's mean token loss.

    Every micro-batch's loss sum is divided by the target tokens of the whole step, so accumulating
    k micro-batches gives the same gradient as one batch holding all of them.
    """
    denominator = max(1, target_tokens)
    total = torch.zeros((), dtype=torch.float32)
    for batch in micro_batches:
        with autocast():
            loss_sum, _ = token_loss_sum(model, batch)
        loss = loss_sum / denominator
        torch.autograd.backward(scale(loss) if scale is not None else loss)
        total += loss.detach().float().cpu()
    return total


# --------------------------------------------------------------------------------------------------
# Optimizer and scheduler.


def build_optimizer(
    parameters: Mapping[str, torch.nn.Parameter], settings: TrainingSettings
) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not to biases, norms or scalars)."""
    decayed = [param for param in parameters.values() if param.ndim >= 2]
    not_decayed = [param for param in parameters.values() if param.ndim < 2]
    groups: list[dict[str, Any]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": settings.weight_decay})
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("the method leaves no trainable parameters")
    return torch.optim.AdamW(groups, lr=settings.learning_rate)


def warmup_step_count(settings: TrainingSettings, total_steps: int) -> int:
    if settings.warmup_steps is not None:
        return min(settings.warmup_steps, total_steps)
    if settings.warmup_ratio:
        return min(math.ceil(settings.warmup_ratio * total_steps), total_steps)
    return 0


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainingSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    scheduler = get_scheduler(
        SCHEDULER_NAMES[settings.scheduler],
        optimizer,
        num_warmup_steps=warmup_step_count(settings, total_steps),
        num_training_steps=total_steps,
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    return scheduler


def steps_per_epoch(example_count: int, settings: TrainingSettings) -> int:
    micro_batches = math.ceil(example_count / settings.batch_size)
    return math.ceil(micro_batches / settings.gradient_accumulation_steps)


def total_step_count(example_count: int, settings: TrainingSettings) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    return (settings.epochs or 1) * steps_per_epoch(example_count, settings)


# --------------------------------------------------------------------------------------------------
# Checkpoints.


@dataclass
class TrainingPosition:
    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    """Index of the next micro-batch of `epoch` to train on."""
    tokens_seen: int = 0


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def _fsync_tree(root: Path) -> None:
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
) -> Path:
    """Write `checkpoints/step-N` via a temporary directory and a rename; drop the oldest beyond `keep`."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final_path = checkpoint_dir / f"{CHECKPOINT_PREFIX}{position.step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=checkpoint_dir))
    try:
        save_safetensors(
            {name: param.detach().contiguous().cpu() for name, param in parameters.items()},
            str(staging / "trainable.safetensors"),
        )
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
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
        _fsync_tree(staging)
        if final_path.exists():
            shutil.rmtree(final_path)
        os.rename(staging, final_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(stale.path, ignore_errors=True)
    return final_path


def load_checkpoint(
    checkpoint: Checkpoint,
    parameters: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> TrainingPosition:
    weights = load_safetensors(str(checkpoint.path / "trainable.safetensors"))
    if set(weights) != set(parameters):
        raise ValueError("the checkpoint holds different trainable parameters")
    with torch.no_grad():
        for name, param in parameters.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(checkpoint.path / "optimizer.pt", weights_only=True))
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


# --------------------------------------------------------------------------------------------------
# Stopping on SIGTERM.


class StopRequest:
    """Set by SIGTERM (or a step hook); the loop checkpoints after the current optimizer step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str = "requested") -> None:
        self.requested = True
        self.reason = reason


class TrainingInterrupted(Exception):
    """Training stopped early on request; the position is saved in `checkpoint` (when there is one).

    Not a ComponentError: nothing is wrong, and running the step again resumes from the checkpoint.
    """

    def __init__(self, step: int, checkpoint: Path | None, reason: str) -> None:
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint directory"
        super().__init__(f"training stopped at step {step} ({reason}); {saved}")
        self.step = step
        self.checkpoint = checkpoint
        self.reason = reason


@contextlib.contextmanager
def stop_on_sigterm(stop: StopRequest) -> Iterator[None]:
    """While active, SIGTERM only sets `stop`; elsewhere (or off the main thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        }


def train(
    model: torch.nn.Module,
    features: Sequence[Feature],
    settings: TrainingSettings,
    *,
    pad_token_id: int,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    progress: ProgressReporter | None = None,
    on_step: StepHook | None = None,
    stop: StopRequest | None = None,
    device: torch.device | None = None,
    record_losses: bool = False,
) -> TrainResult:
    """Train `model` in place on tokenized `features`, resuming from a checkpoint in `checkpoint_dir`.

    Raises TrainingInterrupted (after writing a checkpoint) when `stop` is requested or `on_step`
    returns True.
    """
    if not features:
        raise DatasetError("no training examples left after tokenization")
    device = device or next(model.parameters()).device
    settings.validate_for_device(device)
    stop = stop or StopRequest()
    parameters = trainable_parameters(model)
    optimizer = build_optimizer(parameters, settings)
    total_steps = total_step_count(len(features), settings)
    scheduler = build_scheduler(optimizer, settings, total_steps)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    gas = settings.gradient_accumulation_steps
    lengths = [len(feature["input_ids"]) for feature in features]
    targets = [target_token_count(feature) for feature in features]
    real_tokens = [sum(1 for mask in feature["attention_mask"] if mask) for feature in features]

    position = TrainingPosition()
    resumed_from: int | None = None
    if checkpoint_dir is not None:
        remove_stale_staging(checkpoint_dir)
        for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
            if checkpoint.state.get("fingerprint") != fingerprint:
                continue
            try:
                position = load_checkpoint(checkpoint, parameters, optimizer, scheduler, scaler)
            except (OSError, ValueError, RuntimeError, KeyError):
                continue
            resumed_from = position.step
            break

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return autocast_context(settings.precision, device)

    scale = scaler.scale if scaler is not None else None
    max_grad_norm = settings.max_grad_norm
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

    def checkpoint_now() -> Path:
        assert checkpoint_dir is not None
        return save_checkpoint(
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
            },
        )

    report(force=True)
    while position.step < total_steps:
        plan = plan_micro_batches(lengths, settings.batch_size, settings.seed, position.epoch)
        while position.micro_batch < len(plan) and position.step < total_steps:
            window = plan[position.micro_batch : position.micro_batch + gas]
            micro_batches = [
                collate([features[index] for index in indices], pad_token_id, device) for indices in window
            ]
            step_targets = sum(targets[index] for indices in window for index in indices)
            loss = accumulate_gradients(model, micro_batches, step_targets, autocast, scale)
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
            checkpoint_path: Path | None = None
            due = position.step % settings.checkpoint_every_steps == 0
            if checkpoint_dir is not None and (due or stop.requested):
                checkpoint_path = checkpoint_now()
            if stop.requested:
                report(force=True)
                raise TrainingInterrupted(position.step, checkpoint_path, stop.reason)
            if epoch_finished:
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
    )


# --------------------------------------------------------------------------------------------------
# The step.


def configuration_fingerprint(spec: Mapping[str, Any], train_file: Path) -> str:
    """What decides the trained weights; checkpoints and `trained/` of other configurations are not reused."""
    training = {
        key: value
        for key, value in dict(spec.get("training") or {}).items()
        if key not in ("checkpointEverySteps", "keepCheckpoints")
    }
    relevant = {
        "baseModel": (spec.get("baseModel") or {}).get("uri"),
        "format": (spec.get("dataset") or {}).get("format"),
        "method": spec.get("method"),
        "training": training,
        "trainData": storage.sha256_of(str(train_file)),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def tokenize_examples(
    examples: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any, max_seq_length: int
) -> list[Feature]:
    features: list[Feature] = []
    for example in examples:
        feature = data.tokenize_for_training(
            dict(example), cast(data.DatasetFormat, fmt), tokenizer, max_seq_length
        )
        if feature is not None:
            features.append(feature)
    return features


def read_training_record(trained_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((trained_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_trained(
    model: torch.nn.Module, tokenizer: Any, trained_dir: Path, record: Mapping[str, Any]
) -> None:
    """Write the adapter (PEFT) or the full model, the tokenizer and the training record, atomically."""
    trained_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{trained_dir.name}.", suffix=".tmp", dir=trained_dir.parent))
    try:
        model.save_pretrained(str(staging))  # type: ignore[operator]
        tokenizer.save_pretrained(str(staging))
        storage.atomic_write_json(staging / TRAINING_RECORD, dict(record))
        _fsync_tree(staging)
        if trained_dir.exists():
            shutil.rmtree(trained_dir)
        os.rename(staging, trained_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_trained_model(trained_dir: Path, base_model_uri: str, *, merge: bool = True) -> torch.nn.Module:
    """The tuned model in `trained/`: the base plus the adapter (merged when possible), or the full model."""
    record = read_training_record(trained_dir)
    if record is None:
        raise DatasetError(f"{trained_dir} holds no trained model; run the finetune step first")
    method = str(record.get("method", "lora"))
    if method not in PEFT_METHODS:
        return models.load_causal_lm(str(trained_dir))
    from peft import PeftModel

    base = models.load_causal_lm(base_model_uri)
    peft_model = PeftModel.from_pretrained(base, str(trained_dir))
    if merge and method in MERGEABLE_METHODS:
        merged: torch.nn.Module = peft_model.merge_and_unload()
        return merged
    return peft_model


def run_finetune(
    spec: Mapping[str, Any],
    workspace_dir: Path,
    *,
    progress: ProgressReporter | None = None,
    on_step: StepHook | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train on `data/train.jsonl` of the workspace and write `trained/`; returns the training summary."""
    settings = TrainingSettings.from_spec(spec.get("training") or {})
    method = MethodSettings.from_spec(spec.get("method") or {})
    if (spec.get("output") or {}).get("mergeAdapter") and method.type not in MERGEABLE_METHODS | {"full"}:
        raise ConfigError(
            f"output.mergeAdapter: a {method.type} adapter cannot be merged into the base weights"
        )
    device = pick_device()
    settings.validate_for_device(device)
    base_uri = str(spec["baseModel"]["uri"])
    fmt = str((spec.get("dataset") or {}).get("format", "instruction"))
    train_file = workspace_dir / "data" / "train.jsonl"
    if not train_file.is_file():
        raise DatasetError(f"{train_file} is missing; the curate step must run before finetune")

    fingerprint = configuration_fingerprint(spec, train_file)
    trained_dir = workspace_dir / "trained"
    record = read_training_record(trained_dir)
    if record is not None and record.get("fingerprint") == fingerprint:
        if progress is not None:
            progress.training_update(
                step=int(record.get("steps", 0)),
                total_steps=int(record.get("totalSteps", 0)),
                epoch=float(record.get("epochs", 0.0)),
                train_loss=record.get("trainLoss"),
                learning_rate=None,
                tokens_seen=int(record.get("tokensSeen", 0)),
                force=True,
            )
        return {**record, "cached": True}

    remove_stale_staging(workspace_dir)
    torch.manual_seed(settings.seed)
    tokenizer = models.load_tokenizer(base_uri)
    examples = data.load_examples(str(train_file), cast(data.DatasetFormat, fmt))
    features = tokenize_examples(examples, fmt, tokenizer, settings.max_seq_length)
    if not features:
        raise DatasetError(
            f"{train_file}: no example has a response to train on within training.maxSeqLength"
        )
    model = models.load_causal_lm(base_uri)
    model = apply_method(model, method, tokenizer)  # type: ignore[assignment]
    model.to(device)  # type: ignore[arg-type]

    stop = stop or StopRequest()
    with stop_on_sigterm(stop):
        result = train(
            model,
            features,
            settings,
            pad_token_id=int(tokenizer.pad_token_id),
            checkpoint_dir=workspace_dir / "checkpoints",
            fingerprint=fingerprint,
            progress=progress,
            on_step=on_step,
            stop=stop,
            device=device,
        )
    summary = {
        **result.to_json(),
        "method": method.type,
        "baseModel": base_uri,
        "examples": len(features),
        "trainableParameters": sum(param.numel() for param in trainable_parameters(model).values()),
        "fingerprint": fingerprint,
    }
    model.train(False)
    save_trained(model, tokenizer, trained_dir, summary)
    return summary
