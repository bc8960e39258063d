"""The gateway of a ModelDeployment: the weights it is told (effective weights) and its config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.gateway.config import GatewayConfigError, parse_gateway_config
from kubetune.rollout.weights import proportional
from kubetune_contract.common import as_float
from kubetune_contract.deployment import (
    GENERATED_PROMPT_PARTS,
    AccessLimits,
    Autoscaling,
    ModelDeployment,
    ModelVersion,
    Pricing,
    PromptPart,
    PromptTemplate,
    duration_seconds,
)
from kubetune_contract.workspace import MODEL_CARD_FILE, MODEL_CARD_JSON_FILE


def effective_weights(
    planned: Mapping[str, int], answering: Mapping[str, bool], served: Sequence[str] | set[str]
) -> dict[str, int]:
    """The planned weights with the share of versions that do not answer moved to those that do.

    When no version with planned traffic answers, the versions being served keep their planned
    share (what status shows; the gateway config marks them not ready, so the gateway answers 503
    rather than send them requests); when none is served, every weight is 0.
    """
    carrying = {name: weight for name, weight in planned.items() if weight > 0 and answering.get(name)}
    if not carrying:
        carrying = {name: weight for name, weight in planned.items() if weight > 0 and name in served}
    if not carrying:
        return dict.fromkeys(planned, 0)
    split = proportional(100, carrying)
    return {name: split.get(name, 0) for name in planned}


class GatewayConfigInvalid(ValueError):
    """The spec makes a gateway config the gateway would refuse (the message names the field)."""


def _pricing(pricing: Pricing | None) -> dict[str, float] | None:
    if pricing is None:
        return None
    return {
        "inputPerMillion": as_float(pricing.input_per_million),
        "outputPerMillion": as_float(pricing.output_per_million),
    }


def _limits(limits: AccessLimits) -> dict[str, Any]:
    values = {
        "requestsPerMinute": limits.requests_per_minute,
        "tokensPerMinute": limits.tokens_per_minute,
        "tokensPerDay": limits.tokens_per_day,
        "tokensPerMonth": limits.tokens_per_month,
        "costPerDay": as_float(limits.cost_per_day),
        "costPerMonth": as_float(limits.cost_per_month),
    }
    return {key: value for key, value in values.items() if value is not None}


def _access(deployment: ModelDeployment) -> dict[str, Any]:
    """The gateway's ``access`` section from ``spec.access``. Where keys, the signing key and the audit
    file live is the serving backend's to add (a Secret mount on a cluster, files locally), as is the
    default of an unset ``auth`` (required on a cluster, open until the first key locally)."""
    access = deployment.spec.access
    rendered: dict[str, Any] = {
        "limits": {
            "perKey": _limits(access.limits.per_key),
            "perTenant": _limits(access.limits.per_tenant),
            "tenants": {entry.tenant: _limits(entry.limits) for entry in access.limits.tenants},
        },
        "store": {"onUnavailable": access.store.on_unavailable},
        "audit": {"stdout": access.audit.enabled, "logContent": access.audit.log_content},
    }
    if access.auth is not None:
        rendered["auth"] = access.auth
    if access.store.redis_url is not None:
        rendered["store"]["redisUrl"] = access.store.redis_url
    if access.store.password_secret_ref is not None:
        secret = access.store.password_secret_ref
        rendered["store"]["redisPasswordSecret"] = {"name": secret.name, "key": secret.key}
    return rendered


def prompt_config(prompt: PromptTemplate, parts: Sequence[PromptPart]) -> dict[str, Any]:
    """A prompt as the gateway config holds it (PromptConfig JSON): ``systemParts`` resolved to the
    texts of ``parts`` (``spec.promptParts``), generated parts by name only."""
    texts = {part.name: part.text for part in parts}
    rendered: dict[str, Any] = {
        "name": prompt.name,
        "system": prompt.system,
        "template": prompt.template,
        "examples": [{"user": e.user, "assistant": e.assistant} for e in prompt.examples],
    }
    if prompt.few_shot is not None:
        few_shot = prompt.few_shot
        rendered["fewShot"] = {"uri": few_shot.uri, "k": few_shot.k, "select": few_shot.select}
    if prompt.reasoning is not None:
        # mode is always hidden: the markers are what the model server needs to hide it
        rendered["reasoning"] = {"open": prompt.reasoning.open, "close": prompt.reasoning.close}
    if prompt.system_parts:
        rendered["systemParts"] = [
            {"name": name} if name in GENERATED_PROMPT_PARTS else {"name": name, "text": texts[name]}
            for name in prompt.system_parts
        ]
    if prompt.constitution is not None:
        rendered["constitution"] = prompt.constitution.model_dump(by_alias=True, mode="json")
    return rendered


def _model_card_links(version: ModelVersion, model_uri: str | None) -> dict[str, str] | None:
    published_by_a_job = version.model.fine_tune_job_ref or version.model.quantize_job_ref
    if model_uri is None or published_by_a_job is None:
        return None
    root = model_uri.rstrip("/")
    return {"markdown": f"{root}/{MODEL_CARD_FILE}", "json": f"{root}/{MODEL_CARD_JSON_FILE}"}


def _scale_from_zero(autoscaling: Autoscaling | None) -> dict[str, Any] | None:
    """With minReplicas 0 the gateway holds a sleeping version's requests (kubetune.gateway.cold_start)."""
    if autoscaling is None or not autoscaling.scales_to_zero:
        return None
    return {"maxHeldRequests": autoscaling.max_held_requests, "holdSeconds": autoscaling.hold_seconds}


def gateway_config(
    deployment: ModelDeployment,
    urls: Mapping[str, str],
    weights: Mapping[str, int],
    ready: Mapping[str, bool] | None = None,
    model_uris: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """The gateway's config (GatewayConfig JSON, camelCase) for the versions that have a URL.

    ``model_uris``: the model each version serves; a version serving a FineTuneJob's or QuantizeJob's
    published model gets the links of its model card (which every published artifact carries).

    ``ready``: which versions answer; each version gets ``ready`` from it (absent: not ready), and
    the gateway sends no request to a version that is not. None leaves ``ready`` out (the gateway
    then takes every version as ready until it fails to connect).

    None when no such version has traffic (nothing for a gateway to do yet). Decimal strings become
    floats and durations seconds. Raises :class:`GatewayConfigInvalid` for a config the gateway would
    reject, e.g. a prompt template without ``{{input}}``.
    """
    spec = deployment.spec
    versions: list[dict[str, Any]] = [
        {
            "name": version.name,
            "url": urls[version.name],
            "weight": weights.get(version.name, 0),
            "prompt": version.prompt,
            "pricing": _pricing(version.pricing),
        }
        for version in spec.versions
        if version.name in urls
    ]
    served_versions = [served for served in spec.versions if served.name in urls]
    for version_config, served in zip(versions, served_versions, strict=True):
        links = _model_card_links(served, (model_uris or {}).get(served.name))
        if links is not None:
            version_config["modelCard"] = links
    if not any(version["weight"] for version in versions):
        return None
    if ready is not None:
        for version in versions:
            version["ready"] = ready.get(version["name"], False)
    names = [version["name"] for version in versions]
    generation = spec.generation

    def present(values: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in values.items() if value is not None}

    config: dict[str, Any] = {
        "deployment": deployment.metadata.name,
        "namespace": deployment.metadata.namespace,
        "versions": versions,
        "control": spec.versions[0].name if spec.versions[0].name in names else names[0],
        "routing": {
            "stickyBy": spec.routing.sticky_by,
            "header": spec.routing.header,
            "overrideHeader": spec.routing.override_header,
        },
        "generation": {
            "defaults": present(
                {
                    "temperature": as_float(generation.defaults.temperature),
                    "topP": as_float(generation.defaults.top_p),
                    "maxTokens": generation.defaults.max_tokens,
                }
            ),
            "limits": present(
                {
                    "maxTemperature": as_float(generation.limits.max_temperature),
                    "maxTopP": as_float(generation.limits.max_top_p),
                    "maxTokens": generation.limits.max_tokens,
                }
            ),
            "maxPromptTokens": generation.context_window.max_prompt_tokens,
        },
        "prompts": [prompt_config(prompt, spec.prompt_parts) for prompt in spec.prompts],
        "cache": (
            {
                "enabled": spec.cache.enabled,
                "ttlSeconds": duration_seconds(spec.cache.ttl),
                "maxEntries": spec.cache.max_entries,
            }
            if spec.cache is not None
            else {"enabled": False}
        ),
        "fallback": (
            {"version": spec.fallback.version, "timeoutSeconds": duration_seconds(spec.fallback.timeout)}
            if spec.fallback is not None and spec.fallback.version in names
            else None
        ),
        "access": _access(deployment),
        "scaleFromZero": _scale_from_zero(spec.serving.autoscaling),
        "feedback": {
            "capture": spec.feedback.capture,
            "maxRecords": spec.feedback.max_records,
            "maxAgeSeconds": duration_seconds(spec.feedback.max_age),
            "windowSeconds": duration_seconds(spec.feedback.window),
        },
        "guardrails": (
            spec.guardrails.model_dump(mode="json", by_alias=True, exclude_none=True)
            if spec.guardrails is not None
            else None
        ),
    }
    try:
        parse_gateway_config(json.dumps(config), "gateway config")
    except GatewayConfigError as exc:
        raise GatewayConfigInvalid(str(exc)) from exc
    return config
