"""LoRA versions of one base model on a real kube-apiserver: the operator's reconcile pass serves them
from one Deployment, and a version joining or leaving changes only the group's ConfigMap.

``reconcile_deployment`` runs with the cluster backend (``KubernetesServing``) on ModelDeployments and
FineTuneJob results as the API server holds and the Kopf index would return them. kube-controller-manager runs
(the Deployment and ReplicaSet controllers make the pods); no kubelet does: the test writes the pods'
Ready status, and moves the backend's clock past the time the pods take to load an adapter from their
ConfigMap.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from lightkube import AsyncClient

from kubetune.kube import apply as kube
from kubetune.kube.adapter_group import (
    ADAPTER_LOAD_WAIT_S,
    ADAPTERS_KEY,
    SERVICE,
    group_child_name,
    group_version_url,
)
from kubetune.kube.children import ChildImages, gateway_config_map_name
from kubetune.kube.serving import KubernetesServing
from kubetune.plan.versions import DeploymentRef
from kubetune.reconcile.deployment import DeploymentOutcome, reconcile_deployment
from realcluster.control_plane import ControlPlane, ManagedProcess

pytestmark = pytest.mark.realcluster

IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")
BASE = "pvc://models/base/tiny"
ADAPTER_CLAIM = {"v1": "models", "v2": "models", "v3": "models", "v4": "more-models"}


def finetune_job(name: str) -> dict[str, Any]:
    """A FineTuneJob that published version ``name``'s LoRA adapter of BASE, unmerged."""
    return {
        "spec": {
            "baseModel": {"uri": BASE},
            "method": {"type": "lora"},
            "output": {"uri": "pvc://models/store", "mergeAdapter": False},
        },
        "status": {
            "phase": "Succeeded",
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Published"}],
            "output": {"uri": f"pvc://{ADAPTER_CLAIM[name]}/router/{name}"},
        },
    }


def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return finetune_job(name) if kind == "FineTuneJob" and name in ADAPTER_CLAIM else None


def apply_deployment(
    plane: ControlPlane, namespace: str, weights: dict[str, int], share: bool = True
) -> dict[str, Any]:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "router", "namespace": namespace},
        "spec": {
            "versions": [
                {"name": name, "model": {"fineTuneJobRef": {"name": name}}, "weight": weight}
                for name, weight in weights.items()
            ],
            "serving": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}, "shareBaseModel": share},
        },
    }
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest))
    stored: dict[str, Any] = json.loads(
        plane.kubectl("get", "modeldeployment", "router", "-n", namespace, "-o", "json").stdout
    )
    return stored


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def play_rollout_done(plane: ControlPlane, namespace: str, name: str) -> None:
    """What the kubelet writes once the Deployment's current pods run: each of its pods Ready, until the
    Deployment controller (kube-controller-manager runs for these tests) reports the rollout complete."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stored = get(plane, namespace, "deployment", name)
        status = stored.get("status") or {}
        wanted = stored["spec"].get("replicas", 1)
        if (
            status.get("observedGeneration") == stored["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("readyReplicas") == wanted
            and status.get("replicas") == wanted
        ):
            return
        selector = ",".join(
            f"{key}={value}" for key, value in stored["spec"]["selector"]["matchLabels"].items()
        )
        pods = json.loads(plane.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)
        for pod in pods["items"]:
            conditions = (pod.get("status") or {}).get("conditions") or []
            if pod["metadata"].get("deletionTimestamp") or any(
                c["type"] == "Ready" and c["status"] == "True" for c in conditions
            ):
                continue
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            ready = {
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": kind, "status": "True", "lastTransitionTime": now}
                        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                    ],
                }
            }
            plane.kubectl(
                "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                "--type=merge", "-p", json.dumps(ready), check=False,
            )  # fmt: skip
        time.sleep(0.5)
    raise AssertionError(f"Deployment {name} never finished its rollout: {status}")


async def reconcile(
    plane: ControlPlane,
    namespace: str,
    serving: KubernetesServing,
    weights: dict[str, int],
    share: bool = True,
) -> DeploymentOutcome:
    return await reconcile_deployment(
        apply_deployment(plane, namespace, weights, share), lookup=lookup, serving=serving, prometheus=None
    )


def status_of(outcome: DeploymentOutcome) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in outcome.status["versions"]}


def names_of(plane: ControlPlane, namespace: str, kind: str) -> set[str]:
    """The model servers' objects of that kind (the gateway's are left out)."""
    serving = "app.kubernetes.io/component=serving"
    listed = json.loads(plane.kubectl("get", kind, "-n", namespace, "-l", serving, "-o", "json").stdout)
    return {item["metadata"]["name"] for item in listed["items"]}


def get(plane: ControlPlane, namespace: str, kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(plane.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
    return found


async def test_lora_versions_of_one_base_share_one_deployment_that_follows_them_without_a_restart(
    control_plane: ControlPlane,
    kubetune_crds: list[str],
    controller_manager: ManagedProcess,
    namespace: str,
    client: AsyncClient,
) -> None:
    clock = Clock()
    serving = KubernetesServing(client, IMAGES, retire_after_s=0, clock=clock)
    group = group_child_name("router", BASE)
    ref = DeploymentRef("router", namespace)

    first = await reconcile(control_plane, namespace, serving, {"v1": 50, "v2": 30, "v3": 20})
    # one server for the three versions, with its Service and HPA; no version has one of its own
    assert names_of(control_plane, namespace, "deployment") == {group}
    assert names_of(control_plane, namespace, "service") == {group}
    assert names_of(control_plane, namespace, "horizontalpodautoscaler") == {group}
    server = get(control_plane, namespace, "deployment", group)
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["bentoml", "serve", SERVICE]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in server["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"models"}
    adapters = json.loads(get(control_plane, namespace, "configmap", group)["data"][ADAPTERS_KEY])
    assert adapters == {name: f"/mnt/pvc/models/router/{name}" for name in ("v1", "v2", "v3")}
    assert not any(item.get("ready") for item in first.status["versions"])  # no pod is ready yet

    play_rollout_done(control_plane, namespace, group)
    clock.now += ADAPTER_LOAD_WAIT_S
    ready = await reconcile(control_plane, namespace, serving, {"v1": 50, "v2": 30, "v3": 20})
    assert all(item["ready"] for item in ready.status["versions"]), [
        (item["name"], item.get("message")) for item in ready.status["versions"]
    ]
    gateway = json.loads(
        get(control_plane, namespace, "configmap", gateway_config_map_name("router"))["data"]["gateway.json"]
    )
    routes = {version["name"]: (version["url"], version["weight"]) for version in gateway["versions"]}
    assert routes == {
        "v1": (group_version_url(ref, BASE, "v1"), 50),
        "v2": (group_version_url(ref, BASE, "v2"), 30),
        "v3": (group_version_url(ref, BASE, "v3"), 20),
    }
    generation = server["metadata"]["generation"]

    # v2 leaves: only the ConfigMap changes, which the running pods follow
    await reconcile(control_plane, namespace, serving, {"v1": 70, "v3": 30})
    adapters = json.loads(get(control_plane, namespace, "configmap", group)["data"][ADAPTERS_KEY])
    assert sorted(adapters) == ["v1", "v3"]
    assert get(control_plane, namespace, "deployment", group)["metadata"]["generation"] == generation

    # v4 joins from another claim: the pods must mount it, a rolling update that keeps the old pods serving
    clock.now += 1
    joined = await reconcile(control_plane, namespace, serving, {"v1": 60, "v3": 30, "v4": 10})
    updated = get(control_plane, namespace, "deployment", group)
    assert updated["metadata"]["generation"] == generation + 1
    assert updated["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    play_rollout_done(control_plane, namespace, group)
    joined = await reconcile(control_plane, namespace, serving, {"v1": 60, "v3": 30, "v4": 10})
    versions = status_of(joined)
    assert versions["v1"]["ready"] and versions["v3"]["ready"]
    # the pods' creation times are real, the backend's clock is ahead of them: no pod is known to have
    # started with v4, so it waits for the ConfigMap refresh
    assert not versions["v4"]["ready"]
    clock.now += ADAPTER_LOAD_WAIT_S
    joined = await reconcile(control_plane, namespace, serving, {"v1": 60, "v3": 30, "v4": 10})
    assert status_of(joined)["v4"]["ready"]
    assert names_of(control_plane, namespace, "deployment") == {group}
    stored = await kube.get(client, kube.CONFIG_MAPS, namespace, group)
    assert stored is not None and sorted(json.loads(stored["data"][ADAPTERS_KEY])) == ["v1", "v3", "v4"]


async def test_versions_moving_into_a_group_keep_their_own_servers_while_the_gateways_catch_up(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, client: AsyncClient
) -> None:
    clock = Clock()
    serving = KubernetesServing(client, IMAGES, retire_after_s=150, clock=clock)
    group = group_child_name("router", BASE)
    weights = {"v1": 50, "v2": 50}
    await reconcile(control_plane, namespace, serving, weights, share=False)
    assert names_of(control_plane, namespace, "deployment") == {"router-v1", "router-v2"}

    # shareBaseModel turned on: the group starts, the versions' own servers serve on meanwhile
    await reconcile(control_plane, namespace, serving, weights)
    assert names_of(control_plane, namespace, "deployment") == {group, "router-v1", "router-v2"}
    clock.now += 149
    await reconcile(control_plane, namespace, serving, weights)
    assert names_of(control_plane, namespace, "deployment") == {group, "router-v1", "router-v2"}
    clock.now += 1
    await reconcile(control_plane, namespace, serving, weights)
    assert names_of(control_plane, namespace, "deployment") == {group}
    assert names_of(control_plane, namespace, "horizontalpodautoscaler") == {group}
