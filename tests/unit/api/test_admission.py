"""What `validate` accepts runs: every check that can be made before work starts is made at admission,
by pydantic (``kubetune validate``, ``kubetune up``, the operator) and, where CEL can say it, by the CRD,
and all problems of a resource come out in one run.

Each test names what used to pass validation and fail later (or fail one run at a time).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_cel import admit as admit_finetune
from test_cel import quickstart as finetune_job
from test_deployment_api import admit as admit_deployment
from test_deployment_api import pydantic_errors
from test_deployment_api import sample as deployment
from test_quantize_api import admit as admit_quantize
from test_quantize_api import edit
from test_quantize_api import sample as quantize_job


def validate_says(doc: dict[str, Any]) -> list[str]:
    """`field: message` as `kubetune validate` prints them, without the `Kind/name: ` before them: the
    CRD's CEL rules print the same words after the same field."""
    return [error.split(": ", 1)[1] for error in pydantic_errors(doc)]


# -- sampling defaults and limits: the model server's ranges ------------------------------------------

GENERATION_RANGES = [
    ("defaults.topP", "7", "must be greater than 0 and at most 1"),
    ("defaults.topP", "0", "must be greater than 0 and at most 1"),
    ("defaults.temperature", "2.5", "must be between 0 and 2"),
    ("limits.maxTopP", "1.5", "must be between 0 and 1"),
    ("limits.maxTemperature", "3", "must be between 0 and 2"),
]


@pytest.mark.parametrize(("field", "value", "rule"), GENERATION_RANGES)
def test_generation_values_outside_their_range_are_refused(field: str, value: str, rule: str) -> None:
    """`generation.defaults.topP: "7"` passed validate; the deployment then failed after both model
    servers were built and started, on the first request that left top_p out."""
    doc = edit(edit(deployment(), "spec.generation", {}), f"spec.generation.{field}", value)
    assert pydantic_errors(doc) == [
        f'ModelDeployment/support-router: spec.generation.{field}: {rule} (got "{value}")'
    ]
    assert admit_deployment(doc) == validate_says(doc)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("defaults.topP", "1"),
        ("defaults.topP", "1e-3"),
        ("defaults.temperature", "0"),
        ("limits.maxTopP", "0"),
    ],
)
def test_generation_values_at_the_edges_of_their_range_are_admitted(field: str, value: str) -> None:
    doc = edit(deployment(), f"spec.generation.{field}", value)
    assert pydantic_errors(doc) == []
    assert admit_deployment(doc) == []


def test_a_default_above_its_limit_is_refused_by_the_crd_too() -> None:
    doc = edit(deployment(), "spec.generation", {"defaults": {"topP": "0.9"}, "limits": {"maxTopP": "0.5"}})
    assert validate_says(doc) == [
        "spec.generation: defaults.topP must not be above limits.maxTopP, got 0.9 > 0.5"
    ]
    assert admit_deployment(doc) == validate_says(doc)
    tokens = edit(
        deployment(), "spec.generation", {"defaults": {"maxTokens": 300}, "limits": {"maxTokens": 256}}
    )
    # The CRD cannot show integers in a message (the API server's cost estimate refuses string()): it
    # states the rule, and validate adds the values.
    assert validate_says(tokens) == [
        "spec.generation: defaults.maxTokens must not be above limits.maxTokens, got 300 > 256"
    ]
    assert admit_deployment(tokens) == [
        "spec.generation: defaults.maxTokens must not be above limits.maxTokens"
    ]


# -- the held-out split ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "rule"),
    [
        ("0", "must be above 0 when validationUri is not set"),
        ("0.0", "must be above 0 when validationUri is not set"),
        ("1", "must be below 1 when validationUri is not set, to leave examples to train on"),
    ],
)
def test_a_split_that_holds_nothing_out_is_refused(split: str, rule: str) -> None:
    """`validationSplit: "0"` trained fully, then failed at evaluation for want of held-out examples."""
    doc = edit(finetune_job(), "spec.dataset.validationSplit", split)
    assert pydantic_errors(doc) == [
        f'FineTuneJob/tiny-sql: spec.dataset.validationSplit: {rule} (got "{split}")'
    ]
    assert admit_finetune(doc) == validate_says(doc)


def test_a_validation_file_makes_the_split_irrelevant() -> None:
    doc = edit(finetune_job(), "spec.dataset.validationUri", "file:///data/held-out.jsonl")
    doc = edit(doc, "spec.dataset.validationSplit", "0")
    assert pydantic_errors(doc) == []
    assert admit_finetune(doc) == []


def test_the_quantize_job_dataset_has_the_same_rule() -> None:
    doc = edit(quantize_job(), "spec.dataset", {"uri": "file:///data/calib.jsonl", "validationSplit": "0"})
    assert pydantic_errors(doc) == [
        "QuantizeJob/tiny-int8: spec.dataset.validationSplit: must be above 0 when validationUri is not "
        'set (got "0")'
    ]
    assert admit_quantize(doc) == validate_says(doc)


# -- references to other objects ------------------------------------------------------------------------

NAME_RULE = (
    "must be a Kubernetes object name: lower case letters, digits, '-' or '.', starting and ending with "
    "a letter or digit"
)


@pytest.mark.parametrize("name", ["Support_Router", "-tuned", "tuned-", "a b"])
def test_job_references_must_be_object_names(name: str) -> None:
    """A reference that no object can ever have as its name waited forever for that object."""
    ref = {"fineTuneJobRef": {"name": name}}
    in_deployment = edit(deployment(), "spec.versions.0.model", ref)
    assert pydantic_errors(in_deployment) == [
        "ModelDeployment/support-router: spec.versions[0].model.fineTuneJobRef.name: "
        f'{NAME_RULE} (got "{name}")'
    ]
    assert admit_deployment(in_deployment)[0].startswith("spec.versions.0.model.fineTuneJobRef.name: ")
    quantize_ref = edit(deployment(), "spec.versions.1.model", {"quantizeJobRef": {"name": name}})
    assert pydantic_errors(quantize_ref)[0].startswith(
        "ModelDeployment/support-router: spec.versions[1].model.quantizeJobRef.name: must be a Kubernetes"
    )
    in_quantize_job = edit(quantize_job(), "spec.model", ref)
    assert pydantic_errors(in_quantize_job) == [
        f'QuantizeJob/tiny-int8: spec.model.fineTuneJobRef.name: {NAME_RULE} (got "{name}")'
    ]
    assert admit_quantize(in_quantize_job)[0].startswith("spec.model.fineTuneJobRef.name: ")


def test_dotted_job_references_are_admitted() -> None:
    doc = edit(deployment(), "spec.versions.0.model", {"fineTuneJobRef": {"name": "support.router-v2"}})
    assert pydantic_errors(doc) == []
    assert admit_deployment(doc) == []


# -- the fallback ---------------------------------------------------------------------------------------


def test_a_fallback_to_the_only_version_is_refused() -> None:
    """With one version, the fallback retried a failed request on the very version that failed."""
    single = {"name": "tuned", "model": {"uri": "file:///models/tuned"}, "weight": 100}
    doc = edit(deployment(), "spec.versions", [single])
    doc = edit(doc, "spec.rollout", None)
    assert pydantic_errors(doc) == [
        "ModelDeployment/support-router: spec: fallback.version must name another version: 'tuned' is the "
        "only one, so a failed request would be retried on the version that just failed"
    ]
    assert admit_deployment(doc) == validate_says(doc)
    assert pydantic_errors(edit(doc, "spec.fallback", None)) == []


# -- signs and ranges are told as such ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.training.learningRate", "-3e-4", 'must not be negative (got "-3e-4")'),
        (
            "spec.training.weightDecay",
            -0.1,
            "must not be negative (got the number -0.1; write it as a string in quotes)",
        ),
        ("spec.dataset.validationSplit", "-0.1", 'must be between 0 and 1 (got "-0.1")'),
        ("spec.dataset.seed", -1, "must not be negative (got the number -1)"),
        ("spec.training.learningRate", "1e999", "'1e999' is too large to compute with"),
    ],
)
def test_negative_numbers_are_told_their_sign(path: str, value: Any, expected: str) -> None:
    """A negative number was told it was "not a decimal number as a string"."""
    assert pydantic_errors(edit(finetune_job(), path, value)) == [f"FineTuneJob/tiny-sql: {path}: {expected}"]


def test_a_negative_sampling_default_is_told_its_range() -> None:
    doc = edit(deployment(), "spec.generation.defaults.temperature", "-0.5")
    assert pydantic_errors(doc) == [
        "ModelDeployment/support-router: spec.generation.defaults.temperature: "
        'must be between 0 and 2 (got "-0.5")'
    ]


# -- every problem of a resource in one run -------------------------------------------------------------


def test_cross_field_problems_come_with_the_field_errors() -> None:
    """Fallback, prompt names and defaults above limits were checked only once every field was valid, so
    a user fixed one error per run."""
    doc = edit(deployment(), "spec.versions.0.weight", "80")  # a field error: a string for an integer
    doc = edit(doc, "spec.versions.1.prompt", "v2")
    doc = edit(doc, "spec.fallback.version", "stable")
    doc = edit(doc, "spec.generation.defaults.temperature", "1.8")  # limits.maxTemperature is 1.5
    doc = edit(doc, "spec.generation.limits.maxTokens", 0)
    subject = "ModelDeployment/support-router"
    assert pydantic_errors(doc) == [
        f'{subject}: spec.versions[0].weight: must be an integer (got "80")',
        f"{subject}: spec.generation.limits.maxTokens: must be at least 1 (got the number 0)",
        f"{subject}: spec.generation: defaults.temperature must not be above limits.maxTemperature, "
        "got 1.8 > 1.5",
        f"{subject}: spec: a version's prompt must name an entry of prompts: version int8 names 'v2'",
        f"{subject}: spec: fallback.version 'stable' is not one of the versions",
    ]


def test_rules_skip_what_they_cannot_read_yet() -> None:
    """On raw input a rule does not guess: a weight that is not an integer leaves the sum unchecked, and
    a version without a valid name leaves the fallback unchecked (the field errors say what is wrong)."""
    doc = edit(deployment(), "spec.versions.0.weight", "70")
    doc = edit(doc, "spec.versions.1.name", 7)
    subject = "ModelDeployment/support-router"
    assert pydantic_errors(doc) == [
        f'{subject}: spec.versions[0].weight: must be an integer (got "70")',
        f"{subject}: spec.versions[1].name: must be a string (got the number 7)",
    ]


def test_the_split_rule_comes_with_other_dataset_errors() -> None:
    doc = edit(finetune_job(), "spec.dataset.validationSplit", "0")
    doc = edit(doc, "spec.dataset.seed", "42")
    doc = edit(doc, "spec.training.batchSize", 0)
    assert pydantic_errors(doc) == [
        'FineTuneJob/tiny-sql: spec.dataset.seed: must be an integer (got "42")',
        "FineTuneJob/tiny-sql: spec.dataset.validationSplit: "
        'must be above 0 when validationUri is not set (got "0")',
        "FineTuneJob/tiny-sql: spec.training.batchSize: must be at least 1 (got the number 0)",
    ]


# -- durations the gateway divides by ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["cache.ttl", "fallback.timeout"])
def test_a_zero_duration_the_gateway_cannot_use_is_refused(field: str) -> None:
    """The gateway refuses a cache ttl or fallback timeout of 0; validate passed them (found by the
    property test in tests/unit/contract)."""
    doc = edit(deployment(), f"spec.{field}", "0s")
    assert pydantic_errors(doc) == [
        f"ModelDeployment/support-router: spec.{field}: '0s' must be longer than 0s"
    ]
    assert admit_deployment(doc) == validate_says(doc)
    assert admit_deployment(edit(deployment(), f"spec.{field}", "500ms")) == []


def test_every_positive_duration_is_refused_at_zero_by_the_crd_too() -> None:
    zero_pause = edit(deployment(), "spec.rollout.steps.0.pause", "0m")
    assert admit_deployment(zero_pause) == ["spec.rollout.steps[0].pause: '0m' must be longer than 0s"]
    zero_window = edit(deployment(), "spec.rollout.analysis.window", "0ms")
    assert admit_deployment(zero_window) == ["spec.rollout.analysis.window: '0ms' must be longer than 0s"]
