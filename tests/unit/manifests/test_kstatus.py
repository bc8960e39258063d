"""Flux (kstatus) reads kubetune resources: running -> InProgress, succeeded -> Current, failed -> Failed.

Job statuses come from the real planning code; ModelDeployment statuses from the contract fixtures
(status_fixtures.py). kstatus itself is ported in kstatus.py; its own behaviour is pinned first.
"""

from __future__ import annotations

from typing import Any

import pytest
from kstatus import KstatusError, compute
from status_fixtures import Case, job_cases, modeldeployment_cases

CASES = [*job_cases(), *modeldeployment_cases()]


def obj(generation: int | None, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "x", **meta}
    if generation is not None:
        metadata["generation"] = generation
    return {"kind": "Thing", "metadata": metadata, **({"status": status} if status is not None else {})}


def cond(type_: str, status: str, reason: str = "R", message: str = "m") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


# --- the port follows kstatus -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "expected", "message"),
    [
        (obj(1, deletionTimestamp="2026-01-01T00:00:00Z"), "Terminating", "Resource scheduled for deletion"),
        (
            obj(2, {"observedGeneration": 1}),
            "InProgress",
            "Thing generation is 2, but latest observed generation is 1",
        ),
        (obj(2, {"observedGeneration": 2}), "Current", "Resource is current"),
        (obj(None, {"observedGeneration": 7}), "Current", "Resource is current"),  # no generation: no check
        (obj(1, {"conditions": [cond("Reconciling", "True", message="busy")]}), "InProgress", "busy"),
        (obj(1, {"conditions": [cond("Stalled", "True", message="stuck")]}), "Failed", "stuck"),
        # The first of Reconciling/Stalled that is True wins, in list order.
        (
            obj(1, {"conditions": [cond("Stalled", "True", message="a"), cond("Reconciling", "True")]}),
            "Failed",
            "a",
        ),
        (obj(1, {"conditions": [cond("Ready", "True")]}), "Current", "Resource is Ready"),
        (obj(1, {"conditions": [cond("Ready", "False", message="nope")]}), "InProgress", "nope"),
        (obj(1, {"conditions": [cond("Ready", "Unknown", message="hm")]}), "InProgress", "hm"),
        (obj(1, {"conditions": [cond("Succeeded", "False")]}), "Current", "Resource is current"),
        (
            obj(1, {"conditions": [cond("Ready", "True"), cond("Reconciling", "True", message="r")]}),
            "InProgress",
            "r",
        ),
    ],
)
def test_port_matches_kstatus(resource: dict[str, Any], expected: str, message: str) -> None:
    result = compute(resource)
    assert (result.status, result.message) == (expected, message)


def test_generation_check_reports_a_reconciling_condition() -> None:
    result = compute(obj(3, {"observedGeneration": 2}))
    assert [(c.type, c.status, c.reason) for c in result.conditions] == [
        ("Reconciling", "True", "LatestGenerationNotObserved")
    ]


def test_non_integer_generation_is_an_error_as_in_go() -> None:
    with pytest.raises(KstatusError, match=r"status\.observedGeneration"):
        compute(obj(1, {"observedGeneration": "1"}))


# --- kubetune resources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_kubetune_resources_read_right(case: Case) -> None:
    assert compute(case.obj).status == case.kstatus


def test_every_outcome_is_covered() -> None:
    for kind in ("FineTuneJob", "QuantizeJob", "ModelDeployment"):
        assert {c.kstatus for c in CASES if c.obj["kind"] == kind} == {"InProgress", "Current", "Failed"}


def test_job_conditions_agree_with_succeeded() -> None:
    """Ready mirrors Succeeded; Reconciling is True exactly while running, Stalled exactly when failed."""
    for case in job_cases():
        conditions = {c["type"]: c for c in case.obj["status"]["conditions"]}
        succeeded = conditions["Succeeded"]["status"]
        assert conditions["Ready"]["status"] == succeeded
        assert conditions["Reconciling"]["status"] == ("True" if succeeded == "Unknown" else "False")
        assert conditions["Stalled"]["status"] == ("True" if succeeded == "False" else "False")
        for condition in conditions.values():
            assert condition["reason"] == conditions["Succeeded"]["reason"]
            assert condition["observedGeneration"] == case.obj["status"]["observedGeneration"]
