"""The children of a ModelDeployment (kubetune.kube.children), the readiness rule of kubetune.kube.serving
and the status patch of kubetune.handlers.deployment.

Pure: plain dicts in, plain dicts out, checked for structure, ownership, labels, restricted pod security
and against the Kubernetes OpenAPI schemas (kubernetes_validate, offline).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import Any

import httpx2
import kubernetes_validate
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from kubetune.handlers.deployment import _status_patch
from kubetune.kube.apply import resource_of
from kubetune.kube.children import (
    CONFIG_CHECKSUM_ANNOTATION,
    GATEWAY_CONFIG_KEY,
    IN_FLIGHT_METRIC,
    ChildImages,
    build_gateway_children,
    build_version_children,
    gateway_config_map_name,
    gateway_config_text,
    gateway_endpoint,
    gateway_name,
    version_child_name,
    version_url,
)
from kubetune.kube.serving import HANDOVER_FIELD_MANAGER, KubernetesServing, rollout_state
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.common import SecretKeyRef
from kubetune_contract.deployment import Autoscaling, Batching, Resources, Serving

KUBE_VERSION = "1.30.0"
REF = DeploymentRef(name="support-bot", namespace="team-a", uid="0b4c7a52-9d7e-4d5c-8c36-4c1f0d9a1e01")
IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")
CONTRACT_ENV = {
    "KUBETUNE_DEPLOYMENT": "support-bot",
    "KUBETUNE_VERSION": "tuned",
    "KUBETUNE_MAX_PROMPT_TOKENS": "1024",
    "KUBETUNE_CONTEXT_OVERFLOW": "truncate",
    "KUBETUNE_MAX_BATCH_SIZE": "8",
    "KUBETUNE_MAX_LATENCY_MS": "50",
}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def version(
    name: str = "tuned",
    uri: str = "pvc://artifacts/team-a/support-lora/v1",
    *,
    serving: Serving | None = None,
    token: SecretKeyRef | None = None,
    deployment: str = "support-bot",
    base: str | None = None,
) -> VersionServing:
    return VersionServing(
        name=name,
        model_uri=uri,
        bento=f"{deployment}-{name}".lower(),
        env={**CONTRACT_ENV, "KUBETUNE_DEPLOYMENT": deployment, "KUBETUNE_VERSION": name},
        serving=serving or Serving(),
        token_secret=token,
        base_model_uri=base,
    )


AUTOSCALED = Serving(
    autoscaling=Autoscaling(min_replicas=2, max_replicas=5, target_concurrency=6),
    resources=Resources(requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "4Gi"}),
    batching=Batching(max_batch_size=16, max_latency_ms=20),
)


def gateway_config(weights: dict[str, int] | None = None) -> dict[str, Any]:
    weights = weights or {"tuned": 80, "int8": 20}
    return {
        "deployment": REF.name,
        "namespace": REF.namespace,
        "versions": [
            {"name": name, "url": version_url(REF, name), "weight": weight, "prompt": None}
            for name, weight in weights.items()
        ],
        "control": "tuned",
        "routing": {"stickyBy": "user", "header": None, "overrideHeader": "x-kubetune-version"},
        "upstreamTimeoutSeconds": 60,
    }


def every_child() -> list[dict[str, Any]]:
    return [
        *build_version_children(REF, version(serving=AUTOSCALED), IMAGES),
        *build_version_children(REF, version("int8", "hf://acme/support-int8@abc123"), IMAGES),
        *build_gateway_children(REF, gateway_config(), IMAGES),
    ]


def by_kind(children: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [child for child in children if child["kind"] == kind]


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


# ---- structure -------------------------------------------------------------------------------------


def test_a_version_is_a_deployment_a_service_and_with_autoscaling_an_hpa() -> None:
    children = build_version_children(REF, version(serving=AUTOSCALED), IMAGES)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("Deployment", "support-bot-tuned"),
        ("Service", "support-bot-tuned"),
        ("HorizontalPodAutoscaler", "support-bot-tuned"),
    ]
    assert all(c["metadata"]["namespace"] == "team-a" for c in children)
    plain = build_version_children(REF, version(serving=Serving(replicas=3)), IMAGES)
    assert [c["kind"] for c in plain] == ["Deployment", "Service"]
    assert plain[0]["spec"]["replicas"] == 3
    # With an HPA the Deployment does not set replicas: the autoscaler owns the count.
    assert "replicas" not in children[0]["spec"]


def test_pvc_model_is_mounted_read_only_into_the_init_container_which_builds_the_bento() -> None:
    deployment = build_version_children(REF, version(serving=AUTOSCALED), IMAGES)[0]
    pod = deployment["spec"]["template"]["spec"]
    fetch, serve = containers(deployment)["fetch-model"], containers(deployment)["serve"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-model"]
    assert fetch["image"] == serve["image"] == "registry.example/runtime:1"
    assert fetch["command"] == ["python", "-m", "kubetune_components.serving.bento"]
    assert fetch["args"] == [
        "build",
        "--model-dir",
        "pvc://artifacts/team-a/support-lora/v1",
        "--deployment",
        "support-bot",
        "--version",
        "tuned",
    ]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"] == {"claimName": "artifacts", "readOnly": True}
    store_mount = next(m for m in fetch["volumeMounts"] if m["name"] == claim["name"])
    assert store_mount == {"name": claim["name"], "mountPath": "/mnt/pvc/artifacts", "readOnly": True}
    assert env_of(fetch)["KUBETUNE_PVC_ROOT"] == "/mnt/pvc"
    # The server loads the Bento's own copy of the model: no artifact store, no model dir.
    assert claim["name"] not in {m["name"] for m in serve["volumeMounts"]}
    assert "KUBETUNE_MODEL_DIR" not in env_of(serve)
    # Both share BENTOML_HOME (an emptyDir): the init container builds there, the server reads it.
    home = {m["mountPath"]: m["name"] for m in serve["volumeMounts"]}["/var/lib/bentoml"]
    assert {"name": home, "mountPath": "/var/lib/bentoml"} in fetch["volumeMounts"]
    assert {"name": home, "emptyDir": {}} in pod["volumes"]
    assert env_of(fetch)["BENTOML_HOME"] == env_of(serve)["BENTOML_HOME"] == "/var/lib/bentoml"


def test_the_server_runs_bentoml_serve_with_the_contract_env_probes_and_resources() -> None:
    deployment = build_version_children(REF, version(serving=AUTOSCALED), IMAGES)[0]
    serve = containers(deployment)["serve"]
    assert serve["command"] == [
        "bentoml",
        "serve",
        "support-bot-tuned:latest",
        "--host",
        "0.0.0.0",
        "--port",
        "3000",
    ]
    assert serve["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    env = env_of(serve)
    for name, value in CONTRACT_ENV.items():
        assert env[name] == value
    assert env["HF_HUB_OFFLINE"] == "1"
    assert serve["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert serve["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert serve["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    expected = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert serve["resources"] == containers(deployment)["fetch-model"]["resources"] == expected
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "3000",
        "prometheus.io/path": "/metrics",
    }
    assert deployment["metadata"]["annotations"]["kubetune.dev/model-uri"] == (
        "pvc://artifacts/team-a/support-lora/v1"
    )


def test_hub_model_is_downloaded_by_the_init_container_with_the_token_secret() -> None:
    token = SecretKeyRef(name="hf-token", key="token")
    deployment = build_version_children(
        REF, version("int8", "hf://acme/support-int8@abc", token=token), IMAGES
    )[0]
    pod = deployment["spec"]["template"]["spec"]
    fetch, serve = containers(deployment)["fetch-model"], containers(deployment)["serve"]
    assert env_of(fetch)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert "HF_TOKEN" not in env_of(serve)  # the server never talks to the hub
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    cache = {m["mountPath"]: m["name"] for m in fetch["volumeMounts"]}[env_of(fetch)["HF_HOME"]]
    assert {"name": cache, "emptyDir": {}} in pod["volumes"]
    without_token = build_version_children(REF, version("int8", "hf://acme/support-int8"), IMAGES)[0]
    assert "HF_TOKEN" not in env_of(containers(without_token)["fetch-model"])


def test_an_adapter_on_a_claim_can_download_its_hub_base_into_a_mounted_hf_home() -> None:
    """The root filesystem is read-only: the build downloads an adapter's hub base model into HF_HOME,
    which is a volume whatever holds the adapter (tests/sandbox runs this pod to prove it)."""
    deployment = build_version_children(REF, version(uri="pvc://artifacts/team-a/support-lora/v1"), IMAGES)[0]
    pod = deployment["spec"]["template"]["spec"]
    fetch = containers(deployment)["fetch-model"]
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
    cache = {m["mountPath"]: m["name"] for m in fetch["volumeMounts"]}[env_of(fetch)["HF_HOME"]]
    assert {"name": cache, "emptyDir": {}} in pod["volumes"]
    # The server is offline and loads the Bento's copy of the base: it needs no hub cache.
    assert cache not in {m["name"] for m in containers(deployment)["serve"]["volumeMounts"]}


def test_an_adapters_base_on_another_claim_is_mounted_read_only_beside_it_in_the_init_container() -> None:
    """The build reads the base where its pvc:// URI says: /mnt/pvc/<claim> under KUBETUNE_PVC_ROOT
    (tests/sandbox runs this pod to prove it)."""
    adapter = version(uri="pvc://artifacts/team-a/support-lora/v1", base="pvc://models/tiny-base")
    deployment = build_version_children(REF, adapter, IMAGES)[0]
    pod = deployment["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert sorted(claim["claimName"] for claim in claims.values()) == ["artifacts", "models"]
    assert all(claim["readOnly"] is True for claim in claims.values())
    fetch, serve = containers(deployment)["fetch-model"], containers(deployment)["serve"]
    mounts = {m["mountPath"]: m for m in fetch["volumeMounts"] if m["name"] in claims}
    assert set(mounts) == {"/mnt/pvc/artifacts", "/mnt/pvc/models"}
    assert claims[mounts["/mnt/pvc/models"]["name"]]["claimName"] == "models"
    assert all(mount["readOnly"] is True for mount in mounts.values())
    assert not set(claims) & {m["name"] for m in serve["volumeMounts"]}  # the Bento holds the base


@pytest.mark.parametrize(
    "base",
    ["pvc://artifacts/base-models/tiny", "hf://kubetune/tiny-base", None],
    ids=["same-claim", "hub", "none"],
)
def test_a_base_on_the_adapters_claim_or_the_hub_adds_no_claim(base: str | None) -> None:
    adapter = version(uri="pvc://artifacts/team-a/support-lora/v1", base=base)
    pod = build_version_children(REF, adapter, IMAGES)[0]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "artifacts", "readOnly": True}]


def test_a_hub_model_with_a_base_on_a_claim_mounts_only_the_base_claim() -> None:
    adapter = version(uri="hf://acme/support-lora", base="pvc://models/tiny-base")
    pod = build_version_children(REF, adapter, IMAGES)[0]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "models", "readOnly": True}]


def test_a_malformed_base_model_pvc_uri_is_refused_naming_the_version() -> None:
    adapter = version(uri="pvc://artifacts/team-a/support-lora/v1", base="pvc://models/../secrets")
    with pytest.raises(
        ValueError, match=re.escape("version tuned: base model URI 'pvc://models/../secrets'")
    ):
        build_version_children(REF, adapter, IMAGES)


@pytest.mark.parametrize("uri", ["file:///models/tuned", "/models/tuned", "models/tuned"])
def test_a_local_model_path_is_refused_naming_the_version(uri: str) -> None:
    with pytest.raises(ValueError, match=r"version tuned: model URI .* local path"):
        build_version_children(REF, version(uri=uri), IMAGES)


def test_a_malformed_pvc_uri_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("version tuned: model URI 'pvc://artifacts/../secrets'")):
        build_version_children(REF, version(uri="pvc://artifacts/../secrets"), IMAGES)


def test_bento_tag_must_follow_the_contract_and_fit_bentoml() -> None:
    wrong = VersionServing("tuned", "hf://a/b", "other-tuned", CONTRACT_ENV, Serving())
    with pytest.raises(ValueError, match="Bento tag 'other-tuned' is not 'support-bot-tuned'"):
        build_version_children(REF, wrong, IMAGES)
    long_ref = DeploymentRef(name="d" * 50, namespace="ns", uid="u")
    too_long = version("v" * 20, "hf://a/b", deployment="d" * 50)
    with pytest.raises(ValueError, match="is 71 characters long; BentoML allows 63"):
        build_version_children(long_ref, too_long, IMAGES)


def test_hpa_scales_on_in_flight_requests_per_pod() -> None:
    hpa = by_kind(
        build_version_children(REF, version(serving=AUTOSCALED), IMAGES), "HorizontalPodAutoscaler"
    )[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support-bot-tuned",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": IN_FLIGHT_METRIC},
                "target": {"type": "AverageValue", "averageValue": "6"},
            },
        }
    ]


def test_services_select_their_pods_on_named_ports() -> None:
    children = every_child()
    deployments = {d["metadata"]["name"]: d for d in by_kind(children, "Deployment")}
    for service in by_kind(children, "Service"):
        deployment = deployments[service["metadata"]["name"]]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        port_names = {
            p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        assert "http" in port_names
    # A version's selector never matches the gateway's pods, nor another version's.
    selectors = [tuple(sorted(s["spec"]["selector"].items())) for s in by_kind(children, "Service")]
    assert len(set(selectors)) == len(selectors) == 3


def test_urls_and_endpoint_name_the_services() -> None:
    assert version_url(REF, "tuned") == "http://support-bot-tuned.team-a.svc:3000"
    assert gateway_endpoint(REF) == "http://support-bot.team-a.svc:8080/v1"
    names = {(c["kind"], c["metadata"]["name"]) for c in every_child()}
    assert ("Service", "support-bot-tuned") in names and ("Service", "support-bot") in names


# ---- ownership, labels, security, schemas ----------------------------------------------------------


def test_every_child_is_controlled_by_the_model_deployment() -> None:
    for child in every_child():
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "support-bot",
                "uid": REF.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    with pytest.raises(ValueError, match=r"has no metadata\.uid"):
        build_gateway_children(DeploymentRef(name="x", namespace="y"), gateway_config(), IMAGES)


def test_every_child_carries_the_recommended_and_kubetune_labels() -> None:
    for child in every_child():
        labels = child["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "kubetune"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune"
        assert labels["kubetune.dev/deployment"] == "support-bot"
        component = labels["app.kubernetes.io/component"]
        assert labels["app.kubernetes.io/name"] == f"kubetune-{component}"
        if component == "serving":
            assert labels["kubetune.dev/version"] in ("tuned", "int8")
            assert labels["app.kubernetes.io/instance"] == child["metadata"]["name"]
        else:  # the gateway's ConfigMap, Deployment and Service: one instance, the gateway
            assert component == "gateway" and "kubetune.dev/version" not in labels
            assert labels["app.kubernetes.io/instance"] == "support-bot"
        if child["kind"] == "Deployment":
            assert child["spec"]["template"]["metadata"]["labels"] == labels


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for deployment in by_kind(every_child(), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # only the gateway holds an API token: its own ServiceAccount's, to watch its key Secret
        gateway = deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        assert pod["automountServiceAccountToken"] is gateway
        assert pod.get("serviceAccountName") == ("support-bot-gateway" if gateway else None)
        for container in containers(deployment).values():
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            # A read-only root needs writable scratch space: /tmp is an emptyDir.
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
        allowed = {"emptyDir", "persistentVolumeClaim", "configMap", "secret"}  # the gateway's key Secret
        assert all((set(v) - {"name"}) <= allowed for v in pod["volumes"])


def test_every_child_is_valid_against_the_kubernetes_schemas() -> None:
    for child in every_child():
        kubernetes_validate.validate(child, KUBE_VERSION, strict=True)
        resource_of(child)  # a kind the operator's RBAC (CHILD_RESOURCES) grants


def test_schema_validation_is_not_vacuous() -> None:
    deployment = copy.deepcopy(every_child()[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("deployment", "version_name"),
    [("support-bot", "tuned"), ("a" * 63, "tuned"), ("team.bot", "v1"), ("1bot", "gateway")],
)
def test_names_are_dns_labels_and_distinct(deployment: str, version_name: str) -> None:
    names = [
        version_child_name(deployment, version_name),
        gateway_name(deployment),
        gateway_config_map_name(deployment),
    ]
    for name in names:
        assert len(name) <= 63 and DNS_1035.match(name), name
    # Deployments and Services: a version's never takes the gateway's name (ConfigMaps are another kind).
    assert version_child_name(deployment, version_name) != gateway_name(deployment)
    assert version_child_name(deployment, version_name) != version_child_name(deployment, f"{version_name}2")


# ---- the gateway -----------------------------------------------------------------------------------


def test_gateway_runs_kubetune_gateway_with_the_config_map_mounted_as_a_directory() -> None:
    _account, config_map, deployment, _budget, service, _policy = build_gateway_children(
        REF, gateway_config(), IMAGES
    )
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == "support-bot-gateway"
    assert list(config_map["data"]) == [GATEWAY_CONFIG_KEY]
    gateway = containers(deployment)["gateway"]
    assert gateway["image"] == "registry.example/operator:1"
    assert gateway["command"] == ["kubetune", "gateway"]
    assert gateway["args"][:2] == ["--config", "/etc/kubetune/gateway.json"]
    assert gateway["args"][-2:] == ["--port", "8080"]
    mount = next(m for m in gateway["volumeMounts"] if m["mountPath"] == "/etc/kubetune")
    assert "subPath" not in mount  # a subPath mount would never see the ConfigMap change
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "support-bot-gateway"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["spec"]["ports"][0]["port"] == 8080 and service["metadata"]["name"] == "support-bot"


def test_config_text_is_deterministic_json() -> None:
    config = gateway_config()
    shuffled = dict(reversed(list(config.items())))
    assert gateway_config_text(config) == gateway_config_text(shuffled)
    assert json.loads(gateway_config_text(config)) == config


def test_a_weight_change_changes_only_the_config_map_and_the_checksum_annotation() -> None:
    before = build_gateway_children(REF, gateway_config({"tuned": 80, "int8": 20}), IMAGES)
    after = build_gateway_children(REF, gateway_config({"tuned": 50, "int8": 50}), IMAGES)
    assert before[0] == after[0]  # the ServiceAccount
    assert before[1]["data"] != after[1]["data"]
    assert {k: v for k, v in before[1].items() if k != "data"} == {
        k: v for k, v in after[1].items() if k != "data"
    }
    # The gateway's pods are not restarted: the pod template and the whole spec stay the same.
    assert before[2]["spec"] == after[2]["spec"]
    checksums = [d["metadata"]["annotations"][CONFIG_CHECKSUM_ANNOTATION] for d in (before[2], after[2])]
    assert checksums[0] != checksums[1] and all(re.fullmatch(r"[0-9a-f]{64}", c) for c in checksums)
    assert CONFIG_CHECKSUM_ANNOTATION not in before[2]["spec"]["template"]["metadata"]["annotations"]
    assert before[3] == after[3]


def test_a_model_change_changes_the_version_pod_template() -> None:
    before = build_version_children(REF, version(uri="pvc://artifacts/a/v1"), IMAGES)[0]
    after = build_version_children(REF, version(uri="pvc://artifacts/a/v2"), IMAGES)[0]
    assert before["spec"]["template"] != after["spec"]["template"]
    assert before["spec"]["selector"] == after["spec"]["selector"]  # immutable in apps/v1


# ---- readiness -------------------------------------------------------------------------------------


def stored(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "d", "generation": generation}, "spec": {"replicas": 2}, "status": status}


@pytest.mark.parametrize(
    ("obj", "required", "ready", "message"),
    [
        (stored(observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=2), 2, True, None),
        (stored(observedGeneration=2, replicas=3, updatedReplicas=3, readyReplicas=2), 2, True, None),
        (stored(), 1, False, "waiting for the Deployment controller"),
        (stored(observedGeneration=1, replicas=2, updatedReplicas=2, readyReplicas=2), 2, False, "waiting"),
        (
            stored(observedGeneration=2, replicas=3, updatedReplicas=1, readyReplicas=3),
            2,
            False,
            "1 of 3 pods",
        ),
        (
            stored(observedGeneration=2, replicas=2, updatedReplicas=2, readyReplicas=1),
            2,
            False,
            "1/2 pods ready",
        ),
        (stored(observedGeneration=2, replicas=0, updatedReplicas=0), 0, False, "scaled to 0"),
        (
            stored(
                observedGeneration=2,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "slow",
                    }
                ],
            ),
            1,
            False,
            "stuck: slow",
        ),
    ],
)
def test_rollout_state(obj: dict[str, Any], required: int, ready: bool, message: str | None) -> None:
    got_ready, got_message = rollout_state(obj, required)
    assert got_ready is ready
    if message is None:
        assert got_message is None
    else:
        assert got_message is not None and message in got_message


# ---- the handlers' status patch (kubetune.handlers.deployment) -------------------------------------


def test_status_patch_sets_changes_and_removes_what_is_gone() -> None:
    current = {"phase": "Ready", "weights": "a=100", "rollout": {"state": "Promoted"}}
    planned = {"phase": "Ready", "weights": "a=50,b=50", "versions": []}
    assert _status_patch(current, planned) == {"weights": "a=50,b=50", "versions": [], "rollout": None}


# ---- server-side apply of a version (kubetune.kube.serving) ------------------------------------------


class RecordingApiServer:
    """An API server holding one stored Deployment: GETs answer it, PATCHes are recorded and answered.

    It answers lightkube's HTTP requests (an ``httpx2.MockTransport``), so what it records is what
    kubetune sends over the wire: the path, the query parameters and the body of every PATCH.
    """

    def __init__(self, deployment: dict[str, Any]) -> None:
        self.deployment = deployment
        self.patches: list[tuple[str, dict[str, str], Any]] = []

    def client(self) -> AsyncClient:
        transport = httpx2.MockTransport(self.answer)
        config = KubeConfig.from_one(cluster=Cluster(server="http://api.test"), user=User(token="test"))
        return AsyncClient(config, transport=transport)

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        name = path.rsplit("/", 1)[-1]
        if request.method == "GET" and "/deployments/" in path:
            return httpx2.Response(200, json=copy.deepcopy(self.deployment))
        if request.method == "GET":
            if path.endswith("s"):  # a list
                return httpx2.Response(
                    200, json={"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}
                )
            status = {"kind": "Status", "apiVersion": "v1", "code": 404, "message": f"{name} not found"}
            return httpx2.Response(404, json=status, headers={"Content-Type": "application/json"})
        if request.method == "PATCH":
            body = json.loads(request.content)
            self.patches.append((path, dict(request.url.params), copy.deepcopy(body)))
            if "/deployments/" in path:
                return httpx2.Response(200, json=copy.deepcopy(self.deployment))
            return httpx2.Response(200, json=body)
        raise AssertionError(f"unexpected {request.method} {path}")


def ensure_autoscaled_version(server: RecordingApiServer) -> None:
    async def ensure() -> None:
        client = server.client()
        try:
            await KubernetesServing(client, IMAGES).ensure_versions(REF, [version(serving=AUTOSCALED)])
        finally:
            await client.close()

    asyncio.run(ensure())


def stored_deployment(replicas: int, managers: list[dict[str, Any]]) -> dict[str, Any]:
    applied = build_version_children(REF, version(), IMAGES)[0]
    applied["metadata"]["managedFields"] = managers
    applied["metadata"]["generation"] = 1
    applied["spec"]["replicas"] = replicas
    applied["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas}
    return applied


def test_turning_autoscaling_on_hands_the_replica_count_over_instead_of_resetting_it() -> None:
    # kubetune applied replicas: 3 before; if its next apply just left the field out, the API server
    # would reset it to 1 until the HPA acts (the race in the server-side apply docs).
    owned = {
        "manager": "kubetune",
        "operation": "Apply",
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}},
    }
    api = RecordingApiServer(stored_deployment(3, [owned]))
    ensure_autoscaled_version(api)
    deployment_patches = [(params, body) for path, params, body in api.patches if "/deployments/" in path]
    (handover_params, handover), (main_params, main) = deployment_patches[:2]
    assert handover_params["fieldManager"] == HANDOVER_FIELD_MANAGER
    assert handover["spec"] == {"replicas": 3}
    assert "ownerReferences" not in handover["metadata"]
    assert main_params["fieldManager"] == "kubetune" and "replicas" not in main["spec"]


def test_no_handover_once_kubetune_no_longer_owns_the_replica_count() -> None:
    hpa_owned = {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:replicas": {}}},
        "subresource": "scale",
    }
    kubetune_owned = {
        "manager": "kubetune",
        "operation": "Apply",
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:template": {}}},
    }
    api = RecordingApiServer(stored_deployment(4, [hpa_owned, kubetune_owned]))
    ensure_autoscaled_version(api)
    managers = [params["fieldManager"] for path, params, _ in api.patches if "/deployments/" in path]
    assert managers == ["kubetune"]
