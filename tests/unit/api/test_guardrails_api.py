"""spec.guardrails of a ModelDeployment: the issue's API block is accepted as written, bad values are
refused naming the field, by `kubetune validate` and the CRD's CEL rules alike, and the gateway config
carries the guardrails as written."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_deployment_api import admit, pydantic_errors, sample
from test_quantize_api import edit

from kubetune.gateway.config import parse_gateway_config
from kubetune.plan.gateway import gateway_config
from kubetune_contract.deployment import ModelDeployment

ISSUE_API_BLOCK: dict[str, Any] = {
    "promptInjection": {
        "action": "block",
        "threshold": "0.5",
        "classifier": {"uri": "pvc://models/pi-classifier"},
    },
    "pii": {
        "input": "redact",
        "output": "redact",
        "entities": ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS"],
    },
    "output": {"allowedLinkDomains": ["example.com"], "stripHtml": True, "detectPromptLeak": True},
    "moderation": {
        "action": "block",
        "categories": [{"name": "violence"}, {"name": "self_harm", "action": "flag"}],
    },
}


def guarded(guardrails: dict[str, Any]) -> Any:
    return edit(sample(), "spec.guardrails", guardrails)


def test_the_issues_api_block_is_admitted_and_reaches_the_gateway_config() -> None:
    doc = guarded(ISSUE_API_BLOCK)
    assert admit(doc) == []
    assert pydantic_errors(doc) == []
    deployment = ModelDeployment.model_validate(doc)
    urls = {"tuned": "http://tuned:8000", "int8": "http://int8:8000"}
    config = gateway_config(deployment, urls, {"tuned": 80, "int8": 20})
    assert config is not None
    parsed = parse_gateway_config(json.dumps(config))
    assert parsed.guardrails == deployment.spec.guardrails
    assert config["guardrails"]["promptInjection"]["classifier"]["uri"] == "pvc://models/pi-classifier"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("promptInjection.threshold", "1.5", "spec.guardrails.promptInjection.threshold"),
        ("promptInjection.action", "redact", "spec.guardrails.promptInjection.action"),
        ("pii.entities", ["SSN"], "spec.guardrails.pii.entities"),
        ("output.allowedLinkDomains", ["https://example.com"], "spec.guardrails.output.allowedLinkDomains"),
        ("moderation.categories", [{"name": "competitors"}], "spec.guardrails.moderation.categories"),
        (
            "moderation.categories",
            [{"name": "violence"}, {"name": "violence", "action": "flag"}],
            "spec.guardrails.moderation",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_its_field_by_validate_and_the_api_server(
    path: str, value: Any, field: str
) -> None:
    doc = guarded(edit(ISSUE_API_BLOCK, path, value))
    validate_errors, server_errors = pydantic_errors(doc), admit(doc)
    assert validate_errors and any(field in error for error in validate_errors), validate_errors
    assert server_errors, "the API server would admit what validate refuses"


def test_an_invalid_regular_expression_is_refused_by_validate() -> None:
    categories = [{"name": "codes", "patterns": ["(unclosed"]}]
    errors = pydantic_errors(guarded(edit(ISSUE_API_BLOCK, "moderation.categories", categories)))
    assert any("spec.guardrails.moderation.categories" in e and "regular expression" in e for e in errors)
