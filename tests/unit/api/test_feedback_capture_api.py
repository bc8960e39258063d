"""spec.feedback and spec.access.audit.logContent of a ModelDeployment: admitted as written, bad values
refused naming the field by `kubetune validate` and the CRD alike, and carried to the gateway config."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_deployment_api import admit, pydantic_errors, sample
from test_quantize_api import edit

from kubetune.gateway.config import parse_gateway_config
from kubetune.plan.gateway import gateway_config
from kubetune_contract.deployment import ModelDeployment

FEEDBACK: dict[str, Any] = {"capture": True, "maxRecords": 500, "maxAge": "24h", "window": "10m"}


def test_feedback_capture_and_logged_content_reach_the_gateway_config() -> None:
    doc = edit(edit(sample(), "spec.feedback", FEEDBACK), "spec.access", {"audit": {"logContent": True}})
    assert admit(doc) == []
    assert pydantic_errors(doc) == []
    deployment = ModelDeployment.model_validate(doc)
    config = gateway_config(deployment, {"tuned": "http://t:8000", "int8": "http://i:8000"}, {"tuned": 100})
    assert config is not None
    parsed = parse_gateway_config(json.dumps(config))
    assert parsed.access.audit.log_content is True
    feedback = parsed.feedback
    assert (feedback.capture, feedback.max_records, feedback.max_age_seconds, feedback.window_seconds) == (
        True,
        500,
        86400.0,
        600.0,
    )


def test_by_default_nothing_is_kept() -> None:
    spec = ModelDeployment.model_validate(sample()).spec
    assert spec.feedback.capture is False and spec.access.audit.log_content is False


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("maxRecords", 0, "spec.feedback.maxRecords"),
        ("maxAge", "0s", "spec.feedback.maxAge"),
        ("window", "soon", "spec.feedback.window"),
        ("capture", "yes", "spec.feedback.capture"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field_by_validate_and_the_api_server(
    path: str, value: Any, field: str
) -> None:
    doc = edit(sample(), "spec.feedback", edit(FEEDBACK, path, value))
    validate_errors, server_errors = pydantic_errors(doc), admit(doc)
    assert validate_errors and any(field in error for error in validate_errors), validate_errors
    assert server_errors, "the API server would admit what validate refuses"
