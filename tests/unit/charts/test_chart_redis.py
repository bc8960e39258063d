"""The chart's optional Redis for ModelDeployment gateways (limits, budgets, experiments shared by
replicas): off by default; on, a Deployment and Service that validate, meet the restricted pod
security standard and never share labels with the operator's pods."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[3] / "charts" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def rendered(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    texts = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for name, text in sorted(texts.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def test_no_redis_unless_enabled(chart: helm.Chart) -> None:
    assert not [doc for doc in rendered(chart, {}) if doc["metadata"]["name"].endswith("-redis")]


def test_an_enabled_redis_is_a_valid_restricted_deployment_and_service(chart: helm.Chart) -> None:
    docs = rendered(chart, {"redis": {"enabled": True}})
    redis = [doc for doc in docs if doc["metadata"]["name"] == "kubetune-redis"]
    assert sorted(doc["kind"] for doc in redis) == ["Deployment", "Service"]
    for doc in redis:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    deployment = next(doc for doc in redis if doc["kind"] == "Deployment")
    service = next(doc for doc in redis if doc["kind"] == "Service")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 6379
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the operator's Service and Deployment select its own pods only, never Redis's
    operator = next(doc for doc in docs if doc["kind"] == "Deployment" and doc is not deployment)
    assert not operator["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_the_values_schema_refuses_an_unknown_redis_setting(chart: helm.Chart) -> None:
    with pytest.raises(Exception, match="redis"):
        chart.render({"redis": {"enabled": True, "persistence": True}}, name=RELEASE, namespace=NAMESPACE)


def test_a_password_secret_makes_redis_require_it_without_showing_it(chart: helm.Chart) -> None:
    values = {"redis": {"enabled": True, "passwordSecret": {"name": "redis-auth", "key": "pw"}}}
    deployment = next(doc for doc in rendered(chart, values) if doc["metadata"]["name"] == "kubetune-redis")
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "pw"}}}
    ]
    # the kubelet expands $(REDIS_PASSWORD); the rendered manifest never holds the password
    assert container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    # tests/integration/test_gateway_redis_password.py runs redis-server with these arguments

    open_redis = next(
        doc
        for doc in rendered(chart, {"redis": {"enabled": True}})
        if doc["metadata"]["name"] == "kubetune-redis"
    )
    (container,) = open_redis["spec"]["template"]["spec"]["containers"]
    assert "--requirepass" not in container["args"] and "env" not in container
