"""The chart installed with its kfp values into a real API server, and the identity it gives the operator
checked the way a multi-user Kubeflow Pipelines checks a caller.

KFP's API server authenticates a bearer token with a TokenReview for the audience pipelines.kubeflow.org and
authorizes each call with a SubjectAccessReview on ``pipelines.kubeflow.org`` runs and experiments in the
run's namespace. No kubelet runs here, so the projected token is requested from the TokenRequest API for the
audience and lifetime the rendered volume names, as the kubelet would.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import helm_python as helm
import pytest
import yaml

from realcluster.control_plane import FIELD_MANAGER, ControlPlane
from realcluster.operator_process import CHART

pytestmark = pytest.mark.realcluster

KFP_VALUES: dict[str, Any] = {
    "defaultExecutor": "kfp",
    "kfp": {"host": "http://ml-pipeline.kubeflow:8888", "uiUrl": "https://kubeflow.example.com/pipeline"},
    "workspaceRoot": "pvc://kubetune-workspace/runs",
    "artifactStore": "s3://models/kubetune",
}
KFP_AUDIENCE = "pipelines.kubeflow.org"


def install(
    plane: ControlPlane, values: dict[str, Any], release_namespace: str
) -> tuple[str, list[dict[str, Any]]]:
    """Render the chart as ``helm install`` would and apply every object server-side; returns the release
    name (unique, so cluster-scoped objects of other tests are left alone) and the objects."""
    release = f"kubetune-{uuid.uuid4().hex[:8]}"
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=release, namespace=release_namespace)
    documents = [
        document
        for file_name, text in sorted(rendered.items())
        if file_name.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]
    for document in documents:  # helm install sets the release namespace on objects that name none
        if document["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            document["metadata"].setdefault("namespace", release_namespace)
    plane.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        stdin=yaml.safe_dump_all(documents),
    )
    return release, documents


def kfp_token_volume(plane: ControlPlane, namespace: str, release: str) -> dict[str, Any]:
    """The projected token source of the operator's Deployment as the API server stored it."""
    deployment = json.loads(plane.kubectl("get", "deployment", release, "-n", namespace, "-o", "json").stdout)
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "kfp-token"]
    (source,) = volume["projected"]["sources"]
    token_source: dict[str, Any] = source["serviceAccountToken"]
    return token_source


def token_review(plane: ControlPlane, token: str, audience: str) -> dict[str, Any]:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    }
    status: dict[str, Any] = json.loads(
        plane.kubectl("create", "-f", "-", "-o", "json", stdin=json.dumps(review)).stdout
    )["status"]
    return status


def kfp_allows(
    plane: ControlPlane,
    user: str,
    verb: str,
    resource: str,
    namespace: str,
    group: str = "pipelines.kubeflow.org",
) -> bool:
    """What KFP's SubjectAccessReview answers for ``user`` doing ``verb`` on ``resource`` in ``namespace``
    (KFP's API server asks exactly this; no pipelines.kubeflow.org resource needs to be served). The
    same review of ``group`` trainer.kubeflow.org is what the API server asks when the pipeline's step
    creates a TrainJob."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "resourceAttributes": {
                "group": group,
                "resource": resource,
                "verb": verb,
                "namespace": namespace,
            },
        },
    }
    answer = json.loads(plane.kubectl("create", "-f", "-", "-o", "json", stdin=json.dumps(review)).stdout)
    return bool(answer["status"].get("allowed"))


def test_the_operator_is_a_caller_a_multi_user_kfp_accepts_in_every_namespace(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    release, documents = install(control_plane, KFP_VALUES, namespace)
    assert {d["kind"] for d in documents} >= {"Deployment", "ConfigMap", "ClusterRole", "ClusterRoleBinding"}
    configmap = json.loads(
        control_plane.kubectl("get", "configmap", release, "-n", namespace, "-o", "json").stdout
    )
    assert configmap["data"]["KUBETUNE_KFP_AUTH"] == "serviceAccountToken"
    assert configmap["data"]["KUBETUNE_KFP_NAMESPACE_MAP"] == ""  # runs stay in each resource's namespace

    source = kfp_token_volume(control_plane, namespace, release)
    assert source["audience"] == KFP_AUDIENCE
    token = control_plane.kubectl(
        "create",
        "token",
        release,
        "-n",
        namespace,
        f"--audience={source['audience']}",
        f"--duration={source['expirationSeconds']}s",
    ).stdout.strip()
    user = f"system:serviceaccount:{namespace}:{release}"
    reviewed = token_review(control_plane, token, KFP_AUDIENCE)
    assert reviewed["authenticated"] is True and reviewed["user"]["username"] == user
    # A token for the API server's own audience is not one KFP accepts.
    other = control_plane.kubectl("create", "token", release, "-n", namespace).stdout.strip()
    assert token_review(control_plane, other, KFP_AUDIENCE).get("authenticated") is not True

    for profile in ("team-a", "team-b"):  # any user's profile namespace, cluster-wide
        for verb in ("create", "get", "list", "terminate"):
            assert kfp_allows(control_plane, user, verb, "runs", profile), (verb, profile)
        for verb in ("create", "get", "list"):
            assert kfp_allows(control_plane, user, verb, "experiments", profile), (verb, profile)
    assert not kfp_allows(control_plane, user, "delete", "runs", "team-a")  # nothing it does not do


def test_namespaced_the_operator_may_use_kfp_only_where_its_runs_execute(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    watched, mapped = control_plane.create_namespace(), control_plane.create_namespace()
    other = control_plane.create_namespace()
    moved = control_plane.create_namespace()
    values = {
        **KFP_VALUES,
        "watchNamespaces": [watched, moved],
        "kfp": {**KFP_VALUES["kfp"], "namespaceMap": {moved: mapped}},
    }
    release, _ = install(control_plane, values, namespace)
    user = f"system:serviceaccount:{namespace}:{release}"

    assert kfp_allows(control_plane, user, "create", "runs", watched)
    assert kfp_allows(control_plane, user, "create", "runs", mapped)  # where `moved`'s runs go
    assert not kfp_allows(control_plane, user, "create", "runs", moved)
    assert not kfp_allows(control_plane, user, "create", "runs", other)

    # the pipeline's steps, as the runner ServiceAccount of the namespace they run in, follow TrainJobs
    for runs_in in (watched, mapped):
        runner = f"system:serviceaccount:{runs_in}:pipeline-runner"
        for verb in ("create", "get", "list", "watch", "delete"):
            assert kfp_allows(control_plane, runner, verb, "trainjobs", runs_in, "trainer.kubeflow.org"), verb
        assert not kfp_allows(control_plane, runner, "update", "trainjobs", runs_in, "trainer.kubeflow.org")
    elsewhere = f"system:serviceaccount:{other}:pipeline-runner"
    assert not kfp_allows(control_plane, elsewhere, "create", "trainjobs", other, "trainer.kubeflow.org")


def test_a_fixed_token_install_reads_it_from_a_secret(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str
) -> None:
    values = {
        **KFP_VALUES,
        "kfp": {**KFP_VALUES["kfp"], "auth": {"mode": "token", "tokenSecret": {"name": "kfp"}}},
    }
    release, _ = install(control_plane, values, namespace)

    deployment = json.loads(
        control_plane.kubectl("get", "deployment", release, "-n", namespace, "-o", "json").stdout
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "KUBETUNE_KFP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "kfp", "key": "token"}}}
    ]
    assert all(v["name"] != "kfp-token" for v in deployment["spec"]["template"]["spec"]["volumes"])
