"""ModelDeployment's API: the generated CRD, its CEL rules, offline validation messages, schema vs pydantic.

CEL rules run in cel-python the way the API server runs them (defaults first, then the schema, then the
rules), with Kubernetes' list `sum()`; the helpers come from ``test_cel`` and ``test_crd`` next to this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cel import admit_to, all_rules
from test_crd import structural_problems
from test_quantize_api import edit

from kubetune.api.crd import build_crd, render_crd_yaml
from kubetune.api.kinds import MODELDEPLOYMENT
from kubetune.api.registry import get_definition
from kubetune.api.validation import ResourceInvalid, parse_resource, validate_documents
from kubetune_contract.deployment import ModelDeployment, duration_seconds

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = REPO / "manifests" / "crds" / "modeldeployments.kubetune.dev.yaml"


def sample() -> dict[str, Any]:
    """A valid ModelDeployment: a tuned model and its int8 version 80/20, with a canary rollout."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-router", "namespace": "kubetune-demo"},
        "spec": {
            "versions": [
                {"name": "tuned", "model": {"fineTuneJobRef": {"name": "support-router"}}, "weight": 80},
                {
                    "name": "int8",
                    "model": {"quantizeJobRef": {"name": "support-router-int8"}},
                    "weight": 20,
                    "prompt": "v1",
                },
            ],
            "routing": {"stickyBy": "user"},
            "rollout": {
                "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "2m"}],
                "analysis": {
                    "interval": "30s",
                    "metrics": [
                        {"name": "errorRate", "max": "0.05"},
                        {"name": "tokens", "query": 'sum(rate(x{version="$version"}[$window]))', "min": "1"},
                    ],
                },
            },
            "serving": {
                "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
                "resources": {"requests": {"cpu": "1"}},
            },
            "generation": {
                "defaults": {"temperature": "0.7"},
                "limits": {"maxTemperature": "1.5", "maxTokens": 256},
            },
            "prompts": [{"name": "v1", "system": "Be brief.", "template": "Ticket: {{input}}"}],
            "cache": {"ttl": "5m"},
            "fallback": {"version": "tuned", "timeout": "10s"},
        },
    }


def schema() -> dict[str, Any]:
    result: dict[str, Any] = build_crd(MODELDEPLOYMENT)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def admit(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """What the API server would say: defaulting, then the schema, then CEL (empty list: admitted)."""
    return admit_to(schema(), doc, old)


def pydantic_errors(doc: dict[str, Any]) -> list[str]:
    return [str(issue) for issue in validate_documents([doc])]


def test_committed_crd_is_current() -> None:
    assert CRD_FILE.read_text() == render_crd_yaml(build_crd(MODELDEPLOYMENT))
    chart_copy = REPO / "charts" / "kubetune" / "crds" / CRD_FILE.name
    assert chart_copy.read_text() == CRD_FILE.read_text()


@pytest.mark.parametrize(
    "name", ["mdep", "ModelDeployment", "modeldeployments", "modeldeployments.kubetune.dev"]
)
def test_registry_lookup(name: str) -> None:
    assert get_definition(name) is MODELDEPLOYMENT


def test_names_columns_and_mutable_spec() -> None:
    crd = build_crd(MODELDEPLOYMENT)
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["mdep"] and names["categories"] == ["kubetune"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:4] == ["Ready", "Versions", "Weights", "Rollout"]
    assert not any("oldSelf" in rule for rule in all_rules(schema())), "weights change in place"
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
    assert structural_problems(schema()) == []


def test_sample_is_admitted_and_parses() -> None:
    assert admit(sample()) == []
    resource = parse_resource(sample(), ModelDeployment)
    assert resource.spec.canary is not None and resource.spec.canary.name == "int8"
    assert resource.spec.routing.override_header == "x-kubetune-version"
    assert resource.spec.cache is not None and resource.spec.cache.max_entries == 1024


def test_weight_changes_are_admitted_as_updates() -> None:
    old = sample()
    new = edit(edit(old, "spec.versions.0.weight", 50), "spec.versions.1.weight", 50)
    assert admit(new, old) == []


# Each case: an edit of the sample, the CEL message the API server gives, and the pydantic message.
REJECTED: dict[str, tuple[dict[str, Any], str, str]] = {
    "weights": (edit(sample(), "spec.versions.1.weight", 30), "weights must sum to 100", "got 110"),
    "duplicate-names": (
        edit(sample(), "spec.versions.1.name", "tuned"),
        "names must be unique",
        "repeated: tuned",
    ),
    "two-sources": (
        edit(sample(), "spec.versions.0.model.uri", "file:///models/x"),
        "exactly one of fineTuneJobRef, quantizeJobRef and uri",
        "exactly one of fineTuneJobRef, quantizeJobRef and uri",
    ),
    "unknown-prompt": (
        edit(sample(), "spec.versions.1.prompt", "v9"),
        "must name an entry of prompts",
        "'v9'",
    ),
    "unknown-fallback": (
        edit(sample(), "spec.fallback.version", "v9"),
        "fallback.version",
        "fallback.version",
    ),
    "header-missing": (
        edit(sample(), "spec.routing.stickyBy", "header"),
        "header is required",
        "header is required",
    ),
    "unknown-metric": (
        edit(sample(), "spec.rollout.analysis.metrics.0.name", "errors"),
        "not a built-in metric",
        "not a built-in metric",
    ),
    "unbounded-metric": (
        edit(sample(), "spec.rollout.analysis.metrics.0.max", None),
        "a metric needs min or max",
        "a metric needs min or max",
    ),
    "analysis-checks-nothing": (
        edit(sample(), "spec.rollout.analysis.metrics", []),
        "analysis needs metrics, or skip: true",
        "analysis needs metrics, or skip: true",
    ),
    "analysis-skip-with-metrics": (
        edit(sample(), "spec.rollout.analysis.skip", True),
        "analysis.skip is true, so analysis.metrics must be empty",
        "analysis.skip is true, so analysis.metrics must be empty",
    ),
    "analysis-missing": (
        edit(sample(), "spec.rollout.analysis", None),
        "spec.rollout: 'analysis' is a required property",
        "spec.rollout.analysis",
    ),
    "negative-inconclusive-limit": (
        edit(sample(), "spec.rollout.analysis.inconclusiveLimit", -1),
        "inconclusiveLimit",
        "inconclusiveLimit",
    ),
    "template-without-input": (
        edit(sample(), "spec.prompts.0.template", "Ticket:"),
        "template must contain {{input}}",
        "template must contain {{input}}",
    ),
    "autoscaling-order": (
        edit(sample(), "spec.serving.autoscaling.minReplicas", 5),
        "minReplicas must not exceed maxReplicas",
        "minReplicas must not exceed maxReplicas",
    ),
    "scale-to-zero-after-without-zero": (
        edit(sample(), "spec.serving.autoscaling.scaleToZeroAfter", "10m"),
        "scaleToZeroAfter only applies with minReplicas 0",
        "scaleToZeroAfter only applies with minReplicas 0",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_api_server_and_pydantic_reject(case: str) -> None:
    doc, cel_message, pydantic_message = REJECTED[case]
    assert any(cel_message in failure for failure in admit(doc)), admit(doc)
    errors = pydantic_errors(doc)
    assert errors and any(pydantic_message in error for error in errors), errors
    assert all(error.startswith("ModelDeployment/support-router: spec") for error in errors), errors


def test_rollout_needs_two_versions() -> None:
    doc = sample()
    doc["spec"]["versions"] = [{"name": "tuned", "model": {"uri": "file:///m"}, "weight": 100}]
    assert any("at least two versions" in f for f in admit(doc))
    assert any("at least two versions" in e for e in pydantic_errors(doc))


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.versions.0.name", "Tuned_1", "spec.versions[0].name"),
        ("spec.versions.0.weight", 101, "spec.versions[0].weight"),
        ("spec.rollout.steps.0.pause", "5 minutes", "spec.rollout.steps[0].pause"),
        ("spec.serving.resources.requests.cpu", "lots", "spec.serving.resources.requests.cpu"),
        ("spec.generation.defaults.temperature", 0.7, "spec.generation.defaults.temperature"),
    ],
)
def test_field_level_errors_name_the_field(path: str, value: Any, field: str) -> None:
    doc = edit(sample(), path, value)
    assert admit(doc), "the API server refuses it too"
    errors = pydantic_errors(doc)
    assert any(field in error for error in errors), errors


def test_pydantic_only_checks() -> None:
    decreasing = edit(sample(), "spec.rollout.steps.1.weight", 5)
    assert any("steps weights must increase" in e for e in pydantic_errors(decreasing))
    zero_pause = edit(sample(), "spec.rollout.steps.0.pause", "0s")
    assert any("steps[0].pause: '0s' must be longer than 0s" in e for e in pydantic_errors(zero_pause))
    above_limit = edit(sample(), "spec.generation.defaults.temperature", "2")
    assert any(
        "defaults.temperature must not be above limits.maxTemperature, got 2 > 1.5" in e
        for e in pydantic_errors(above_limit)
    )


def test_durations() -> None:
    assert duration_seconds("1h30m") == 5400.0
    assert duration_seconds("500ms") == 0.5
    assert duration_seconds("1m30s") == 90.0
    with pytest.raises(ValueError, match="not a duration"):
        duration_seconds("90")


def test_quickstart_deployment_is_valid() -> None:
    path = REPO / "examples" / "quickstart" / "03-deployment.yaml"
    if not path.exists():
        pytest.fail("examples/quickstart/03-deployment.yaml is missing")
    doc = yaml.safe_load(path.read_text())
    assert admit(doc) == []
    try:
        resource = parse_resource(doc, ModelDeployment)
    except ResourceInvalid as exc:  # pragma: no cover - the message is the point
        pytest.fail(str(exc))
    assert [v.weight for v in resource.spec.versions] == [80, 20]


def test_canary_example_is_admitted() -> None:
    doc = yaml.safe_load((REPO / "examples" / "canary" / "modeldeployment.yaml").read_text())
    assert admit(doc) == []
    resource = parse_resource(doc, ModelDeployment)
    assert resource.spec.canary is not None and resource.spec.canary.name == "v2"
