"""The pods Kubeflow Pipelines would run for a compiled kubetune pipeline, as pod specs for the sandbox.

KFP's driver turns each task of a compiled pipeline (the IR YAML ``kubetune compile`` writes) into a pod:
the executor's container command with its placeholders resolved, the ``pvcMount`` and ``secretAsEnv``
of the kubernetes platform spec, and no securityContext (so the runtime image's ``USER`` applies).
:func:`task_pods` does that for every task, in an order that respects ``dependentTasks``.

KFP's default pods have a writable root filesystem, but a hardened cluster may not: here the root stays
read-only and only the platform spec's ``pvcMount`` and ``emptyDirMounts`` are writable. The pipeline
mounts an emptyDir at ``/tmp`` on every task (kubetune.pipelines.finetune.on_cluster): the launcher
writes each output parameter's file and the executor output under :data:`KFP_OUTPUTS_DIR` there, and
the steps cannot start without a writable temp dir (torch's import asks ``tempfile`` for one; the
image's ``HF_HOME`` is ``/tmp/huggingface``). A task without it fails here as it would on such a cluster.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KFP_OUTPUTS_DIR = "/tmp/kfp/outputs"
EXECUTOR_OUTPUT_FILE = f"{KFP_OUTPUTS_DIR}/executor_output.json"
_INPUT = re.compile(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}")
_OUTPUT_FILE = re.compile(r"\{\{\$\.outputs\.parameters\['([^']+)'\]\.output_file\}\}")
_EXECUTOR_INPUT = "{{$}}"


@dataclass(frozen=True)
class TaskPod:
    task: str  # the task's display name (curate, evaluate-baseline, ...)
    spec: dict[str, Any]  # the pod spec
    outputs: dict[str, str]  # output parameter -> its file in the pod


def _task_inputs(task: Mapping[str, Any], pipeline_inputs: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, source in ((task.get("inputs") or {}).get("parameters") or {}).items():
        if "componentInputParameter" in source:
            values[name] = pipeline_inputs[source["componentInputParameter"]]
        elif "runtimeValue" in source:
            values[name] = str(source["runtimeValue"]["constant"])
        else:
            raise ValueError(
                f"task input {name}: {sorted(source)} is not stood in (only constants and inputs)"
            )
    return values


def _executor_input(
    component: Mapping[str, Any], inputs: Mapping[str, str], outputs: Mapping[str, str]
) -> str:
    artifacts = {
        name: {
            "artifacts": [
                {
                    "name": name,
                    "type": definition["artifactType"],
                    "uri": f"{KFP_OUTPUTS_DIR}/artifacts/{name}",
                    "metadata": {},
                }
            ]
        }
        for name, definition in ((component.get("outputDefinitions") or {}).get("artifacts") or {}).items()
    }
    return json.dumps(
        {
            "inputs": {"parameterValues": dict(inputs)},
            "outputs": {
                "parameters": {name: {"outputFile": path} for name, path in outputs.items()},
                "artifacts": artifacts,
                "outputFile": EXECUTOR_OUTPUT_FILE,
            },
        }
    )


def _resolve(argument: str, inputs: Mapping[str, str], outputs: dict[str, str], executor_input: str) -> str:
    if argument == _EXECUTOR_INPUT:
        return executor_input
    argument = _INPUT.sub(lambda match: inputs[match.group(1)], argument)

    def output_file(match: re.Match[str]) -> str:
        outputs.setdefault(match.group(1), f"{KFP_OUTPUTS_DIR}/{match.group(1)}/data")
        return outputs[match.group(1)]

    return _OUTPUT_FILE.sub(output_file, argument)


def _platform_pod_parts(
    executor: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts, env) of a task's kubernetes platform config."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for empty_dir in executor.get("emptyDirMounts") or []:
        volume = {key: value for key, value in empty_dir.items() if key in ("medium", "sizeLimit")}
        volumes.append({"name": empty_dir["volumeName"], "emptyDir": volume})
        mounts.append({"name": empty_dir["volumeName"], "mountPath": empty_dir["mountPath"]})
    for index, pvc in enumerate(executor.get("pvcMount") or []):
        claim = pvc.get("constant") or pvc["pvcNameParameter"]["runtimeValue"]["constant"]
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": pvc["mountPath"]})
    env = [
        {
            "name": mapping["envVar"],
            "valueFrom": {
                "secretKeyRef": {
                    "name": secret.get("secretName")
                    or secret["secretNameParameter"]["runtimeValue"]["constant"],
                    "key": mapping["secretKey"],
                    "optional": bool(secret.get("optional")),
                }
            },
        }
        for secret in executor.get("secretAsEnv") or []
        for mapping in secret["keyToEnv"]
    ]
    return volumes, mounts, env


def task_pods(documents: list[Mapping[str, Any]]) -> list[TaskPod]:
    """Every task's pod of a compiled pipeline (its IR document and platform document), dependencies first.

    A ``dsl.ParallelFor`` task (a component with a ``dag``) becomes its inner tasks' pods once per item
    of its list, one item after another, as the local runner runs it.
    """
    spec = documents[0]
    platform = (
        documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(documents) > 1 else {}
    )
    pipeline_inputs = {
        name: str(definition["defaultValue"])
        for name, definition in spec["root"]["inputDefinitions"]["parameters"].items()
    }
    return _dag_pods(spec, platform, spec["root"]["dag"]["tasks"], pipeline_inputs)


def _dag_pods(
    spec: Mapping[str, Any],
    platform: Mapping[str, Any],
    tasks: Mapping[str, Mapping[str, Any]],
    pipeline_inputs: Mapping[str, str],
) -> list[TaskPod]:
    ordered: list[str] = []
    while len(ordered) < len(tasks):
        ready = [
            name
            for name, task in tasks.items()
            if name not in ordered and set(task.get("dependentTasks") or []) <= set(ordered)
        ]
        if not ready:
            raise ValueError("the pipeline's tasks depend on each other in a cycle")
        ordered.extend(sorted(ready))
    pods: list[TaskPod] = []
    for name in ordered:
        task = tasks[name]
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            iterator = task["parameterIterator"]
            loop_inputs = _task_inputs(task, pipeline_inputs)
            # KFP passes a list parameter's default as its JSON text (and str() of a Python list of ints
            # reads the same).
            for item in json.loads(loop_inputs[iterator["items"]["inputParameter"]]):
                item_inputs = {**loop_inputs, iterator["itemInput"]: str(item)}
                pods.extend(_dag_pods(spec, platform, component["dag"]["tasks"], item_inputs))
            continue
        executor_label = component["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor_label]["container"]
        inputs = _task_inputs(task, pipeline_inputs)
        outputs: dict[str, str] = {
            param: f"{KFP_OUTPUTS_DIR}/{param}/data"
            for param in ((component.get("outputDefinitions") or {}).get("parameters") or {})
        }
        executor_input = _executor_input(component, inputs, outputs)
        argv = [
            _resolve(argument, inputs, outputs, executor_input)
            for argument in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        volumes, mounts, env = _platform_pod_parts(platform.get(executor_label) or {})
        # The launcher creates each output's directory before it runs the command.
        directories = sorted({path.rsplit("/", 1)[0] for path in outputs.values()})
        pod_spec = {
            "initContainers": [
                {
                    "name": "kfp-launcher",
                    "image": container["image"],
                    "command": ["mkdir", "-p", *directories, f"{KFP_OUTPUTS_DIR}/artifacts"],
                    "volumeMounts": mounts,
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": container["image"],
                    "command": argv,
                    "env": env,
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        }
        pods.append(TaskPod(task=task["taskInfo"]["name"], spec=pod_spec, outputs=outputs))
    return pods
