"""The FineTuneJob fields against forgetting and for checkpoint selection: what `kubetune validate` and the
CRD's CEL rules refuse, each naming the field, and what they accept."""

from __future__ import annotations

from typing import Any

import pytest
from test_cel import admit, tiny_job, validate

REFERENCE = {"name": "general-text", "uri": "data/general.jsonl"}

ACCEPTED = {
    "select best, early stopping": tiny_job(
        training={"evalEverySteps": 5, "earlyStopping": {"metric": "evalLoss", "patience": 2}},
        output={"select": "best", "selectMetric": "exactMatch"},
    ),
    "reference sets with a drop gate": tiny_job(
        evaluation={
            "reference": [
                REFERENCE,
                {"name": "routing", "uri": "r.jsonl", "format": "instruction", "metric": "exactMatch"},
            ],
            "maxReferenceDrop": "0.1",
        }
    ),
    "replay": tiny_job(training={"replay": {"uri": "data/general.jsonl", "ratio": "0.5"}}),
}


@pytest.mark.parametrize("doc", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_by_validate_and_by_the_api_server(doc: dict[str, Any]) -> None:
    assert validate(doc) == []
    assert admit(doc) == []


REFUSED = [
    (
        tiny_job(output={"select": "best"}),
        "spec.output.select: best needs training.evalEverySteps",
    ),
    (
        tiny_job(training={"earlyStopping": {"patience": 3}}),
        "spec.training.earlyStopping: needs training.evalEverySteps",
    ),
    (
        tiny_job(
            training={"evalEverySteps": 10},
            output={"select": "best", "selectMetric": "exactMatch"},
            evaluation={"metrics": ["evalLoss"]},
        ),
        "spec.output.selectMetric: exactMatch is not in evaluation.metrics",
    ),
    (
        tiny_job(
            training={"evalEverySteps": 10, "earlyStopping": {"metric": "exactMatch"}},
            evaluation={"metrics": ["evalLoss", "perplexity"]},
        ),
        "spec.training.earlyStopping.metric: exactMatch is not in evaluation.metrics",
    ),
    (
        tiny_job(evaluation={"maxReferenceDrop": "0.1"}),
        "spec.evaluation.maxReferenceDrop: needs at least one set in evaluation.reference to apply to",
    ),
    (
        tiny_job(evaluation={"reference": [{**REFERENCE, "metric": "exactMatch"}]}),
        "spec.evaluation.reference[0].metric: exactMatch needs responses to compare: "
        "format instruction or chat",
    ),
    (
        tiny_job(training={"replay": {"uri": "g.jsonl", "ratio": "0"}}),
        'spec.training.replay.ratio: must be greater than 0 and at most 10 (got "0")',
    ),
]


@pytest.mark.parametrize(("doc", "message"), REFUSED, ids=[message for _, message in REFUSED])
def test_refused_naming_the_field_by_validate_and_by_the_api_server(
    doc: dict[str, Any], message: str
) -> None:
    assert validate(doc) == [f"FineTuneJob/demo: {message}"]
    assert admit(doc) == [message]


def test_reference_names_are_unique() -> None:
    doc = tiny_job(evaluation={"reference": [REFERENCE, {**REFERENCE, "uri": "other.jsonl"}]})
    assert validate(doc) == [
        "FineTuneJob/demo: spec.evaluation.reference: reference names must be unique "
        "(duplicate 'general-text')"
    ]
    assert admit(doc) == ["spec.evaluation.reference: reference names must be unique"]


def test_a_reference_name_is_a_dns_label() -> None:
    doc = tiny_job(evaluation={"reference": [{**REFERENCE, "name": "General Text"}]})
    [issue] = validate(doc)
    assert issue.startswith("FineTuneJob/demo: spec.evaluation.reference[0].name: ")
