"""``kubetune operator`` (cluster-wide) on the real API server, as its ServiceAccount bound only to the
chart's generated ClusterRole; the tests of deletion add kube-controller-manager (garbage collection, the
Deployment controller; no scheduler, so pods stay Pending).

Jobs reach their end states with the local executor's stand-in steps. A ModelDeployment's children are
applied with real server-side apply and field managers: a ``kubectl edit`` of a field kubetune manages is
undone, a replica count the HPA set is left alone, an object that merely has a child's name is reported
and never adopted, and deleting the ModelDeployment leaves nothing behind. Nothing the operator asks for
is forbidden (its log and the API server's audit log say so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from realcluster.cluster_objects import (
    ClusterObjects,
    Manifest,
    finetunejob,
    modeldeployment,
    quantizejob,
    succeeded,
    wait_until,
)
from realcluster.control_plane import FIELD_MANAGER, ControlPlane, ManagedProcess
from realcluster.operator_process import (
    OperatorIdentity,
    OperatorProcess,
    install_operator_rbac,
    refused_requests,
    run_operator,
)

pytestmark = pytest.mark.realcluster

AUTOSCALING = {"minReplicas": 1, "maxReplicas": 3, "targetConcurrency": 4}
KUBECTL_EDIT = "kubectl-edit"  # the field manager `kubectl edit` writes as


@dataclass
class RunningOperator:
    plane: ControlPlane
    identity: OperatorIdentity
    process: OperatorProcess

    def assert_nothing_forbidden(self) -> None:
        assert self.process.forbidden_lines() == []
        assert self.plane.audit_events(self.identity.username), "no request of the operator was audited"
        assert refused_requests(self.plane, self.identity) == []


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, kubetune_crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningOperator]:
    identity = install_operator_rbac(control_plane, control_plane.create_namespace(), [])
    with run_operator(identity, tmp_path_factory.mktemp("operator")) as process:
        yield RunningOperator(control_plane, identity, process)


@pytest.fixture
def objects(operator: RunningOperator) -> Iterator[ClusterObjects]:
    """A fresh namespace's objects, read as admin."""
    with operator.plane.admin_http() as http:
        yield ClusterObjects(operator.plane, operator.plane.create_namespace(), http, operator.process)


def managers_of(obj: Manifest, field: str) -> set[str]:
    """The field managers that own ``spec.<field>`` of ``obj``."""
    return {
        entry["manager"]
        for entry in obj["metadata"].get("managedFields") or []
        if f"f:{field}" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
    }


def first_image(deployment: Manifest) -> str:
    image: str = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def version_message(deployment: Manifest, version: str) -> str:
    for seen in (deployment.get("status") or {}).get("versions") or []:
        if seen["name"] == version:
            return str(seen.get("message") or "")
    return ""


def test_jobs_reach_their_end_states(operator: RunningOperator, objects: ClusterObjects) -> None:
    objects.apply(quantizejob("base-int8", "base"))  # waits for its source first
    objects.apply(finetunejob("base"))
    for plural, name in (("finetunejobs", "base"), ("quantizejobs", "base-int8")):
        done = objects.wait_for(plural, name, succeeded, "Succeeded")
        assert done["status"]["phase"] == "Succeeded"
        assert done["status"]["pipelineRun"]["backend"] == "local"
    operator.assert_nothing_forbidden()


def test_an_edited_child_is_set_back_and_the_hpa_keeps_its_replicas(
    operator: RunningOperator, objects: ClusterObjects
) -> None:
    objects.apply(modeldeployment("chat", serving={"replicas": 2}))
    server = objects.wait_for("deployments", "chat-tuned")
    assert server["spec"]["replicas"] == 2 and managers_of(server, "replicas") == {"kubetune"}
    image = first_image(server)

    # Autoscaling on: the HPA takes the count over; kubetune stops applying it, without resetting it.
    objects.apply(modeldeployment("chat", serving={"replicas": 2, "autoscaling": AUTOSCALING}))
    hpa = objects.wait_for("horizontalpodautoscalers", "chat-tuned")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "chat-tuned"
    server = objects.wait_for(
        "deployments",
        "chat-tuned",
        lambda found: "kubetune" not in managers_of(found, "replicas"),
        "kubetune no longer applies spec.replicas",
    )
    assert server["spec"]["replicas"] == 2

    # The HPA scales (as its controller does, through the scale subresource), then a user edits a field
    # kubetune applies. The next pass undoes the edit and leaves the HPA's count.
    objects.kubectl("scale", "deployment", "chat-tuned", "--replicas=3")
    tampered = [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "tampered:1"}]
    edited = objects.kubectl(
        "patch", "deployment", "chat-tuned", "--type=json", f"--field-manager={KUBECTL_EDIT}",
        f"--patch={json.dumps(tampered)}", "--output=json",
    )  # fmt: skip
    assert first_image(json.loads(edited)) == "tampered:1"
    server = objects.wait_for(
        "deployments", "chat-tuned", lambda found: first_image(found) == image, "the edit undone"
    )
    assert server["spec"]["replicas"] == 3
    containers_managers = {
        entry["manager"]
        for entry in server["metadata"]["managedFields"]
        if "f:containers" in json.dumps(entry.get("fieldsV1") or {})
    }
    assert "kubetune" in containers_managers and KUBECTL_EDIT not in containers_managers
    operator.assert_nothing_forbidden()


def test_an_object_with_a_childs_name_is_a_conflict_and_never_adopted(
    operator: RunningOperator, objects: ClusterObjects, controller_manager: ManagedProcess
) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "rival-tuned", "labels": {"team": "search"}},
        "spec": {"selector": {"app": "search"}, "ports": [{"name": "web", "port": 9999}]},
    }
    objects.apply(theirs)
    objects.apply(modeldeployment("rival"))
    reported = objects.wait_for(
        "modeldeployments",
        "rival",
        lambda found: "already exists" in version_message(found, "tuned"),
        "the conflict in its status",
    )
    message = version_message(reported, "tuned")
    assert f"Service {objects.namespace}/rival-tuned" in message and "has no controlling owner" in message
    assert [v["ready"] for v in reported["status"]["versions"]] == [False]

    def assert_untouched() -> None:
        service = objects.get("services", "rival-tuned")
        assert service is not None
        assert service["metadata"].get("ownerReferences") is None
        assert service["metadata"]["labels"] == {"team": "search"}
        assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("web", 9999)]
        assert {entry["manager"] for entry in service["metadata"]["managedFields"]} == {FIELD_MANAGER}

    assert_untouched()
    objects.kubectl("delete", "modeldeployment", "rival", "--wait=false")
    objects.wait_gone("deployments", "rival-tuned")  # what it did own is collected
    objects.wait_gone("configmaps", "rival-gateway")
    assert_untouched()
    operator.assert_nothing_forbidden()


@pytest.mark.parametrize("cascade", ["background", "foreground"])
def test_deleting_a_modeldeployment_leaves_no_child_behind(
    operator: RunningOperator, objects: ClusterObjects, controller_manager: ManagedProcess, cascade: str
) -> None:
    """Background (kubectl's default): the owner goes first, then the collector deletes its children.
    Foreground: the collector deletes the children first (blockOwnerDeletion), then the owner."""
    objects.apply(modeldeployment("brief", serving={"autoscaling": AUTOSCALING}))
    children = [
        ("deployments", "brief-tuned"),
        ("services", "brief-tuned"),
        ("horizontalpodautoscalers", "brief-tuned"),
        ("deployments", "brief"),
        ("services", "brief"),
        ("configmaps", "brief-gateway"),
    ]
    owner = objects.wait_for("modeldeployments", "brief")
    for plural, name in children:
        (reference,) = objects.wait_for(plural, name)["metadata"]["ownerReferences"]
        assert (reference["uid"], reference["controller"], reference["blockOwnerDeletion"]) == (
            owner["metadata"]["uid"],
            True,
            True,
        )

    def replica_sets() -> list[str]:
        return objects.kubectl("get", "replicasets", "-o", "name").split()

    # The Deployment controller made ReplicaSets (and Pods): the collector must take those too.
    wait_until("the Deployments' ReplicaSets", lambda: len(replica_sets()) == 2, operator.process)

    objects.kubectl("delete", "modeldeployment", "brief", f"--cascade={cascade}", "--wait=false")
    objects.wait_gone("modeldeployments", "brief")
    for plural, name in children:
        objects.wait_gone(plural, name)
    wait_until("the ReplicaSets to be collected", lambda: replica_sets() == [], operator.process)
    operator.assert_nothing_forbidden()
