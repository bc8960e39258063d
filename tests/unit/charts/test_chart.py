"""The Helm chart (charts/kubetune) and the kustomize base rendered from it (manifests/).

Everything here is offline: helm_python renders and lints through Helm v4's Go SDK (no helm binary, no
cluster), and kubernetes_validate checks objects against the Kubernetes OpenAPI schemas it ships.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api.registry import all_definitions
from kubetune.cli import build_parser
from kubetune.config import KFP_TOKEN_PATH, KfpAuth, KfpNamespaceMap, OperatorConfig
from kubetune.handlers.metrics import port_from_env
from kubetune.kube import permissions

REPO = Path(__file__).resolve().parents[3]
CHART_DIR = REPO / "charts" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"
KUBE_VERSION = "1.30.0"
# Kinds served by CRDs of other projects: kubernetes_validate has no schema for them.
FOREIGN_API_GROUPS = ("monitoring.coreos.com/",)

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["a", "b"]},
    "everything": {
        "watchNamespaces": ["team-a"],
        "defaultExecutor": "kfp",
        "kfp": {
            "host": "http://ml-pipeline.kubeflow:8888",
            "uiUrl": "https://kfp.example.com",
            "namespaceMap": {"team-a": "ml-team-a"},
        },
        "workspaceRoot": "pvc://kubetune-workspace/runs",
        "artifactStore": "s3://models/kubetune",
        "workspace": {"claim": "kubetune-workspace"},
        "metrics": {
            "port": 9191,
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
            "grafanaDashboard": {"enabled": True},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"a": "b"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", REPO / "scripts" / "render_manifests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template file name -> rendered text."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return {key.removeprefix("kubetune/templates/"): text for key, text in rendered.items()}


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name, text in sorted(rendered.items()):
        if name.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def the_deployment(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, Any]:
    (deployment,) = by_kind(objects(render(chart, values)), "Deployment")
    return deployment


# --- chart metadata and lint ------------------------------------------------------------------------------


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert (meta["apiVersion"], meta["name"], meta["version"], meta["appVersion"]) == (
        "v2",
        "kubetune",
        "0.1.0",
        "0.1.0",
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict_is_clean(variant: str) -> None:
    report = helm.lint(CHART_DIR, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- values.schema.json -----------------------------------------------------------------------------------


def test_values_schema_is_draft7_strict_and_documented(chart: helm.Chart) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    undocumented = [key for key, prop in schema["properties"].items() if "description" not in prop]
    assert undocumented == []
    # Every default value is declared and valid, both for jsonschema and for Helm's own validator.
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])
    jsonschema.Draft7Validator(schema).validate(defaults)
    chart.validate_schema(defaults)
    assert chart.schema == schema


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"defaultExecutor": "gpu"}, "defaultExecutor"),
        ({"maxRunAttempts": 0}, "maxRunAttempts"),
        ({"maxRunAttempts": 1.5}, "maxRunAttempts"),
        ({"reconcileInterval": 0}, "reconcileInterval"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
        ({"watchNamespaces": "a"}, "watchNamespaces"),
        ({"workspace": {"claim": "Bad Claim"}}, "claim"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "enabled"),
        ({"replicas": 2}, "replicas"),
        ({"metrics": {"port": 80}}, "port"),
        ({"metrics": {"prometheusRule": {"slowReconcileSeconds": 0}}}, "slowReconcileSeconds"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(
    chart: helm.Chart, values: dict[str, Any], field: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=field):
        chart.validate_schema(values)
    # ... and so does an install/template: rendering validates against the schema first.
    with pytest.raises(helm.HelmValuesError, match=field):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- rendered objects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_objects_validate_against_kubernetes_schemas(chart: helm.Chart, variant: str) -> None:
    docs = objects(render(chart, VARIANTS[variant]))
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(FOREIGN_API_GROUPS):
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_kubernetes_validation_is_not_vacuous(chart: helm.Chart) -> None:
    deployment = the_deployment(chart)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_crds_validate_against_kubernetes_schemas(chart: helm.Chart) -> None:
    crds = chart.crds
    assert sorted(crd["filename"] for crd in crds) == [
        "kubetune/crds/finetunejobs.kubetune.dev.yaml",
        "kubetune/crds/modeldeployments.kubetune.dev.yaml",
        "kubetune/crds/quantizejobs.kubetune.dev.yaml",
    ]
    for crd in crds:
        kubernetes_validate.validate(yaml.safe_load(crd["data"]), KUBE_VERSION, strict=True)


def test_default_render_has_the_expected_objects(chart: helm.Chart) -> None:
    docs = objects(render(chart))
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)
    assert kinds == [
        ("ClusterRole", "kubetune"),
        ("ClusterRoleBinding", "kubetune"),
        ("ConfigMap", "kubetune"),
        ("Deployment", "kubetune"),
        ("Service", "kubetune"),
        ("ServiceAccount", "kubetune"),
    ]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_pod_security(chart: helm.Chart) -> None:
    deployment = the_deployment(chart)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    # The root filesystem is read-only: KUBETUNE_HOME and /tmp are emptyDirs.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/lib/kubetune", "/tmp"):
        assert volumes[mounts[path]]["emptyDir"] == {}
    assert not any("hostPath" in v for v in pod["volumes"])


def test_container_runs_the_operator(chart: helm.Chart) -> None:
    deployment = the_deployment(chart, {"watchNamespaces": ["a", "b"], "image": {"tag": "dev"}})
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/kubetune/operator:dev"
    assert container["command"] == ["kubetune", "operator"]
    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert args.namespace == ["a", "b"]
    assert args.liveness_port == 8080
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz"
    assert ports[probe["port"]] == 8080
    assert ports["metrics"] == 9090
    assert container["envFrom"] == [{"configMapRef": {"name": "kubetune"}}]
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    # Cluster-wide by default: no --namespace at all.
    (default,) = the_deployment(chart)["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(["operator", *default["args"]]).namespace is None


def test_workspace_claim_is_mounted_under_pvc_root(chart: helm.Chart) -> None:
    pod = the_deployment(chart, {"workspace": {"claim": "ws"}})["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "workspace", "mountPath": "/mnt/pvc/ws"} in container["volumeMounts"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "ws"}} in pod["volumes"]
    assert all(v["name"] != "workspace" for v in the_deployment(chart)["spec"]["template"]["spec"]["volumes"])


def test_configmap_is_read_by_operator_config(chart: helm.Chart) -> None:
    values = {
        "defaultExecutor": "kfp",
        "kfp": {
            "host": "http://kfp:8888",
            "uiUrl": "https://kfp.example.com",
            "namespaceMap": {"team-a": "ml-a", "*": "pipelines"},
            "auth": {"mode": "serviceAccountToken", "audience": "pipelines.kubeflow.org"},
        },
        "artifactStore": "s3://bucket/kubetune",
        "workspaceRoot": "pvc://ws/runs",
        "runtimeImage": "registry.example.com/runtime:1",
        "reconcileInterval": 5,
        "maxRunAttempts": 7,
    }
    (configmap,) = by_kind(objects(render(chart, values)), "ConfigMap")
    env = configmap["data"]
    assert all(isinstance(v, str) for v in env.values())
    config = OperatorConfig.from_env(env)
    assert config.home == Path("/var/lib/kubetune")
    assert config.default_executor == "kfp"
    assert (config.kfp_host, config.kfp_ui_url) == ("http://kfp:8888", "https://kfp.example.com")
    assert config.kfp_namespace == KfpNamespaceMap(overrides={"team-a": "ml-a"}, default="pipelines")
    assert config.kfp_auth == KfpAuth(mode="serviceAccountToken", token_path=KFP_TOKEN_PATH)
    assert (config.artifact_store, config.workspace_root) == ("s3://bucket/kubetune", "pvc://ws/runs")
    assert config.runtime_image == "registry.example.com/runtime:1"
    assert (config.reconcile_interval_s, config.max_run_attempts) == (5.0, 7)
    assert env["KUBETUNE_PVC_ROOT"] == "/mnt/pvc"
    # Defaults: the operator's own defaults, with the runtime image pinned to the chart's appVersion.
    (default,) = by_kind(objects(render(chart)), "ConfigMap")
    config = OperatorConfig.from_env(default["data"])
    assert config.default_executor == "local"
    assert config.kfp_host is None
    assert config.kfp_namespace.for_resource("team-a") == "team-a"  # runs stay in their namespace
    assert config.artifact_store == "/var/lib/kubetune/artifacts"
    assert config.runtime_image == "ghcr.io/kubetune/runtime:0.1.0"
    assert (config.reconcile_interval_s, config.max_run_attempts) == (2.0, 3)
    assert port_from_env(default["data"]) == 9090
    (disabled,) = by_kind(objects(render(chart, {"metrics": {"enabled": False}})), "ConfigMap")
    assert port_from_env(disabled["data"]) == 0


def test_metrics_service_and_optional_servicemonitor(chart: helm.Chart) -> None:
    docs = objects(render(chart))
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = the_deployment(chart)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert by_kind(docs, "ServiceMonitor") == [] and by_kind(docs, "PrometheusRule") == []
    enabled = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    (monitor,) = by_kind(objects(render(chart, enabled)), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_metrics_port_is_one_value_for_pod_service_and_operator(chart: helm.Chart) -> None:
    docs = objects(render(chart, {"metrics": {"port": 9191}}))
    (configmap,) = by_kind(docs, "ConfigMap")
    (service,) = by_kind(docs, "Service")
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert port_from_env(configmap["data"]) == 9191
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in container["ports"]
    assert service["spec"]["ports"][0]["port"] == 9191


def test_metrics_can_be_disabled(chart: helm.Chart) -> None:
    values = {
        "metrics": {
            "enabled": False,
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        }
    }
    docs = objects(render(chart, values))
    assert by_kind(docs, "Service") == []
    assert by_kind(docs, "ServiceMonitor") == [] and by_kind(docs, "PrometheusRule") == []
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert all(port["name"] != "metrics" for port in container["ports"])


def test_prometheus_rule(chart: helm.Chart) -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}}
    (rule,) = by_kind(objects(render(chart, values)), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "KubetuneOperatorDown",
        "KubetuneReconcileErrors",
        "KubetuneReconcileSlow",
        "KubetuneJobFailed",
        "KubetuneRolloutRolledBack",
    }
    for alert in alerts.values():
        # Scoped to this release's operator, as the ServiceMonitor's target labels them.
        assert 'namespace="kubetune-system", service="kubetune"' in alert["expr"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info")
    assert alerts["KubetuneReconcileErrors"]["for"] == "15m"
    assert alerts["KubetuneReconcileSlow"]["expr"].endswith("> 10")
    # Prometheus templates survive Helm's templating.
    assert alerts["KubetuneReconcileErrors"]["annotations"]["summary"].startswith("{{ $labels.kind }}")


def test_grafana_dashboard_configmap_is_the_committed_dashboard(chart: helm.Chart) -> None:
    (configmap,) = [
        doc
        for doc in objects(render(chart, {"metrics": {"grafanaDashboard": {"enabled": True}}}))
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "kubetune-dashboard"
    ]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = json.loads((REPO / "manifests" / "grafana" / "kubetune-dashboard.json").read_text())
    assert json.loads(configmap["data"]["kubetune-dashboard.json"]) == committed


def test_notes_render(chart: helm.Chart) -> None:
    assert "every namespace" in render(chart)["NOTES.txt"]
    assert "a, b" in render(chart, {"watchNamespaces": ["a", "b"]})["NOTES.txt"]


# --- RBAC -------------------------------------------------------------------------------------------------


def _rules(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            yield from doc["rules"]


def _grants(rules: Iterator[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# The rules are generated from the code (kubetune.kube.permissions); these pin what that means.
NAMESPACED = permissions.grants(clusterwide=False)
CLUSTERWIDE = permissions.grants(clusterwide=True)


def test_generated_grants_cover_the_registry_children_and_kopf() -> None:
    for definition in all_definitions():
        for verb in ("get", "list", "watch", "patch"):
            assert ("kubetune.dev", definition.plural, verb) in NAMESPACED
        assert ("kubetune.dev", f"{definition.plural}/status", "patch") in NAMESPACED
    for child in permissions.CHILD_RESOURCES:
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            assert (child.group, child.plural, verb) in NAMESPACED
    assert ("kubetune.dev", "modeldeployments/finalizers", "update") in NAMESPACED
    assert ("", "events", "create") in NAMESPACED
    cluster_only = CLUSTERWIDE - NAMESPACED
    assert cluster_only == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    # Never: Secrets, RBAC itself, or anything cluster-scoped beyond CRD discovery; Pods only listed.
    resources = {resource for _, resource, _ in CLUSTERWIDE}
    assert not resources & {"secrets", "roles", "rolebindings", "namespaces"}
    assert {verb for _, resource, verb in CLUSTERWIDE if resource == "pods"} == {"list"}


def test_child_resources_must_name_a_known_owner() -> None:
    stray = permissions.ChildResource("", "v1", "pods", "Pod", owner_kind="Nope")
    with pytest.raises(ValueError, match="Pod is owned by unknown kind 'Nope'"):
        permissions.grants(clusterwide=False, children=[stray])


def test_rules_refuse_wildcards() -> None:
    with pytest.raises(ValueError, match="no wildcards"):
        permissions.rules([("", "*", "get")])


def test_chart_rules_file_is_the_generated_one() -> None:
    generated = yaml.safe_load((CHART_DIR / "files" / "rbac-rules.yaml").read_text())
    assert generated == permissions.rules_document()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rbac_has_no_wildcards(chart: helm.Chart, variant: str) -> None:
    for rule in _rules(objects(render(chart, VARIANTS[variant]))):
        for key in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[key]), rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_cluster_wide_rbac(chart: helm.Chart) -> None:
    docs = objects(render(chart))
    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []
    assert _grants(_rules(docs)) == CLUSTERWIDE
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kubetune",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NAMESPACE}]


def test_namespaced_rbac(chart: helm.Chart) -> None:
    docs = objects(render(chart, {"watchNamespaces": ["a", "b"]}))
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    roles, bindings = by_kind(docs, "Role"), by_kind(docs, "RoleBinding")
    assert [r["metadata"]["namespace"] for r in roles] == ["a", "b"]
    assert [b["metadata"]["namespace"] for b in bindings] == ["a", "b"]
    for role in roles:
        # No discovery permissions: with exact namespaces Kopf's namespace/CRD scanning is disabled.
        assert _grants(iter(role["rules"])) == NAMESPACED
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NAMESPACE}]


def test_rbac_and_serviceaccount_can_be_disabled(chart: helm.Chart) -> None:
    docs = objects(
        render(chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    )
    assert {doc["kind"] for doc in docs} == {"ConfigMap", "Deployment", "Service"}
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops"


# --- the kustomize base and the chart's CRD copies --------------------------------------------------------


def test_chart_crds_equal_manifests_crds() -> None:
    chart_crds = {p.name: p.read_text() for p in sorted((CHART_DIR / "crds").glob("*.yaml"))}
    manifest_crds = {p.name: p.read_text() for p in sorted((REPO / "manifests" / "crds").glob("*.yaml"))}
    assert chart_crds == manifest_crds, (
        "charts/kubetune/crds/ differs from manifests/crds/: run `python scripts/render_manifests.py`"
    )


def test_kustomize_base_equals_chart_render() -> None:
    script = _load_script()
    stale = script.stale_files()
    assert stale == [], f"stale generated manifests {stale}: run `python scripts/render_manifests.py`"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((REPO / "manifests" / "kustomization.yaml").read_text())
    on_disk = sorted(
        str(p.relative_to(REPO / "manifests"))
        for directory in ("crds", "operator")
        for p in (REPO / "manifests" / directory).glob("*.yaml")
    )
    assert sorted(kustomization["resources"]) == on_disk
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((REPO / "manifests" / name).read_text()):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_render_script_check_mode_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _load_script()
    # Point the script at a scratch copy of manifests/ so the real tree is untouched.
    scratch = tmp_path / "manifests"
    (scratch / "crds").mkdir(parents=True)
    for crd in (REPO / "manifests" / "crds").glob("*.yaml"):
        (scratch / "crds" / crd.name).write_text(crd.read_text())
    chart_copy = tmp_path / "charts" / "kubetune"
    chart_copy.mkdir(parents=True)
    for path in CHART_DIR.rglob("*"):
        if path.is_file():
            target = chart_copy / path.relative_to(CHART_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    monkeypatch.setattr(script, "REPO", tmp_path)
    monkeypatch.setattr(script, "CHART_DIR", chart_copy)
    monkeypatch.setattr(script, "MANIFESTS", scratch)
    monkeypatch.setattr(script, "CRD_DIR", scratch / "crds")
    monkeypatch.setattr(script, "OPERATOR_DIR", scratch / "operator")
    (scratch / "argocd").mkdir()
    for lua in (REPO / "manifests" / "argocd").glob("*.lua"):
        (scratch / "argocd" / lua.name).write_text(lua.read_text())
    monkeypatch.setattr(script, "ARGOCD_DIR", scratch / "argocd")
    assert script.main(["--check"]) == 1
    assert script.main([]) == 0
    assert script.main(["--check"]) == 0
    (scratch / "operator" / "deployment.yaml").write_text("edited by hand\n")
    (scratch / "operator" / "extra.yaml").write_text("{}\n")
    assert script.stale_files() == [
        "manifests/operator/deployment.yaml",
        "manifests/operator/extra.yaml (no longer generated)",
    ]
