"""Conditions per the Kubernetes API conventions."""

from __future__ import annotations

from typing import Any, Literal


def find_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with `type_` set; lastTransitionTime moves only when status changes."""
    previous = find_condition(conditions, type_)
    transition = now
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    updated = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }
    return [c for c in conditions if c.get("type") != type_] + [updated]


# The condition a job ends with (True: it succeeded; False: it failed; Unknown: not ended yet).
SUCCEEDED = "Succeeded"
# The conditions kstatus reads (sigs.k8s.io/cli-utils/pkg/kstatus: Flux's health checks, kpt, kapply):
# Reconciling True -> InProgress, Stalled True -> Failed, else Ready True -> Current.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"


def set_job_conditions(
    conditions: list[dict[str, Any]],
    succeeded: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with a job's Succeeded condition and the kstatus ones that follow from it.

    A job not yet ended is Reconciling; a failed one is Stalled (it will not recover without a new
    spec); a succeeded one is Ready. Every condition carries the same reason and message, so whichever
    one a tool shows explains the job's state.
    """
    reconciling = "True" if succeeded == "Unknown" else "False"
    stalled = "True" if succeeded == "False" else "False"
    for type_, state in (
        (SUCCEEDED, succeeded),
        (READY, succeeded),
        (RECONCILING, reconciling),
        (STALLED, stalled),
    ):
        conditions = set_condition(conditions, type_, state, reason, message, now=now, generation=generation)
    return conditions
