"""``kubetune operator --namespace NS`` on the real API server as its ServiceAccount, bound only to the
Role the chart renders for ``watchNamespaces: [NS]``: it takes a FineTuneJob, a QuantizeJob of it and a
ModelDeployment through their lives, and nothing it asks for is forbidden, nor outside NS."""

from __future__ import annotations

from pathlib import Path

import pytest

from realcluster.cluster_objects import (
    ClusterObjects,
    finetunejob,
    modeldeployment,
    quantizejob,
    succeeded,
)
from realcluster.control_plane import ControlPlane
from realcluster.operator_process import install_operator_rbac, refused_requests, run_operator

pytestmark = pytest.mark.realcluster


def test_a_namespaced_operator_needs_nothing_beyond_its_roles(
    control_plane: ControlPlane, kubetune_crds: list[str], tmp_path: Path
) -> None:
    watched = control_plane.create_namespace()
    identity = install_operator_rbac(control_plane, control_plane.create_namespace(), [watched])
    bindings = control_plane.kubectl("get", "clusterrolebindings", "-o", "json").stdout
    assert identity.namespace not in bindings  # no cluster-wide role for this release

    with control_plane.admin_http() as http, run_operator(identity, tmp_path, [watched]) as operator:
        objects = ClusterObjects(control_plane, watched, http, operator)
        objects.apply(quantizejob("base-int8", "base"))  # waits for its source first
        objects.apply(finetunejob("base"))
        objects.apply(modeldeployment("bot"))
        objects.wait_for("finetunejobs", "base", succeeded, "Succeeded")
        objects.wait_for("quantizejobs", "base-int8", succeeded, "Succeeded")
        for plural, name in (
            ("deployments", "bot-tuned"),
            ("services", "bot-tuned"),
            ("deployments", "bot"),
            ("services", "bot"),
            ("configmaps", "bot-gateway"),
        ):
            objects.wait_for(plural, name)
        objects.wait_for("modeldeployments", "bot", lambda found: "conditions" in found.get("status", {}))
        objects.kubectl("delete", "modeldeployment", "bot", "--wait=false")
        objects.wait_gone("modeldeployments", "bot")  # the operator removed its finalizer

        assert operator.forbidden_lines() == []

    requests = control_plane.audit_events(identity.username)
    assert requests, "the audit log holds none of the operator's requests"
    assert refused_requests(control_plane, identity) == []
    outside = {
        f"{event['verb']} {event['requestURI']}"
        for event in requests
        if "objectRef" in event and event["objectRef"].get("namespace") != watched
    }
    assert outside == set()
    made = {
        (event["objectRef"]["resource"], event["objectRef"].get("subresource", ""), event["verb"])
        for event in requests
        if "objectRef" in event
    }
    assert {  # the run reached what the Role is for (not a vacuous pass)
        ("finetunejobs", "", "watch"),
        ("finetunejobs", "status", "patch"),
        ("quantizejobs", "status", "patch"),
        ("modeldeployments", "status", "patch"),
        ("modeldeployments", "", "patch"),  # the finalizer's removal
        ("deployments", "", "patch"),  # server-side apply
        ("configmaps", "", "patch"),
        ("events", "", "create"),
    } <= made


def test_a_request_beyond_the_roles_is_refused_and_audited(control_plane: ControlPlane) -> None:
    """The check above is not vacuous: the Role holds, and the audit log shows what it refused."""
    watched = control_plane.create_namespace()
    identity = install_operator_rbac(control_plane, control_plane.create_namespace(), [watched])
    elsewhere = control_plane.create_namespace()
    allowed = control_plane.kubectl("get", "finetunejobs", "-n", watched, kubeconfig=identity.kubeconfig)
    assert allowed.returncode == 0
    refused = control_plane.kubectl(
        "get", "finetunejobs", "-n", elsewhere, kubeconfig=identity.kubeconfig, check=False
    )
    assert refused.returncode != 0 and "forbidden" in refused.stderr
    assert refused_requests(control_plane, identity) == [
        f"list /apis/kubetune.dev/v1alpha1/namespaces/{elsewhere}/finetunejobs?limit=500"
    ]
