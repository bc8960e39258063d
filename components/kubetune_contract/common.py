"""Building blocks shared by every kubetune resource.

The pydantic models in this package are the single source of truth for the API: the CRDs in
``manifests/crds`` are generated from them (``kubetune crds``), never edited by hand.

Conventions (Kubernetes API conventions):
- field names are camelCase on the wire; Python attributes are snake_case;
- no floats in ``spec``: learning rates, ratios and thresholds are decimal strings;
- unknown fields are rejected, so a typo never silently does nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeVar, overload

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError, core_schema

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class KubeModel(BaseModel):
    """Base for every API object: camelCase aliases, strict about unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it is stored in Kubernetes (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


DECIMAL_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
# Decimal strings between 0 and 1: plain ("0", "0.05", "1.0") or scientific notation with a single-digit
# mantissa and a negative exponent ("5e-2"). Every string it admits is <= 1, so the CRD can enforce the
# range with a pattern alone (an exact "<= 1" over all exponent forms is not a regular language).
RATIO_PATTERN = r"^(0+(\.[0-9]+)?|0*1(\.0+)?|0*[0-9](\.[0-9]+)?[eE]-[0-9]*[1-9][0-9]*)$"


def _check_decimal(value: str) -> str:
    try:
        number = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the pattern already rejects these
        raise ValueError(f"{value!r} is not a decimal number") from exc
    # The code that computes with it reads a float: "1e999" would be infinity there.
    if not math.isfinite(float(number)):
        raise ValueError(f"{value!r} is too large to compute with")
    return value


def _check_ratio(value: str) -> str:
    if not Decimal(value) <= 1:
        raise ValueError(f"{value!r} must be between 0 and 1")
    return value


DecimalString = Annotated[
    str,
    Field(
        pattern=DECIMAL_PATTERN,
        description='A non-negative decimal number written as a string, e.g. "0.1" or "3e-4".',
    ),
    AfterValidator(_check_decimal),
]
RatioString = Annotated[
    str,
    Field(
        pattern=RATIO_PATTERN,
        description='A ratio between 0 and 1 written as a string, e.g. "0.1" or "5e-2".',
        json_schema_extra={"x-kubetune-ratio": True},
    ),
    AfterValidator(_check_decimal),
    AfterValidator(_check_ratio),
]


@dataclass(frozen=True)
class DecimalRange:
    """The values a decimal-string field accepts, compared as the float the code computes with.

    The field's schema carries it (``x-kubetune-range``), so the CRD's CEL rule and the message for a
    value the pattern refuses (a negative one) state the same range.
    """

    minimum: float = 0.0
    maximum: float | None = None
    above_minimum: bool = False  # the minimum itself is excluded

    SCHEMA_KEY = "x-kubetune-range"

    def contains(self, value: float) -> bool:
        low_ok = value > self.minimum if self.above_minimum else value >= self.minimum
        return low_ok and (self.maximum is None or value <= self.maximum)

    def describe(self) -> str:
        """``must be greater than 0 and at most 1``, ``must be between 0 and 2``."""
        low, high = f"{self.minimum:g}", f"{self.maximum:g}" if self.maximum is not None else None
        if high is None:
            if self.above_minimum:
                return f"must be greater than {low}"
            return "must not be negative" if self.minimum == 0 else f"must be at least {low}"
        if self.above_minimum:
            return f"must be greater than {low} and at most {high}"
        return f"must be between {low} and {high}"

    def schema(self) -> dict[str, Any]:
        return {"minimum": self.minimum, "maximum": self.maximum, "aboveMinimum": self.above_minimum}

    @classmethod
    def from_schema(cls, node: Mapping[str, Any]) -> DecimalRange | None:
        """The range a schema node declares, if it declares one."""
        declared = node.get(cls.SCHEMA_KEY)
        if not isinstance(declared, Mapping):
            return None
        return cls(declared["minimum"], declared["maximum"], declared["aboveMinimum"])

    def check(self, value: str) -> str:
        if not self.contains(float(Decimal(value))):
            raise ValueError(f"{self.describe()} (got {json.dumps(value)})")
        return value

    # As metadata of a decimal string (``Annotated[DecimalString, TOP_P]``): checked after the pattern.
    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        node = handler(schema)
        node[self.SCHEMA_KEY] = self.schema()
        return node


@overload
def as_float(value: str) -> float: ...
@overload
def as_float(value: str | None, default: float | None = None) -> float | None: ...
def as_float(value: str | None, default: float | None = None) -> float | None:
    """Decimal strings from ``spec`` as floats, for the code that computes with them."""
    if value is None:
        return default
    return float(Decimal(value))


GateOp = Literal["min", "max", "minImprovement"]
GATE_TOLERANCE = 1e-9
"""Slack for float noise: exactMatch going from 0.3 to 0.6 improves by 0.3, not by 0.29999999999999993."""


def within_bound(value: float | None, op: GateOp, threshold: float) -> bool:
    """Whether a gate's value meets its bound: `max` is an upper bound, `min` and `minImprovement`
    lower bounds (the improvement is already a value). A value that could not be measured fails."""
    if value is None:
        return False
    if op == "max":
        return value <= threshold + GATE_TOLERANCE
    return value >= threshold - GATE_TOLERANCE


class GateResult(KubeModel):
    """The verdict of one bound of one gate, as gates.json and the resource's status hold it."""

    metric: str = Field(description="The metric the gate checks, as the gate names it.")
    op: str = Field(description="The bound: min, max or minImprovement.")
    threshold: float = Field(description="The bound's value from the spec.")
    value: float | None = Field(
        default=None,
        description="The measured value (an improvement for minImprovement); unset when "
        "it could not be measured, which fails the gate.",
    )
    passed: bool = Field(description="Whether the value meets the bound.")


# -- rules that span fields, reported with the field errors ----------------------------------------------

FieldLocation = tuple[str | int, ...]
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class BrokenRule:
    """A rule spanning fields that the input breaks: where it points (relative to the model) and why."""

    message: str
    loc: FieldLocation = ()


def read_field(source: object, wire_name: str) -> object:
    """A field of a validated model, or of raw input (by its wire or Python name); None when absent.

    Cross-field rules read through this so that one rule runs on either: the model once every field is
    valid, the raw input while some field is not.
    """
    python_name = re.sub(r"(?<!^)([A-Z])", r"_\1", wire_name).lower()
    if isinstance(source, BaseModel):
        return getattr(source, python_name, None)
    if isinstance(source, Mapping):
        value = source.get(wire_name)
        return value if value is not None else source.get(python_name)
    return None


def validate_with_rules(
    data: Any,
    handler: Callable[[Any], Model],
    rules: Callable[[object], Iterable[BrokenRule]],
) -> Model:
    """``handler(data)`` (a ``model_validator(mode="wrap")``'s) plus the cross-field ``rules``, every
    problem in one ValidationError.

    pydantic runs an ``after`` validator only once every field is valid, so a user would fix field errors
    first and meet a broken reference one run later. Here the rules also run on the raw input when a
    field is invalid; each rule skips what it cannot read there.
    """
    try:
        model = handler(data)
    except ValidationError as error:
        broken = list(rules(data))
        if not broken:
            raise
        raise _with_broken_rules(error.title, error.errors(), broken, data) from None
    broken = list(rules(model))
    if broken:
        raise _with_broken_rules(type(model).__name__, [], broken, data)
    return model


def _carried(error: Any) -> InitErrorDetails:
    """A reported error as pydantic takes it back (a ValueError's message keeps its words, not its type)."""
    if error["type"] in ("value_error", "assertion_error"):
        message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return InitErrorDetails(
            type=PydanticCustomError("value_error", message), loc=error["loc"], input=error["input"]
        )
    if "ctx" in error:
        return InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"], ctx=error["ctx"])
    return InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])


def _with_broken_rules(
    title: str, field_errors: Iterable[Any], broken: Iterable[BrokenRule], data: Any
) -> ValidationError:
    details = [_carried(error) for error in field_errors]
    details += [
        InitErrorDetails(type=PydanticCustomError("value_error", rule.message), loc=rule.loc, input=data)
        for rule in broken
    ]
    return ValidationError.from_exception_data(title, details)


DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""What the API server requires of an object's name (a DNS-1123 subdomain), so of a reference to one."""
MODEL_URI_PATTERN = r"^(hf://[^@\s]+(@[^@\s]+)?|file://\S+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/\S*|[^:\s]+)$"


class SecretKeyRef(KubeModel):
    """A key in a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(default="token", min_length=1, description="Key within the Secret.")


class ModelSource(KubeModel):
    """Where a model comes from."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        description=(
            "Model location: `hf://org/name@revision` (Hugging Face Hub; pin the revision for "
            "reproducible runs), `file:///abs/path` or a plain path, or `pvc://claim/path` "
            "(a PersistentVolumeClaim in the resource's namespace)."
        ),
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding a hub access token, for gated or private models.",
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(KubeModel):
    """A condition per the Kubernetes API conventions."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    type: str = Field(description="The aspect it reports on, e.g. Succeeded, Ready or Stalled.")
    status: ConditionStatus = Field(description="True, False or Unknown (not decided yet).")
    reason: str = Field(default="", description="A CamelCase word for why, e.g. Completed or ModelInvalid.")
    message: str = Field(default="", description="What happened, for a person.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation the condition was computed for."
    )


class PipelineRunRef(KubeModel):
    """The pipeline run that carries out a job."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    backend: Literal["kfp", "local"] = Field(description="The executor running it: kfp or local.")
    id: str = Field(description="The run's id in that backend.")
    url: str | None = Field(default=None, description="Where to watch the run (the Kubeflow UI's run page).")
    name: str | None = Field(
        default=None,
        description="The run's name, derived from the resource's namespace, name, "
        "generation and uid so that it is submitted once.",
    )
    generation: int | None = Field(
        default=None, description="Generation of the spec the run was submitted for."
    )
    train_job: str | None = Field(
        default=None,
        description="The Kubeflow Trainer TrainJob (in the resource's namespace) that runs the run's "
        "distributed training (training.distributed on the kfp executor).",
    )


class OutputRef(KubeModel):
    """Where a job published its model."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    uri: str = Field(description="The published directory (adapter or weights, tokenizer, manifest).")
    version: str = Field(description="The published version, v<generation>.")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ObjectMeta(BaseModel):
    """The parts of ObjectMeta kubetune reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = Field(min_length=1, max_length=63)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    def is_dns_label(self) -> bool:
        return bool(_DNS_LABEL.match(self.name))
