"""ModelDeployments on a cluster: the real operator (kubetune.handlers.deployment) against kmock.

The emulator runs no Deployment controller: a test plays it by writing a Deployment's status. It
approximates server-side apply as create-or-merge-patch (see kubetune.kube.apply), and deleting an
owner deletes its dependents, as the garbage collector does.

The first tests drive kubetune.kube.apply / serving directly with the operator's lightkube client
(configured from the k8s fixture's kubeconfig, as the operator's is); the last ones run the operator.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import kmock
import pytest
from lightkube import AsyncClient

from kubetune.kube import apply as kube
from kubetune.kube import permissions
from kubetune.kube.apply import ChildConflict
from kubetune.kube.children import ChildImages, build_gateway_config_map
from kubetune.kube.serving import KubernetesServing
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune.reconcile.deployment import reconcile_deployment, remove_deployment
from kubetune_contract.deployment import Autoscaling, Serving

if TYPE_CHECKING:
    from fixtures.cluster import Cluster
    from fixtures.operator import OperatorRunner

# Read when the handlers module is first imported (by run_operator): a tick every half second.
os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")

HANDLERS = "kubetune.handlers.deployment"
IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")


async def an_owner(cluster: Cluster, name: str = "support-bot") -> DeploymentRef:
    """A stored ModelDeployment (its uid is what children point to)."""
    created = await cluster.create(
        "modeldeployments",
        {
            "metadata": {"name": name},
            "spec": {"versions": [{"name": "tuned", "model": {"uri": "hf://acme/x"}, "weight": 100}]},
        },
    )
    return DeploymentRef(name=name, namespace="default", uid=created["metadata"]["uid"])


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


def serving_of(ref: DeploymentRef, name: str, uri: str, serving: Serving | None = None) -> VersionServing:
    return VersionServing(
        name=name,
        model_uri=uri,
        bento=f"{ref.name}-{name}",
        env={"KUBETUNE_DEPLOYMENT": ref.name, "KUBETUNE_VERSION": name},
        serving=serving or Serving(),
    )


async def play_deployment_controller(cluster: Cluster, name: str, ready: int = 1) -> None:
    """Write the status the Deployment controller would once ``ready`` pods run the current spec."""
    deployment = await cluster.get("deployments", name)
    replicas = deployment["spec"].get("replicas", 1)
    status = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }
    await cluster.patch("deployments", name, {"status": status}, subresource="status")


# ---- the apply client and the serving backend, without the operator -------------------------------


async def test_a_reconcile_pass_awaits_the_cluster_backend_on_the_clients_loop(
    cluster: Cluster, api: AsyncClient
) -> None:
    ref = await an_owner(cluster)
    body = copy.deepcopy(await cluster.get("modeldeployments", ref.name))
    serving = KubernetesServing(api, IMAGES)
    outcome = await reconcile_deployment(body, lookup=lambda *_: None, serving=serving, prometheus=None)
    tuned = next(version for version in outcome.status["versions"] if version["name"] == "tuned")
    assert tuned["url"] == "http://support-bot-tuned.default.svc:3000"
    assert cluster.peek("deployments", "support-bot-tuned") is not None
    await remove_deployment(body, serving)
    assert cluster.peek("deployments", "support-bot-tuned") is None


async def test_apply_creates_then_updates_in_place(cluster: Cluster, api: AsyncClient) -> None:
    ref = await an_owner(cluster)
    first = await kube.apply(api, build_gateway_config_map(ref, {"weights": [80, 20]}))
    again = await kube.apply(api, build_gateway_config_map(ref, {"weights": [80, 20]}))
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]  # a no-op
    changed = await kube.apply(api, build_gateway_config_map(ref, {"weights": [50, 50]}))
    assert changed["metadata"]["uid"] == first["metadata"]["uid"]
    assert json.loads(changed["data"]["gateway.json"]) == {"weights": [50, 50]}
    # The server saw server-side apply requests from kubetune's field manager.
    applies = [
        r
        for r in cluster.emulator
        if r.method == "PATCH" and r.resource and r.resource.plural == "configmaps"
    ]
    assert len(applies) == 3
    assert all(r.headers["Content-Type"] == "application/apply-patch+yaml" for r in applies)
    assert all(r.params == {"fieldManager": "kubetune", "force": "true"} for r in applies)


async def test_apply_refuses_an_object_controlled_by_another_owner(
    cluster: Cluster, api: AsyncClient
) -> None:
    ref = await an_owner(cluster)
    other = await an_owner(cluster, "other")
    stranger = build_gateway_config_map(other, {})
    stranger["metadata"]["name"] = "support-bot-gateway"
    await cluster.create("configmaps", stranger)
    with pytest.raises(
        ChildConflict, match="ConfigMap default/support-bot-gateway already exists and is controlled"
    ):
        await kube.apply(api, build_gateway_config_map(ref, {}))
    # Nor one that nobody owns (a user's): force-applying would adopt it, and GC would then delete it.
    users = build_gateway_config_map(ref, {"mine": True})
    users["metadata"]["name"] = "users-own"
    del users["metadata"]["ownerReferences"]
    await cluster.create("configmaps", users)
    ours = build_gateway_config_map(ref, {})
    ours["metadata"]["name"] = "users-own"
    with pytest.raises(ChildConflict, match="has no controlling owner"):
        await kube.apply(api, ours)
    assert cluster.peek("configmaps", "users-own")["data"] == users["data"]  # type: ignore[index]


async def test_ensure_versions_applies_reports_readiness_and_prunes(
    cluster: Cluster, api: AsyncClient
) -> None:
    ref = await an_owner(cluster)
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    backend = KubernetesServing(api, IMAGES, retire_after_s=60, clock=clock)
    autoscaled = Serving(autoscaling=Autoscaling(min_replicas=1, max_replicas=3))
    versions = [
        serving_of(ref, "tuned", "pvc://artifacts/tuned", autoscaled),
        serving_of(ref, "int8", "hf://acme/int8", autoscaled),
    ]
    seen = await backend.ensure_versions(ref, versions)
    assert {name: (o.url, o.ready) for name, o in seen.items()} == {
        "tuned": ("http://support-bot-tuned.default.svc:3000", False),
        "int8": ("http://support-bot-int8.default.svc:3000", False),
    }
    assert "waiting for the Deployment controller" in (seen["tuned"].message or "")
    for kind in ("deployments", "services", "horizontalpodautoscalers"):
        assert cluster.peek(kind, "support-bot-tuned") is not None
        assert cluster.peek(kind, "support-bot-int8") is not None

    await play_deployment_controller(cluster, "support-bot-tuned")
    seen = await backend.ensure_versions(ref, versions)
    assert (seen["tuned"].ready, seen["int8"].ready) == (True, False)

    # int8 leaves and tuned loses its autoscaler. The HPA goes at once; int8 keeps serving for the
    # grace period (the gateway's pods may not have the new config yet), then its objects go.
    clock.now += 1
    plain_tuned = serving_of(ref, "tuned", "pvc://artifacts/tuned", Serving(replicas=1))
    seen = await backend.ensure_versions(ref, [plain_tuned])
    assert list(seen) == ["tuned"]
    assert cluster.peek("horizontalpodautoscalers", "support-bot-tuned") is None
    retired = cluster.peek("deployments", "support-bot-int8")
    assert retired is not None
    assert retired["metadata"]["annotations"]["kubetune.dev/retired-at"] == "2026-01-01T00:00:01Z"
    clock.now += 59
    await backend.ensure_versions(ref, [plain_tuned])
    assert cluster.peek("services", "support-bot-int8") is not None
    clock.now += 1
    await backend.ensure_versions(ref, [plain_tuned])
    for kind in ("deployments", "services", "horizontalpodautoscalers"):
        assert cluster.peek(kind, "support-bot-int8") is None
    assert cluster.peek("deployments", "support-bot-tuned") is not None

    # A version that comes back within its grace period is not deleted later.
    await backend.ensure_versions(ref, [])
    assert (
        "kubetune.dev/retired-at"
        in cluster.peek("deployments", "support-bot-tuned")["metadata"]["annotations"]
    )  # type: ignore[index]
    await backend.ensure_versions(ref, [plain_tuned])
    clock.now += 3600
    await backend.ensure_versions(ref, [plain_tuned])
    back = cluster.peek("deployments", "support-bot-tuned")
    assert back is not None and "kubetune.dev/retired-at" not in back["metadata"]["annotations"]

    # A version that cannot be served on a cluster is reported; its objects stay as they are.
    seen = await backend.ensure_versions(ref, [serving_of(ref, "tuned", "/local/path")])
    assert not seen["tuned"].ready and "local path" in (seen["tuned"].message or "")
    assert cluster.peek("deployments", "support-bot-tuned") is not None

    deleted = await backend.remove(ref)
    assert sorted(deleted) == [("Deployment", "support-bot-tuned"), ("Service", "support-bot-tuned")]


async def test_prune_never_deletes_what_another_owner_controls(cluster: Cluster, api: AsyncClient) -> None:
    ref = await an_owner(cluster)
    other = await an_owner(cluster, "other")
    backend = KubernetesServing(api, IMAGES, retire_after_s=0)
    await backend.ensure_versions(other, [serving_of(other, "v1", "hf://acme/x")])
    labelled = copy.deepcopy(await cluster.get("services", "other-v1"))
    labelled["metadata"]["labels"]["kubetune.dev/deployment"] = "support-bot"  # carries our label
    await cluster.replace("services", "other-v1", labelled)
    await backend.ensure_versions(ref, [])
    assert cluster.peek("services", "other-v1") is not None


# ---- the operator --------------------------------------------------------------------------------


def mdep(weights: dict[str, int], *, autoscaling: bool = True) -> dict[str, Any]:
    models = {
        "tuned": {"fineTuneJobRef": {"name": "support-lora"}},
        "int8": {"uri": "pvc://artifacts/support-int8/v1"},
    }
    serving: dict[str, Any] = {"resources": {"requests": {"cpu": "1"}}}
    if autoscaling:
        serving["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3, "targetConcurrency": 4}
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot"},
        "spec": {
            "versions": [{"name": name, "model": models[name], "weight": w} for name, w in weights.items()],
            "serving": serving,
        },
    }


SUCCEEDED_FTJ = {
    "metadata": {"name": "support-lora"},
    "spec": {"baseModel": {"uri": "hf://acme/base"}, "dataset": {"uri": "data.jsonl"}},
    "status": {
        "phase": "Succeeded",
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Published", "message": "done"}],
        "output": {"uri": "pvc://artifacts/support-lora/v1", "version": "v1"},
    },
}


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return [(r["kind"], r["name"], r["uid"], r["controller"], r["blockOwnerDeletion"]) for r in refs] == [
        ("ModelDeployment", "support-bot", owner["metadata"]["uid"], True, True)
    ]


def rbac_grants(cluster: Cluster) -> set[tuple[str, str, str]]:
    """The (apiGroup, resource, verb) RBAC checks for each request the operator (Kopf and kubetune's
    client) made."""
    grants = set()
    for request in cluster.operator_requests():
        resource = request.resource
        if resource is None or not resource.plural:
            continue  # discovery
        plural = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
        verb = {
            "GET": {kmock.action.WATCH: "watch", kmock.action.LIST: "list"}.get(request.action, "get"),
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete" if request.name else "deletecollection",
        }[request.method.value]
        grants.add((str(resource.group or ""), plural, verb))
    return grants


def gateway_weights(cluster: Cluster) -> dict[str, int]:
    config_map = cluster.peek("configmaps", "support-bot-gateway")
    assert config_map is not None
    config = json.loads(config_map["data"]["gateway.json"])
    return {version["name"]: version["weight"] for version in config["versions"]}


async def test_the_operator_serves_a_model_deployment(
    cluster: Cluster, run_operator: OperatorRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_RETIRE_GRACE_SECONDS", "0")  # the grace period has its own test above
    await cluster.create("finetunejobs", SUCCEEDED_FTJ)
    async with run_operator(HANDLERS):
        owner = await cluster.create("modeldeployments", mdep({"tuned": 80, "int8": 20}))

        # Every child exists and is controlled by the ModelDeployment.
        children = [
            (kind, f"support-bot-{version}")
            for version in ("tuned", "int8")
            for kind in ("deployments", "services", "horizontalpodautoscalers")
        ]
        children += [
            ("configmaps", "support-bot-gateway"),
            ("deployments", "support-bot"),
            ("services", "support-bot"),
        ]
        for kind, name in children:
            obj = await cluster.wait_for(kind, name, timeout=15)
            assert owned_by(obj, owner), (kind, name)
        tuned = cluster.peek("deployments", "support-bot-tuned")
        assert tuned is not None
        fetch = tuned["spec"]["template"]["spec"]["initContainers"][0]
        assert "pvc://artifacts/support-lora/v1" in fetch["args"]  # the FineTuneJob's published model
        assert gateway_weights(cluster) == {"tuned": 80, "int8": 20}

        # The Deployment controller's part: the pods are ready.
        for name in ("support-bot-tuned", "support-bot-int8", "support-bot"):
            await play_deployment_controller(cluster, name)

        def ready(obj: dict[str, Any]) -> bool:
            conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
            return conditions["Ready"] == "True" and all(v["ready"] for v in obj["status"]["versions"])

        status = (await cluster.wait_for("modeldeployments", "support-bot", ready, timeout=15))["status"]
        assert status["endpoint"] == "http://support-bot.default.svc:8080/v1"
        assert {v["name"]: (v["url"], v["weight"]) for v in status["versions"]} == {
            "tuned": ("http://support-bot-tuned.default.svc:3000", 80),
            "int8": ("http://support-bot-int8.default.svc:3000", 20),
        }
        assert status["observedGeneration"] == 1
        await cluster.wait_events("support-bot", reason="AllVersionsReady")

        # New weights: the ConfigMap changes in place; no Deployment's spec changes.
        before = {
            name: cluster.peek("deployments", name)
            for name in ("support-bot-tuned", "support-bot-int8", "support-bot")
        }
        config_map_uid = cluster.peek("configmaps", "support-bot-gateway")["metadata"]["uid"]  # type: ignore[index]
        await cluster.patch(
            "modeldeployments", "support-bot", {"spec": mdep({"tuned": 50, "int8": 50})["spec"]}
        )
        await cluster.wait_for(
            "configmaps",
            "support-bot-gateway",
            lambda _: gateway_weights(cluster) == {"tuned": 50, "int8": 50},
        )
        assert cluster.peek("configmaps", "support-bot-gateway")["metadata"]["uid"] == config_map_uid  # type: ignore[index]
        for name, old in before.items():
            new = cluster.peek("deployments", name)
            assert new is not None and old is not None
            assert (
                new["spec"] == old["spec"] and new["metadata"]["generation"] == old["metadata"]["generation"]
            )
            if name != "support-bot":  # the gateway's Deployment only has a new checksum annotation
                assert new["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"]

        # int8 is removed from the spec: its children are deleted, the gateway forgets it.
        await cluster.patch("modeldeployments", "support-bot", {"spec": mdep({"tuned": 100})["spec"]})
        for kind in ("deployments", "services", "horizontalpodautoscalers"):
            await cluster.wait_gone(kind, "support-bot-int8", timeout=15)
        await cluster.wait_for(
            "configmaps", "support-bot-gateway", lambda _: gateway_weights(cluster) == {"tuned": 100}
        )
        assert cluster.peek("deployments", "support-bot-tuned") is not None

        # Every API call the operator made is one its RBAC (derived from the code) grants.
        assert rbac_grants(cluster) - permissions.grants(clusterwide=True) == set()
        assert {
            ("apps", "deployments", "patch"),
            ("apps", "deployments", "watch"),
            ("autoscaling", "horizontalpodautoscalers", "delete"),
            ("", "configmaps", "patch"),
            ("kubetune.dev", "modeldeployments/status", "patch"),
        } <= rbac_grants(cluster)

        # Deleting the ModelDeployment deletes what it owns (the garbage collector, emulated).
        await cluster.delete("modeldeployments", "support-bot")
        for kind, name in [
            ("deployments", "support-bot-tuned"),
            ("deployments", "support-bot"),
            ("configmaps", "support-bot-gateway"),
        ]:
            await cluster.wait_gone(kind, name)


async def test_a_version_waiting_for_its_job_is_reported(
    cluster: Cluster, run_operator: OperatorRunner
) -> None:
    async with run_operator(HANDLERS):
        await cluster.create("modeldeployments", mdep({"tuned": 50, "int8": 50}, autoscaling=False))
        await cluster.wait_for("deployments", "support-bot-int8", timeout=15)

        def reported(obj: dict[str, Any]) -> bool:
            versions = {v["name"]: v for v in obj["status"]["versions"]}
            return "support-lora" in (versions["tuned"].get("message") or "")

        await cluster.wait_for("modeldeployments", "support-bot", reported, timeout=15)
        assert cluster.peek("deployments", "support-bot-tuned") is None  # nothing to serve yet
        int8 = cluster.peek("deployments", "support-bot-int8")
        assert int8 is not None and int8["spec"]["replicas"] == 1
