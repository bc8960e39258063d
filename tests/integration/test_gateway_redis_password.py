"""Redis with a password, from the spec to a real ``redis-server``: the chart's bundled Redis started
with the command line the chart renders (its ``$(REDIS_PASSWORD)`` expanded from the Secret, as the
kubelet does), and a gateway configured from a ModelDeployment whose ``spec.access.store.
passwordSecretRef`` names the Secret, with the environment its rendered container gets from that
Secret. The right password: the limits count in Redis. A wrong or missing one: Redis is reported
unreachable (``/healthz``, ``/readyz``, the failure metric) and ``onUnavailable`` decides.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
import redis as redis_client
import yaml

from asgi_server import serve_app
from gateway_processes import serve_chat_completions
from kubetune.api.validation import parse_resource
from kubetune.gateway.app import create_app
from kubetune.gateway.config import REDIS_PASSWORD_ENV, parse_gateway_config
from kubetune.kube.children import GATEWAY_CONFIG_KEY, ChildImages, build_gateway_children
from kubetune.plan.gateway import gateway_config
from kubetune.plan.versions import DeploymentRef
from kubetune_contract.deployment import ModelDeployment
from redis_server import RedisServer, RedisUnavailable, redis_binary, running_redis

REPO = Path(__file__).resolve().parents[2]
REDIS_SECRET_NAME = "redis-auth"
REDIS_SECRET_DATA = {"password": "a-long-redis-password-for-the-test"}  # what the Secret holds
REF = DeploymentRef(name="support-bot", namespace="team-a", uid="uid-1")


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    with serve_chat_completions() as url:
        yield url


def _expand(text: str, env: dict[str, str]) -> str:
    """``$(NAME)`` in a container's args replaced by the variable's value, as the kubelet does."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda match: env[match.group(1)], text)


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment variables taken from the Secret, resolved as the kubelet would."""
    env = {}
    for variable in container.get("env", []):
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference is not None:
            assert reference["name"] == REDIS_SECRET_NAME
            env[variable["name"]] = REDIS_SECRET_DATA[reference["key"]]
    return env


def chart_redis_arguments() -> list[str]:
    """The command line of the chart's Redis with ``redis.passwordSecret`` naming the Secret."""
    values = {"redis": {"enabled": True, "passwordSecret": {"name": REDIS_SECRET_NAME, "key": "password"}}}
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        texts = chart.render(values, name="kubetune", namespace="kubetune-system")
    documents = [
        doc
        for name, text in texts.items()
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    deployment = next(
        doc
        for doc in documents
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "kubetune-redis"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _secret_env(container)
    return [_expand(argument, env) for argument in container["args"]]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        redis_binary()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    password = REDIS_SECRET_DATA["password"]
    with running_redis(
        tmp_path_factory.mktemp("redis"), args=chart_redis_arguments(), password=password
    ) as server:
        yield server


def deployment(redis_url: str, on_unavailable: str) -> ModelDeployment:
    document = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": REF.name, "namespace": REF.namespace, "uid": REF.uid},
        "spec": {
            "versions": [{"name": "tuned", "model": {"uri": "hf://acme/support@abc123"}, "weight": 100}],
            "access": {
                "auth": "disabled",
                "limits": {"perKey": {"requestsPerMinute": 1000}},
                "store": {
                    "redisUrl": redis_url,
                    "passwordSecretRef": {"name": REDIS_SECRET_NAME},
                    "onUnavailable": on_unavailable,
                },
            },
        },
    }
    return parse_resource(document, ModelDeployment)


@contextmanager
def gateway(
    model_server: str,
    redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    on_unavailable: str = "failClosed",
    secret_data: dict[str, str] | None = None,
) -> Iterator[tuple[str, str]]:
    """A gateway as the cluster renders it for the spec: its config from the ConfigMap, its environment
    from the Secret (``secret_data`` standing in for what the Secret holds; None: no such variable).
    Yields its URL and the prefix of its counters in Redis."""
    rendered = gateway_config(deployment(redis.url, on_unavailable), {"tuned": model_server}, {"tuned": 100})
    assert rendered is not None
    children = build_gateway_children(REF, rendered, ChildImages())
    config_map = next(child for child in children if child["kind"] == "ConfigMap")
    pod = next(child for child in children if child["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    [password_variable] = [v for v in container["env"] if v["name"] == REDIS_PASSWORD_ENV]
    assert password_variable["valueFrom"]["secretKeyRef"] == {"name": REDIS_SECRET_NAME, "key": "password"}
    if secret_data is None:
        monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    else:
        monkeypatch.setenv(REDIS_PASSWORD_ENV, secret_data["password"])
    document = json.loads(config_map["data"][GATEWAY_CONFIG_KEY])
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    document["access"]["store"]["keyPrefix"] = prefix
    document["access"].pop("keysFile")  # the mounted Secret's path: no such file here, so no keys
    document["access"].pop("keysSecret")
    config = parse_gateway_config(json.dumps(document))
    with serve_app(create_app(config)) as url:
        yield url, prefix


def _ask(url: str) -> httpx.Response:
    body = {"model": REF.name, "messages": [{"role": "user", "content": "hello"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def _metric(url: str, name: str, **labels: str) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and all(label in line for label in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_gateway_authenticates_to_the_charts_redis_with_the_secrets_password(
    model_server: str, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gateway(model_server, redis, monkeypatch, secret_data=REDIS_SECRET_DATA) as (url, prefix):
        for _ in range(3):
            assert _ask(url).status_code == 200
        assert httpx.get(f"{url}/healthz", timeout=10).json()["limitStoreError"] is None
        assert _metric(url, "kubetune_gateway_limit_store_up") == 1
    # the counters are in that Redis, which refuses anyone without the password
    with redis_client.Redis(port=redis.port, password=REDIS_SECRET_DATA["password"]) as client:
        assert client.keys(f"{prefix}:*")
    with redis_client.Redis(port=redis.port) as client, pytest.raises(redis_client.AuthenticationError):
        client.keys("*")


def test_a_wrong_password_is_reported_and_fails_closed(
    model_server: str, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = {"password": "not-the-password"}
    with gateway(model_server, redis, monkeypatch, "failClosed", wrong) as (url, _prefix):
        refused = _ask(url)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "limit_store_unavailable"
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert "AuthenticationError" in health["limitStoreError"]
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503 and "failClosed" in ready.json()["refusing"]
        assert _metric(url, "kubetune_gateway_limit_store_up") == 0
        assert _metric(url, "kubetune_gateway_limit_store_failures_total", behaviour="failClosed") >= 1


def test_a_missing_password_is_reported_naming_the_secret_and_fails_open_when_asked(
    model_server: str, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gateway(model_server, redis, monkeypatch, "failOpen", None) as (url, _prefix):
        assert _ask(url).status_code == 200  # served without limits, as the spec chose
        problem = httpx.get(f"{url}/healthz", timeout=10).json()["limitStoreError"]
        assert f"Secret {REDIS_SECRET_NAME!r}" in problem and REDIS_PASSWORD_ENV in problem
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200  # failOpen serves
        assert _metric(url, "kubetune_gateway_limit_store_failures_total", behaviour="failOpen") >= 1
