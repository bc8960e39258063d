"""The job a step is handed, parsed with the API's own models.

The operator hands every step the resource as a wire dict (camelCase, defaults filled in). Parsing it with
kubetune_contract's models, as strictly as the API does, means the steps have no defaults or rules of their
own: a config the API rejects is rejected here with the same words (kubetune_contract.validation), e.g.
`FineTuneJob/demo: spec.training.batchSize: must be at least 1 (got the number 0)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from kubetune_components.common.errors import ConfigError
from kubetune_contract.common import KubeModel
from kubetune_contract.finetune import FineTuneJob, FineTuneJobSpec
from kubetune_contract.quantize import QuantizeJob
from kubetune_contract.validation import describe_validation_error, resource_identity, validation_issues

Job = TypeVar("Job", bound=KubeModel)


def _parse(model: type[Job], kind: str, config: Mapping[str, Any]) -> Job:
    if config.get("kind", kind) != kind:
        raise ConfigError(f"expected a {kind}, got kind {config.get('kind')!r}")
    if not isinstance(config.get("spec"), Mapping):
        raise ConfigError("the config has no spec")
    try:
        return model.model_validate(config, strict=True)
    except ValidationError as error:
        _, name = resource_identity(config)
        issues = validation_issues(error, model, kind=kind, name=name)
        raise ConfigError("; ".join(str(issue) for issue in issues)) from error


def parse_finetune_job(config: Mapping[str, Any]) -> FineTuneJob:
    return _parse(FineTuneJob, "FineTuneJob", config)


def parse_finetune_spec(spec: Mapping[str, Any]) -> FineTuneJobSpec:
    """A FineTuneJob's spec on its own (for callers that train without a resource around it)."""
    try:
        return FineTuneJobSpec.model_validate(spec, strict=True)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, FineTuneJobSpec)) from error


def parse_quantize_job(config: Mapping[str, Any]) -> QuantizeJob:
    """The QuantizeJob; the operator has already resolved spec.model.fineTuneJobRef into spec.model.uri."""
    if config.get("kind") != "QuantizeJob":
        raise ConfigError(f"expected a QuantizeJob, got kind {config.get('kind')!r}")
    job = _parse(QuantizeJob, "QuantizeJob", config)
    if job.spec.model.uri is None:
        raise ConfigError("spec.model.uri is required (the operator resolves fineTuneJobRef to it)")
    return job
