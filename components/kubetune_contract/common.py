"""Building blocks shared by every kubetune resource.

The pydantic models in this package are the single source of truth for the API: the CRDs in
``manifests/crds`` are generated from them (``kubetune crds``), never edited by hand.

Conventions (Kubernetes API conventions):
- field names are camelCase on the wire; Python attributes are snake_case;
- no floats in ``spec``: learning rates, ratios and thresholds are decimal strings;
- unknown fields are rejected, so a typo never silently does nothing.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, overload

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

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
        Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the pattern already rejects these
        raise ValueError(f"{value!r} is not a decimal number") from exc
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

    metric: str
    op: str
    threshold: float
    value: float | None = None
    passed: bool


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

    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PipelineRunRef(KubeModel):
    """The pipeline run that carries out a job."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    backend: Literal["kfp", "local"]
    id: str
    url: str | None = None
    name: str | None = None
    generation: int | None = Field(
        default=None, description="Generation of the spec the run was submitted for."
    )


class OutputRef(KubeModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    uri: str
    version: str


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
