"""A version whose model path holds no model stalls its ModelDeployment at once, on a real API server.

The version's model-building init container exits with MODEL_INVALID_EXIT_CODE after writing
``<Reason>: <message>`` to its termination log (``python -m kubetune_components.serving.bento build``
does so; the first test runs it). The kubelet puts both in the pod's status. There is no kubelet
here, so the test writes that status through the pods' status subresource, as the kubelet would;
the operator's serving backend (``KubernetesServing``) then reports the version failed, and the
ModelDeployment's status goes Stalled with ModelInvalid, instead of Stalled=False while the init
container crash-loops forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient

from kubetune.kube.children import ChildImages
from kubetune.kube.serving import KubernetesServing
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import Serving
from kubetune_contract.serving import MODEL_INVALID_EXIT_CODE, TERMINATION_LOG_ENV
from realcluster.control_plane import ControlPlane

pytestmark = pytest.mark.realcluster

REPO = Path(__file__).resolve().parents[2]
IMAGES = ChildImages(serving="registry.example/runtime:1", gateway="registry.example/operator:1")
NO_MODEL = "pvc://models/support-bot/v3"
BUILD = [sys.executable, "-m", "kubetune_components.serving.bento", "build"]  # the init container's command


def the_init_container_says(tmp_path: Path) -> str:
    """What the real init container command writes to its termination log for a path with no model."""
    log = tmp_path / "termination-log"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = subprocess.run(
        [*BUILD, "--model-dir", str(empty), "--deployment", "support-bot", "--version", "tuned"],
        env={**os.environ, TERMINATION_LOG_ENV: str(log)},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == MODEL_INVALID_EXIT_CODE, result.stderr
    return log.read_text(encoding="utf-8")


def test_the_init_container_exits_with_the_model_invalid_status_and_says_why(tmp_path: Path) -> None:
    said = the_init_container_says(tmp_path)
    assert said.startswith("ModelLoadFailed: ")
    assert "not-a-model" in said


async def owner(plane: ControlPlane, namespace: str) -> DeploymentRef:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "support-bot", "namespace": namespace},
        "spec": {"versions": [{"name": "tuned", "model": {"uri": NO_MODEL}, "weight": 100}]},
    }
    plane.kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(manifest))
    stored = json.loads(
        plane.kubectl("get", "modeldeployment", "support-bot", "-n", namespace, "-o", "json").stdout
    )
    return DeploymentRef("support-bot", namespace, stored["metadata"]["uid"])


def tuned(model_uri: str = NO_MODEL) -> VersionServing:
    return VersionServing(
        name="tuned", model_uri=model_uri, bento="support-bot-tuned", env={}, serving=Serving()
    )


def create_pod_of(plane: ControlPlane, namespace: str, name: str) -> None:
    """A pod as the version's ReplicaSet would create it from the Deployment's template (there is no
    controller-manager here, so neither the ReplicaSet nor the namespace's default ServiceAccount)."""
    server = json.loads(
        plane.kubectl("get", "deployment", "support-bot-tuned", "-n", namespace, "-o", "json").stdout
    )
    template = server["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }
    if plane.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode != 0:
        plane.kubectl("create", "serviceaccount", "default", "-n", namespace)
    plane.kubectl("create", "-f", "-", stdin=json.dumps(pod))


def kubelet_reports(plane: ControlPlane, namespace: str, pod: str, init_status: dict[str, Any]) -> None:
    """Write the pod's status as the kubelet does after running its init container."""
    status = {"status": {"phase": "Pending", "initContainerStatuses": [init_status]}}
    plane.kubectl(
        "patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )


def terminated(exit_code: int, message: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}


def init_status(**states: Any) -> dict[str, Any]:
    return {
        "name": "fetch-model",
        "image": IMAGES.serving,
        "imageID": "",
        "ready": False,
        "restartCount": 1,
        "state": states.get("state", {"waiting": {"reason": "CrashLoopBackOff"}}),
        "lastState": states.get("last", {}),
    }


async def test_a_version_whose_init_container_refused_the_model_is_failed_at_once(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, client: AsyncClient, tmp_path: Path
) -> None:
    ref = await owner(control_plane, namespace)
    serving = KubernetesServing(client, IMAGES)
    first = (await serving.ensure_versions(ref, [tuned()]))["tuned"]
    assert not first.ready and not first.failed  # no pod has said anything yet

    create_pod_of(control_plane, namespace, "support-bot-tuned-abc")
    said = the_init_container_says(tmp_path)
    kubelet_reports(
        control_plane,
        namespace,
        "support-bot-tuned-abc",
        init_status(last=terminated(MODEL_INVALID_EXIT_CODE, said)),
    )

    observed = (await serving.ensure_versions(ref, [tuned()]))["tuned"]
    assert observed.failed and not observed.ready
    assert observed.message is not None
    assert observed.message.startswith(f"the model cannot be served: {said.strip()}")
    assert "init container fetch-model of pod support-bot-tuned-abc" in observed.message


async def test_other_failures_and_other_models_are_left_to_retry(
    control_plane: ControlPlane, kubetune_crds: list[str], namespace: str, client: AsyncClient
) -> None:
    ref = await owner(control_plane, namespace)
    serving = KubernetesServing(client, IMAGES)
    await serving.ensure_versions(ref, [tuned()])
    create_pod_of(control_plane, namespace, "support-bot-tuned-net")
    # A download that broke (exit 1): the kubelet retries it, and so does the operator.
    kubelet_reports(
        control_plane,
        namespace,
        "support-bot-tuned-net",
        init_status(last=terminated(1, "ModelFetchFailed: cannot fetch the model hf://acme/tiny")),
    )
    assert not (await serving.ensure_versions(ref, [tuned()]))["tuned"].failed

    # The pod refused the old model; the version now names another one: that pod says nothing about it.
    kubelet_reports(
        control_plane,
        namespace,
        "support-bot-tuned-net",
        init_status(state=terminated(MODEL_INVALID_EXIT_CODE, "ModelLoadFailed: no model")),
    )
    assert (await serving.ensure_versions(ref, [tuned()]))["tuned"].failed
    assert not (await serving.ensure_versions(ref, [tuned("pvc://models/support-bot/v4")]))["tuned"].failed
