"""A version's Deployment when ``spec.serving.engine`` is vllm: the same pod, serving the vLLM Bento.

It is the transformers engine's Deployment (:func:`kubetune.kube.children.build_version_deployment`:
init container, volumes, hardening, labels) with these differences:

* both containers run the vLLM serving image (``ChildImages.vllm_serving``: kubetune's runtime plus
  vLLM and the CUDA torch it needs), and the init container builds the Bento with ``--engine vllm``,
  so ``bentoml serve`` runs :mod:`kubetune_components.serving.vllm_service`;
* the server's environment holds ``spec.serving.vllm`` as KUBETUNE_VLLM_OPTIONS (dtype, maxModelLen,
  gpuMemoryUtilization, maxLoras; put there by ``plan.versions.serving_env``); the service turns it,
  with what the Bento's model is, into vLLM's arguments: ``--model``, ``--dtype``,
  ``--max-model-len``, ``--gpu-memory-utilization`` and, for a LoRA version, ``--enable-lora
  --max-loras --max-lora-rank --lora-modules <version>=<adapter>`` on the base the Bento bundles
  (:func:`kubetune_components.serving.vllm_engine.engine_cli_args`);
* ``/dev/shm`` is a memory-backed emptyDir (vLLM's workers share tensors through it; a container's
  default 64 MiB is too small);
* vLLM writes its compile and CUDA-graph caches under VLLM_CACHE_ROOT on the ``tmp`` emptyDir (the
  root filesystem is read-only), and sends no usage statistics;
* the startup probe allows :data:`STARTUP_SECONDS` before liveness applies: the engine loads the
  weights, profiles memory and captures CUDA graphs before /readyz answers.

The target gpu gives the server one ``nvidia.com/gpu`` (``children.container_resources``).
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune.plan.versions import VersionServing

ENGINE_ANNOTATION = "kubetune.dev/engine"
SERVE_CONTAINER = "serve"
FETCH_CONTAINER = "fetch-model"
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
SHM_SIZE = "2Gi"
VLLM_CACHE_ROOT = "/tmp/vllm"  # on the pod's tmp emptyDir
STARTUP_PERIOD_S = 10
STARTUP_SECONDS = 1800
"""Longest a vLLM server may take to start (load, memory profiling, CUDA graph capture)."""


def _container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(container for container in containers if container["name"] == name)


def vllm_deployment(deployment: dict[str, Any], version: VersionServing, image: str) -> dict[str, Any]:
    """``deployment`` (the transformers engine's, for ``version``) turned into the vLLM one."""
    result = copy.deepcopy(deployment)
    result["metadata"].setdefault("annotations", {})[ENGINE_ANNOTATION] = "vllm"
    pod = result["spec"]["template"]["spec"]
    fetch = _container(pod["initContainers"], FETCH_CONTAINER)
    fetch["image"] = image
    fetch["args"] = [*fetch["args"], "--engine", "vllm"]
    serve = _container(pod["containers"], SERVE_CONTAINER)
    serve["image"] = image
    serve["env"] = [
        *serve["env"],
        {"name": "VLLM_CACHE_ROOT", "value": VLLM_CACHE_ROOT},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]
    serve["volumeMounts"] = [*serve["volumeMounts"], {"name": SHM_VOLUME, "mountPath": SHM_PATH}]
    pod["volumes"] = [
        *pod["volumes"],
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
    ]
    serve["startupProbe"] = {
        **serve["startupProbe"],
        "periodSeconds": STARTUP_PERIOD_S,
        "failureThreshold": STARTUP_SECONDS // STARTUP_PERIOD_S,
    }
    return result
