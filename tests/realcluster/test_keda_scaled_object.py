"""A version with spec.serving.autoscaling.minReplicas 0 on a real kube-apiserver with KEDA's own ScaledObject
CRD installed (tests/realcluster/vendor, abridged from kedacore/keda; see its header).

The operator's serving backend (``KubernetesServing``) applies the rendered ScaledObject with server-side
apply, and the API server stores it whole (nothing pruned: the rendering matches KEDA's schema). Without
KEDA the version is reported not ready with the API server's answer, and its other objects are applied.
Turning minReplicas 0 off and on swaps the ScaledObject and the HorizontalPodAutoscaler. No KEDA operator
runs here: what it does with the ScaledObject is KEDA's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightkube import AsyncClient

from kubetune.kube import apply as kube
from kubetune.kube.children import ChildImages, build_version_scaled_object
from kubetune.kube.serving import KubernetesServing
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import Autoscaling, Serving
from realcluster.control_plane import ControlPlane

pytestmark = pytest.mark.realcluster

SCALED_OBJECT_CRD = Path(__file__).parent / "vendor" / "keda.sh_scaledobjects.yaml"
IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")
PROMETHEUS = "http://prometheus.monitoring.svc:9090"
TO_ZERO = Serving(autoscaling=Autoscaling(min_replicas=0, max_replicas=3, scale_to_zero_after="10m"))
AT_LEAST_ONE = Serving(autoscaling=Autoscaling(min_replicas=1, max_replicas=3))


async def owner(plane: ControlPlane, namespace: str) -> DeploymentRef:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot", "namespace": namespace},
        "spec": {
            "versions": [{"name": "tuned", "model": {"uri": "pvc://models/support-bot/v3"}, "weight": 100}],
            "serving": {"autoscaling": {"minReplicas": 0, "maxReplicas": 3, "scaleToZeroAfter": "10m"}},
        },
    }
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest))
    stored = json.loads(
        plane.kubectl("get", "modeldeployment", "support-bot", "-n", namespace, "-o", "json").stdout
    )
    return DeploymentRef("support-bot", namespace, stored["metadata"]["uid"])


def tuned(serving: Serving) -> VersionServing:
    return VersionServing(
        name="tuned",
        model_uri="pvc://models/support-bot/v3",
        bento="support-bot-tuned",
        env={},
        serving=serving,
    )


def kinds_of(plane: ControlPlane, namespace: str) -> set[str]:
    found = set()
    for kind in ("deployment", "service", "horizontalpodautoscaler", "scaledobject.keda.sh"):
        listed = plane.kubectl("get", kind, "-n", namespace, "-o", "json", check=False)
        if listed.returncode == 0 and json.loads(listed.stdout)["items"]:
            found.add(kind)
    return found


def install_keda_crd(plane: ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(SCALED_OBJECT_CRD))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=90s", "crd", "scaledobjects.keda.sh")


async def test_the_rendered_scaled_object_is_stored_whole_and_swaps_with_the_hpa(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, client: AsyncClient
) -> None:
    ref = await owner(control_plane, namespace)
    serving = KubernetesServing(client, IMAGES, prometheus_url=PROMETHEUS)

    if control_plane.kubectl("get", "crd", "scaledobjects.keda.sh", check=False).returncode != 0:
        # Without KEDA: the version says the API server has no ScaledObject; the rest is applied.
        observed = (await serving.ensure_versions(ref, [tuned(TO_ZERO)]))["tuned"]
        assert not observed.ready and observed.message is not None
        assert "the cluster has no keda.sh/v1alpha1 ScaledObject" in observed.message, observed.message
        assert kinds_of(control_plane, namespace) == {"deployment", "service"}
        install_keda_crd(control_plane)

    observed = (await serving.ensure_versions(ref, [tuned(TO_ZERO)]))["tuned"]
    assert not observed.ready  # no pod runs: at zero replicas the gateway holds its requests
    stored = await kube.get(client, kube.SCALED_OBJECTS, namespace, "support-bot-tuned")
    assert stored is not None
    rendered = build_version_scaled_object(ref, "tuned", TO_ZERO, PROMETHEUS)
    assert rendered is not None
    assert stored["spec"] == rendered["spec"]  # nothing pruned by KEDA's schema
    assert stored["metadata"]["ownerReferences"] == rendered["metadata"]["ownerReferences"]
    assert kinds_of(control_plane, namespace) == {"deployment", "service", "scaledobject.keda.sh"}
    deployment = await kube.get(client, kube.DEPLOYMENTS, namespace, "support-bot-tuned")
    assert deployment is not None

    # KEDA scales the idle version to zero: it sleeps, which is not a failure (Ready stays True)
    control_plane.kubectl("scale", "deployment", "support-bot-tuned", "-n", namespace, "--replicas=0")
    asleep = (await serving.ensure_versions(ref, [tuned(TO_ZERO)]))["tuned"]
    assert asleep.scaled_to_zero and not asleep.ready and not asleep.failed
    assert asleep.message is not None and "scaled to zero by KEDA" in asleep.message

    # minReplicas 1: the HPA takes over and the ScaledObject goes; back to 0: the other way round.
    await serving.ensure_versions(ref, [tuned(AT_LEAST_ONE)])
    assert kinds_of(control_plane, namespace) == {"deployment", "service", "horizontalpodautoscaler"}
    await serving.ensure_versions(ref, [tuned(TO_ZERO)])
    assert kinds_of(control_plane, namespace) == {"deployment", "service", "scaledobject.keda.sh"}
