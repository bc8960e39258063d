"""The LoRA versions of a ModelDeployment that share a base model, served on a cluster by one Deployment.

As in ``kubetune up`` (:mod:`kubetune.local.adapter_server`), the versions that
:func:`~kubetune.plan.versions.shared_adapter_groups` groups by base model are served by one model
server, ``kubetune_components.serving.shared_service``, holding the base once and each version as a
named adapter. Per group ``g`` (``adapters-<hash of the base model URI>``) of ModelDeployment ``d``:

* ConfigMap ``d-g`` with ``adapters.json``: version -> the adapter's directory in the pod. Every pod
  mounts it as a directory (``KUBETUNE_ADAPTERS_FILE``); the server watches the file and loads a
  version that joins, or whose adapter changes, and unloads one that leaves, without a restart
  (:mod:`kubetune_components.serving.adapters_file`). The annotation
  :data:`ADAPTERS_SINCE_ANNOTATION` records since when each version's adapter has been in it.
* Deployment ``d-g``: ``bentoml serve`` of the shared service on port 3000. The adapters and a
  ``pvc://`` base are read from their claims, mounted read-only at ``/mnt/pvc/<claim>``; a hub base is
  downloaded at start into an emptyDir (``HF_TOKEN`` from the first version that names a token
  Secret). Only a version whose adapter is on a claim no pod mounts yet changes the pod template: a
  rolling update (maxUnavailable 0) in which the old pods serve until the new ones are ready.
* Service ``d-g`` (port 3000); the gateway sends version ``v`` to ``http://d-g.<ns>.svc:3000/adapters/v``,
  as locally.
* With ``spec.serving.autoscaling`` the group's HorizontalPodAutoscaler, or with minReplicas 0 its KEDA
  ScaledObject, whose query adds up the open requests of every version in the group.

The pods carry the deployment's serving labels (``kubetune.dev/deployment``, component ``serving``), so
the NetworkPolicy of the version pods covers them, plus :data:`GROUP_LABEL`, and no version label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubetune.gateway.metrics import OPEN_REQUESTS_METRIC
from kubetune.kube.children import (
    BENTOML_HOME,
    COMPONENT_LABEL,
    DEPLOYMENT_LABEL,
    DOWNLOAD_CACHE,
    SERVING_COMPONENT,
    SERVING_PORT,
    TMP_DIR,
    ChildImages,
    _claim_of,
    _common_labels,
    _container_security,
    _deployment,
    _dns_label,
    _env,
    _http_probe,
    _metadata,
    _service,
    build_version_autoscaler,
    build_version_scaled_object,
    container_resources,
)
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.serving import ADAPTERS_FILE_ENV, ADAPTERS_PATH, MODEL_DIR_ENV, VERSION_ENV
from kubetune_contract.workspace import PVC_MOUNT_ROOT, PVC_ROOT_ENV

SERVICE = "kubetune_components.serving.shared_service:SharedAdapterService"
GROUP_LABEL = "kubetune.dev/adapter-group"
BASE_MODEL_ANNOTATION = "kubetune.dev/base-model-uri"
ADAPTERS_SINCE_ANNOTATION = "kubetune.dev/adapters-since"
"""On the group's ConfigMap: ``{version: {"dir": adapter directory, "since": when it was written}}``."""
ADAPTERS_KEY = "adapters.json"
ADAPTERS_DIR = "/etc/kubetune/adapters"
ADAPTER_LOAD_WAIT_S = 120.0
"""How long after a version's adapter entered the ConfigMap its running pods are taken to hold it: the
kubelet refreshes a mounted ConfigMap within about a minute, the server reads it every 2 s and loads a
LoRA adapter in seconds. Pods started after that moment loaded it before they became ready."""


def group_id(base_model_uri: str) -> str:
    """``adapters-<hash of the base model URI>``: the same group name locally and on a cluster."""
    return "adapters-" + hashlib.sha256(base_model_uri.encode()).hexdigest()[:10]


def group_child_name(deployment: str, base_model_uri: str) -> str:
    """Name of a group's ConfigMap, Deployment, Service and autoscaler."""
    return _dns_label(f"{deployment}-{group_id(base_model_uri)}")


def group_url(ref: DeploymentRef, base_model_uri: str) -> str:
    return f"http://{group_child_name(ref.name, base_model_uri)}.{ref.namespace}.svc:{SERVING_PORT}"


def group_version_url(ref: DeploymentRef, base_model_uri: str, version: str) -> str:
    """Where the gateway sends a grouped version's requests (its upstream URL, + ``/v1/...``)."""
    return f"{group_url(ref, base_model_uri)}{ADAPTERS_PATH}/{version}"


def shares_on_cluster(version: VersionServing) -> bool:
    """Whether a version can join a group on a cluster: a LoRA adapter on a claim (pods mount it) with a
    known base on a claim or a hub (not a path of the operator's machine)."""
    base = version.base_model_uri
    if not version.lora_adapter or base is None or not version.model_uri.startswith("pvc://"):
        return False
    scheme, separator, _ = base.partition("://")
    return bool(separator) and scheme != "file"


def adapter_dir(uri: str) -> str:
    """Where a ``pvc://<claim>/<path>`` adapter is in the pod."""
    return f"{PVC_MOUNT_ROOT}/{uri[len('pvc://') :]}"


def group_selector(deployment: str, base_model_uri: str) -> dict[str, str]:
    return {
        DEPLOYMENT_LABEL: deployment,
        COMPONENT_LABEL: SERVING_COMPONENT,
        GROUP_LABEL: group_id(base_model_uri),
    }


def group_labels(deployment: str, base_model_uri: str) -> dict[str, str]:
    labels = _common_labels(deployment, SERVING_COMPONENT, group_child_name(deployment, base_model_uri))
    labels[GROUP_LABEL] = group_id(base_model_uri)
    return labels


def adapters_since(
    members: Sequence[VersionServing], stored: Mapping[str, Any] | None, now: float
) -> dict[str, dict[str, str]]:
    """Each member's adapter directory and since when the ConfigMap has held it: kept from the stored
    ConfigMap for a version whose directory is unchanged, ``now`` for one that joined or changed."""
    annotations = ((stored or {}).get("metadata") or {}).get("annotations") or {}
    try:
        previous = json.loads(annotations.get(ADAPTERS_SINCE_ANNOTATION) or "{}")
    except ValueError:
        previous = {}
    if not isinstance(previous, dict):
        previous = {}
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    since: dict[str, dict[str, str]] = {}
    for member in members:
        directory = adapter_dir(member.model_uri)
        before = previous.get(member.name)
        kept = before.get("since") if isinstance(before, dict) and before.get("dir") == directory else None
        since[member.name] = {"dir": directory, "since": str(kept) if kept else stamp}
    return since


def build_group_config_map(
    ref: DeploymentRef, base_model_uri: str, since: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    name = group_child_name(ref.name, base_model_uri)
    metadata = _metadata(ref, name, group_labels(ref.name, base_model_uri))
    metadata["annotations"] = {
        BASE_MODEL_ANNOTATION: base_model_uri,
        ADAPTERS_SINCE_ANNOTATION: json.dumps(since, sort_keys=True, separators=(",", ":")),
    }
    adapters = {version: entry["dir"] for version, entry in since.items()}
    text = json.dumps(adapters, indent=2, sort_keys=True) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {ADAPTERS_KEY: text}}


def build_group_deployment(
    ref: DeploymentRef, base_model_uri: str, members: Sequence[VersionServing], images: ChildImages
) -> dict[str, Any]:
    """The Deployment of the group's shared adapter servers (see the module docstring)."""
    first = members[0]
    name = group_child_name(ref.name, base_model_uri)
    claims: list[str] = []
    for member in members:
        claim = _claim_of(member, "model URI", member.model_uri)
        if claim is not None and claim not in claims:
            claims.append(claim)
    base_claim = _claim_of(first, "base model URI", base_model_uri)
    if base_claim is not None and base_claim not in claims:
        claims.append(base_claim)
    claims.sort()  # the pod template changes only when the set of claims does

    volumes: list[dict[str, Any]] = [
        {"name": "bentoml-home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "download-cache", "emptyDir": {}},
        {
            "name": "adapters",
            "configMap": {"name": name, "items": [{"key": ADAPTERS_KEY, "path": ADAPTERS_KEY}]},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "bentoml-home", "mountPath": BENTOML_HOME},
        {"name": "tmp", "mountPath": TMP_DIR},
        {"name": "download-cache", "mountPath": DOWNLOAD_CACHE},
        # a directory, not a subPath: the kubelet replaces the file in place and the server follows it
        {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
    ]
    for index, claim in enumerate(claims):
        volume = f"model-store-{index}"
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})

    values = {key: value for key, value in first.env.items() if key not in (VERSION_ENV, MODEL_DIR_ENV)}
    values.update(
        {
            "HOME": TMP_DIR,
            "BENTOML_HOME": BENTOML_HOME,
            "BENTOML_DO_NOT_TRACK": "true",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HF_HOME": DOWNLOAD_CACHE,
            PVC_ROOT_ENV: PVC_MOUNT_ROOT,
            ADAPTERS_FILE_ENV: f"{ADAPTERS_DIR}/{ADAPTERS_KEY}",
        }
    )
    if base_claim is not None:
        values["HF_HUB_OFFLINE"] = "1"
    env = _env(values)
    token = next((member.token_secret for member in members if member.token_secret is not None), None)
    if token is not None:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}
        )
    serving = first.serving
    serve = {
        "name": "serve",
        "image": images.serving,
        "imagePullPolicy": images.pull_policy,
        "command": ["bentoml", "serve", SERVICE, "--host", "0.0.0.0", "--port", str(SERVING_PORT)],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": container_resources(serving),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        "startupProbe": _http_probe("/livez", period=10, failures=90),
        "livenessProbe": _http_probe("/livez", period=10, failures=3),
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
    }
    labels = group_labels(ref.name, base_model_uri)
    metadata = _metadata(ref, name, labels)
    metadata["annotations"] = {BASE_MODEL_ANNOTATION: base_model_uri}
    return _deployment(
        metadata,
        group_selector(ref.name, base_model_uri),
        labels,
        SERVING_PORT,
        {"containers": [serve], "volumes": volumes},
        replicas=serving.replicas if serving.autoscaling is None else None,
    )


def open_requests_query(deployment: str, versions: Sequence[str]) -> str:
    """The PromQL of a group's demand: the open requests of all its versions at the gateways."""
    selector = f'deployment="{deployment}",version=~"{"|".join(sorted(versions))}"'
    return f"sum({OPEN_REQUESTS_METRIC}{{{selector}}}) or vector(0)"


def build_group_autoscaler(
    ref: DeploymentRef,
    base_model_uri: str,
    members: Sequence[VersionServing],
    prometheus_url: str | None,
) -> dict[str, Any] | None:
    """The group's KEDA ScaledObject (minReplicas 0) or HorizontalPodAutoscaler, as a version's, on the
    group's Deployment; None without autoscaling."""
    serving = members[0].serving
    name = group_child_name(ref.name, base_model_uri)
    scaler = build_version_scaled_object(ref, members[0].name, serving, prometheus_url)
    if scaler is not None:
        trigger = scaler["spec"]["triggers"][0]["metadata"]
        trigger["query"] = open_requests_query(ref.name, [member.name for member in members])
    else:
        scaler = build_version_autoscaler(ref, members[0].name, serving)
        if scaler is None:
            return None
    scaler["metadata"] = _metadata(ref, name, group_labels(ref.name, base_model_uri))
    scaler["spec"]["scaleTargetRef"]["name"] = name
    return scaler


def build_group_children(
    ref: DeploymentRef,
    base_model_uri: str,
    members: Sequence[VersionServing],
    images: ChildImages,
    since: Mapping[str, Mapping[str, str]],
    prometheus_url: str | None = None,
) -> list[dict[str, Any]]:
    """The group's ConfigMap (first: the pods mount it), Deployment, Service and autoscaler, if any.
    ValueError (naming the version) when a member's URI cannot be mounted."""
    children = [
        build_group_config_map(ref, base_model_uri, since),
        build_group_deployment(ref, base_model_uri, members, images),
        _service(
            ref,
            group_child_name(ref.name, base_model_uri),
            group_labels(ref.name, base_model_uri),
            group_selector(ref.name, base_model_uri),
            SERVING_PORT,
        ),
    ]
    scaler = build_group_autoscaler(ref, base_model_uri, members, prometheus_url)
    if scaler is not None:
        children.append(scaler)
    return children
