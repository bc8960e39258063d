"""The cluster side of access control, applied by the kube serving backend to kmock: the version
pods' NetworkPolicy, the gateway's key Secret mount and watch (its own ServiceAccount), an
authentication-required config and Redis's password from a Secret."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from lightkube import AsyncClient

from kubetune.kube.children import ACCESS_DIR, ChildImages
from kubetune.kube.serving import KubernetesServing
from kubetune.plan.versions import DeploymentRef

if TYPE_CHECKING:
    from fixtures.cluster import Cluster

IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")


async def test_the_gateway_is_the_only_way_in_and_requires_keys(cluster: Cluster, api: AsyncClient) -> None:
    created = await cluster.create(
        "modeldeployments",
        {
            "metadata": {"name": "support-bot"},
            "spec": {"versions": [{"name": "tuned", "model": {"uri": "hf://acme/x"}, "weight": 100}]},
        },
    )
    ref = DeploymentRef(name="support-bot", namespace="default", uid=created["metadata"]["uid"])
    config = {
        "deployment": "support-bot",
        "namespace": "default",
        "versions": [{"name": "tuned", "url": "http://support-bot-tuned.default.svc:3000", "weight": 100}],
        "access": {
            "limits": {"perKey": {"requestsPerMinute": 60}},
            "audit": {"stdout": True},
            "store": {
                "redisUrl": "redis://kubetune-redis.kubetune-system:6379/0",
                "redisPasswordSecret": {"name": "redis-auth", "key": "password"},
            },
        },
    }
    await KubernetesServing(api, IMAGES).ensure_gateway(ref, config)

    policy = cluster.peek("networkpolicies", "support-bot-versions")
    assert policy is not None and policy["metadata"]["ownerReferences"][0]["uid"] == ref.uid
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "kubetune.dev/deployment": "support-bot",
        "app.kubernetes.io/component": "serving",
    }
    stored_config = cluster.peek("configmaps", "support-bot-gateway")
    assert stored_config is not None
    access = json.loads(stored_config["data"]["gateway.json"])["access"]
    assert access["auth"] == "required" and access["keysFile"].startswith(ACCESS_DIR)
    assert access["keysSecret"] == "support-bot-gateway-access"  # watched, so revocations apply at once
    gateway = cluster.peek("deployments", "support-bot")
    assert gateway is not None
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["access"]["secret"]["secretName"] == "support-bot-gateway-access"
    assert (
        gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    )
    # its own identity, which `kubetune keys` binds to the Role of that Secret
    account = cluster.peek("serviceaccounts", "support-bot-gateway")
    assert account is not None and account["metadata"]["ownerReferences"][0]["uid"] == ref.uid
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == "support-bot-gateway"
    # Redis's password from its Secret, never in the ConfigMap
    env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "KUBETUNE_REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}},
    } in env
