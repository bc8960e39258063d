"""FineTuneJob (kubetune.dev/v1alpha1): adapt a base model to a domain."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from kubetune_contract.common import (
    BrokenRule,
    Condition,
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

DatasetFormat = Literal["text", "instruction", "chat"]
MethodType = Literal["lora", "prefix-tuning", "prompt-tuning", "ia3", "full"]
METHOD_BLOCKS: dict[str, str] = {
    "lora": "lora",
    "prefix-tuning": "prefixTuning",
    "prompt-tuning": "promptTuning",
    "ia3": "ia3",
    "full": "full",
}
PEFT_METHODS = frozenset({"lora", "prefix-tuning", "prompt-tuning", "ia3"})
"""Methods that train a PEFT adapter on a frozen base (the others train the weights themselves)."""
MERGEABLE_METHODS = frozenset({"lora", "ia3"})
"""Adapters whose weights can be folded into the base (prefix and prompt tuning add inputs instead)."""
Executor = Literal["kfp", "local"]


class Curation(KubeModel):
    """Dataset curation applied before the split."""

    dedupe: bool = Field(
        default=True, description="Drop exact duplicate examples (after whitespace normalisation)."
    )
    min_tokens: int = Field(default=1, ge=0, description="Drop examples shorter than this many tokens.")
    max_tokens: int = Field(
        default=2048, ge=1, le=1_048_576, description="Drop examples longer than this many tokens."
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
            "`chat`: {messages: [{role, content}]}. Loss is masked to the response for instruction and chat."
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


class Method(KubeModel):
    """The adaptation method. `type` names it; the block of the same name holds its options.

    Only the block named by `type` may be set, and it is optional: left out, the method runs with its
    defaults. Setting another method's block is an error.
    """

    type: MethodType = Field(
        default="lora",
        description="lora, prefix-tuning, prompt-tuning, ia3 (adapters) or full (all weights).",
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

    @model_validator(mode="after")
    def _own_block_only(self) -> Method:
        wanted = METHOD_BLOCKS[self.type]
        for method_type, block in METHOD_BLOCKS.items():
            attr = _snake(block)
            present = getattr(self, attr) is not None
            if method_type == self.type and not present:
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


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


_BLOCK_TYPES: dict[str, type[KubeModel]] = {
    "lora": LoraOptions,
    "prefixTuning": VirtualTokenOptions,
    "promptTuning": PromptTuningOptions,
    "ia3": Ia3Options,
    "full": FullOptions,
}


class Scheduler(KubeModel):
    """The learning-rate schedule: warm up, then decay to 0 (linear, cosine) or hold (constant)."""

    type: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="Shape of the decay after warm-up: linear, cosine or constant."
    )
    warmup_ratio: RatioString | None = Field(default=None, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warm-up steps; overrides warmupRatio.")


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
    checkpoint_every_steps: int = Field(
        default=100, ge=1, description="Save a resumable checkpoint every N optimizer steps."
    )
    keep_checkpoints: int = Field(default=2, ge=1, le=100, description="Checkpoints kept on disk.")

    @model_validator(mode="after")
    def _length(self) -> Training:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


GateMetric = Literal["evalLoss", "perplexity", "exactMatch"]
_DEFAULT_METRICS: tuple[GateMetric, ...] = ("evalLoss", "perplexity", "exactMatch")


class Gate(KubeModel):
    """A threshold the tuned model must meet before it is published."""

    metric: GateMetric = Field(description="The held-out metric checked: evalLoss, perplexity or exactMatch.")
    min: DecimalString | None = Field(default=None, description="The metric must be at least this.")
    max: DecimalString | None = Field(default=None, description="The metric must be at most this.")
    min_improvement: DecimalString | None = Field(
        default=None,
        description=(
            "The metric must beat the base model by at least this (lower for losses, higher for exactMatch)."
        ),
    )

    @model_validator(mode="after")
    def _one_bound(self) -> Gate:
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


class Output(KubeModel):
    """Where and in which form the tuned model is published."""

    uri: str | None = Field(
        default=None,
        description="Artifact store prefix the model is published under; defaults to the operator's store.",
    )
    merge_adapter: bool = Field(
        default=False, description="Merge LoRA/IA3 weights into the base and publish full weights."
    )


class FineTuneJobSpec(KubeModel):
    """Desired state of the FineTuneJob: what to tune, on what data, how, and where to publish it."""

    base_model: ModelSource
    dataset: Dataset
    method: Method = Field(default_factory=Method)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)
    executor: Executor | None = Field(
        default=None, description="Where the pipeline runs; defaults to the operator's setting."
    )

    @model_validator(mode="after")
    def _mergeable(self) -> FineTuneJobSpec:
        if self.output.merge_adapter and self.method.is_peft and self.method.type not in MERGEABLE_METHODS:
            raise ValueError(
                f"output.mergeAdapter: a {self.method.type} adapter cannot be merged into the base weights; "
                "only lora and ia3 can"
            )
        return self


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


class EvaluationStatus(KubeModel):
    """The held-out metrics of the base and the tuned model, and the verdict of each gate."""

    baseline: EvalMetrics | None = Field(default=None, description="The base model before tuning.")
    final: EvalMetrics | None = Field(default=None, description="The tuned model.")
    reference_baselines: ReferenceBaselines | None = Field(
        default=None, description="What trivial predictors score on the same held-out examples."
    )
    gates: list[GateResult] = Field(default_factory=list, description="One result per bound of each gate.")


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
    output: OutputRef | None = None
    pipeline_run: PipelineRunRef | None = None


class FineTuneJob(KubeModel):
    model_config = KubeModel.model_config | {"extra": "ignore"}

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None
