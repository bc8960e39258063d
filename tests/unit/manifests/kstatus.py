"""A Python port of kstatus' status computation for custom resources (what Flux's health checks use).

Ported from sigs.k8s.io/cli-utils, pkg/kstatus/status:
  - generic.go  ``checkGenericProperties`` (deletionTimestamp, then ``checkGeneration``, then the
                Reconciling/Stalled conditions) and ``checkGeneration``;
  - status.go   ``Compute`` (generic properties, then -- kubetune's kinds have no built-in legacy
                rules -- ``checkReadyCondition``, else Current) and ``checkReadyCondition``;
  - util.go     ``newInProgressStatus`` / ``newReconcilingCondition``.
The branches keep the Go code's order; where Go's ``unstructured.NestedInt64`` fails on a value of the
wrong type, this port raises :class:`KstatusError` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["InProgress", "Failed", "Current", "Terminating"]


class KstatusError(ValueError):
    """kstatus could not compute a status (Go's Compute returns an error)."""


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class Result:
    status: Status
    message: str
    conditions: list[Condition] = field(default_factory=list)


def _in_progress(reason: str, message: str) -> Result:
    return Result("InProgress", message, [Condition("Reconciling", "True", reason, message)])


def _nested_int(obj: Mapping[str, Any], *path: str) -> int | None:
    """``unstructured.NestedInt64``: None when absent; an error when present with another type."""
    value: Any = obj
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise KstatusError(
            f"{'.'.join(path)} accessor error: {value!r} is of the type {type(value).__name__}"
        )
    return value


def _conditions(obj: Mapping[str, Any]) -> list[Condition]:
    """``GetObjectWithConditions``: status.conditions decoded into (type, status, reason, message)."""
    raw = (obj.get("status") or {}).get("conditions") or []
    return [
        Condition(
            str(c.get("type", "")),
            str(c.get("status", "")),
            str(c.get("reason", "")),
            str(c.get("message", "")),
        )
        for c in raw
    ]


def _check_generation(obj: Mapping[str, Any]) -> Result | None:
    generation = _nested_int(obj, "metadata", "generation")
    if generation is None:
        return None
    observed = _nested_int(obj, "status", "observedGeneration")
    if observed is not None and observed != generation:
        message = (
            f"{obj.get('kind', '')} generation is {generation}, but latest observed generation is {observed}"
        )
        return _in_progress("LatestGenerationNotObserved", message)
    return None


def _check_generic_properties(obj: Mapping[str, Any]) -> Result | None:
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return Result("Terminating", "Resource scheduled for deletion")
    result = _check_generation(obj)
    if result is not None:
        return result
    for condition in _conditions(obj):
        if condition.type == "Reconciling" and condition.status == "True":
            return Result("InProgress", condition.message, [condition])
        if condition.type == "Stalled" and condition.status == "True":
            return Result("Failed", condition.message, [condition])
    return None


def _check_ready_condition(obj: Mapping[str, Any]) -> Result | None:
    for condition in _conditions(obj):
        if condition.type != "Ready":
            continue
        if condition.status == "True":
            return Result("Current", "Resource is Ready")
        if condition.status in ("False", "Unknown"):
            return _in_progress(condition.reason, condition.message)
    return None


def compute(obj: Mapping[str, Any]) -> Result:
    """kstatus ``Compute`` for a custom resource (no built-in legacy rules apply to kubetune kinds)."""
    return (
        _check_generic_properties(obj)
        or _check_ready_condition(obj)
        or Result("Current", "Resource is current")
    )
