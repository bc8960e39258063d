"""On a cluster, distributed training runs as a Kubeflow Trainer TrainJob that the finetune step follows.

The pipeline's finetune step, given ``--launcher trainjob`` (its container command on Kubeflow) and a job
with ``training.distributed``, does not train in its own pod: it creates a TrainJob
(trainer.kubeflow.org/v1alpha1) on the ``torch-distributed`` ClusterTrainingRuntime that runs the same
finetune command line on the same image on ``workers`` nodes of ``processesPerWorker`` processes each
(the Trainer sets torchrun's PET_* variables; distributed.py starts torchrun from them), with the
job's PersistentVolumeClaims mounted where the step has them and the hub token as HF_TOKEN. Rank 0
writes progress.json, checkpoints and trained/ into the shared workspace, which the operator reads as
for any step. The step then follows the TrainJob to its end:

- condition Complete True: the step reports what rank 0 saved in trained/;
- condition Failed True: the step fails with reason TrainJobFailed and the TrainJob's own reason and
  message;
- the step is stopped (SIGTERM: the run was cancelled or the FineTuneJob deleted): it deletes the
  TrainJob (its pods with it) and ends as interrupted.

The TrainJob's name is derived from the job's name and its workspace (:func:`trainjob_name`), so a
retried step finds and follows the TrainJob it created instead of starting a second one. With
``spec.scheduling.queueName`` the TrainJob carries Kueue's queue-name label, which makes Kueue admit
it from that LocalQueue (and ``priorityClassName`` Kueue's priority-class label).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubetune_components.common.errors import ComponentError
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.finetune.signals import StopRequest, TrainingInterrupted
from kubetune_contract.finetune import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL, trainjob_name
from kubetune_contract.workspace import PVC_MOUNT_ROOT

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
TORCH_RUNTIME = "torch-distributed"
"""The ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch (torchrun)."""
TRAINER_NODE = "node"
"""The torch runtime's replicated job and container that run the trainer (targets of the overrides)."""
STEPS_MODULE = "kubetune_components.finetune.steps"
__all__ = ["delete", "follow", "render_trainjob", "submit", "trainjob_name"]
TMP_VOLUME = "tmp"
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class CustomObjects(Protocol):
    """The calls of kubernetes.client.CustomObjectsApi this module makes."""

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Any
    ) -> Any: ...

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> Any: ...

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kwargs: Any
    ) -> Any: ...


def _claims(uris: list[str]) -> list[str]:
    return sorted({uri.removeprefix("pvc://").split("/", 1)[0] for uri in uris if uri.startswith("pvc://")})


def render_trainjob(
    config: Mapping[str, Any], workspace: str, *, image: str, namespace: str
) -> dict[str, Any]:
    """The TrainJob that runs the finetune step of `config` (a resolved FineTuneJob) in `workspace`."""
    job = parse_finetune_job(dict(config))
    spec = job.spec
    distributed = spec.training.distributed
    if distributed is None:
        raise ComponentError(
            "training.distributed is not set: the step trains in its own pod", "InvalidConfig"
        )
    uris = [spec.base_model.uri, spec.dataset.uri, workspace]
    if spec.dataset.validation_uri:
        uris.append(spec.dataset.validation_uri)
    if spec.output.uri:
        uris.append(spec.output.uri)
    claims = _claims(uris)
    volumes: list[dict[str, Any]] = [{"name": TMP_VOLUME, "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": TMP_VOLUME, "mountPath": "/tmp"}]
    for claim in claims:
        volumes.append({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{claim}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    env: list[dict[str, Any]] = []
    token = spec.base_model.token_secret_ref
    if token is not None:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}
        )
    trainer: dict[str, Any] = {
        "image": image,
        "command": [
            "python",
            "-m",
            STEPS_MODULE,
            "finetune",
            "--config-json",
            json.dumps(dict(config), sort_keys=True),
            "--workspace",
            workspace,
        ],
        "numNodes": distributed.workers,
        "numProcPerNode": distributed.processes_per_worker,
    }
    if env:
        trainer["env"] = env
    if spec.target == "gpu":
        gpus = str(distributed.processes_per_worker)
        trainer["resourcesPerNode"] = {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}
    meta = job.metadata
    labels = {
        "kubetune.dev/kind": "finetunejob",
        "kubetune.dev/name": meta.name,
        "kubetune.dev/namespace": meta.namespace,
    }
    if meta.generation is not None:
        labels["kubetune.dev/generation"] = str(meta.generation)
    scheduling = spec.scheduling
    if scheduling is not None and scheduling.queue_name is not None:
        labels[KUEUE_QUEUE_LABEL] = scheduling.queue_name
    if scheduling is not None and scheduling.priority_class_name is not None:
        labels[KUEUE_PRIORITY_LABEL] = scheduling.priority_class_name
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": trainjob_name(meta.name, workspace), "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": TORCH_RUNTIME, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": trainer,
            "labels": dict(labels),
            "podTemplateOverrides": [
                {
                    "targetJobs": [{"name": TRAINER_NODE}],
                    "spec": {
                        "volumes": volumes,
                        "containers": [{"name": TRAINER_NODE, "volumeMounts": mounts}],
                    },
                }
            ],
        },
    }


@dataclass(frozen=True)
class TrainJobOutcome:
    name: str
    reason: str
    message: str


def condition(trainjob: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for entry in (trainjob.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind and entry.get("status") == "True":
            return entry  # type: ignore[no-any-return]
    return None


def _is_conflict(error: BaseException) -> bool:
    return getattr(error, "status", None) == 409


def _is_not_found(error: BaseException) -> bool:
    return getattr(error, "status", None) == 404


def submit(api: CustomObjects, trainjob: Mapping[str, Any]) -> str:
    """Create the TrainJob, or take the one a previous attempt of this step created; its name."""
    namespace = trainjob["metadata"]["namespace"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(trainjob))
    except Exception as error:
        if not _is_conflict(error):
            raise
    return str(trainjob["metadata"]["name"])


def follow(
    api: CustomObjects,
    namespace: str,
    name: str,
    *,
    stop: StopRequest,
    poll_s: float = 5.0,
    on_poll: Callable[[], None] = lambda: None,
    sleep: Callable[[float], None] = time.sleep,
) -> TrainJobOutcome:
    """Wait for TrainJob `name` to end; raise for Failed (ComponentError) or a stop (TrainingInterrupted).

    On a stop the TrainJob is deleted (foreground: its JobSet and pods go first).
    """
    while True:
        if stop.requested:
            delete(api, namespace, name)
            raise TrainingInterrupted(0, None, f"{stop.reason}; TrainJob {name} deleted")
        try:
            trainjob = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as error:
            if _is_not_found(error):
                raise ComponentError(
                    f"TrainJob {namespace}/{name} was deleted before it finished", "TrainJobDeleted"
                ) from None
            raise
        if (done := condition(trainjob, "Complete")) is not None:
            return TrainJobOutcome(name, str(done.get("reason", "")), str(done.get("message", "")))
        if (failed := condition(trainjob, "Failed")) is not None:
            reason = failed.get("reason") or "Failed"
            raise ComponentError(
                f"TrainJob {namespace}/{name} failed ({reason}): {failed.get('message') or 'no message'}",
                "TrainJobFailed",
            )
        on_poll()
        sleep(poll_s)


def delete(api: CustomObjects, namespace: str, name: str) -> None:
    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
        )
    except Exception as error:
        if not _is_not_found(error):
            raise


def own_namespace() -> str:
    """The namespace of the pod this step runs in (its service account's)."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ComponentError(
            f"--launcher trainjob runs in a pod; cannot read {SERVICE_ACCOUNT_NAMESPACE} ({error})",
            "InvalidConfig",
        ) from None


def in_cluster_api() -> CustomObjects:
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi()  # type: ignore[no-any-return]
