"""The objects of a group of LoRA versions sharing a base model on a cluster (kubetune.kube.adapter_group):
one ConfigMap the pods follow, one Deployment whose pod template changes only with the claims it
mounts, one Service, and the group's autoscaler; which versions may join a group."""

from __future__ import annotations

import json
from typing import Any

from kubetune.kube.adapter_group import (
    ADAPTERS_KEY,
    ADAPTERS_SINCE_ANNOTATION,
    SERVICE,
    adapters_since,
    build_group_children,
    group_child_name,
    group_id,
    shares_on_cluster,
)
from kubetune.kube.children import ChildImages
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.common import SecretKeyRef
from kubetune_contract.deployment import Autoscaling, Serving
from kubetune_contract.serving import ADAPTERS_FILE_ENV

REF = DeploymentRef("router", "ml", "uid-1")
IMAGES = ChildImages(serving="registry.example/runtime:1")
HUB_BASE = "hf://kubetune/tiny-base"
NOW = 1_800_000_000.0


def member(name: str, claim: str = "models", serving: Serving | None = None, **extra: Any) -> VersionServing:
    fields: dict[str, Any] = {"base_model_uri": HUB_BASE, "lora_adapter": True, **extra}
    return VersionServing(
        name=name,
        model_uri=f"pvc://{claim}/router/{name}",
        bento=f"router-{name}",
        env={"KUBETUNE_DEPLOYMENT": "router", "KUBETUNE_VERSION": name},
        serving=serving or Serving(),
        **fields,
    )


def children(members: list[VersionServing], prometheus: str | None = None) -> dict[str, dict[str, Any]]:
    since = adapters_since(members, None, NOW)
    built = build_group_children(REF, HUB_BASE, members, IMAGES, since, prometheus)
    return {child["kind"]: child for child in built}


def test_only_lora_adapters_on_claims_with_a_base_pods_can_read_share_on_a_cluster() -> None:
    assert shares_on_cluster(member("v1"))
    assert shares_on_cluster(member("v1", base_model_uri="pvc://bases/tiny"))
    assert not shares_on_cluster(member("v1", base_model_uri="/home/me/tiny"))  # the operator's own disk
    assert not shares_on_cluster(member("v1", base_model_uri="file:///home/me/tiny"))
    assert not shares_on_cluster(member("v1", lora_adapter=False))
    hub_adapter = VersionServing("v1", "hf://org/adapter", "router-v1", {}, Serving(), None, HUB_BASE, True)
    assert not shares_on_cluster(hub_adapter)  # no claim to mount it from


def test_one_server_holds_every_version_listed_in_a_config_map_it_watches() -> None:
    built = children([member("v1"), member("v2")])
    name = group_child_name("router", HUB_BASE)
    assert name == f"router-{group_id(HUB_BASE)}"
    assert {child["metadata"]["name"] for child in built.values()} == {name}
    assert json.loads(built["ConfigMap"]["data"][ADAPTERS_KEY]) == {
        "v1": "/mnt/pvc/models/router/v1",
        "v2": "/mnt/pvc/models/router/v2",
    }
    pod = built["Deployment"]["spec"]["template"]["spec"]
    (serve,) = pod["containers"]
    assert serve["command"] == ["bentoml", "serve", SERVICE, "--host", "0.0.0.0", "--port", "3000"]
    env = {item["name"]: item.get("value") for item in serve["env"]}
    assert env[ADAPTERS_FILE_ENV] == f"/etc/kubetune/adapters/{ADAPTERS_KEY}"
    assert "KUBETUNE_VERSION" not in env  # one server, many versions
    assert "HF_HUB_OFFLINE" not in env  # a hub base is downloaded at start
    adapters_volume = next(v for v in pod["volumes"] if v["name"] == "adapters")
    assert adapters_volume["configMap"]["name"] == name
    mount = next(m for m in serve["volumeMounts"] if m["name"] == "adapters")
    assert "subPath" not in mount  # a subPath mount would never see the kubelet's updates
    assert built["Service"]["spec"]["selector"] == built["Deployment"]["spec"]["selector"]["matchLabels"]
    assert "kubetune.dev/version" not in built["Deployment"]["spec"]["selector"]["matchLabels"]


def test_versions_joining_from_the_same_claim_leave_the_pod_template_as_it_is() -> None:
    two = children([member("v1"), member("v2")])["Deployment"]["spec"]["template"]
    three = children([member("v1"), member("v2"), member("v3")])["Deployment"]["spec"]["template"]
    assert two == three
    other_claim = children([member("v1"), member("v4", claim="more")])["Deployment"]["spec"]["template"]
    volumes = other_claim["spec"]["volumes"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    assert claims == {"models", "more"}


def test_a_pvc_base_is_read_offline_and_the_hub_token_of_a_version_is_passed_on() -> None:
    token = SecretKeyRef(name="hub", key="token")
    members = [
        member("v1", base_model_uri="pvc://bases/tiny"),
        member("v2", base_model_uri="pvc://bases/tiny"),
    ]
    since = adapters_since(members, None, NOW)
    deployment = build_group_children(REF, "pvc://bases/tiny", members, IMAGES, since)[1]
    (serve,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in serve["env"]
    hub = build_group_children(
        REF, HUB_BASE, [member("v1", token_secret=token), member("v2")], IMAGES, since
    )[1]
    (serve,) = hub["spec"]["template"]["spec"]["containers"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}} in serve[
        "env"
    ]


def test_since_when_each_adapter_is_listed_is_kept_until_its_directory_changes() -> None:
    first = adapters_since([member("v1"), member("v2")], None, NOW)
    stored = build_group_children(REF, HUB_BASE, [member("v1"), member("v2")], IMAGES, first)[0]
    assert json.loads(stored["metadata"]["annotations"][ADAPTERS_SINCE_ANNOTATION]) == first
    moved = member("v2", claim="more")
    later = adapters_since([member("v1"), moved, member("v3")], stored, NOW + 60)
    assert later["v1"] == first["v1"]
    assert later["v2"] == {"dir": "/mnt/pvc/more/router/v2", "since": "2027-01-15T08:01:00Z"}
    assert later["v3"]["since"] == "2027-01-15T08:01:00Z"


def test_the_group_autoscales_as_one_on_the_open_requests_of_all_its_versions() -> None:
    to_zero = Serving(autoscaling=Autoscaling(min_replicas=0, max_replicas=4))
    built = children([member("v2", serving=to_zero), member("v1", serving=to_zero)], "http://prom:9090")
    scaled = built["ScaledObject"]
    name = group_child_name("router", HUB_BASE)
    assert scaled["spec"]["scaleTargetRef"]["name"] == name and scaled["metadata"]["name"] == name
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert query == 'sum(kubetune_gateway_open_requests{deployment="router",version=~"v1|v2"}) or vector(0)'
    assert "HorizontalPodAutoscaler" not in built
    assert "replicas" not in built["Deployment"]["spec"]  # KEDA owns the count

    at_least_one = Serving(autoscaling=Autoscaling(min_replicas=1, max_replicas=4))
    hpa = children([member("v1", serving=at_least_one), member("v2", serving=at_least_one)])[
        "HorizontalPodAutoscaler"
    ]
    assert hpa["spec"]["scaleTargetRef"]["name"] == name and hpa["spec"]["maxReplicas"] == 4
    assert children([member("v1"), member("v2")])["Deployment"]["spec"]["replicas"] == 1
