"""spec.access and versions[].pricing rendered into the gateway config the gateway validates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune.gateway.config import parse_gateway_config
from kubetune.plan.gateway import gateway_config
from kubetune_contract.deployment import PASSWORD_NEEDS_REDIS_URL, ModelDeployment


def _deployment(spec_extra: dict[str, Any], version_extra: dict[str, Any] | None = None) -> ModelDeployment:
    version = {"name": "tuned", "model": {"uri": "hf://org/model"}, "weight": 100, **(version_extra or {})}
    return ModelDeployment.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "bot", "namespace": "team-a"},
            "spec": {"versions": [version], **spec_extra},
        }
    )


def test_access_limits_store_and_pricing_reach_the_gateway_config() -> None:
    deployment = _deployment(
        {
            "access": {
                "auth": "required",
                "limits": {
                    "perKey": {"requestsPerMinute": 60, "costPerDay": "2.5"},
                    "perTenant": {"tokensPerMonth": 1000000},
                    "tenants": [{"tenant": "vip", "limits": {"tokensPerMonth": 5000000}}],
                },
                "store": {"redisUrl": "redis://kubetune-redis:6379/0", "onUnavailable": "failOpen"},
                "audit": {"enabled": False},
            }
        },
        {"pricing": {"inputPerMillion": "0.5", "outputPerMillion": "1.5"}},
    )
    config = gateway_config(deployment, {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None
    parsed = parse_gateway_config(json.dumps(config))
    access = parsed.access
    assert access.auth == "required" and access.audit.stdout is False
    assert access.limits.per_key.requests_per_minute == 60 and access.limits.per_key.cost_per_day == 2.5
    assert access.limits.per_tenant.tokens_per_month == 1_000_000
    assert access.limits.tenants["vip"].tokens_per_month == 5_000_000
    assert (
        access.store.redis_url == "redis://kubetune-redis:6379/0"
        and access.store.on_unavailable == "failOpen"
    )
    pricing = parsed.version("tuned").pricing
    assert pricing is not None and pricing.cost(1_000_000, 1_000_000) == 2.0


def test_an_unset_auth_is_left_to_the_serving_backend() -> None:
    config = gateway_config(_deployment({}), {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None and "auth" not in config["access"]
    assert parse_gateway_config(json.dumps(config)).access.auth == "whenKeysExist"


def test_a_redis_password_secret_reaches_the_gateway_config_with_its_default_key() -> None:
    deployment = _deployment(
        {"access": {"store": {"redisUrl": "redis://r:6379/0", "passwordSecretRef": {"name": "redis-auth"}}}}
    )
    config = gateway_config(deployment, {"tuned": "http://tuned:3000"}, {"tuned": 100})
    assert config is not None
    secret = parse_gateway_config(json.dumps(config)).access.store.redis_password_secret
    assert secret is not None and (secret.name, secret.key) == ("redis-auth", "password")


def test_a_redis_password_without_a_redis_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as refused:
        _deployment({"access": {"store": {"passwordSecretRef": {"name": "redis-auth"}}}})
    [error] = refused.value.errors()
    assert error["loc"] == ("spec", "access", "store")
    assert PASSWORD_NEEDS_REDIS_URL in error["msg"]
