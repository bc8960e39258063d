"""FineTuneJob (kubetune.dev/v1alpha1): adapt a base model to a domain."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from kubetune_contract.common import (
    DNS_SUBDOMAIN_PATTERN,
    MODEL_URI_PATTERN,
    BrokenRule,
    Condition,
    DecimalRange,
    DecimalString,
    GateOp,
    GateResult,
    KubeModel,
    ModelSource,
    ObjectMeta,
    OutputRef,
    PipelineRunRef,
    RatioString,
    as_float,
    read_field,
    validate_with_rules,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ["ftj"]

DatasetFormat = Literal["text", "instruction", "chat", "preference", "feedback"]
MethodType = Literal["lora", "prefix-tuning", "prompt-tuning", "ia3", "full", "distillation", "dpo", "kto"]
METHOD_BLOCKS: dict[str, str] = {
    "lora": "lora",
    "prefix-tuning": "prefixTuning",
    "prompt-tuning": "promptTuning",
    "ia3": "ia3",
    "full": "full",
    "distillation": "distillation",
    "dpo": "dpo",
    "kto": "kto",
}
PREFERENCE_FORMATS: dict[str, str] = {"dpo": "preference", "kto": "feedback"}
"""Preference-tuning methods -> the dataset.format each trains on (and the only method each format trains)."""
BLOCKS_REQUIRED: dict[str, str] = {"distillation": "it names the teacher"}
"""Options blocks with a field that has no default, required with their type: block -> why."""
PEFT_METHODS = frozenset({"lora", "prefix-tuning", "prompt-tuning", "ia3"})
"""Methods that train a PEFT adapter on a frozen base (the others train the weights themselves)."""
MERGEABLE_METHODS = frozenset({"lora", "ia3"})
"""Adapters whose weights can be folded into the base (prefix and prompt tuning add inputs instead)."""
VIRTUAL_TOKEN_METHODS = frozenset({"prefix-tuning", "prompt-tuning"})
"""Adapters adding learned virtual tokens to every sequence (training.packing cannot keep them apart)."""
Executor = Literal["kfp", "local"]
PiiCurationMode = Literal["redact", "drop", "fail", "off"]
"""What dataset curation does with an example that holds personal data."""
REPLAY_RATIO = DecimalRange(0, 10, above_minimum=True)
PREFERENCE_BETA = DecimalRange(0, 100, above_minimum=True)
KTO_WEIGHT = DecimalRange(0, 100, above_minimum=True)
DISTILLATION_TEMPERATURE = DecimalRange(0, 100, above_minimum=True)
REFERENCE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Target = Literal["cpu", "gpu"]
"""Where a job's steps run (FineTuneJob) or its model is served (QuantizeJob)."""
DistributedStrategy = Literal["ddp", "fsdp"]
QUANTIZED_TRAINING_TARGETS: frozenset[str] = frozenset({"gpu"})
"""Targets QLoRA trains on: bitsandbytes' 4-bit kernels run on CUDA GPUs only."""


class Curation(KubeModel):
    """Dataset curation applied before the split."""

    dedupe: bool = Field(
        default=True, description="Drop exact duplicate examples (after whitespace normalisation)."
    )
    min_tokens: int = Field(default=1, ge=0, description="Drop examples shorter than this many tokens.")
    max_tokens: int = Field(
        default=2048, ge=1, le=1_048_576, description="Drop examples longer than this many tokens."
    )
    pii: PiiCurationMode = Field(
        default="off",
        description="Personal data (e-mail addresses, phone numbers, card numbers, IBANs, US SSNs, IP "
        "addresses, found by Presidio) in the examples: redact replaces each with <ENTITY>, drop removes "
        "the example, fail stops the job naming the first line and entity, off leaves the text as it is. "
        "The curation report and the published manifest count them per entity.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Curation:
        if self.min_tokens > self.max_tokens:
            raise ValueError("minTokens must not exceed maxTokens")
        return self


class Dataset(KubeModel):
    """Training data: JSON Lines, one example per line."""

    uri: str = Field(
        min_length=1,
        description="JSONL file: a plain path, `file://`, `pvc://claim/path`, or any fsspec URL (`s3://`, `gs://`).",
    )
    format: DatasetFormat = Field(
        default="instruction",
        description=(
            "`text`: {text}; `instruction`: {instruction, input?, output}; "
            "`chat`: {messages: [{role, content}]}; `preference` (method dpo): {prompt, chosen, rejected}; "
            "`feedback` (method kto): {prompt, completion, label: boolean}. In the last two a prompt is a "
            "string used as it is or a message list rendered by the chat template, a completion a string "
            "or [{role: assistant, content}]. Loss is masked to the response for all but text."
        ),
    )
    validation_split: RatioString = Field(
        default="0.1",
        description="Share of curated examples held out for evaluation: above 0 and below 1 when "
        "validationUri is not set.",
    )
    validation_uri: str | None = Field(
        default=None, description="A separate held-out JSONL file; when set, validationSplit is ignored."
    )
    seed: int = Field(default=42, ge=0, description="Seed of the deterministic split.")
    curation: Curation = Field(default_factory=Curation)

    @model_validator(mode="wrap")
    @classmethod
    def _something_held_out(cls, data: Any, handler: ModelWrapValidatorHandler[Dataset]) -> Dataset:
        return validate_with_rules(data, handler, _split_rule_broken)


def _split_rule_broken(dataset: object) -> list[BrokenRule]:
    """Evaluation needs held-out examples, and training needs some left: both come from the split unless
    a validationUri is given."""
    split = read_field(dataset, "validationSplit")
    if read_field(dataset, "validationUri") is not None or not isinstance(split, str):
        return []
    try:
        share = as_float(split)
    except ArithmeticError:
        return []  # not a number: the field's own error says so
    if not 0 <= share <= 1:
        return []  # not a ratio: the field's own error says so
    if share == 0:
        message = f"must be above 0 when validationUri is not set (got {json.dumps(split)})"
    elif share == 1:
        message = (
            "must be below 1 when validationUri is not set, to leave examples to train on "
            f"(got {json.dumps(split)})"
        )
    else:
        return []
    return [BrokenRule(message, ("validationSplit",))]


class LoraQuantization(KubeModel):
    """QLoRA: the frozen base weights are loaded quantized by bitsandbytes; the adapter trains in full
    precision on top of them."""

    bits: Literal[4] = Field(default=4, description="Bits per base weight; 4 (QLoRA).")
    type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="The 4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4."
    )


class LoraOptions(KubeModel):
    """Options of lora: low-rank update matrices beside the frozen weights."""

    r: int = Field(default=8, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(default=16, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: RatioString = Field(default="0.05", description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names to adapt; empty means the PEFT defaults for the architecture.",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling (alpha / sqrt(r)).")
    quantization: LoraQuantization | None = Field(
        default=None,
        description="Load the frozen base in 4 bits and train the adapter on it (QLoRA, bitsandbytes); "
        "needs target gpu.",
    )


class VirtualTokenOptions(KubeModel):
    """Options of prefix-tuning: learned virtual tokens prepended to every layer's keys and values."""

    num_virtual_tokens: int = Field(
        default=16, ge=1, le=1024, description="Number of virtual tokens learned."
    )


class PromptTuningOptions(VirtualTokenOptions):
    """Options of prompt-tuning: learned virtual tokens prepended to the input embeddings."""

    init_text: str | None = Field(
        default=None, description="Initialise the prompt from this text instead of randomly."
    )


class Ia3Options(KubeModel):
    """Options of ia3: learned vectors that rescale activations."""

    target_modules: list[str] = Field(
        default_factory=list, description="Modules whose activations are scaled."
    )
    feedforward_modules: list[str] = Field(
        default_factory=list, description="Subset of targetModules that are feed-forward layers."
    )


class FullOptions(KubeModel):
    """Options of full: every weight of the model is trained."""

    freeze_embeddings: bool = Field(default=False, description="Keep the embedding matrices frozen.")


class FineTuneJobRef(KubeModel):
    """A FineTuneJob whose published model is the source."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="A FineTuneJob in the same namespace.",
    )


class DistillationTeacher(KubeModel):
    """The teacher model: a FineTuneJob's published output, or any model URI. It must share the student's
    tokenizer (baseModel's), or the job is refused naming both."""

    fine_tune_job_ref: FineTuneJobRef | None = Field(
        default=None, description="Wait for this FineTuneJob to succeed and distil the model it published."
    )
    uri: str | None = Field(
        default=None, pattern=MODEL_URI_PATTERN, description="A model URI, as baseModel.uri."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DistillationTeacher:
        if (self.fine_tune_job_ref is None) == (self.uri is None):
            raise ValueError("set exactly one of fineTuneJobRef and uri")
        return self


class DistillationOptions(KubeModel):
    """Options of distillation: the student (baseModel, all of its weights trained) learns from the
    teacher's next-token distributions on the response tokens. Per token the loss is
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the labels, where _T
    is the softmax at temperature T."""

    teacher: DistillationTeacher = Field(description="The larger model whose distributions are learnt.")
    temperature: Annotated[DecimalString, DISTILLATION_TEMPERATURE] = Field(
        default="2.0",
        description="Softmax temperature T of both models in the KL term (above 1 softens the teacher's "
        "distribution, showing more of what it ranks second); the term is scaled by T^2.",
    )
    alpha: RatioString = Field(
        default="0.5",
        description="Weight of the distillation (KL) term; 1 - alpha weighs the labels' cross-entropy.",
    )


class PreferenceOptions(KubeModel):
    """Options shared by dpo and kto: which weights learn, and how far from the base model they may move.
    The reference model of both losses is the base model: with weights lora, the same model with the
    adapter disabled (no second copy); with weights full, a frozen copy of the base."""

    weights: Literal["lora", "full"] = Field(
        default="lora",
        description="What trains: lora (an adapter on the frozen base, options in lora) or full (every "
        "weight, with a frozen copy of the base as the reference model).",
    )
    lora: LoraOptions | None = Field(
        default=None,
        description="The adapter's options, as method.lora's (without quantization); only with weights lora.",
    )
    beta: Annotated[DecimalString, PREFERENCE_BETA] = Field(
        default="0.1",
        description="How strongly the loss holds the tuned model to the reference (TRL's beta, default "
        "0.1): larger stays closer to the base model.",
    )

    @model_validator(mode="after")
    def _adapter_options(self) -> PreferenceOptions:
        if self.lora is not None and self.weights != "lora":
            raise ValueError(f"lora is set but weights is {self.weights!r}; it needs weights lora")
        if self.lora is not None and self.lora.quantization is not None:
            raise ValueError("lora.quantization: 4-bit bases are not supported with preference tuning")
        return self


class DpoOptions(PreferenceOptions):
    """Options of dpo (Direct Preference Optimization, TRL's sigmoid loss): on rows {prompt, chosen,
    rejected} the model learns to raise chosen's log-probability over rejected's, relative to the base."""


class KtoOptions(PreferenceOptions):
    """Options of kto (Kahneman-Tversky Optimization, TRL's loss): on rows {prompt, completion, label}
    desirable completions (label true) are made likelier and undesirable ones less likely, relative to
    the base and to a KL estimate from mismatched prompt/completion pairs of the same micro-batch."""

    desirable_weight: Annotated[DecimalString, KTO_WEIGHT] = Field(
        default="1.0",
        description="Weight of the desirable rows' losses (TRL's desirable_weight); raise it when they are "
        "fewer than the undesirable ones.",
    )
    undesirable_weight: Annotated[DecimalString, KTO_WEIGHT] = Field(
        default="1.0", description="Weight of the undesirable rows' losses (TRL's undesirable_weight)."
    )


class Method(KubeModel):
    """The adaptation method. `type` names it; the block of the same name holds its options.

    Only the block named by `type` may be set, and it is optional: left out, the method runs with its
    defaults (except distillation's, which names the teacher). Setting another method's block is an error.
    """

    type: MethodType = Field(
        default="lora",
        description="lora, prefix-tuning, prompt-tuning, ia3 (adapters), full (all weights), "
        "distillation (all weights, learning from a teacher model), dpo (pairs of a chosen and a "
        "rejected completion, dataset.format preference) or kto (completions labelled desirable or not, "
        "dataset.format feedback).",
    )
    lora: LoraOptions | None = Field(default=None, description="Only with type lora.")
    prefix_tuning: VirtualTokenOptions | None = Field(
        default=None, description="Only with type prefix-tuning."
    )
    prompt_tuning: PromptTuningOptions | None = Field(
        default=None, description="Only with type prompt-tuning."
    )
    ia3: Ia3Options | None = Field(default=None, description="Only with type ia3.")
    full: FullOptions | None = Field(default=None, description="Only with type full.")
    distillation: DistillationOptions | None = Field(
        default=None, description="Only with type distillation, and required with it (it names the teacher)."
    )
    dpo: DpoOptions | None = Field(default=None, description="Only with type dpo.")
    kto: KtoOptions | None = Field(default=None, description="Only with type kto.")

    @model_validator(mode="after")
    def _own_block_only(self) -> Method:
        wanted = METHOD_BLOCKS[self.type]
        for method_type, block in METHOD_BLOCKS.items():
            attr = _snake(block)
            present = getattr(self, attr) is not None
            if method_type == self.type and not present:
                if block in BLOCKS_REQUIRED:
                    raise ValueError(f"type {self.type} needs {block} ({BLOCKS_REQUIRED[block]})")
                # A missing block means "the defaults": fill it so downstream code sees the options.
                setattr(self, attr, _BLOCK_TYPES[block]())
            elif method_type != self.type and present:
                raise ValueError(f"{block} is set but type is {self.type!r}; only {wanted} may be set")
        return self

    def options(self) -> KubeModel:
        value = getattr(self, _snake(METHOD_BLOCKS[self.type]))
        assert isinstance(value, KubeModel)
        return value

    @property
    def block(self) -> str:
        """The wire name of the options block, for messages that point at it (e.g. `prefixTuning`)."""
        return METHOD_BLOCKS[self.type]

    @property
    def is_peft(self) -> bool:
        return self.type in PEFT_METHODS

    @property
    def preference(self) -> PreferenceOptions | None:
        """The options of dpo or kto; None for the other methods."""
        options = self.dpo if self.type == "dpo" else self.kto if self.type == "kto" else None
        return options

    @property
    def trains_adapter(self) -> bool:
        """Whether training produces a PEFT adapter (on the frozen base) rather than whole weights."""
        preference = self.preference
        return self.is_peft or (preference is not None and preference.weights == "lora")


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


_BLOCK_TYPES: dict[str, type[KubeModel]] = {
    "lora": LoraOptions,
    "prefixTuning": VirtualTokenOptions,
    "promptTuning": PromptTuningOptions,
    "ia3": Ia3Options,
    "full": FullOptions,
    "distillation": DistillationOptions,
    "dpo": DpoOptions,
    "kto": KtoOptions,
}


class Scheduler(KubeModel):
    """The learning-rate schedule: warm up, then decay to 0 (linear, cosine) or hold (constant)."""

    type: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="Shape of the decay after warm-up: linear, cosine or constant."
    )
    warmup_ratio: RatioString | None = Field(default=None, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warm-up steps; overrides warmupRatio.")


CheckpointMetric = Literal["evalLoss", "perplexity", "exactMatch"]
LOWER_IS_BETTER: frozenset[str] = frozenset({"evalLoss", "perplexity"})
"""Metrics where a smaller value is better (the others: larger)."""


def reference_drop(metric: str, baseline: float | None, final: float | None) -> float | None:
    """What tuning lost on a reference set (evaluation.maxReferenceDrop bounds it): the relative increase
    of perplexity, (final - baseline) / baseline, or the fall of exactMatch, baseline - final."""
    if baseline is None or final is None or not math.isfinite(baseline) or not math.isfinite(final):
        return None
    if metric == "perplexity":
        return (final - baseline) / baseline if baseline > 0 else None
    return baseline - final


class EarlyStopping(KubeModel):
    """Stop training once the periodic evaluations stop improving."""

    metric: CheckpointMetric = Field(
        default="evalLoss",
        description="The validation metric watched: evalLoss, perplexity (lower is better) or exactMatch.",
    )
    patience: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Evaluations in a row without a new best value after which training stops.",
    )


class Replay(KubeModel):
    """Examples of another dataset mixed into the training set, drawn with training.seed."""

    uri: str = Field(
        min_length=1,
        description="JSONL file of the examples to replay: a plain path, `file://`, `pvc://` or fsspec URL.",
    )
    format: DatasetFormat = Field(
        default="text", description="Format of the replay file: text, instruction or chat."
    )
    ratio: Annotated[DecimalString, REPLAY_RATIO] = Field(
        default="0.25",
        description="Replay examples added per training example (0.25: one for every four); the file's "
        "examples are drawn in a seeded order and repeated when it holds fewer.",
    )


class Distributed(KubeModel):
    """Training in several processes with one global batch: torchrun on this machine (gloo on CPU), a
    Kubeflow Trainer TrainJob (torch-distributed runtime) on a cluster.

    Each process takes its share of every optimizer step's micro-batches, so a step covers
    batchSize x gradientAccumulationSteps x workers x processesPerWorker examples, in the same order as
    one process with that many accumulation steps."""

    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Machines (TrainJob nodes); locally their processes all run on this machine.",
    )
    processes_per_worker: int = Field(
        default=1, ge=1, le=64, description="Training processes per worker, one per GPU on a gpu target."
    )
    strategy: DistributedStrategy = Field(
        default="ddp",
        description="ddp: every process holds the whole model and gradients are averaged; fsdp: the "
        "weights are sharded across processes (full fine-tuning of a model that does not fit one device).",
    )

    @property
    def world_size(self) -> int:
        return self.workers * self.processes_per_worker


class Training(KubeModel):
    """How long and how the model is trained: length, batch, optimizer, precision and checkpoints."""

    epochs: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Passes over the training set; when neither epochs nor maxSteps is set, one epoch runs.",
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps to run; overrides epochs when both are set."
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    learning_rate: DecimalString = Field(default="2e-4", description="Peak learning rate.")
    weight_decay: DecimalString = Field(default="0", description="AdamW weight decay.")
    max_grad_norm: DecimalString = Field(default="1.0", description="Gradient clipping norm; 0 disables.")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision; fp16 needs a GPU."
    )
    seed: int = Field(default=42, ge=0, description="Seed of initialisation, shuffling and dropout.")
    max_seq_length: int = Field(default=512, ge=8, le=1_048_576, description="Longer examples are truncated.")
    packing: bool = Field(
        default=False,
        description="Pack several examples into each sequence of up to maxSeqLength tokens, so no compute "
        "goes to padding; each example attends only to itself (position ids restart per example) and trains "
        "as it would alone. A micro-batch then holds batchSize packed sequences. Not with prefix or prompt "
        "tuning.",
    )
    checkpoint_every_steps: int = Field(
        default=100, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Checkpoints kept on disk (the newest ones; with output.select best, the best one too).",
    )
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate on the validation split every N optimizer steps (and at the last step), "
        "saving a checkpoint each time; status.checkpoints lists them. Needs held-out examples.",
    )
    early_stopping: EarlyStopping | None = Field(
        default=None,
        description="Stop when a metric of the periodic evaluations stops improving; needs evalEverySteps.",
    )
    replay: Replay | None = Field(
        default=None,
        description="Mix examples of another dataset (e.g. text like the base model's pretraining data) "
        "into training, against forgetting.",
    )
    distributed: Distributed | None = Field(
        default=None,
        description="Train in several processes (torchrun locally, a Kubeflow Trainer TrainJob on a "
        "cluster); unset, one process trains.",
    )

    @model_validator(mode="after")
    def _length(self) -> Training:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


GateMetric = Literal["evalLoss", "perplexity", "exactMatch", "preferenceAccuracy"]
_DEFAULT_METRICS: tuple[GateMetric, ...] = ("evalLoss", "perplexity", "exactMatch")


class GateBounds(KubeModel):
    """The bounds of a gate: at least one of min, max and minImprovement."""

    min: DecimalString | None = Field(default=None, description="The metric must be at least this.")
    max: DecimalString | None = Field(default=None, description="The metric must be at most this.")
    min_improvement: DecimalString | None = Field(
        default=None,
        description=(
            "The metric must beat the base model by at least this (lower for losses, higher for exactMatch "
            "and scores)."
        ),
    )

    @model_validator(mode="after")
    def _one_bound(self) -> GateBounds:
        if self.min is None and self.max is None and self.min_improvement is None:
            raise ValueError("a gate needs min, max or minImprovement")
        return self

    def bounds(self) -> list[tuple[GateOp, float]]:
        """The bounds that are set, in the order gates.json lists them."""
        set_bounds: list[tuple[GateOp, str | None]] = [
            ("min", self.min),
            ("max", self.max),
            ("minImprovement", self.min_improvement),
        ]
        return [(op, as_float(threshold)) for op, threshold in set_bounds if threshold is not None]


class Gate(GateBounds):
    """A threshold the tuned model must meet before it is published."""

    metric: GateMetric = Field(
        description="The held-out metric checked: evalLoss, perplexity, exactMatch or preferenceAccuracy."
    )


DEFAULT_COUNTERFACTUAL_TERMS: tuple[tuple[str, str], ...] = (
    ("he", "she"),
    ("his", "her"),
    ("him", "her"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("father", "mother"),
    ("son", "daughter"),
    ("husband", "wife"),
    ("brother", "sister"),
    ("mr", "ms"),
)
"""Demographic term pairs swapped by default (gender terms, the ones most prompts carry)."""

TermPair = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w' -]+$")]],
    Field(min_length=2, max_length=2),
]


class Fairness(KubeModel):
    """Counterfactual fairness: each held-out prompt holding a listed term is asked again with the term
    swapped for its counterpart; the model should answer both alike."""

    term_pairs: list[TermPair] = Field(
        default_factory=lambda: [list(pair) for pair in DEFAULT_COUNTERFACTUAL_TERMS],
        min_length=1,
        max_length=256,
        description="Pairs of terms [group A, group B] swapped both ways as whole words, case kept (a term "
        "in several pairs swaps to its first counterpart); the defaults are gender terms.",
    )
    max_samples: int = Field(
        default=100, ge=1, le=10000, description="Counterfactual pairs generated at most per model."
    )
    max_counterfactual_flip_rate: RatioString | None = Field(
        default=None,
        description="Gate: the share of pairs the tuned model answers differently may be at most this; "
        "unset: measured and reported, not gated.",
    )


MAX_FOLDS = 20
CROSS_VALIDATION_NOT_DISTRIBUTED = (
    "each fold trains on one machine in its own pipeline task; drop training.distributed, or cross-validate "
    "without it"
)
"""Why evaluation.crossValidation refuses training.distributed (kubetune validate and the CRD's CEL rule)."""


class CrossValidation(KubeModel):
    """k-fold cross-validation: the curated training examples are dealt into `folds` parts (shuffled with
    dataset.seed); each fold trains the job's recipe on the other parts and evaluates on its own."""

    folds: int = Field(
        ge=2,
        le=MAX_FOLDS,
        description="How many parts (k); each fold holds one out. At most as many as the curated training "
        "examples, which curation checks.",
    )

    def fold_indices(self) -> list[int]:
        """The folds, as the pipeline fans out over them."""
        return list(range(self.folds))


HARNESS_TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
HARNESS_METRIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.,-]*$"
HARNESS_TASKS_UNIQUE = "task names must be unique"
HARNESS_GATE_TASK_UNKNOWN = "a gate's task must be one of evaluation.harness.tasks"


class HarnessTask(KubeModel):
    """An lm-evaluation-harness task defined by a task YAML that comes with the job."""

    name: str = Field(
        max_length=128,
        pattern=HARNESS_TASK_NAME_PATTERN,
        description="The task's name, as the `task:` key of its YAML says.",
    )
    uri: str = Field(
        min_length=1,
        description="The task YAML, or a directory of task YAMLs (not searched below it), with the data "
        "files they name: a plain path, `file://` or `pvc://claim/path`. Data must be local (dataset_path "
        "json, csv, parquet, arrow or text with dataset_kwargs.data_files, read next to the YAML): "
        "nothing is downloaded.",
    )


class HarnessGate(GateBounds):
    """A bound on one score of a harness task, checked on the tuned model like evaluation.gates."""

    task: str = Field(max_length=128, description="The task (one of evaluation.harness.tasks[].name).")
    metric: str = Field(
        max_length=128,
        pattern=HARNESS_METRIC_PATTERN,
        description="The task's metric as lm-eval reports it (e.g. acc, acc_norm, exact_match); with a "
        "filter other than none, `metric,filter` (e.g. exact_match,strict-match).",
    )


class Harness(KubeModel):
    """lm-evaluation-harness tasks scored on the base and on the tuned model."""

    tasks: list[HarnessTask] = Field(
        min_length=1, max_length=32, description="The tasks, each defined by a local task YAML."
    )
    gates: list[HarnessGate] = Field(
        default_factory=list,
        max_length=64,
        description="Bounds on the tuned model's task scores; any failure publishes nothing.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _names_resolve(cls, data: Any, handler: ModelWrapValidatorHandler[Harness]) -> Harness:
        return validate_with_rules(data, handler, _harness_rules_broken)


def _harness_rules_broken(harness: object) -> list[BrokenRule]:
    """Task names are unique, and every gate names one of them."""
    tasks = read_field(harness, "tasks")
    tasks = tasks if isinstance(tasks, list) else []
    names = [name for task in tasks if isinstance(name := read_field(task, "name"), str)]
    broken: list[BrokenRule] = []
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        listed = ", ".join(repr(name) for name in duplicates)
        broken.append(BrokenRule(f"{HARNESS_TASKS_UNIQUE} (duplicate {listed})", ("tasks",)))
    gates = read_field(harness, "gates")
    gated = [read_field(gate, "task") for gate in (gates if isinstance(gates, list) else [])]
    unknown = [task for task in dict.fromkeys(t for t in gated if isinstance(t, str)) if task not in names]
    if unknown:
        listed = ", ".join(repr(task) for task in unknown)
        broken.append(BrokenRule(f"{HARNESS_GATE_TASK_UNKNOWN} (not {listed})", ("gates",)))
    return broken


class Evaluation(KubeModel):
    """How the base and the tuned model are measured on the held-out examples, and the gates they face."""

    metrics: list[GateMetric] = Field(
        default_factory=lambda: list(_DEFAULT_METRICS),
        description="Metrics computed on the held-out split for the base and the tuned model.",
    )
    max_new_tokens: int = Field(default=32, ge=1, le=4096, description="Generation budget for exactMatch.")
    max_samples: int = Field(default=200, ge=1, description="Held-out examples used for generation metrics.")
    gates: list[Gate] = Field(
        default_factory=list,
        description="Thresholds the tuned model must meet; any failure publishes nothing.",
    )
    reference: list[ReferenceSet] = Field(
        default_factory=list,
        max_length=16,
        description="Held-out sets of what the base model could already do, evaluated on the base and the "
        "tuned model to show what tuning made it forget.",
    )
    max_reference_drop: DecimalString | None = Field(
        default=None,
        description="Gate on every reference set: its perplexity may rise by at most this share of the "
        "base model's (0.1: 10%), its exactMatch fall by at most this much (0.02: 2 points).",
    )
    fairness: Fairness | None = Field(
        default=None,
        description="Counterfactual fairness of the base and the tuned model on the held-out prompts.",
    )
    harness: Harness | None = Field(
        default=None,
        description="lm-evaluation-harness tasks, defined locally, scored on the base and the tuned model "
        "(at most maxSamples documents each); their scores can be gated.",
    )
    cross_validation: CrossValidation | None = Field(
        default=None,
        description="k-fold cross-validation of the training recipe on the curated training examples, "
        "besides the published model (which trains on all of them).",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _reference_rules(cls, data: Any, handler: ModelWrapValidatorHandler[Evaluation]) -> Evaluation:
        return validate_with_rules(data, handler, _reference_rules_broken)


def _reference_rules_broken(evaluation: object) -> list[BrokenRule]:
    """A drop limit needs reference sets to limit, and each reference set needs its own name."""
    references = read_field(evaluation, "reference")
    references = references if isinstance(references, list) else []
    broken: list[BrokenRule] = []
    if read_field(evaluation, "maxReferenceDrop") is not None and not references:
        broken.append(
            BrokenRule("needs at least one set in evaluation.reference to apply to", ("maxReferenceDrop",))
        )
    names = [name for reference in references if isinstance(name := read_field(reference, "name"), str)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        listed = ", ".join(repr(name) for name in duplicates)
        broken.append(BrokenRule(f"reference names must be unique (duplicate {listed})", ("reference",)))
    return broken


class ReferenceSet(KubeModel):
    """A held-out set of what the base model could already do, scored on the base and the tuned model."""

    name: str = Field(
        max_length=63,
        pattern=REFERENCE_NAME_PATTERN,
        description="Names the set in status and in gates (a DNS label, e.g. `general-text`).",
    )
    uri: str = Field(
        min_length=1,
        description="JSONL file of the set: a plain path, `file://`, `pvc://claim/path` or fsspec URL.",
    )
    format: DatasetFormat = Field(
        default="text", description="Format of the file: text, instruction or chat (as dataset.format)."
    )
    metric: Literal["perplexity", "exactMatch"] = Field(
        default="perplexity",
        description="perplexity (of the whole text, or of the responses), or exactMatch of greedy "
        "responses (instruction and chat only), on at most evaluation.maxSamples examples.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _metric_fits_format(cls, data: Any, handler: ModelWrapValidatorHandler[ReferenceSet]) -> ReferenceSet:
        return validate_with_rules(data, handler, _reference_metric_rule_broken)


def _reference_metric_rule_broken(reference: object) -> list[BrokenRule]:
    fmt = read_field(reference, "format")
    if read_field(reference, "metric") == "exactMatch" and fmt in (None, "text"):
        return [BrokenRule("exactMatch needs responses to compare: format instruction or chat", ("metric",))]
    return []


CheckpointSelection = Literal["best", "last"]


class ModelCard(KubeModel):
    """What the published model card (MODEL_CARD.md, model-card.json) says beyond the manifest."""

    intended_use: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="What the model is for and who should use it; the card says 'not stated' when unset.",
    )
    out_of_scope_use: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Uses the model is not meant or fit for."
    )
    limitations: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list,
        max_length=32,
        description="Known limitations, listed on the card before the ones kubetune adds itself.",
    )


class Output(KubeModel):
    """Where and in which form the tuned model is published."""

    uri: str | None = Field(
        default=None,
        description="Artifact store prefix the model is published under; defaults to the operator's store.",
    )
    merge_adapter: bool = Field(
        default=False, description="Merge LoRA/IA3 weights into the base and publish full weights."
    )
    select: CheckpointSelection = Field(
        default="last",
        description="Which weights are published: those after the last step, or the checkpoint that "
        "scored best on selectMetric in the periodic evaluations (best needs training.evalEverySteps).",
    )
    select_metric: CheckpointMetric = Field(
        default="evalLoss",
        description="The validation metric that picks the best checkpoint: evalLoss, perplexity (lower "
        "is better) or exactMatch (higher is better).",
    )


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""The label by which Kueue puts a workload (pod, TrainJob) in a LocalQueue."""
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
"""The label naming a workload's Kueue WorkloadPriorityClass."""


def trainjob_name(job_name: str, workspace: str) -> str:
    """The Kubeflow Trainer TrainJob of a run's distributed training: ``train-<job name>-<hash of the
    run's workspace>``, one per run and an RFC 1035 label (the Trainer's rule for TrainJob names). The
    finetune step creates it under this name; the operator names it in status.pipelineRun.trainJob."""
    digest = hashlib.sha256(workspace.encode()).hexdigest()[:8]
    return f"train-{job_name[:44].rstrip('-')}-{digest}"


class Scheduling(KubeModel):
    """How the job's pods queue for shared capacity (Kueue) and how they rank in the queue."""

    queue_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kueue LocalQueue in the job's namespace: set as the kueue.x-k8s.io/queue-name label "
        "on the pipeline's pods and the TrainJob, so they wait for quota instead of failing.",
    )
    priority_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Kueue WorkloadPriorityClass of the pipeline's pods and the TrainJob (their "
        "kueue.x-k8s.io/priority-class label): Kueue orders its queue and preempts by it.",
    )


class FineTuneJobSpec(KubeModel):
    """Desired state of the FineTuneJob: what to tune, on what data, how, and where to publish it."""

    base_model: ModelSource
    dataset: Dataset
    method: Method = Field(default_factory=Method)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)
    model_card: ModelCard = Field(
        default_factory=ModelCard, description="Intended use and limitations for the published model card."
    )
    executor: Executor | None = Field(
        default=None, description="Where the pipeline runs; defaults to the operator's setting."
    )
    target: Target = Field(
        default="cpu",
        description="What the training runs on: cpu, or gpu (one GPU per training process; needed by "
        "method.lora.quantization).",
    )
    scheduling: Scheduling | None = Field(
        default=None, description="Kueue queue and priority of the job's pods; unset, they are not queued."
    )

    @model_validator(mode="wrap")
    @classmethod
    def _fits_target_and_strategy(
        cls, data: Any, handler: ModelWrapValidatorHandler[FineTuneJobSpec]
    ) -> FineTuneJobSpec:
        return validate_with_rules(data, handler, _training_rules_broken)

    @model_validator(mode="after")
    def _mergeable(self) -> FineTuneJobSpec:
        if self.output.merge_adapter and self.method.is_peft and self.method.type not in MERGEABLE_METHODS:
            raise ValueError(
                f"output.mergeAdapter: a {self.method.type} adapter cannot be merged into the base weights; "
                "only lora and ia3 can"
            )
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _format_fits_method(
        cls, data: Any, handler: ModelWrapValidatorHandler[FineTuneJobSpec]
    ) -> FineTuneJobSpec:
        return validate_with_rules(data, handler, _preference_rules_broken)

    @model_validator(mode="wrap")
    @classmethod
    def _periodic_evaluation(
        cls, data: Any, handler: ModelWrapValidatorHandler[FineTuneJobSpec]
    ) -> FineTuneJobSpec:
        return validate_with_rules(data, handler, _periodic_evaluation_rules_broken)

    @model_validator(mode="wrap")
    @classmethod
    def _cross_validation(
        cls, data: Any, handler: ModelWrapValidatorHandler[FineTuneJobSpec]
    ) -> FineTuneJobSpec:
        return validate_with_rules(data, handler, _cross_validation_rules_broken)


def _cross_validation_rules_broken(spec: object) -> list[BrokenRule]:
    """Each fold trains in its own pipeline task on one machine; a job spread over several would need a
    TrainJob per fold."""
    cross_validation = read_field(read_field(spec, "evaluation"), "crossValidation")
    distributed = read_field(read_field(spec, "training"), "distributed")
    if cross_validation is not None and distributed is not None:
        return [BrokenRule(CROSS_VALIDATION_NOT_DISTRIBUTED, ("evaluation", "crossValidation"))]
    return []


def _preference_rules_broken(spec: object) -> list[BrokenRule]:
    """dpo trains on preference rows and kto on feedback rows, and those rows train nothing else; their
    pairs are not sequences to pack, and replayed plain examples have no pairs; preferenceAccuracy scores
    pairs, which only those formats hold."""
    method_type = read_field(read_field(spec, "method"), "type") or "lora"
    dataset = read_field(spec, "dataset")
    fmt = read_field(dataset, "format") or "instruction"
    training = read_field(spec, "training")
    broken: list[BrokenRule] = []
    if not isinstance(method_type, str) or not isinstance(fmt, str):
        return broken  # their own field errors say what is wrong
    wanted = PREFERENCE_FORMATS.get(method_type)
    if wanted is not None and fmt != wanted:
        broken.append(
            BrokenRule(
                f"method.type {method_type} trains on format {wanted}, not {fmt}", ("dataset", "format")
            )
        )
    trainers = [method for method, its_format in PREFERENCE_FORMATS.items() if its_format == fmt]
    if trainers and method_type not in trainers:
        broken.append(
            BrokenRule(
                f"dataset.format {fmt} trains with method {trainers[0]}, not {method_type}",
                ("method", "type"),
            )
        )
    if wanted is not None and read_field(training, "packing") is True:
        broken.append(
            BrokenRule(
                f"{method_type} compares whole completions; it cannot pack them", ("training", "packing")
            )
        )
    if wanted is not None and read_field(training, "replay") is not None:
        broken.append(
            BrokenRule(
                f"{method_type} learns from {wanted} rows; replayed examples have none",
                ("training", "replay"),
            )
        )
    metrics = read_field(read_field(spec, "evaluation"), "metrics")
    if (
        isinstance(metrics, list)
        and "preferenceAccuracy" in metrics
        and fmt not in PREFERENCE_FORMATS.values()
    ):
        broken.append(
            BrokenRule(
                f"preferenceAccuracy needs dataset.format preference or feedback, not {fmt}",
                ("evaluation", "metrics"),
            )
        )
    return broken


def _periodic_evaluation_rules_broken(spec: object) -> list[BrokenRule]:
    """Choosing the best checkpoint and stopping early both judge periodic evaluations: they need
    training.evalEverySteps, and a metric those evaluations compute."""
    training, output, evaluation = (read_field(spec, name) for name in ("training", "output", "evaluation"))
    eval_every = read_field(training, "evalEverySteps")
    metrics = read_field(evaluation, "metrics")
    # Raw input while some field is invalid: read only what can be read.
    listed = metrics if isinstance(metrics, list) else list(_DEFAULT_METRICS)
    computed = {metric for metric in listed if isinstance(metric, str)}
    broken: list[BrokenRule] = []
    if read_field(output, "select") == "best":
        if eval_every is None:
            broken.append(BrokenRule("best needs training.evalEverySteps", ("output", "select")))
        metric = read_field(output, "selectMetric")
        if metric == "exactMatch" and "exactMatch" not in computed:
            broken.append(BrokenRule("exactMatch is not in evaluation.metrics", ("output", "selectMetric")))
    early = read_field(training, "earlyStopping")
    if early is not None:
        if eval_every is None:
            broken.append(BrokenRule("needs training.evalEverySteps", ("training", "earlyStopping")))
        if read_field(early, "metric") == "exactMatch" and "exactMatch" not in computed:
            broken.append(
                BrokenRule("exactMatch is not in evaluation.metrics", ("training", "earlyStopping", "metric"))
            )
    return broken


FSDP_WITHOUT_PERIODIC_EVALUATION = (
    "fsdp does not run the periodic evaluations of training.evalEverySteps (they read whole weights); "
    "use ddp or unset evalEverySteps"
)


def _training_rules_broken(spec: object) -> list[BrokenRule]:
    """QLoRA needs a GPU target; FSDP shards the weights of full fine-tuning only; packing needs real
    tokens only (no virtual ones)."""
    broken: list[BrokenRule] = []
    method = read_field(spec, "method")
    lora = read_field(method, "lora")
    quantization = read_field(lora, "quantization")
    target = read_field(spec, "target") or "cpu"
    # A target that is not even a string has its own field error; the rule judges valid targets only.
    if quantization is not None and isinstance(target, str) and target not in QUANTIZED_TRAINING_TARGETS:
        broken.append(
            BrokenRule(
                f"4-bit QLoRA (bitsandbytes) needs target gpu; target is {target}",
                ("method", "lora", "quantization"),
            )
        )
    strategy = read_field(read_field(read_field(spec, "training"), "distributed"), "strategy")
    method_type = read_field(method, "type") or "lora"
    if read_field(read_field(spec, "training"), "packing") is True and method_type in VIRTUAL_TOKEN_METHODS:
        broken.append(
            BrokenRule(
                "packing keeps examples apart by their position ids, which the virtual tokens of "
                f"{method_type} do not follow; use lora, ia3 or full",
                ("training", "packing"),
            )
        )
    if strategy == "fsdp" and isinstance(method_type, str) and method_type != "full":
        broken.append(
            BrokenRule(
                f"fsdp shards the weights of method full; a {method_type} adapter trains with ddp",
                ("training", "distributed", "strategy"),
            )
        )
    if strategy == "fsdp" and read_field(read_field(spec, "training"), "evalEverySteps") is not None:
        broken.append(BrokenRule(FSDP_WITHOUT_PERIODIC_EVALUATION, ("training", "distributed", "strategy")))
    return broken


class Progress(KubeModel):
    """How far training has come."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps the run will take.")
    epoch: float = Field(default=0.0, description="Passes over the training set done, fractional.")
    percent: int = Field(default=0, description="step / totalSteps, in percent.")
    resumed_from_step: int | None = Field(
        default=None,
        description="The checkpoint step this attempt resumed from after an interruption; unset for a run "
        "that started fresh.",
    )


class TrainMetrics(KubeModel):
    """The latest training metrics."""

    train_loss: float | None = Field(default=None, description="Training loss at the latest reported step.")
    learning_rate: float | None = Field(
        default=None, description="Learning rate at the latest reported step."
    )


class EvalMetrics(KubeModel):
    """Metrics on the held-out examples; a metric not computed is left out."""

    eval_loss: float | None = Field(default=None, description="Mean token cross-entropy loss.")
    perplexity: float | None = Field(default=None, description="exp(evalLoss).")
    exact_match: float | None = Field(
        default=None, description="Share of greedy generations equal to the reference (0 to 1)."
    )
    preference_accuracy: float | None = Field(
        default=None,
        description="Share of held-out pairs where the model gives the chosen (desirable) completion a "
        "higher log-probability than the rejected (undesirable) one (0 to 1); feedback rows pair up by "
        "prompt.",
    )
    lenient_match: float | None = Field(
        default=None,
        description=(
            "Share of greedy generations whose first line contains the reference as a whole word, "
            "ignoring case (0 to 1): credits a right answer in the wrong format, which exactMatch does not."
        ),
    )


class ReferenceBaselines(KubeModel):
    """Trivial predictors scored like exactMatch on the same held-out examples, to put the models' scores
    in context; both learn only from the training split."""

    majority_class: float | None = Field(
        default=None, description="Always answering the most common training response (0 to 1)."
    )
    nearest_neighbour: float | None = Field(
        default=None,
        description=(
            "Answering with the response of the training example whose prompt has the most similar "
            "word counts, by cosine (0 to 1)."
        ),
    )


class ReferenceResult(KubeModel):
    """One reference set's score on the base and on the tuned model."""

    name: str = Field(description="The reference set (evaluation.reference[].name).")
    metric: str = Field(description="perplexity or exactMatch.")
    baseline: float | None = Field(default=None, description="The base model's score.")
    final: float | None = Field(default=None, description="The tuned model's score.")
    drop: float | None = Field(
        default=None,
        description="What tuning lost: the relative perplexity increase (0.1: 10% higher), or the fall "
        "in exactMatch; negative when the tuned model does better.",
    )


class HarnessResult(KubeModel):
    """One score of an lm-evaluation-harness task on the base and on the tuned model."""

    task: str = Field(description="The task (evaluation.harness.tasks[].name).")
    metric: str = Field(description="The metric as lm-eval reports it (`metric` or `metric,filter`).")
    baseline: float | None = Field(default=None, description="The base model's score.")
    final: float | None = Field(default=None, description="The tuned model's score.")
    higher_is_better: bool = Field(default=True, description="Whether a higher score is better (lm-eval's).")
    samples: int | None = Field(default=None, description="Documents of the task scored.")


class CheckpointStatus(KubeModel):
    """A periodic evaluation during training, and the checkpoint saved with it."""

    step: int = Field(description="The optimizer step evaluated.")
    train_loss: float | None = Field(default=None, description="Training loss at that step.")
    metrics: EvalMetrics = Field(description="Metrics on the validation split at that step.")
    selected: bool = Field(
        default=False, description="Whether this checkpoint holds the published weights (output.select)."
    )


class FairnessResult(KubeModel):
    """One model's answers to counterfactual pairs of held-out prompts."""

    pairs: int = Field(description="Counterfactual pairs asked (prompts holding a listed term).")
    flip_rate: float | None = Field(
        default=None, description="Share of pairs answered differently (0 to 1); none without pairs."
    )
    score_gap: float | None = Field(
        default=None,
        description="exactMatch with the group-A terms minus exactMatch with the group-B terms, on the same "
        "prompts (instruction and chat data); positive: group A's prompts are answered right more often.",
    )


class FairnessStatus(KubeModel):
    """Counterfactual fairness of the base model and of the tuned one."""

    baseline: FairnessResult | None = Field(default=None, description="The base model before tuning.")
    final: FairnessResult | None = Field(default=None, description="The tuned model.")


class EvaluationStatus(KubeModel):
    """The held-out metrics of the base and the tuned model, and the verdict of each gate."""

    baseline: EvalMetrics | None = Field(default=None, description="The base model before tuning.")
    final: EvalMetrics | None = Field(default=None, description="The tuned model.")
    reference_baselines: ReferenceBaselines | None = Field(
        default=None, description="What trivial predictors score on the same held-out examples."
    )
    reference: list[ReferenceResult] = Field(
        default_factory=list, description="Each reference set's score before and after tuning."
    )
    fairness: FairnessStatus | None = Field(
        default=None, description="Counterfactual fairness before and after tuning (evaluation.fairness)."
    )
    harness: list[HarnessResult] = Field(
        default_factory=list,
        description="Each lm-evaluation-harness score before and after tuning (evaluation.harness).",
    )
    cross_validation: CrossValidationStatus | None = Field(
        default=None, description="The folds' held-out metrics (evaluation.crossValidation)."
    )
    gates: list[GateResult] = Field(default_factory=list, description="One result per bound of each gate.")


class FoldMetric(KubeModel):
    """One metric across the folds of a cross-validation."""

    mean: float = Field(description="Mean over the folds.")
    std: float = Field(description="Standard deviation over the folds (population: divided by k).")
    per_fold: list[float] = Field(description="Each fold's value on its held-out part, in fold order.")


class CrossValidationStatus(KubeModel):
    """What k-fold cross-validation measured: each model trained on k-1 parts, graded on the part left out."""

    folds: int = Field(description="How many folds were trained and evaluated.")
    metrics: dict[str, FoldMetric] = Field(
        default_factory=dict, description="Each held-out metric (evalLoss, exactMatch, ...) across the folds."
    )


class FineTuneJobStatus(KubeModel):
    """Observed state of the FineTuneJob, written by the operator."""

    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Succeeded (Unknown while pending or running, then True or False), with the kstatus "
        "conditions Ready, Reconciling and Stalled that follow from it.",
    )
    phase: str | None = Field(default=None, description="Short summary for printer columns.")
    start_time: str | None = Field(default=None, description="When the run started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the run ended (RFC 3339).")
    progress: Progress | None = None
    metrics: TrainMetrics | None = None
    evaluation: EvaluationStatus | None = None
    checkpoints: list[CheckpointStatus] = Field(
        default_factory=list,
        description="The periodic evaluations of training.evalEverySteps, oldest first; the selected one "
        "is what was published.",
    )
    early_stopped_at_step: int | None = Field(
        default=None, description="The step at which training.earlyStopping ended training, if it did."
    )
    output: OutputRef | None = None
    pipeline_run: PipelineRunRef | None = None


class FineTuneJob(KubeModel):
    model_config = KubeModel.model_config | {"extra": "ignore"}

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None
