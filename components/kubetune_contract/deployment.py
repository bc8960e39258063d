"""ModelDeployment (kubetune.dev/v1alpha1): serve model versions behind one OpenAI-compatible gateway.

Every version, its traffic weight, the canary steps and the metrics that judge them are in the spec:
nothing about what is served is implicit. Unlike the jobs, the spec is mutable: changing weights,
adding a version or editing a prompt updates the running deployment in place.
"""

from __future__ import annotations

import itertools
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ModelWrapValidatorHandler, model_validator

from kubetune_contract.common import (
    DNS_SUBDOMAIN_PATTERN,
    MODEL_URI_PATTERN,
    BrokenRule,
    Condition,
    DecimalRange,
    DecimalString,
    KubeModel,
    ObjectMeta,
    SecretKeyRef,
    as_float,
    read_field,
    validate_with_rules,
)
from kubetune_contract.guardrails import Guardrails

KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SHORT_NAMES = ["mdep"]

MAX_VERSIONS = 8
MAX_PROMPTS = 16
MAX_VERSION_NAME = 20
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
HEADER_PATTERN = r"^[A-Za-z0-9][-A-Za-z0-9]*$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def duration_seconds(value: str) -> float:
    """``"1m30s"`` -> 90.0. Durations use Go's units (ms, s, m, h), as kubectl and Argo do."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration such as 30s, 5m or 1h30m")
    return float(sum(Decimal(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value)))


def _check_duration(value: str) -> str:
    duration_seconds(value)
    return value


Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, description='A duration such as "30s", "5m", "1h30m" or "500ms".'),
    AfterValidator(_check_duration),
]


def _check_positive_duration(value: str) -> str:
    if duration_seconds(value) <= 0:
        raise ValueError(f"{value!r} must be longer than 0s")
    return value


POSITIVE_DURATION_KEY = "x-kubetune-positive-duration"
"""Marks a positive duration in the schema, so the CRD gets the CEL rule a pattern cannot express."""
PositiveDuration = Annotated[
    Duration,
    Field(json_schema_extra={POSITIVE_DURATION_KEY: True}),
    AfterValidator(_check_positive_duration),
]
Quantity = Annotated[
    str, Field(pattern=QUANTITY_PATTERN, description='A Kubernetes quantity such as "500m", "2" or "4Gi".')
]


class JobRef(KubeModel):
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="A job in the same namespace.",
    )


class VersionModel(KubeModel):
    """The model a version serves: a job's published output, or any model URI."""

    fine_tune_job_ref: JobRef | None = Field(
        default=None, description="Serve this FineTuneJob's published model (waits until it succeeds)."
    )
    quantize_job_ref: JobRef | None = Field(
        default=None, description="Serve this QuantizeJob's published model (waits until it succeeds)."
    )
    uri: str | None = Field(
        default=None,
        pattern=MODEL_URI_PATTERN,
        description="A published model URI (file://, pvc:// or hf://).",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding a hub access token, for gated or private models."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionModel:
        sources = [self.fine_tune_job_ref, self.quantize_job_ref, self.uri]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("set exactly one of fineTuneJobRef, quantizeJobRef and uri")
        return self


PRICE_RANGE = DecimalRange(0)
BUDGET_RANGE = DecimalRange(0, above_minimum=True)


class Pricing(KubeModel):
    """A version's price per million tokens, which turns its usage into cost (usage, cost budgets)."""

    input_per_million: Annotated[DecimalString, PRICE_RANGE] = Field(
        default="0", description='Price of 1M prompt tokens, e.g. "0.50" (any currency, used consistently).'
    )
    output_per_million: Annotated[DecimalString, PRICE_RANGE] = Field(
        default="0", description='Price of 1M completion tokens, e.g. "1.50".'
    )


class ModelVersion(KubeModel):
    """One served version and the share of traffic it gets."""

    name: str = Field(
        min_length=1,
        max_length=MAX_VERSION_NAME,
        pattern=DNS_LABEL_PATTERN,
        description="Version name (a DNS label): the value of x-kubetune-version and of the override header.",
    )
    model: VersionModel
    weight: int = Field(
        ge=0, le=100, description="Percent of traffic; the weights of all versions sum to 100."
    )
    prompt: str | None = Field(
        default=None, max_length=63, description="Name of a spec.prompts entry this version applies."
    )
    pricing: Pricing | None = Field(
        default=None, description="The version's token prices; usage of an unpriced version costs 0."
    )


class Routing(KubeModel):
    """How requests are assigned to versions."""

    sticky_by: Literal["user", "header"] = Field(
        default="user",
        description="What keeps a user on one version: the OpenAI request's `user` field, or a header.",
    )
    header: str | None = Field(
        default=None,
        max_length=128,
        pattern=HEADER_PATTERN,
        description="The header, when stickyBy is header.",
    )
    override_header: str = Field(
        default="x-kubetune-version",
        max_length=128,
        pattern=HEADER_PATTERN,
        description="A request carrying this header is served by the version it names (for testing).",
    )

    @model_validator(mode="after")
    def _header_when_needed(self) -> Routing:
        if self.sticky_by == "header" and not self.header:
            raise ValueError("header is required when stickyBy is header")
        return self


class CanaryStep(KubeModel):
    weight: int = Field(ge=1, le=99, description="Percent of traffic the canary gets during this step.")
    pause: PositiveDuration = Field(
        description="How long the step runs (and is analysed) before the next one."
    )


BUILTIN_METRICS = ("errorRate", "p95Latency", "timeToFirstToken", "feedback")


class AnalysisMetric(KubeModel):
    """A metric the canary must keep within bounds: a built-in, or a custom PromQL query."""

    name: str = Field(
        min_length=1,
        max_length=63,
        description="errorRate, p95Latency (seconds), timeToFirstToken (p95, seconds), feedback (mean "
        "score), or any name for a custom query.",
    )
    query: str | None = Field(
        default=None,
        max_length=4096,
        description="PromQL for a custom metric; $deployment, $version and $window are substituted.",
    )
    min: DecimalString | None = Field(default=None, description="The canary fails below this value.")
    max: DecimalString | None = Field(default=None, description="The canary fails above this value.")

    @model_validator(mode="after")
    def _known_and_bounded(self) -> AnalysisMetric:
        if self.query is None and self.name not in BUILTIN_METRICS:
            raise ValueError(
                f"{self.name!r} is not a built-in metric ({', '.join(BUILTIN_METRICS)}); "
                "set query for a custom one"
            )
        if self.min is None and self.max is None:
            raise ValueError("a metric needs min or max")
        return self


ANALYSIS_INCONCLUSIVE_LIMIT_MAX = 100
METRICS_OR_SKIP = "analysis needs metrics, or skip: true to promote on the steps' timing alone"
SKIP_WITHOUT_METRICS = "analysis.skip is true, so analysis.metrics must be empty"


class Analysis(KubeModel):
    """How the canary is judged at each step. A rollout checked by nothing says so: ``skip: true``."""

    skip: bool = Field(
        default=False,
        description="Check no metrics: each step lasts its pause and the canary is promoted on timing "
        "alone. Required when metrics is empty, so an unchecked rollout is written in the spec.",
    )
    interval: PositiveDuration = Field(
        default="30s", description="How often the canary's metrics are queried."
    )
    window: PositiveDuration = Field(
        default="1m", description="The range of the rate() windows in the queries."
    )
    metrics: list[AnalysisMetric] = Field(
        default_factory=list, max_length=16, description="Every metric must be within its bounds."
    )
    inconclusive_limit: int = Field(
        default=0,
        ge=0,
        le=ANALYSIS_INCONCLUSIVE_LIMIT_MAX,
        description="How many inconclusive analyses in a row (no data, Prometheus unreachable) the "
        "canary may have; one more pauses the rollout (as Argo Rollouts' inconclusiveLimit). 0: the "
        "first inconclusive analysis pauses it.",
    )

    @model_validator(mode="after")
    def _metrics_or_skip(self) -> Analysis:
        if self.skip and self.metrics:
            raise ValueError(SKIP_WITHOUT_METRICS)
        if not self.skip and not self.metrics:
            raise ValueError(METRICS_OR_SKIP)
        return self


class Rollout(KubeModel):
    """A canary rollout of the newest version (the last entry of versions), judged by metrics."""

    steps: list[CanaryStep] = Field(
        min_length=1,
        max_length=16,
        description="Canary weights in increasing order; after the last step the spec weights apply.",
    )
    analysis: Analysis = Field(
        description="The metrics that judge the canary, or skip: true for a rollout on timing alone."
    )
    auto_rollback: bool = Field(
        default=True,
        description="On a failing analysis set the canary's weight to 0 (else pause the rollout).",
    )

    @model_validator(mode="after")
    def _increasing(self) -> Rollout:
        weights = [step.weight for step in self.steps]
        if any(later <= earlier for earlier, later in itertools.pairwise(weights)):
            raise ValueError(f"steps weights must increase, got {weights}")
        return self


SCALE_TO_ZERO_AFTER = "5m"
"""How long a version with minReplicas 0 gets no request before it scales to zero, unless set."""
SCALE_TO_ZERO_AFTER_NEEDS_ZERO = "scaleToZeroAfter only applies with minReplicas 0"


class Autoscaling(KubeModel):
    """Replicas per version follow the requests: a HorizontalPodAutoscaler, or with minReplicas 0 a KEDA
    ScaledObject that scales an idle version to zero."""

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas per version. 0 scales a version that gets no request for "
        "scaleToZeroAfter to zero (on a cluster a KEDA ScaledObject replaces the "
        "HorizontalPodAutoscaler; kubetune up stops its server); the gateway holds its next requests "
        "until it is ready again (see maxHeldRequests and holdTimeout).",
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas per version.")
    target_concurrency: int = Field(
        default=8, ge=1, le=10_000, description="In-flight requests per replica the autoscaler aims for."
    )
    scale_to_zero_after: PositiveDuration | None = Field(
        default=None,
        description=f"With minReplicas 0: how long a version gets no request before it scales to zero "
        f"(KEDA's cooldownPeriod on a cluster). Default {SCALE_TO_ZERO_AFTER}.",
    )
    max_held_requests: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Most requests the gateway holds per version while it scales up from zero; one "
        "more is answered 503 with Retry-After at once.",
    )
    hold_timeout: PositiveDuration = Field(
        default="2m",
        description="Longest the gateway holds a request for a version scaling up from zero (its "
        "model loads meanwhile); then it answers 503 with Retry-After.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        if self.scale_to_zero_after is not None and self.min_replicas != 0:
            raise ValueError(SCALE_TO_ZERO_AFTER_NEEDS_ZERO)
        return self

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0

    @property
    def idle_seconds_before_zero(self) -> float:
        """How long a version scaling to zero waits without requests before it goes to zero."""
        return duration_seconds(self.scale_to_zero_after or SCALE_TO_ZERO_AFTER)

    @property
    def hold_seconds(self) -> float:
        return duration_seconds(self.hold_timeout)


class Resources(KubeModel):
    """CPU, memory and accelerator requests and limits of each version's server container."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description='e.g. {cpu: "1", memory: 2Gi}')
    limits: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {memory: 4Gi}")


class Batching(KubeModel):
    """Adaptive batching in each version's server."""

    max_batch_size: int = Field(default=8, ge=1, le=1024, description="Most requests in one batch.")
    max_latency_ms: int = Field(
        default=50, ge=1, le=60_000, description="Longest a request waits for a batch."
    )


ServingEngine = Literal["transformers", "vllm"]
ServingTarget = Literal["cpu", "gpu"]
VLLM_TARGETS: frozenset[str] = frozenset({"gpu"})
"""vLLM's engine runs on CUDA GPUs only (its CPU build is another install, not served by kubetune)."""
GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource a gpu target's server container asks for (NVIDIA's device plugin)."""
VLLM_NEEDS_GPU = "engine vllm needs target gpu"
VLLM_OPTIONS_NEED_VLLM = "vllm only applies with engine vllm"
GPU_MEMORY_UTILIZATION = DecimalRange(0, 1, above_minimum=True)


class VllmOptions(KubeModel):
    """vLLM's engine arguments for each version's server (with engine vllm)."""

    dtype: Literal["auto", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights and activations dtype (vLLM's --dtype); auto takes the model config's "
        "torch_dtype (float32 models run in float16).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Longest prompt plus completion in tokens (vLLM's --max-model-len); unset, the "
        "model's own context length.",
    )
    gpu_memory_utilization: Annotated[DecimalString, GPU_MEMORY_UTILIZATION] = Field(
        default="0.9",
        description="Share of the GPU's memory vLLM may take for weights and KV cache "
        "(--gpu-memory-utilization).",
    )
    max_loras: int = Field(
        default=4,
        ge=1,
        le=64,
        description="LoRA versions one server holds in a batch at once (--max-loras); a LoRA version "
        "is served with --enable-lora and --lora-modules <version>=<adapter>.",
    )


class Serving(KubeModel):
    """How each version's model server runs: replicas, autoscaling, resources and batching."""

    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas per version, without autoscaling.")
    gateway_replicas: int = Field(
        default=1,
        ge=1,
        le=20,
        description="Replicas of the gateway on a cluster (locally one process serves). A "
        "PodDisruptionBudget lets voluntary disruptions take at most one at a time; set "
        "access.store.redisUrl so replicas share limits, budgets and experiment statistics.",
    )
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="A HorizontalPodAutoscaler per version, or with minReplicas 0 a KEDA ScaledObject.",
    )
    resources: Resources = Field(default_factory=Resources)
    batching: Batching = Field(default_factory=Batching)
    share_base_model: bool = Field(
        default=True,
        description="Serve the versions that are LoRA adapters of the same base model (FineTuneJobs "
        "publishing unmerged LoRA adapters of one baseModel.uri) from one model server: the base is "
        "loaded once and each request is generated with its version's adapter; versions join and leave "
        "it without a restart. On a cluster (adapters on pvc:// claims) that is one Deployment per base, "
        "autoscaled as a whole; in kubetune up (adapters stored locally) one process, except for "
        "autoscaling.minReplicas 0, where each version's server stops and starts on its own requests. "
        "False gives every version a server of its own.",
    )
    target: ServingTarget = Field(
        default="cpu",
        description=f"What each version's server runs on: cpu, or gpu (its container asks for one "
        f"{GPU_RESOURCE} unless resources name a count; needed by engine vllm).",
    )
    engine: ServingEngine = Field(
        default="transformers",
        description="The model server's engine: transformers (kubetune's own, CPU or GPU), or vllm "
        "(vLLM's engine in the version's Bento, target gpu only; serves full and merged models, "
        "mixed-precision and pruning QuantizeJobs, and LoRA adapters through vLLM's LoRA support).",
    )
    vllm: VllmOptions | None = Field(
        default=None, description="vLLM's engine arguments; only with engine vllm (defaults when unset)."
    )

    @model_validator(mode="wrap")
    @classmethod
    def _engine_fits_target(cls, data: Any, handler: ModelWrapValidatorHandler[Serving]) -> Serving:
        return validate_with_rules(data, handler, _serving_rules_broken)

    @property
    def vllm_options(self) -> VllmOptions:
        """The vLLM engine arguments in effect (the defaults when spec.serving.vllm is unset)."""
        return self.vllm if self.vllm is not None else VllmOptions()


def _serving_rules_broken(serving: object) -> list[BrokenRule]:
    """engine vllm needs a GPU target; vllm options need engine vllm."""
    broken: list[BrokenRule] = []
    engine = read_field(serving, "engine") or "transformers"
    target = read_field(serving, "target") or "cpu"
    if engine == "vllm" and isinstance(target, str) and target not in VLLM_TARGETS:
        broken.append(BrokenRule(f"{VLLM_NEEDS_GPU}; target is {target}", ("engine",)))
    if read_field(serving, "vllm") is not None and isinstance(engine, str) and engine != "vllm":
        broken.append(BrokenRule(f"{VLLM_OPTIONS_NEED_VLLM}; engine is {engine}", ("vllm",)))
    return broken


# The ranges the model server accepts in a request (OpenAI's): a default outside them would fail every
# request that leaves the parameter out, and a limit outside them could never be reached.
TEMPERATURE_RANGE = DecimalRange(0, 2)
TOP_P_RANGE = DecimalRange(0, 1, above_minimum=True)
MAX_TOP_P_RANGE = DecimalRange(0, 1)


class GenerationDefaults(KubeModel):
    """Sampling parameters applied to requests that leave them out."""

    temperature: Annotated[DecimalString, TEMPERATURE_RANGE] | None = Field(
        default=None, description="Used when a request sets none; between 0 and 2."
    )
    top_p: Annotated[DecimalString, TOP_P_RANGE] | None = Field(
        default=None, description="Used when a request sets none; greater than 0 and at most 1."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=1_048_576, description="Used when a request sets none."
    )


class GenerationLimits(KubeModel):
    """Upper bounds on a request's sampling parameters; a request above one is refused with 400."""

    max_temperature: Annotated[DecimalString, TEMPERATURE_RANGE] | None = Field(
        default=None, description="Requests above it are refused; between 0 and 2."
    )
    max_top_p: Annotated[DecimalString, MAX_TOP_P_RANGE] | None = Field(
        default=None, description="Requests above it are refused; between 0 and 1."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, le=1_048_576, description="Requests above it are refused."
    )


class ContextWindow(KubeModel):
    """How long a prompt may be, and what happens to a longer one."""

    max_prompt_tokens: int = Field(
        default=2048,
        ge=1,
        le=1_048_576,
        description="Most prompt tokens (after the template) sent to a model.",
    )
    overflow: Literal["truncate", "refuse"] = Field(
        default="truncate",
        description="truncate drops the oldest messages (chat) or tokens (completions); refuse answers 400.",
    )


DEFAULTS_AND_LIMITS = (("temperature", "maxTemperature"), ("topP", "maxTopP"), ("maxTokens", "maxTokens"))


def _number(value: object) -> float | None:
    """A default or limit as the number it stands for, or None when it is not (yet) a valid one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return as_float(value)
        except ArithmeticError:
            return None
    return None


def _defaults_above_limits(generation: object) -> list[BrokenRule]:
    defaults, limits = read_field(generation, "defaults"), read_field(generation, "limits")
    broken = []
    for default_name, limit_name in DEFAULTS_AND_LIMITS:
        default_value, limit_value = read_field(defaults, default_name), read_field(limits, limit_name)
        default, limit = _number(default_value), _number(limit_value)
        if default is not None and limit is not None and default > limit:
            broken.append(
                BrokenRule(
                    f"defaults.{default_name} must not be above limits.{limit_name}, "
                    f"got {default_value} > {limit_value}"
                )
            )
    return broken


class Generation(KubeModel):
    """Generation parameters the gateway applies: defaults, limits and the prompt's context window."""

    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    limits: GenerationLimits = Field(default_factory=GenerationLimits)
    context_window: ContextWindow = Field(default_factory=ContextWindow)

    @model_validator(mode="wrap")
    @classmethod
    def _defaults_within_limits(cls, data: Any, handler: ModelWrapValidatorHandler[Generation]) -> Generation:
        return validate_with_rules(data, handler, _defaults_above_limits)


class FewShotExample(KubeModel):
    """One few-shot turn, sent before the request's own messages."""

    user: str = Field(max_length=16_384, description="The example user message.")
    assistant: str = Field(max_length=16_384, description="The answer the model should give to it.")


class PromptReasoning(KubeModel):
    """Step-by-step thinking the model writes between two markers, kept from the client."""

    mode: Literal["hidden"] = Field(
        default="hidden",
        description="hidden: nothing between the markers reaches the client, streamed or not; usage still "
        "counts those tokens (completion_tokens_details.reasoning_tokens).",
    )
    open: str = Field(
        default="<think>", min_length=1, max_length=64, description="Marker opening the reasoning."
    )
    close: str = Field(
        default="</think>", min_length=1, max_length=64, description="Marker closing the reasoning."
    )


class FewShotSelection(KubeModel):
    """Few-shot examples picked per request from a pool, instead of (or after) the fixed examples."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description='A JSONL pool of examples, one {"user": ..., "assistant": ...} object a line (a path or '
        "file:// URI the gateway reads).",
    )
    k: int = Field(default=3, ge=1, le=32, description="Most examples a request gets.")
    select: Literal["similar", "random", "fixed"] = Field(
        default="similar",
        description="similar: the k examples nearest the request's last user message (BM25); random: k "
        "drawn with the request as the seed (the same request gets the same examples); fixed: the "
        "first k. Examples that would not fit the context window's maxPromptTokens are left out.",
    )


FORMAT_INSTRUCTIONS_PART = "format-instructions"
SAFETY_PREAMBLE_PART = "safety-preamble"
GENERATED_PROMPT_PARTS = (FORMAT_INSTRUCTIONS_PART, SAFETY_PREAMBLE_PART)
"""System-message parts the gateway writes itself; ``promptParts`` may not take these names."""
PROMPT_PARTS_UNIQUE = "promptParts names must be unique"
GENERATED_NAME_TAKEN = "the name is generated by the gateway; give the part another name"
SYSTEM_PARTS_RESOLVE = "a prompt's systemParts must name entries of promptParts or generated parts"
PRINCIPLES_UNIQUE = "principles names must be unique"


PromptPartName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]


class PromptPart(KubeModel):
    """A named piece of system message that prompts compose (``systemParts``), reused across versions."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="The name systemParts refer to (a DNS label; not format-instructions or "
        "safety-preamble, which the gateway generates).",
    )
    text: str = Field(min_length=1, max_length=16_384, description="The part's text.")


class ConstitutionPrinciple(KubeModel):
    """A rule the model's answer is checked against."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Names the principle in the revisions metric (a DNS label).",
    )
    text: str = Field(
        min_length=1, max_length=2048, description='The principle, e.g. "Never promise a refund."'
    )


class Constitution(KubeModel):
    """Critique and revise: a second pass checks each answer against principles and rewrites it."""

    principles: list[ConstitutionPrinciple] = Field(
        min_length=1, max_length=16, description="What every answer is checked against."
    )
    revise: bool = Field(
        default=True,
        description="Rewrite an answer the critique finds in violation (a third pass); false: only "
        "critique and count. Chat completions only; a streamed request gets its stream after the "
        "critique (and revision), and usage counts the tokens of every pass.",
    )


class PromptTemplate(KubeModel):
    """A versioned prompt: rolled out and A/B-tested with the model version that names it."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="The name a version's prompt field refers to (a DNS label).",
    )
    system: str | None = Field(
        default=None, max_length=16_384, description="System message prepended (after systemParts)."
    )
    system_parts: list[PromptPartName] = Field(
        default_factory=list,
        max_length=16,
        description="Parts composing the system message, in order, a blank line apart: names of "
        "spec.promptParts entries, or format-instructions (the request's response_format and tools in "
        "words; left out when it has neither) and safety-preamble, which the gateway generates.",
    )
    template: str = Field(
        default="{{input}}",
        max_length=16_384,
        description="Applied to the last user message: {{input}} is that message; other {{variables}} come "
        "from the request's metadata.",
    )
    examples: list[FewShotExample] = Field(default_factory=list, max_length=32, description="Few-shot turns.")
    few_shot: FewShotSelection | None = Field(
        default=None, description="Few-shot examples selected per request from a pool (after examples)."
    )
    reasoning: PromptReasoning | None = Field(
        default=None, description="Reasoning the model writes between markers, hidden from the client."
    )
    constitution: Constitution | None = Field(
        default=None,
        description="Critique and revise against principles (off when unset; it doubles the cost).",
    )

    @model_validator(mode="after")
    def _keeps_the_input(self) -> PromptTemplate:
        if "{{input}}" not in self.template:
            raise ValueError("template must contain {{input}} (the user's message)")
        return self


class Cache(KubeModel):
    """Exact-match response cache; only deterministic requests (temperature 0, not streamed) are cached."""

    enabled: bool = Field(default=True, description="Whether answers are cached.")
    ttl: PositiveDuration = Field(
        default="5m", description='How long an answer is reused: a duration above 0 such as "5m".'
    )
    max_entries: int = Field(
        default=1024, ge=1, le=1_000_000, description="Most answers kept; the least recently used go first."
    )


class Fallback(KubeModel):
    version: str = Field(description="The version that answers when the chosen one errors or times out.")
    timeout: PositiveDuration = Field(default="30s", description="How long the chosen version may take.")


class AccessLimits(KubeModel):
    """Limits on one key, or on all keys of a tenant together; unset fields set no limit."""

    requests_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Requests a minute."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Prompt + completion tokens a minute, counted as generated (streams too).",
    )
    tokens_per_day: int | None = Field(default=None, ge=1, description="Token budget per UTC day.")
    tokens_per_month: int | None = Field(default=None, ge=1, description="Token budget per UTC month.")
    cost_per_day: Annotated[DecimalString, BUDGET_RANGE] | None = Field(
        default=None, description="Cost budget per UTC day (the versions' pricing)."
    )
    cost_per_month: Annotated[DecimalString, BUDGET_RANGE] | None = Field(
        default=None, description="Cost budget per UTC month (the versions' pricing)."
    )


class TenantLimits(KubeModel):
    """Limits for one tenant that replace access.limits.perTenant for it."""

    tenant: str = Field(min_length=1, max_length=253, description="The tenant a key was created for.")
    limits: AccessLimits = Field(description="That tenant's limits (all its keys together).")


class Limits(KubeModel):
    """Rate limits and budgets; over one, a request gets 429 with Retry-After."""

    per_key: AccessLimits = Field(default_factory=AccessLimits, description="Every key on its own.")
    per_tenant: AccessLimits = Field(
        default_factory=AccessLimits, description="All keys of a tenant together."
    )
    tenants: list[TenantLimits] = Field(
        default_factory=list, max_length=1000, description="Per-tenant overrides of perTenant."
    )


PASSWORD_NEEDS_REDIS_URL = "passwordSecretRef needs redisUrl: the password is for the Redis it names"


class RedisPasswordRef(SecretKeyRef):
    """The key in a Secret of the resource's namespace holding Redis's password."""

    key: str = Field(default="password", min_length=1, description="Key within the Secret.")


class LimitStore(KubeModel):
    """Where the gateway replicas share their counters."""

    redis_url: str | None = Field(
        default=None,
        pattern=r"^(redis|rediss)://[^\s]+$",
        max_length=2048,
        description="Redis the gateway replicas share their counters in, e.g. "
        "redis://kubetune-redis.kubetune-system:6379/0 (the chart's redis.enabled deploys one). Unset: each "
        "replica counts on its own, so N replicas let up to N times a limit through.",
    )
    password_secret_ref: RedisPasswordRef | None = Field(
        default=None,
        description="The Secret (in this namespace) and key holding the password of the Redis at redisUrl "
        "(e.g. the chart's redis.passwordSecret). The gateway gets it as an environment variable from the "
        "Secret; a missing or wrong password makes Redis unreachable for it: onUnavailable applies.",
    )
    on_unavailable: Literal["failOpen", "failClosed"] = Field(
        default="failClosed",
        description="When Redis cannot be asked: failClosed answers 503, failOpen serves without limits; "
        "either way it is logged, counted (kubetune_gateway_limit_store_failures_total) and shown.",
    )

    @model_validator(mode="after")
    def _password_of_a_named_redis(self) -> LimitStore:
        if self.password_secret_ref is not None and self.redis_url is None:
            raise ValueError(PASSWORD_NEEDS_REDIS_URL)
        return self


class Audit(KubeModel):
    """The hash-chained audit log: one JSON line per request, never the key; the text only if asked."""

    enabled: bool = Field(default=True, description="Write the audit log (to the gateway's stdout).")
    log_content: bool = Field(
        default=False,
        description="Also log each request's prompt (messages) and completion (the text as sent to the "
        "client, streams included), PII-redacted: with spec.guardrails.pii's entities when set, else with "
        "every supported entity. Content is never logged unredacted.",
    )


class Feedback(KubeModel):
    """What the gateway keeps of the completions that receive feedback (POST /v1/feedback)."""

    capture: bool = Field(
        default=False,
        description="Keep the prompt and completion of each completion that receives feedback (PII-redacted "
        "as audit.logContent is), for `kubetune feedback export`: in the Redis of access.store when set "
        "(shared by the replicas), else under $KUBETUNE_HOME locally (in the replica's memory on a cluster).",
    )
    max_records: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Most rated records kept; the oldest go first."
    )
    max_age: PositiveDuration = Field(
        default="720h", description='How long a rated record is kept after its feedback, e.g. "720h".'
    )
    window: PositiveDuration = Field(
        default="1h",
        description="How long a completion's content waits for its feedback; feedback after that is "
        "counted but its content is not captured.",
    )


class Access(KubeModel):
    """Who may call the deployment's gateway and how much: API keys, scopes, limits, audit."""

    auth: Literal["required", "disabled"] | None = Field(
        default=None,
        description="required: every request needs a key (Authorization: Bearer kt-...). disabled: none does "
        "(explicit opt-out). Unset: required on a cluster; locally, required once the deployment has a key.",
    )
    limits: Limits = Field(default_factory=Limits)
    store: LimitStore = Field(default_factory=LimitStore)
    audit: Audit = Field(default_factory=Audit)


class ModelDeploymentSpec(KubeModel):
    """Desired state of the ModelDeployment: the versions served, how traffic reaches them, and how."""

    versions: list[ModelVersion] = Field(
        min_length=1,
        max_length=MAX_VERSIONS,
        description="The model versions served; their weights sum to 100. With a rollout, the last one is "
        "the canary.",
    )
    routing: Routing = Field(default_factory=Routing)
    rollout: Rollout | None = Field(default=None, description="Roll the last version out as a canary.")
    serving: Serving = Field(default_factory=Serving)
    generation: Generation = Field(default_factory=Generation)
    prompts: list[PromptTemplate] = Field(
        default_factory=list, max_length=MAX_PROMPTS, description="Prompt templates versions can name."
    )
    prompt_parts: list[PromptPart] = Field(
        default_factory=list,
        max_length=32,
        description="Named system-message parts that prompts compose with systemParts.",
    )
    cache: Cache | None = Field(default=None, description="Response cache; off when unset.")
    fallback: Fallback | None = Field(default=None, description="Where failed requests are retried.")
    access: Access = Field(default_factory=Access, description="API keys, scopes, limits, budgets and audit.")
    feedback: Feedback = Field(
        default_factory=Feedback, description="Capture of rated completions as training data."
    )
    guardrails: Guardrails | None = Field(
        default=None,
        description="Guards on prompts and answers: prompt injection, PII, output sanitization, moderation.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _consistent(
        cls, data: Any, handler: ModelWrapValidatorHandler[ModelDeploymentSpec]
    ) -> ModelDeploymentSpec:
        return validate_with_rules(data, handler, _spec_rules_broken)

    @property
    def canary(self) -> ModelVersion | None:
        """The version a rollout brings in (the last one), when the spec has a rollout."""
        return self.versions[-1] if self.rollout is not None else None


def _items(source: object, wire_name: str) -> list[object]:
    value = read_field(source, wire_name)
    return list(value) if isinstance(value, list) else []


def _repeated(names: list[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


def _spec_rules_broken(spec: object) -> list[BrokenRule]:
    """The rules between a spec's versions, prompts, fallback and rollout, on a spec or raw input.

    On raw input a rule that needs a value it cannot read (a version without a valid name, a weight that
    is not an integer) is skipped: the field's own error says what is wrong with it.
    """
    broken: list[BrokenRule] = []
    versions = _items(spec, "versions")
    raw_names = [read_field(version, "name") for version in versions]
    names = [name for name in raw_names if isinstance(name, str)]
    all_named = len(names) == len(versions)
    if duplicates := _repeated(names):
        broken.append(BrokenRule(f"versions names must be unique; repeated: {', '.join(duplicates)}"))
    weights = [read_field(version, "weight") for version in versions]
    integer_weights = [w for w in weights if isinstance(w, int) and not isinstance(w, bool)]
    if versions and len(integer_weights) == len(weights) and sum(integer_weights) != 100:
        broken.append(BrokenRule(f"versions weights must sum to 100, got {sum(integer_weights)}"))
    prompts = _items(spec, "prompts")
    prompt_names = [name for p in prompts if isinstance(name := read_field(p, "name"), str)]
    if repeated_prompts := _repeated(prompt_names):
        broken.append(BrokenRule(f"prompts names must be unique; repeated: {', '.join(repeated_prompts)}"))
    if len(prompt_names) == len(prompts):
        for version in versions:
            prompt, name = read_field(version, "prompt"), read_field(version, "name")
            if isinstance(prompt, str) and prompt not in prompt_names:
                broken.append(
                    BrokenRule(
                        f"a version's prompt must name an entry of prompts: version {name} names {prompt!r}"
                    )
                )
    broken.extend(_prompt_parts_rules_broken(spec, prompts))
    fallback = read_field(read_field(spec, "fallback"), "version")
    if isinstance(fallback, str) and all_named and versions:
        if fallback not in names:
            broken.append(BrokenRule(f"fallback.version {fallback!r} is not one of the versions"))
        elif all(name == fallback for name in names):
            broken.append(
                BrokenRule(
                    f"fallback.version must name another version: {fallback!r} is the only one, so a "
                    "failed request would be retried on the version that just failed"
                )
            )
    if read_field(spec, "rollout") is not None and len(versions) < 2:
        broken.append(BrokenRule("rollout needs at least two versions: the last one is the canary"))
    return broken


def _prompt_parts_rules_broken(spec: object, prompts: list[object]) -> list[BrokenRule]:
    """promptParts names are unique and not generated ones; systemParts name parts that exist;
    a constitution's principle names are unique."""
    broken: list[BrokenRule] = []
    parts = _items(spec, "promptParts")
    part_names = [name for part in parts if isinstance(name := read_field(part, "name"), str)]
    if repeated := _repeated(part_names):
        broken.append(BrokenRule(f"{PROMPT_PARTS_UNIQUE}; repeated: {', '.join(repeated)}"))
    for index, name in enumerate(part_names):
        if name in GENERATED_PROMPT_PARTS:
            broken.append(BrokenRule(f"{GENERATED_NAME_TAKEN} (got {name!r})", ("promptParts", index)))
    known = ", ".join(dict.fromkeys([*part_names, *GENERATED_PROMPT_PARTS]))
    for prompt_index, prompt in enumerate(prompts):
        for part_index, reference in enumerate(_items(prompt, "systemParts")):
            if isinstance(reference, str) and reference not in (*part_names, *GENERATED_PROMPT_PARTS):
                broken.append(
                    BrokenRule(
                        f"{SYSTEM_PARTS_RESOLVE}: prompts[{prompt_index}].systemParts[{part_index}] is "
                        f"{reference!r} (known: {known})"
                    )
                )
        principles = _items(read_field(prompt, "constitution"), "principles")
        principle_names = [n for p in principles if isinstance(n := read_field(p, "name"), str)]
        if repeated := _repeated(principle_names):
            broken.append(
                BrokenRule(
                    f"{PRINCIPLES_UNIQUE}; repeated: {', '.join(repeated)}",
                    ("prompts", prompt_index, "constitution"),
                )
            )
    return broken


class VersionStatus(KubeModel):
    """One version as it is served now."""

    name: str = Field(description="The version's name from the spec.")
    weight: int = Field(
        description="Percent of traffic the version gets now (differs from spec mid-rollout)."
    )
    ready: bool = Field(default=False, description="Whether its server answers and the gateway routes to it.")
    model_uri: str | None = Field(default=None, description="The model being served, as resolved.")
    url: str | None = Field(default=None, description="The version's own service endpoint.")
    bento: str | None = Field(default=None, description="The Bento tag serving it.")
    message: str | None = Field(default=None, description="Why it is not ready, when it is not.")


class MetricResult(KubeModel):
    """One analysis metric's value and verdict."""

    name: str = Field(description="The metric's name from the spec.")
    value: float | None = Field(default=None, description="None when the query returned no data.")
    min: str | None = Field(default=None, description="The lower bound it was checked against.")
    max: str | None = Field(default=None, description="The upper bound it was checked against.")
    passed: bool | None = Field(default=None, description="None when inconclusive (no data).")


class AnalysisRun(KubeModel):
    """The latest analysis of the canary."""

    time: str = Field(description="When it ran (RFC 3339).")
    passed: bool = Field(description="Whether no metric failed (an inconclusive one does not fail).")
    metric: str | None = Field(default=None, description="The first failing metric, when one failed.")
    value: float | None = Field(default=None, description="The failing metric's value.")
    threshold: str | None = Field(default=None, description="The bound the failing metric broke.")
    message: str = Field(default="", description="The verdict, for a person.")
    results: list[MetricResult] = Field(default_factory=list, description="Every metric's result.")

    @property
    def inconclusive(self) -> bool:
        """Nothing failed, but some metric could not be judged (no data, Prometheus unreachable)."""
        return self.passed and any(result.passed is None for result in self.results)


class RolloutStatus(KubeModel):
    """Where the canary rollout stands."""

    canary: str = Field(description="The version being rolled out.")
    step: int = Field(description="Index of the current step (0-based); len(steps) once promoted.")
    state: Literal["Progressing", "Paused", "Promoted", "RolledBack"] = Field(
        description="Progressing, Paused, Promoted or RolledBack."
    )
    reason: Literal["AnalysisFailed", "AnalysisInconclusive"] | None = Field(
        default=None, description="Why the rollout is Paused or RolledBack."
    )
    step_started_at: str | None = Field(default=None, description="When the current step began (RFC 3339).")
    stable_weights: dict[str, int] = Field(
        default_factory=dict, description="The weights before the rollout began, restored on rollback."
    )
    last_analysis: AnalysisRun | None = Field(default=None, description="The latest analysis of the canary.")
    inconclusive_analyses: int = Field(
        default=0, description="Inconclusive analyses in a row; a conclusive one resets the count."
    )
    message: str = Field(default="", description="What the rollout is doing or why it stopped, for a person.")


class ModelDeploymentStatus(KubeModel):
    """Observed state of the ModelDeployment, written by the operator."""

    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready (the gateway serves), Reconciling and Stalled (a person must act), as kstatus "
        "reads them.",
    )
    phase: str | None = Field(default=None, description="Short summary for printer columns.")
    endpoint: str | None = Field(default=None, description="The gateway's OpenAI-compatible base URL.")
    versions: list[VersionStatus] = Field(default_factory=list, description="Each version as served now.")
    weights: str | None = Field(default=None, description='Effective weights, e.g. "tuned=80,int8=20".')
    ready_versions: str | None = Field(default=None, description='Ready versions out of all, e.g. "2/2".')
    rollout: RolloutStatus | None = Field(
        default=None, description="The canary rollout, when the spec has one."
    )


class ModelDeployment(KubeModel):
    model_config = KubeModel.model_config | {"extra": "ignore"}

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: dict[str, Any] | None = None
