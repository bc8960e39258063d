"""QuantizeJob (kubetune.dev/v1alpha1): shrink a model, measure what it gained and what it cost."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from kubetune_contract.common import (
    MODEL_URI_PATTERN,
    BrokenRule,
    Condition,
    DecimalString,
    GateOp,
    GateResult,
    KubeModel,
    ObjectMeta,
    OutputRef,
    PipelineRunRef,
    RatioString,
    SecretKeyRef,
    as_float,
    read_field,
    validate_with_rules,
)
from kubetune_contract.finetune import PREFERENCE_FORMATS, Dataset, FineTuneJobRef, ModelCard, Progress
from kubetune_contract.finetune import Target as Target  # one Target for every job kind

KIND = "QuantizeJob"
PLURAL = "quantizejobs"
SHORT_NAMES = ["qj"]

QuantizeMethodType = Literal[
    "int8-weight-only", "int8-dynamic", "int4-weight-only", "qat", "pruning", "mixed-precision"
]
QuantScheme = Literal["int8-weight-only", "int8-dynamic", "int4-weight-only"]
QUANT_SCHEMES: tuple[QuantScheme, ...] = get_args(QuantScheme)
PruningPattern = Literal["unstructured", "2:4"]

METHOD_BLOCKS: dict[str, str | None] = {
    "int8-weight-only": None,
    "int8-dynamic": None,
    "int4-weight-only": "int4WeightOnly",
    "qat": "qat",
    "pruning": "pruning",
    "mixed-precision": "mixedPrecision",
}

# Where each method runs well enough to be worth asking for. The planner refuses any other pair,
# naming both, rather than silently falling back to something else.
SUPPORTED_TARGETS: dict[str, frozenset[str]] = {
    "int8-weight-only": frozenset({"cpu", "gpu"}),
    "int8-dynamic": frozenset({"cpu", "gpu"}),
    "int4-weight-only": frozenset({"cpu", "gpu"}),
    "qat": frozenset({"cpu", "gpu"}),
    "pruning": frozenset({"cpu", "gpu"}),
    "mixed-precision": frozenset({"cpu", "gpu"}),
}
# Finer rules inside a method's options (checked by the validator below).
SEMI_STRUCTURED_TARGETS = frozenset({"gpu"})
FP16_TARGETS = frozenset({"gpu"})


class QuantizeSource(KubeModel):
    """The model to shrink: a FineTuneJob's published output, or any model URI."""

    fine_tune_job_ref: FineTuneJobRef | None = Field(
        default=None, description="Wait for this FineTuneJob to succeed and take its output."
    )
    uri: str | None = Field(
        default=None,
        pattern=MODEL_URI_PATTERN,
        description="A model URI, as baseModel.uri of a FineTuneJob.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding a hub access token, for gated or private models."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> QuantizeSource:
        if (self.fine_tune_job_ref is None) == (self.uri is None):
            raise ValueError("set exactly one of fineTuneJobRef and uri")
        return self


class Int4Options(KubeModel):
    """Options of int4-weight-only."""

    group_size: Literal[32, 64, 128, 256] = Field(default=128, description="Weights sharing one scale.")


class QatOptions(KubeModel):
    """Options of qat (quantization-aware training): fine-tune with fake quantization, then convert."""

    scheme: QuantScheme = Field(default="int8-dynamic", description="What the fake quantization simulates.")
    steps: int = Field(default=100, ge=1, le=1_000_000, description="Fake-quantized training steps.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per training step.")
    learning_rate: DecimalString = Field(default="1e-5", description="Learning rate of the QAT steps.")
    max_seq_length: int = Field(default=512, ge=8, le=1_048_576, description="Longer examples are truncated.")
    group_size: Literal[32, 64, 128, 256] = Field(
        default=128, description="Weights sharing one scale, when scheme is int4-weight-only."
    )
    seed: int = Field(default=42, ge=0, description="Random seed of the QAT run.")


class PruningOptions(KubeModel):
    """Options of pruning."""

    sparsity: RatioString = Field(default="0.5", description="Share of weights set to zero (unstructured).")
    pattern: PruningPattern = Field(
        default="unstructured", description="2:4 semi-structured sparsity is accelerated on GPUs only."
    )
    then: Literal["none", "int8-weight-only", "int8-dynamic", "int4-weight-only"] = Field(
        default="none", description="Quantize the pruned model afterwards."
    )


class MixedPrecisionOptions(KubeModel):
    """Options of mixed-precision: cast the weights to a 16-bit float type."""

    dtype: Literal["bf16", "fp16"] = Field(default="bf16", description="fp16 needs a GPU target.")


class QuantizeMethod(KubeModel):
    """`type` names the method; options, where it has any, are in the block of the same name."""

    type: QuantizeMethodType = Field(
        description="The method. int8-weight-only and int8-dynamic take no options block; the others "
        "may set the block of the same name (int4WeightOnly, qat, pruning, mixedPrecision)."
    )
    int4_weight_only: Int4Options | None = Field(default=None, description="Only with type int4-weight-only.")
    qat: QatOptions | None = Field(default=None, description="Only with type qat.")
    pruning: PruningOptions | None = Field(default=None, description="Only with type pruning.")
    mixed_precision: MixedPrecisionOptions | None = Field(
        default=None, description="Only with type mixed-precision."
    )

    @model_validator(mode="after")
    def _own_block_only(self) -> QuantizeMethod:
        wanted = METHOD_BLOCKS[self.type]
        for block, block_type in _BLOCK_TYPES.items():
            attr = _snake(block)
            if block == wanted:
                if getattr(self, attr) is None:
                    setattr(self, attr, block_type())
            elif getattr(self, attr) is not None:
                allowed = f"only {wanted} may be set" if wanted else "it takes no options block"
                raise ValueError(f"{block} is set but type is {self.type!r}; {allowed}")
        return self

    @property
    def scheme(self) -> QuantScheme | None:
        """The real quantization applied in the end (None: the weights stay plain tensors)."""
        if self.type in QUANT_SCHEMES:
            return self.type
        if self.qat is not None:
            return self.qat.scheme
        if self.pruning is not None and self.pruning.then != "none":
            return self.pruning.then
        return None

    @property
    def int4_group_size(self) -> int:
        """Weights sharing one scale when the scheme is int4-weight-only."""
        if self.qat is not None:
            return self.qat.group_size
        # pruning.then int4-weight-only has no block of its own: it uses int4WeightOnly's default.
        return (self.int4_weight_only or Int4Options()).group_size


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


_BLOCK_TYPES: dict[str, type[KubeModel]] = {
    "int4WeightOnly": Int4Options,
    "qat": QatOptions,
    "pruning": PruningOptions,
    "mixedPrecision": MixedPrecisionOptions,
}

QuantizeGateMetric = Literal[
    "perplexityIncrease", "exactMatch", "exactMatchDrop", "sizeRatio", "latencyRatio"
]


class QuantizeGate(KubeModel):
    """A threshold on the report: e.g. perplexityIncrease max "0.05" (relative), sizeRatio max "0.3"."""

    metric: QuantizeGateMetric = Field(description="The report value the gate checks.")
    min: DecimalString | None = Field(default=None, description="The metric must be at least this.")
    max: DecimalString | None = Field(default=None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _one_bound(self) -> QuantizeGate:
        if self.min is None and self.max is None:
            raise ValueError("a gate needs min or max")
        return self

    def bounds(self) -> list[tuple[GateOp, float]]:
        """The bounds that are set, in the order gates.json lists them."""
        set_bounds: list[tuple[GateOp, str | None]] = [("min", self.min), ("max", self.max)]
        return [(op, as_float(threshold)) for op, threshold in set_bounds if threshold is not None]


class QuantizeEvaluation(KubeModel):
    """How the source and the shrunk model are compared, and the gates the result must pass."""

    max_samples: int = Field(
        default=100, ge=1, description="Held-out examples for perplexity and exactMatch."
    )
    max_new_tokens: int = Field(default=32, ge=1, le=4096, description="Generation budget for exactMatch.")
    latency_prompts: int = Field(default=8, ge=1, le=1000, description="Fixed prompts timed on the target.")
    latency_new_tokens: int = Field(
        default=16, ge=1, le=4096, description="Tokens generated per timed prompt."
    )
    gates: list[QuantizeGate] = Field(default_factory=list, description="Thresholds the report must meet.")


class QuantizeOutput(KubeModel):
    """Where the shrunk model is published."""

    uri: str | None = Field(
        default=None, description="Artifact store prefix; defaults to the operator's store."
    )


class QuantizeJobSpec(KubeModel):
    """Desired state of the QuantizeJob: which model to shrink, how, for which target, and the gates."""

    model: QuantizeSource
    method: QuantizeMethod
    target: Target = Field(
        default="cpu",
        description="Where the quantized model will be served. Pruning with pattern 2:4 and "
        "mixed-precision fp16 need gpu.",
    )
    dataset: Dataset | None = Field(
        default=None,
        description="Calibration, QAT and evaluation data. With fineTuneJobRef it defaults to that job's "
        "dataset and held-out split.",
    )
    evaluation: QuantizeEvaluation = Field(default_factory=QuantizeEvaluation)
    output: QuantizeOutput = Field(default_factory=QuantizeOutput)
    model_card: ModelCard = Field(
        default_factory=ModelCard, description="Intended use and limitations for the published model card."
    )
    executor: Literal["kfp", "local"] | None = Field(
        default=None, description="Where the pipeline runs; defaults to the operator's setting."
    )

    @model_validator(mode="after")
    def _target_supported(self) -> QuantizeJobSpec:
        unsupported = target_problem(self.method, self.target)
        if unsupported is not None:
            raise ValueError(unsupported)
        if self.method.type == "qat" and self.dataset is None and self.model.fine_tune_job_ref is None:
            raise ValueError("qat trains: set dataset (or take the model from a fineTuneJobRef)")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _calibration_format(
        cls, data: Any, handler: ModelWrapValidatorHandler[QuantizeJobSpec]
    ) -> QuantizeJobSpec:
        return validate_with_rules(data, handler, _pair_formats_broken)


PAIR_FORMATS_NOT_CALIBRATION = (
    "preference and feedback rows are dpo/kto pairs, not calibration text: use text, instruction or chat"
)


def _pair_formats_broken(spec: object) -> list[BrokenRule]:
    """Calibration, QAT and quality measurements read sequences; preference and feedback rows hold pairs."""
    fmt = read_field(read_field(spec, "dataset"), "format")
    if isinstance(fmt, str) and fmt in PREFERENCE_FORMATS.values():
        return [BrokenRule(PAIR_FORMATS_NOT_CALIBRATION, ("dataset", "format"))]
    return []


def target_problem(method: QuantizeMethod, target: Target) -> str | None:
    """Why `method` cannot run on `target`, or None when it can."""
    if target not in SUPPORTED_TARGETS[method.type]:
        return f"method {method.type} does not support target {target}"
    pruning = method.pruning
    if pruning is not None and pruning.pattern == "2:4" and target not in SEMI_STRUCTURED_TARGETS:
        return f"pruning pattern 2:4 does not support target {target} (GPU only)"
    mixed = method.mixed_precision
    if mixed is not None and mixed.dtype == "fp16" and target not in FP16_TARGETS:
        return f"mixed-precision fp16 does not support target {target}; use bf16"
    return None


class SizeReport(KubeModel):
    """Bytes of the model's weights on disk."""

    before: int | None = Field(default=None, description="The source model.")
    after: int | None = Field(default=None, description="The shrunk model.")


class LatencyReport(KubeModel):
    """Seconds per generated token on the target, over the fixed latency prompts."""

    before: float | None = Field(default=None, description="Seconds per generated token.")
    after: float | None = Field(default=None, description="Seconds per generated token of the shrunk model.")


class QualityMetrics(KubeModel):
    """Held-out quality of one model; a metric not computed is left out."""

    perplexity: float | None = Field(default=None, description="exp(mean token loss) on held-out examples.")
    exact_match: float | None = Field(
        default=None, description="Share of greedy generations equal to the reference (0 to 1)."
    )


class QualityReport(KubeModel):
    """Held-out quality before and after shrinking."""

    before: QualityMetrics | None = Field(default=None, description="The source model.")
    after: QualityMetrics | None = Field(default=None, description="The shrunk model.")


class QuantizeReport(KubeModel):
    size_bytes: SizeReport | None = Field(default=None, description="Bytes of the weights before and after.")
    size_ratio: float | None = Field(default=None, description="Size after / size before.")
    latency: LatencyReport | None = None
    quality: QualityReport | None = None
    gates: list[GateResult] = Field(default_factory=list, description="One result per bound of each gate.")


class ResolvedSource(KubeModel):
    uri: str = Field(description="The model URI the pipeline quantizes.")
    fine_tune_job: str | None = Field(default=None, description="The FineTuneJob it was published by.")


class QuantizeJobStatus(KubeModel):
    """Observed state of the QuantizeJob, written by the operator."""

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
    progress: Progress | None = Field(default=None, description="QAT training steps, when the method trains.")
    source: ResolvedSource | None = Field(default=None, description="The model being shrunk, as resolved.")
    report: QuantizeReport | None = Field(
        default=None, description="Size, latency and quality before and after, and the gate results."
    )
    output: OutputRef | None = None
    pipeline_run: PipelineRunRef | None = None


class QuantizeJob(KubeModel):
    model_config = KubeModel.model_config | {"extra": "ignore"}

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["QuantizeJob"] = "QuantizeJob"
    metadata: ObjectMeta
    spec: QuantizeJobSpec
    status: dict[str, Any] | None = None
