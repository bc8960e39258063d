"""A version with spec.serving.autoscaling.minReplicas 0 is scaled by a KEDA ScaledObject, not an HPA."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune.gateway.metrics import OPEN_REQUESTS_METRIC
from kubetune.kube import permissions
from kubetune.kube.children import ChildImages, build_version_children, open_requests_query
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import Autoscaling, Serving

REF = DeploymentRef(name="support-bot", namespace="team-a", uid="0b4c7a52-9d7e-4d5c-8c36-4c1f0d9a1e01")
IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")
PROMETHEUS = "http://prometheus.monitoring.svc:9090"


def version(autoscaling: Autoscaling) -> VersionServing:
    return VersionServing(
        name="tuned",
        model_uri="pvc://artifacts/team-a/support-lora/v1",
        bento="support-bot-tuned",
        env={"KUBETUNE_DEPLOYMENT": "support-bot", "KUBETUNE_VERSION": "tuned"},
        serving=Serving(autoscaling=autoscaling),
    )


TO_ZERO = Autoscaling(min_replicas=0, max_replicas=3, target_concurrency=4, scale_to_zero_after="90s")


def test_min_replicas_zero_gives_a_scaled_object_on_the_gateways_open_requests_instead_of_an_hpa() -> None:
    children = build_version_children(REF, version(TO_ZERO), IMAGES, PROMETHEUS)

    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "support-bot-tuned"),
        ("Service", "support-bot-tuned"),
        ("ScaledObject", "support-bot-tuned"),
    ]
    deployment, _, scaled = children
    assert "replicas" not in deployment["spec"]  # KEDA owns the count, down to 0
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == "team-a"
    (owner,) = scaled["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ModelDeployment", REF.uid, True)
    assert scaled["metadata"]["labels"]["kubetune.dev/version"] == "tuned"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support-bot-tuned",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 3)
    assert spec["cooldownPeriod"] == 90  # scaleToZeroAfter
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": PROMETHEUS,
        "query": f'sum({OPEN_REQUESTS_METRIC}{{deployment="support-bot",version="tuned"}}) or vector(0)',
        "threshold": "4",  # targetConcurrency per replica
        "activationThreshold": "0",  # one held request wakes the version
    }
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA's schema


def test_scale_to_zero_after_defaults_to_five_minutes_of_no_requests() -> None:
    autoscaling = Autoscaling(min_replicas=0)
    (scaled,) = [
        c
        for c in build_version_children(REF, version(autoscaling), IMAGES, PROMETHEUS)
        if c["kind"] == "ScaledObject"
    ]
    assert scaled["spec"]["cooldownPeriod"] == 300
    assert scaled["spec"]["maxReplicaCount"] == autoscaling.max_replicas


def test_min_replicas_one_keeps_the_hpa_and_no_scaled_object() -> None:
    children = build_version_children(REF, version(Autoscaling(min_replicas=1)), IMAGES, PROMETHEUS)
    assert [c["kind"] for c in children] == ["Deployment", "Service", "HorizontalPodAutoscaler"]


def test_scaling_to_zero_without_the_operators_prometheus_names_the_field_and_the_setting() -> None:
    with pytest.raises(
        ValueError, match=r"spec\.serving\.autoscaling\.minReplicas: 0 needs .*KUBETUNE_PROMETHEUS_URL"
    ):
        build_version_children(REF, version(TO_ZERO), IMAGES, prometheus_url=None)


def test_scale_to_zero_after_is_refused_unless_min_replicas_is_zero() -> None:
    with pytest.raises(ValidationError, match="scaleToZeroAfter only applies with minReplicas 0"):
        Autoscaling(min_replicas=1, scale_to_zero_after="10m")
    with pytest.raises(ValidationError):
        Autoscaling(min_replicas=0, scale_to_zero_after="0s")
    assert Autoscaling(min_replicas=0, hold_timeout="30s").hold_seconds == 30


def test_the_query_selects_the_gateways_series_of_one_version() -> None:
    assert (
        open_requests_query("a", "b")
        == f'sum({OPEN_REQUESTS_METRIC}{{deployment="a",version="b"}}) or vector(0)'
    )


def test_the_operators_rbac_manages_scaled_objects() -> None:
    granted = permissions.grants(clusterwide=False)
    assert {("keda.sh", "scaledobjects", verb) for verb in permissions.SERVER_SIDE_APPLY_VERBS} <= granted
