"""FineTuneJob method.type distillation: what `kubetune validate` and the CRD's CEL rules refuse, each
naming the field, and what they accept."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_cel import admit

from kubetune.api.validation import validate_documents


def job(method: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": "./models/tiny-student"},
            "dataset": {"uri": "data/tickets.jsonl", "validationSplit": "0.2"},
            "method": method,
        },
    }


def distillation(**options: Any) -> dict[str, Any]:
    return job({"type": "distillation", "distillation": {"teacher": {"uri": "./models/teacher"}, **options}})


def validate(doc: dict[str, Any]) -> list[str]:
    return [str(issue) for issue in validate_documents([copy.deepcopy(doc)])]


ACCEPTED = {
    "teacher by uri, defaults": distillation(),
    "teacher by fineTuneJobRef": job(
        {"type": "distillation", "distillation": {"teacher": {"fineTuneJobRef": {"name": "big-router"}}}}
    ),
    "temperature and alpha": distillation(temperature="4", alpha="1"),
}


@pytest.mark.parametrize("doc", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_validate_and_by_the_api_server(doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    assert admit(doc) == []


REFUSED = [
    (job({"type": "distillation"}), "spec.method: type distillation needs distillation"),
    (
        job({"type": "distillation", "distillation": {"teacher": {}}}),
        "spec.method.distillation.teacher: set exactly one of fineTuneJobRef and uri",
    ),
    (
        job(
            {
                "type": "distillation",
                "distillation": {"teacher": {"uri": "./t", "fineTuneJobRef": {"name": "big"}}},
            }
        ),
        "spec.method.distillation.teacher: set exactly one of fineTuneJobRef and uri",
    ),
    (distillation(temperature="0"), "spec.method.distillation.temperature: must be greater than 0"),
    (distillation(alpha="1.5"), "spec.method.distillation.alpha: "),
    (
        job({"type": "full", "distillation": {"teacher": {"uri": "./t"}}}),
        "spec.method: distillation is set but type is 'full'; only full may be set",
    ),
]


@pytest.mark.parametrize(("doc", "message"), REFUSED, ids=[message for _, message in REFUSED])
def test_refused_naming_the_field_by_validate_and_by_the_api_server(
    doc: dict[str, Any], message: str
) -> None:
    [issue] = validate(doc)
    assert issue.startswith(f"FineTuneJob/demo: {message}")
    [refusal] = admit(doc)
    assert refusal.startswith(message)
