"""The cluster side of access control: no way around the gateway, the key Secret, auth by default."""

from __future__ import annotations

import json
from typing import Any

from kubetune.gateway.config import REDIS_PASSWORD_ENV
from kubetune.kube.children import (
    ACCESS_DIR,
    GATEWAY_CONFIG_KEY,
    SERVING_PORT,
    ChildImages,
    build_gateway_children,
    build_version_children,
    gateway_access_secret_name,
    gateway_service_account_name,
)
from kubetune.kube.gateway_access import Owner, build_gateway_access_role, build_gateway_access_role_binding
from kubetune.kube.permissions import rules_document
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import Serving

REF = DeploymentRef(name="support-bot", namespace="team-a", uid="uid-1")
CONFIG: dict[str, Any] = {
    "deployment": "support-bot",
    "namespace": "team-a",
    "versions": [{"name": "tuned", "url": "http://support-bot-tuned.team-a.svc:3000", "weight": 100}],
    "access": {"limits": {"perKey": {"requestsPerMinute": 60}}, "audit": {"stdout": True}},
}


def _version() -> VersionServing:
    return VersionServing(
        name="tuned",
        model_uri="hf://acme/support@abc123",
        bento="support-bot-tuned",
        env={"KUBETUNE_DEPLOYMENT": "support-bot", "KUBETUNE_VERSION": "tuned"},
        serving=Serving(),
    )


def test_version_pods_admit_only_their_gateway_and_metrics_scrapers() -> None:
    policy = build_gateway_children(REF, CONFIG, ChildImages())[-1]
    assert (policy["kind"], policy["metadata"]["name"]) == ("NetworkPolicy", "support-bot-versions")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    version_pod = build_version_children(REF, _version(), ChildImages())[0]["spec"]["template"]["metadata"]
    assert spec["podSelector"]["matchLabels"].items() <= version_pod["labels"].items()
    gateway = next(c for c in build_gateway_children(REF, CONFIG, ChildImages()) if c["kind"] == "Deployment")
    gateway_pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert not spec["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()  # clients reach it
    from_gateway, from_scrapers = spec["ingress"]
    assert from_gateway == {
        "from": [{"podSelector": {"matchLabels": from_gateway["from"][0]["podSelector"]["matchLabels"]}}]
    }
    assert from_gateway["from"][0]["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()
    assert from_scrapers["ports"] == [{"protocol": "TCP", "port": SERVING_PORT}]
    assert from_scrapers["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubetune.dev/metrics-scraper": "true"}}}
    ]


def test_the_gateway_reads_its_own_key_secret_and_requires_keys_unless_the_spec_opts_out() -> None:
    _account, config_map, deployment, _budget, _service, _policy = build_gateway_children(
        REF, CONFIG, ChildImages()
    )
    pod = deployment["spec"]["template"]["spec"]
    secret_volume = next(v for v in pod["volumes"] if v["name"] == "access")["secret"]
    assert (
        secret_volume["secretName"]
        == gateway_access_secret_name("support-bot")
        == "support-bot-gateway-access"
    )
    assert secret_volume["optional"] is True
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "access")
    assert mount == {"name": "access", "mountPath": ACCESS_DIR, "readOnly": True}
    access = json.loads(config_map["data"][GATEWAY_CONFIG_KEY])["access"]
    assert access["auth"] == "required"
    assert (
        access["keysFile"] == f"{ACCESS_DIR}/keys.json"
        and access["signingKeyFile"] == f"{ACCESS_DIR}/signing.key"
    )
    assert access["limits"] == {"perKey": {"requestsPerMinute": 60}} and access["audit"] == {"stdout": True}

    opted_out = {**CONFIG, "access": {**CONFIG["access"], "auth": "disabled"}}
    config_map = build_gateway_children(REF, opted_out, ChildImages())[1]
    assert json.loads(config_map["data"][GATEWAY_CONFIG_KEY])["access"]["auth"] == "disabled"


def test_the_operator_may_manage_network_policies_and_reads_no_secrets() -> None:
    rules = rules_document()
    flattened = [
        (group, resource, verb)
        for rule in [*rules.get("namespaced", []), *rules.get("clusterwide", [])]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    assert ("networking.k8s.io", "networkpolicies", "patch") in flattened
    assert not any(resource == "secrets" for _, resource, _ in flattened)


def test_gateway_replicas_run_under_a_disruption_budget_of_one() -> None:
    children = build_gateway_children(REF, CONFIG, ChildImages(), replicas=3)
    deployment = next(c for c in children if c["kind"] == "Deployment")
    budget = next(c for c in children if c["kind"] == "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] == 3
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_gateway_runs_as_its_own_service_account_and_watches_its_key_secret() -> None:
    children = build_gateway_children(REF, CONFIG, ChildImages())
    account = children[0]  # first: the pods cannot be created without it
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "support-bot-gateway")
    assert account["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    deployment = next(c for c in children if c["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == gateway_service_account_name("support-bot") == "support-bot-gateway"
    assert pod["automountServiceAccountToken"] is True
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    access = json.loads(config_map["data"][GATEWAY_CONFIG_KEY])["access"]
    assert access["keysSecret"] == gateway_access_secret_name("support-bot")


def test_the_gateway_role_reads_its_own_key_secret_by_name_and_nothing_else() -> None:
    owner = Owner("support-bot", "team-a", "uid-1")
    role = build_gateway_access_role(owner)
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["support-bot-gateway-access"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = build_gateway_access_role_binding(owner)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "support-bot-gateway-access",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "support-bot-gateway", "namespace": "team-a"}
    ]
    for document in (role, binding):
        # owned by the ModelDeployment (gone with it) but not controlled: the operator never prunes them
        (reference,) = document["metadata"]["ownerReferences"]
        assert reference["uid"] == "uid-1" and "controller" not in reference


def test_redis_password_comes_from_the_named_secret_as_the_variable_the_gateway_reads() -> None:
    store = {"redisUrl": "redis://r:6379/0", "redisPasswordSecret": {"name": "redis-auth", "key": "pw"}}
    config = {**CONFIG, "access": {**CONFIG["access"], "store": store}}
    deployment = next(
        c for c in build_gateway_children(REF, config, ChildImages()) if c["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {
        "name": REDIS_PASSWORD_ENV,
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "pw"}},
    } in (container["env"])
    without = next(c for c in build_gateway_children(REF, CONFIG, ChildImages()) if c["kind"] == "Deployment")
    assert REDIS_PASSWORD_ENV not in {
        v["name"] for v in without["spec"]["template"]["spec"]["containers"][0]["env"]
    }
