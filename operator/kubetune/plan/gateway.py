"""The gateway of a ModelDeployment: the weights it is told (effective weights) and its config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.gateway.config import GatewayConfigError, parse_gateway_config
from kubetune.rollout.weights import proportional
from kubetune_contract.common import as_float
from kubetune_contract.deployment import (
    AccessLimits,
    ModelDeployment,
    Pricing,
    PromptTemplate,
    duration_seconds,
)


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
        "audit": {"stdout": access.audit.enabled},
    }
    if access.auth is not None:
        rendered["auth"] = access.auth
    if access.store.redis_url is not None:
        rendered["store"]["redisUrl"] = access.store.redis_url
    return rendered


def _prompt(prompt: PromptTemplate) -> dict[str, Any]:
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
    return rendered


def gateway_config(
    deployment: ModelDeployment,
    urls: Mapping[str, str],
    weights: Mapping[str, int],
    ready: Mapping[str, bool] | None = None,
) -> dict[str, Any] | None:
    """The gateway's config (GatewayConfig JSON, camelCase) for the versions that have a URL.

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
        "prompts": [_prompt(prompt) for prompt in spec.prompts],
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
    }
    try:
        parse_gateway_config(json.dumps(config), "gateway config")
    except GatewayConfigError as exc:
        raise GatewayConfigInvalid(str(exc)) from exc
    return config
