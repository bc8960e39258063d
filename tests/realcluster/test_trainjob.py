"""A distributed finetune step's Kubeflow Trainer TrainJob, against a real kube-apiserver with the Trainer's
own TrainJob CRD installed (tests/realcluster/vendor, abridged from kubeflow/trainer; see its header).

No Trainer controller runs here: the test plays its part, writing the TrainJob's status conditions as
the controller does (Complete, Failed), while the step's code renders, creates, follows and deletes it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from kubetune_components.common.errors import ComponentError
from kubetune_components.finetune import trainjob
from kubetune_components.finetune.signals import StopRequest, TrainingInterrupted
from realcluster.control_plane import ControlPlane

pytestmark = pytest.mark.realcluster

TRAINJOB_CRD = Path(__file__).parent / "vendor" / "trainer.kubeflow.org_trainjobs.yaml"
IMAGE = "ghcr.io/kubetune/runtime:0.1.0"
WORKSPACE = "pvc://kubetune-workspace/runs/team-a/support-router/g2-6d1c2f0e"
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def trainjob_crd(control_plane: ControlPlane) -> None:
    control_plane.kubectl("apply", "--server-side", "-f", str(TRAINJOB_CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=90s", "crd", "trainjobs.trainer.kubeflow.org"
    )


@pytest.fixture
def api(control_plane: ControlPlane, trainjob_crd: None) -> Iterator[client.CustomObjectsApi]:
    api_client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client.CustomObjectsApi(api_client)
    api_client.close()


def finetune_job(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support-router", "namespace": namespace, "generation": 2},
        "spec": {
            "baseModel": {"uri": "pvc://models/tiny-base", "tokenSecretRef": {"name": "hf-token"}},
            "dataset": {"uri": "pvc://datasets/support.jsonl"},
            "target": "gpu",
            "training": {"distributed": {"workers": 2, "processesPerWorker": 4}},
            "scheduling": {"queueName": "team-a-gpus", "priorityClassName": "batch-high"},
        },
    }


def play_controller(
    control_plane: ControlPlane, namespace: str, name: str, *conditions: dict[str, str]
) -> None:
    """Write the TrainJob's status conditions as the Trainer controller does (the status subresource)."""
    status = {
        "conditions": [
            {**condition, "lastTransitionTime": "2026-01-01T00:00:00Z"} for condition in conditions
        ]
    }
    control_plane.kubectl(
        "patch",
        "trainjob",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


class Following:
    """trainjob.follow in a thread, as the finetune step runs it; what it returned or raised."""

    def __init__(self, api: client.CustomObjectsApi, namespace: str, name: str) -> None:
        self.stop = StopRequest()
        self.polls = 0
        self.result: trainjob.TrainJobOutcome | None = None
        self.error: BaseException | None = None
        self.polled = threading.Event()

        def on_poll() -> None:
            self.polls += 1
            self.polled.set()

        def run() -> None:
            try:
                self.result = trainjob.follow(
                    api, namespace, name, stop=self.stop, poll_s=0.1, on_poll=on_poll
                )
            except BaseException as error:  # handed to the test thread
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self) -> None:
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), "follow did not return"


def created(api: client.CustomObjectsApi, namespace: str) -> tuple[str, dict[str, Any]]:
    manifest = trainjob.render_trainjob(finetune_job(namespace), WORKSPACE, image=IMAGE, namespace=namespace)
    name = trainjob.submit(api, manifest)
    stored = api.get_namespaced_custom_object(
        trainjob.GROUP, trainjob.VERSION, namespace, trainjob.PLURAL, name
    )
    return name, stored


def test_the_step_creates_a_torch_distributed_trainjob_running_its_own_command(
    api: client.CustomObjectsApi, namespace: str
) -> None:
    name, stored = created(api, namespace)

    assert name == trainjob.trainjob_name("support-router", WORKSPACE)
    spec = stored["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert spec["managedBy"] == "trainer.kubeflow.org/trainjob-controller"  # the CRD's default
    trainer = spec["trainer"]
    assert (trainer["image"], trainer["numNodes"], trainer["numProcPerNode"]) == (IMAGE, 2, 4)
    assert trainer["command"][:4] == ["python", "-m", "kubetune_components.finetune.steps", "finetune"]
    assert trainer["command"][-2:] == ["--workspace", WORKSPACE]
    config_json = json.loads(trainer["command"][trainer["command"].index("--config-json") + 1])
    assert config_json["spec"]["training"]["distributed"]["workers"] == 2
    assert trainer["env"] == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    ]
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    override = spec["podTemplateOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    mounts = {
        mount["mountPath"]: mount["name"] for mount in override["spec"]["containers"][0]["volumeMounts"]
    }
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in override["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert {path: claims.get(volume) for path, volume in mounts.items()} == {
        "/tmp": None,
        "/mnt/pvc/datasets": "datasets",
        "/mnt/pvc/kubetune-workspace": "kubetune-workspace",
        "/mnt/pvc/models": "models",
    }
    labels = stored["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert labels["kueue.x-k8s.io/priority-class"] == "batch-high"
    assert labels["kubetune.dev/name"] == "support-router"

    # A retried step takes the TrainJob its first attempt created.
    assert (
        trainjob.submit(
            api,
            trainjob.render_trainjob(finetune_job(namespace), WORKSPACE, image=IMAGE, namespace=namespace),
        )
        == name
    )


def test_following_ends_when_the_trainer_says_complete(
    api: client.CustomObjectsApi, control_plane: ControlPlane, namespace: str
) -> None:
    name, _ = created(api, namespace)
    following = Following(api, namespace, name)
    assert following.polled.wait(DEADLINE_S)  # running: still following
    play_controller(
        control_plane,
        namespace,
        name,
        {"type": "Created", "status": "True", "reason": "JobsCreationSucceeded", "message": "jobs created"},
    )
    play_controller(
        control_plane,
        namespace,
        name,
        {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "jobs completed"},
    )

    following.wait()
    assert following.error is None
    assert following.result == trainjob.TrainJobOutcome(name, "JobsCompleted", "jobs completed")
    assert following.polls >= 1


def test_a_failed_trainjob_fails_the_step_with_its_reason(
    api: client.CustomObjectsApi, control_plane: ControlPlane, namespace: str
) -> None:
    name, _ = created(api, namespace)
    following = Following(api, namespace, name)
    assert following.polled.wait(DEADLINE_S)
    play_controller(
        control_plane,
        namespace,
        name,
        {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "node-1 OOMKilled"},
    )

    following.wait()
    assert isinstance(following.error, ComponentError)
    assert following.error.reason == "TrainJobFailed"
    assert following.error.message == f"TrainJob {namespace}/{name} failed (JobsFailed): node-1 OOMKilled"


def test_a_stopped_step_deletes_its_trainjob(
    api: client.CustomObjectsApi, control_plane: ControlPlane, namespace: str
) -> None:
    name, _ = created(api, namespace)
    following = Following(api, namespace, name)
    assert following.polled.wait(DEADLINE_S)

    following.stop.request("SIGTERM")
    following.wait()

    assert isinstance(following.error, TrainingInterrupted)
    assert f"TrainJob {name} deleted" in str(following.error)
    # Deleted in the foreground: the API server marks it and keeps it until the garbage collector has
    # removed what it owns (its JobSet and pods, on a cluster with the Trainer), then removes it.
    left = api.get_namespaced_custom_object(
        trainjob.GROUP, trainjob.VERSION, namespace, trainjob.PLURAL, name
    )
    assert left["metadata"]["deletionTimestamp"]
    assert left["metadata"]["finalizers"] == ["foregroundDeletion"]


def test_a_trainjob_deleted_under_the_step_fails_it(
    api: client.CustomObjectsApi, control_plane: ControlPlane, namespace: str
) -> None:
    name, _ = created(api, namespace)
    following = Following(api, namespace, name)
    assert following.polled.wait(DEADLINE_S)

    control_plane.kubectl("delete", "trainjob", name, "-n", namespace, "--wait=false")

    following.wait()
    assert isinstance(following.error, ComponentError)
    assert following.error.reason == "TrainJobDeleted"
