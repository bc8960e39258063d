"""The chart's kfp values: what a multi-user Kubeflow needs, rendered; refused at install when missing.

Rendered offline with helm_python (Helm's Go SDK); tests/realcluster/test_chart_kfp.py installs the same
objects into a real API server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from kubetune.config import KFP_TOKEN_PATH, KfpAuth, OperatorConfig

CHART_DIR = Path(__file__).resolve().parents[3] / "charts" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"

KFP_VALUES: dict[str, Any] = {
    "defaultExecutor": "kfp",
    "kfp": {"host": "http://ml-pipeline.kubeflow:8888", "namespaceMap": {"team-b": "ml-b"}},
    "workspaceRoot": "pvc://kubetune-workspace/runs",
    "artifactStore": "s3://models/kubetune",
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def rendered_objects(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for name, text in sorted(rendered.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def with_values(**changes: Any) -> dict[str, Any]:
    values = {**KFP_VALUES, **changes}
    values["kfp"] = {**KFP_VALUES["kfp"], **changes.get("kfp", {})}
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # The README's own `helm install --set defaultExecutor=kfp --set kfp.host=...`: no shared workspace.
        (
            {"defaultExecutor": "kfp", "kfp": {"host": "http://ml-pipeline.kubeflow:8888"}},
            "workspaceRoot is required when defaultExecutor=kfp and must be pvc://CLAIM/...: the kfp "
            'executor needs shared storage its steps mount in the user\'s namespace (got "")',
        ),
        (
            with_values(workspaceRoot="/var/lib/kubetune/runs"),
            "workspaceRoot is required when defaultExecutor=kfp and must be pvc://CLAIM/...",
        ),
        (
            with_values(artifactStore=""),
            "artifactStore is required when defaultExecutor=kfp: the kfp executor needs shared storage "
            '(pvc://CLAIM/... or s3://...) to publish models to (got "")',
        ),
        (with_values(kfp={"host": ""}), "kfp.host is required when defaultExecutor=kfp"),
        (
            with_values(kfp={"auth": {"mode": "token"}}),
            "kfp.auth.tokenSecret.name is required when kfp.auth.mode=token",
        ),
    ],
    ids=["readme-install", "local-workspace", "no-artifact-store", "no-host", "token-without-secret"],
)
def test_an_install_the_kfp_executor_cannot_work_with_is_refused_naming_the_value(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)


def test_the_operator_gets_a_projected_token_for_kfps_audience_where_it_reads_it(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, KFP_VALUES)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kfp-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "path": "token",
        "audience": "pipelines.kubeflow.org",
        "expirationSeconds": 3600,
    }
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kfp-token"]
    assert mount["readOnly"] is True
    config = OperatorConfig.from_env(one(docs, "ConfigMap", RELEASE)["data"])
    assert config.kfp_auth == KfpAuth(mode="serviceAccountToken", token_path=KFP_TOKEN_PATH)
    assert config.kfp_auth.token_path == f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"


def test_runs_stay_in_each_resources_namespace_unless_mapped(chart: helm.Chart) -> None:
    config = OperatorConfig.from_env(one(rendered_objects(chart, KFP_VALUES), "ConfigMap", RELEASE)["data"])
    assert config.kfp_namespace.for_resource("team-a") == "team-a"
    assert config.kfp_namespace.for_resource("team-b") == "ml-b"
    assert (config.workspace_root, config.artifact_store) == (
        KFP_VALUES["workspaceRoot"],
        KFP_VALUES["artifactStore"],
    )


def test_a_fixed_token_comes_from_a_secret_not_the_configmap(chart: helm.Chart) -> None:
    values = with_values(kfp={"auth": {"mode": "token", "tokenSecret": {"name": "kfp-bearer", "key": "jwt"}}})
    docs = rendered_objects(chart, values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["env"] == [
        {"name": "KUBETUNE_KFP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "kfp-bearer", "key": "jwt"}}}
    ]
    assert all(v["name"] != "kfp-token" for v in pod["volumes"])
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["KUBETUNE_KFP_AUTH"] == "token" and "KUBETUNE_KFP_TOKEN" not in data


def test_no_credentials_only_when_configured_so(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, with_values(kfp={"auth": {"mode": "none"}}))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert all(v["name"] != "kfp-token" for v in pod["volumes"]) and "env" not in pod["containers"][0]
    assert OperatorConfig.from_env(one(docs, "ConfigMap", RELEASE)["data"]).kfp_auth.mode == "none"


def test_the_local_executor_gets_no_kfp_token_and_no_kfp_grants(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, {})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert all(v["name"] != "kfp-token" for v in pod["volumes"])
    assert all(not d["metadata"]["name"].endswith("-kfp") for d in docs)


def test_the_service_account_may_use_kfp_runs_and_experiments_cluster_wide(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, KFP_VALUES)
    role = one(docs, "ClusterRole", f"{RELEASE}-kfp")
    assert role["rules"] == [
        {
            "apiGroups": ["pipelines.kubeflow.org"],
            "resources": ["experiments"],
            "verbs": ["create", "get", "list"],
        },
        {
            "apiGroups": ["pipelines.kubeflow.org"],
            "resources": ["runs"],
            "verbs": ["create", "get", "list", "terminate"],
        },
    ]
    binding = one(docs, "ClusterRoleBinding", f"{RELEASE}-kfp")
    assert binding["roleRef"]["name"] == f"{RELEASE}-kfp"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]


def test_namespaced_the_grants_are_where_the_runs_execute(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, with_values(watchNamespaces=["team-a", "team-b"]))
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == f"{RELEASE}-kfp"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml-b", "team-a"]
    assert not [
        d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"].endswith("-kfp")
    ]


TRAINJOB_RULES = [
    {
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["trainjobs"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    }
]


def trainjob_bindings(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The RoleBindings of the TrainJob grants, by namespace: their subjects."""
    return {
        d["metadata"]["namespace"]: d["subjects"]
        for d in docs
        if d["kind"] == "RoleBinding" and d["metadata"]["name"] == f"{RELEASE}-trainjobs"
    }


def test_the_pipeline_runner_may_create_and_follow_trainjobs_where_runs_execute(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, KFP_VALUES)
    role = one(docs, "ClusterRole", f"{RELEASE}-trainjobs")
    assert role["rules"] == TRAINJOB_RULES
    # a multi-user Kubeflow's profiles get it through kubeflow-edit (bound to their default-editor)
    assert role["metadata"]["labels"]["rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit"] == "true"
    assert trainjob_bindings(docs) == {  # cluster-wide: namespaceMap's targets
        "ml-b": [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "ml-b"}]
    }
    # and the namespaces listed, e.g. a standalone Kubeflow Pipelines' own
    docs = rendered_objects(chart, with_values(kfp={"pipelineRunner": {"namespaces": ["kubeflow"]}}))
    assert trainjob_bindings(docs) == {
        namespace: [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": namespace}]
        for namespace in ("kubeflow", "ml-b")
    }
    for binding in (
        d for d in docs if d["metadata"]["name"] == f"{RELEASE}-trainjobs" and d["kind"] != "ClusterRole"
    ):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{RELEASE}-trainjobs",
        }


def test_namespaced_the_runner_of_each_run_namespace_gets_trainjobs_by_the_name_configured(
    chart: helm.Chart,
) -> None:
    values = with_values(
        watchNamespaces=["team-a", "team-b"], kfp={"pipelineRunner": {"serviceAccount": "default-editor"}}
    )
    bindings = trainjob_bindings(rendered_objects(chart, values))
    assert bindings == {
        namespace: [{"kind": "ServiceAccount", "name": "default-editor", "namespace": namespace}]
        for namespace in ("ml-b", "team-a")
    }


def test_the_local_executor_grants_no_trainjobs(chart: helm.Chart) -> None:
    docs = rendered_objects(chart, {})
    assert not [d for d in docs if d["metadata"]["name"].endswith("-trainjobs")]
