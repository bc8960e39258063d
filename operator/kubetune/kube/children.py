"""The Kubernetes objects a ModelDeployment owns, as plain dicts (pure builders, dask-kubernetes style).

Per version ``v`` of ModelDeployment ``d``:

* Deployment ``d-v``: the init container ``fetch-model`` runs ``python -m
  kubetune_components.serving.bento build`` on the version's model URI: a ``pvc://claim/path`` is
  mounted read-only at ``/mnt/pvc/<claim>`` (as in the pipeline steps), and so is the claim of an
  adapter's base model when the operator knows it (``VersionServing.base_model_uri``); an ``hf://``
  model is downloaded (``HF_TOKEN`` from the version's token Secret) into ``HF_HOME``, an emptyDir mounted
  whatever holds the model, since an adapter on a claim may name a hub base model and the root
  filesystem is read-only (tests/sandbox runs these pods); the build imports the model (with an
  adapter's base model) into BentoML's store in a shared emptyDir (``BENTOML_HOME``) and builds the
  Bento ``<deployment>-<version>``. The container ``serve`` runs ``bentoml serve`` of that Bento on
  port 3000, offline, configured by the contract's environment variables; it loads the Bento's own
  copy of the model, so KUBETUNE_MODEL_DIR is not set and the artifact store is not mounted there.
* Service ``d-v`` (ClusterIP, port 3000).
* HorizontalPodAutoscaler ``d-v`` when ``spec.serving.autoscaling`` is set. It scales on in-flight
  requests per pod (``targetConcurrency``): the Pods metric :data:`IN_FLIGHT_METRIC`, BentoML's own
  gauge of requests in progress. Kubernetes has no such metric by itself: it needs a custom metrics
  adapter (e.g. prometheus-adapter with a rule exposing that series per pod). Without one the HPA
  reports ``FailedGetPodsMetric`` and keeps the current replica count, never below minReplicas.
  CPU utilisation was not used because it does not measure what ``targetConcurrency`` promises.
* KEDA ScaledObject ``d-v`` instead of the HPA when ``spec.serving.autoscaling.minReplicas`` is 0
  (:func:`build_version_scaled_object`): KEDA needs to be installed, and reads the gateway's
  :data:`~kubetune.gateway.metrics.OPEN_REQUESTS_METRIC` from the operator's Prometheus.

The gateway of ``d``:

* ConfigMap ``d-gateway`` with the key ``gateway.json`` (the GatewayConfig JSON, serialised with
  sorted keys so the same config is the same bytes);
* Deployment ``d`` running ``kubetune gateway`` on port 8080 with the ConfigMap mounted as a
  directory (not a subPath, so the kubelet updates the file in place and the gateway reloads it).
  The config's checksum is an annotation of the Deployment itself, not of its pod template, so a
  weight change updates the ConfigMap and never restarts the gateway;
* Service ``d`` (ClusterIP, port 8080): the OpenAI-compatible endpoint ``http://d.<ns>.svc:8080/v1``.

Access on a cluster: the NetworkPolicy ``d-versions`` (with the gateway's objects) lets into every
version pod of ``d`` only the deployment's gateway pods and, on the serving port, pods of namespaces
labelled ``kubetune.dev/metrics-scraper: "true"`` (Prometheus), so the key check cannot be skipped by
calling ``d-<version>`` directly. The
gateway mounts the Secret ``d-gateway-access`` (keys ``keys.json``, the key hashes, and
``signing.key``) read-only at ``/etc/kubetune/access``, and watches it through the API as its own
ServiceAccount ``d-gateway`` (so a revoked key is refused within seconds, not at the kubelet's next
sync); ``kubetune keys`` creates that Secret and the Role that lets only ``d-gateway`` read it
(:mod:`kubetune.kube.gateway_access`). It is optional, and without it a gateway whose
``spec.access.auth`` is unset or ``required`` refuses every request (401). An unset ``auth`` is
``required`` here, and the audit log goes to the gateway's stdout. Redis's password, when
``spec.access.store.passwordSecretRef`` names one, reaches the gateway as ``KUBETUNE_REDIS_PASSWORD``
from that Secret.

Every object carries the ModelDeployment as its controller ownerReference (garbage-collected with
it), the ``app.kubernetes.io/*`` labels and ``kubetune.dev/deployment`` (``kubetune.dev/version`` on
a version's objects), by which the operator finds the children it no longer wants.

Names longer than 63 characters, or that are not DNS-1035 labels (Services must be), are shortened
with a hash of the full name, so two different names never collide after shortening.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.config import OPERATOR_IMAGE, PROMETHEUS_URL_ENV, RUNTIME_IMAGE, VLLM_SERVING_IMAGE
from kubetune.gateway.access.keys import KEY_FILE_NAME, SIGNING_KEY_FILE_NAME
from kubetune.gateway.config import REDIS_PASSWORD_ENV
from kubetune.gateway.metrics import OPEN_REQUESTS_METRIC
from kubetune.kube.vllm_serving import vllm_deployment
from kubetune.plan.versions import DeploymentRef, VersionServing
from kubetune_contract.deployment import DNS_LABEL_PATTERN, GPU_RESOURCE, Serving
from kubetune_contract.serving import MODEL_DIR_ENV
from kubetune_contract.workspace import PVC_MOUNT_ROOT, PVC_ROOT_ENV

SERVING_PORT = 3000
GATEWAY_PORT = 8080
GATEWAY_CONFIG_KEY = "gateway.json"
GATEWAY_CONFIG_DIR = "/etc/kubetune"
GATEWAY_CONFIG_PATH = f"{GATEWAY_CONFIG_DIR}/{GATEWAY_CONFIG_KEY}"
BENTOML_HOME = "/var/lib/bentoml"
TMP_DIR = "/tmp"
IN_FLIGHT_METRIC = "bentoml_service_request_in_progress"
RUN_AS_USER = 1000
SCALED_OBJECT_POLLING_S = 5  # how often KEDA reads a version's open requests: a held request waits this long

DEPLOYMENT_LABEL = "kubetune.dev/deployment"
VERSION_LABEL = "kubetune.dev/version"
COMPONENT_LABEL = "app.kubernetes.io/component"
SERVING_COMPONENT = "serving"
GATEWAY_COMPONENT = "gateway"
CONFIG_CHECKSUM_ANNOTATION = "kubetune.dev/gateway-config-sha256"
MODEL_URI_ANNOTATION = "kubetune.dev/model-uri"
RETIRED_AT_ANNOTATION = "kubetune.dev/retired-at"  # when a removed version's Deployment was retired
DOWNLOAD_CACHE = "/var/cache/kubetune"
ACCESS_DIR = "/etc/kubetune/access"
ACCESS_KEYS_FILE = KEY_FILE_NAME
ACCESS_SIGNING_KEY_FILE = SIGNING_KEY_FILE_NAME
METRICS_SCRAPER_LABEL = "kubetune.dev/metrics-scraper"
MAX_BENTO_NAME = 63  # kubetune_components.serving.bento.MAX_NAME_LENGTH


_MAX_NAME = 63
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABEL = re.compile(DNS_LABEL_PATTERN)


@dataclass(frozen=True)
class ChildImages:
    """Container images of the children (operator settings, not spec)."""

    serving: str = RUNTIME_IMAGE
    """Runs the init container (fetch model, build Bento) and ``bentoml serve``: the runtime image."""
    gateway: str = OPERATOR_IMAGE
    """Runs ``kubetune gateway``: any image with the kubetune package (the operator's)."""
    vllm_serving: str = VLLM_SERVING_IMAGE
    """Serves the versions with engine vllm (:mod:`kubetune.kube.vllm_serving`): the runtime plus vLLM."""
    pull_policy: str = "IfNotPresent"


# ---- names, labels, ownership -------------------------------------------------------------------


def _dns_label(raw: str) -> str:
    """``raw`` if it is a DNS-1035 label, else a valid one ending in a hash of ``raw``."""
    if len(raw) <= _MAX_NAME and _DNS_1035_LABEL.match(raw):
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    clean = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if not clean[:1].isalpha():
        clean = f"k-{clean}"
    head = clean[: _MAX_NAME - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def version_child_name(deployment: str, version: str) -> str:
    """Name of a version's Deployment, Service and HorizontalPodAutoscaler."""
    return _dns_label(f"{deployment}-{version}")


def gateway_name(deployment: str) -> str:
    """Name of the gateway's Deployment and Service (the deployment's own name, when it is valid)."""
    return _dns_label(deployment)


def gateway_config_map_name(deployment: str) -> str:
    return _dns_label(f"{deployment}-gateway")


def version_url(ref: DeploymentRef, version: str) -> str:
    """The base URL of a version's Service (what the gateway sends the version's requests to)."""
    return f"http://{version_child_name(ref.name, version)}.{ref.namespace}.svc:{SERVING_PORT}"


def gateway_access_secret_name(deployment: str) -> str:
    """The Secret holding a deployment's key hashes and signing key, mounted by its gateway only."""
    return _dns_label(f"{deployment}-gateway-access")


def gateway_service_account_name(deployment: str) -> str:
    """The gateway pods' ServiceAccount: the identity the Role of its key Secret is bound to."""
    return _dns_label(f"{deployment}-gateway")


def gateway_endpoint(ref: DeploymentRef) -> str:
    """The OpenAI-compatible base URL of the deployment."""
    return f"http://{gateway_name(ref.name)}.{ref.namespace}.svc:{GATEWAY_PORT}/v1"


def child_selector(deployment: str) -> dict[str, str]:
    """The labels every child of a ModelDeployment carries (a label selector of all of them)."""
    return {DEPLOYMENT_LABEL: deployment}


def version_children_selector(deployment: str) -> dict[str, str]:
    """The labels every version child of a ModelDeployment carries (not the gateway's)."""
    return {DEPLOYMENT_LABEL: deployment, COMPONENT_LABEL: SERVING_COMPONENT}


def _common_labels(deployment: str, component: str, instance: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"kubetune-{component}",
        "app.kubernetes.io/instance": instance,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune",
        DEPLOYMENT_LABEL: deployment,
    }


def version_selector(deployment: str, version: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: deployment, VERSION_LABEL: version, COMPONENT_LABEL: SERVING_COMPONENT}


def version_labels(deployment: str, version: str) -> dict[str, str]:
    labels = _common_labels(deployment, SERVING_COMPONENT, version_child_name(deployment, version))
    labels[VERSION_LABEL] = version
    return labels


def gateway_selector(deployment: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: deployment, COMPONENT_LABEL: GATEWAY_COMPONENT}


def gateway_labels(deployment: str) -> dict[str, str]:
    return _common_labels(deployment, GATEWAY_COMPONENT, gateway_name(deployment))


def _metadata(ref: DeploymentRef, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels,
        "ownerReferences": [ref.owner_reference()],
    }


# ---- pod security ----------------------------------------------------------------------------------


def _pod_security() -> dict[str, Any]:
    """The restricted Pod Security Standard, with a fixed non-root user so emptyDirs are writable."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _env(values: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "value": value} for name, value in values.items()]


# ---- a version -------------------------------------------------------------------------------------


def _claim_of(version: VersionServing, what: str, uri: str) -> str | None:
    """The PersistentVolumeClaim of a pvc:// URI (checked), or None for any other URI."""
    if not uri.startswith("pvc://"):
        return None
    claim, _, sub_path = uri[len("pvc://") :].partition("/")
    if not _DNS_LABEL.match(claim) or ".." in sub_path.split("/"):
        raise ValueError(f"version {version.name}: {what} {uri!r} must be pvc://<claim>/<path> without '..'")
    return claim


def _model_claim(version: VersionServing) -> str | None:
    """The PersistentVolumeClaim holding the version's model (pvc://), or None for a download."""
    uri = version.model_uri
    claim = _claim_of(version, "model URI", uri)
    if claim is not None:
        return claim
    scheme, separator, _ = uri.partition("://")
    if not separator or scheme == "file":
        raise ValueError(
            f"version {version.name}: model URI {uri!r} is a local path, which a pod cannot read; on a "
            "cluster a version's model must be pvc://<claim>/<path> (an artifact store on a "
            "PersistentVolumeClaim), hf://<org>/<name>[@revision] or an object store URL"
        )
    return None


def container_resources(serving: Serving) -> dict[str, dict[str, str]]:
    """spec.serving.resources, with one GPU (limit; Kubernetes sets the request equal) on a gpu target
    whose resources name no GPU count."""
    resources = {key: dict(value) for key, value in serving.resources.to_wire().items() if value}
    named = GPU_RESOURCE in resources.get("limits", {}) or GPU_RESOURCE in resources.get("requests", {})
    if serving.target == "gpu" and not named:
        resources.setdefault("limits", {})[GPU_RESOURCE] = "1"
    return resources


def _check_bento(ref: DeploymentRef, version: VersionServing) -> None:
    # The init container names the Bento from the deployment and version (bento.bento_name).
    expected = f"{ref.name}-{version.name}".lower()
    if version.bento != expected:
        raise ValueError(f"version {version.name}: Bento tag {version.bento!r} is not {expected!r}")
    if len(version.bento) > MAX_BENTO_NAME:
        raise ValueError(
            f"version {version.name}: the Bento name {version.bento!r} is {len(version.bento)} characters "
            f"long; BentoML allows {MAX_BENTO_NAME}: shorten the ModelDeployment or version name"
        )


def build_version_deployment(
    ref: DeploymentRef, version: VersionServing, images: ChildImages
) -> dict[str, Any]:
    """The Deployment serving one version; a change of its pod template rolls the version's pods.

    The init container builds the version's Bento from the model (``bento build``), which imports
    the model, with an adapter's base model, into BentoML's model store in ``BENTOML_HOME``; the
    server then loads the Bento's model, so KUBETUNE_MODEL_DIR is not set and the artifact store is
    mounted in the init container only.
    """
    _check_bento(ref, version)
    serving = version.serving
    name = version_child_name(ref.name, version.name)
    # volume name by claim: the model's, then its base's when that is on another claim
    claims = {claim: "model-store" for claim in [_model_claim(version)] if claim is not None}
    if version.base_model_uri is not None:
        base_claim = _claim_of(version, "base model URI", version.base_model_uri)
        if base_claim is not None:
            claims.setdefault(base_claim, "base-model-store")

    volumes: list[dict[str, Any]] = [
        {"name": "bentoml-home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    shared_mounts: list[dict[str, Any]] = [
        {"name": "bentoml-home", "mountPath": BENTOML_HOME},
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    # The hub cache is mounted whatever holds the model: an adapter on a claim may name a hub base
    # model, which the build downloads into HF_HOME (the root filesystem is read-only).
    volumes.append({"name": "download-cache", "emptyDir": {}})
    fetch_mounts = [*shared_mounts, {"name": "download-cache", "mountPath": DOWNLOAD_CACHE}]
    # The build reads an adapter's base where its URI says (under the contract's PVC mount root); the
    # server loads the Bento's own copy of both, so only the init container mounts the claims.
    for claim, volume in claims.items():
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        fetch_mounts.append({"name": volume, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})

    pod_env = {
        "HOME": TMP_DIR,
        "BENTOML_HOME": BENTOML_HOME,
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    fetch_values = {**pod_env, PVC_ROOT_ENV: PVC_MOUNT_ROOT, "HF_HOME": DOWNLOAD_CACHE}
    fetch_env = _env(fetch_values)
    if version.token_secret is not None:
        secret = version.token_secret
        fetch_env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}
        )
    # The contract's settings first; the pod's own paths win over anything of the same name.
    serve_values = {**version.env, **pod_env, "HF_HUB_OFFLINE": "1"}
    serve_values.pop(MODEL_DIR_ENV, None)
    resources = container_resources(serving)

    fetch = {
        "name": "fetch-model",
        "image": images.serving,
        "imagePullPolicy": images.pull_policy,
        "command": ["python", "-m", "kubetune_components.serving.bento"],
        "args": [
            "build",
            "--model-dir",
            version.model_uri,
            "--deployment",
            ref.name,
            "--version",
            version.name,
        ],
        "env": fetch_env,
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": fetch_mounts,
    }
    serve = {
        "name": "serve",
        "image": images.serving,
        "imagePullPolicy": images.pull_policy,
        "command": [
            "bentoml",
            "serve",
            f"{version.bento}:latest",
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVING_PORT),
        ],
        "ports": [{"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "env": _env(serve_values),
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": shared_mounts,
        # Loading a model can take minutes: the startup probe holds liveness off until /livez answers.
        "startupProbe": _http_probe("/livez", period=10, failures=90),
        "livenessProbe": _http_probe("/livez", period=10, failures=3),
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
    }
    labels = version_labels(ref.name, version.name)
    metadata = _metadata(ref, name, labels)
    metadata["annotations"] = {MODEL_URI_ANNOTATION: version.model_uri}
    return _deployment(
        metadata,
        version_selector(ref.name, version.name),
        labels,
        SERVING_PORT,
        {"initContainers": [fetch], "containers": [serve], "volumes": volumes},
        # With autoscaling the HPA owns the replica count: applying one here would fight it.
        replicas=serving.replicas if serving.autoscaling is None else None,
    )


def _deployment(
    metadata: dict[str, Any],
    selector: dict[str, str],
    pod_labels: dict[str, str],
    port: int,
    pod: dict[str, Any],
    replicas: int | None,
) -> dict[str, Any]:
    """A Deployment of pods with ``pod`` (containers, volumes) and kubetune's pod hardening."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "revisionHistoryLimit": 3,
        # A new pod is ready before an old one goes: the pods keep serving through an update.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": _scrape_annotations(port)},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": _pod_security(),
                **pod,
            },
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def _service(
    ref: DeploymentRef, name: str, labels: dict[str, str], selector: dict[str, str], port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, name, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
            ],
        },
    }


def build_version_service(ref: DeploymentRef, version: str) -> dict[str, Any]:
    return _service(
        ref,
        version_child_name(ref.name, version),
        version_labels(ref.name, version),
        version_selector(ref.name, version),
        SERVING_PORT,
    )


def build_version_autoscaler(ref: DeploymentRef, version: str, serving: Serving) -> dict[str, Any] | None:
    """The version's HorizontalPodAutoscaler, or None when spec.serving.autoscaling is unset."""
    autoscaling = serving.autoscaling
    if autoscaling is None:
        return None
    name = version_child_name(ref.name, version)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(ref, name, version_labels(ref.name, version)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": IN_FLIGHT_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(autoscaling.target_concurrency),
                        },
                    },
                }
            ],
        },
    }


def versions_network_policy_name(deployment: str) -> str:
    return _dns_label(f"{deployment}-versions")


def build_versions_network_policy(ref: DeploymentRef) -> dict[str, Any]:
    """Only the deployment's gateway pods, and metrics scrapers on the serving port, reach its version
    pods: a caller without a key cannot go around the gateway."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ref, versions_network_policy_name(ref.name), gateway_labels(ref.name)),
        "spec": {
            "podSelector": {"matchLabels": version_children_selector(ref.name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": gateway_selector(ref.name)}}]},
                {
                    "from": [{"namespaceSelector": {"matchLabels": {METRICS_SCRAPER_LABEL: "true"}}}],
                    "ports": [{"protocol": "TCP", "port": SERVING_PORT}],
                },
            ],
        },
    }


def open_requests_query(deployment: str, version: str) -> str:
    """The PromQL of a version's demand: requests its deployment's gateways hold or have in flight."""
    selector = f'deployment="{deployment}",version="{version}"'
    return f"sum({OPEN_REQUESTS_METRIC}{{{selector}}}) or vector(0)"


def build_version_scaled_object(
    ref: DeploymentRef, version: str, serving: Serving, prometheus_url: str | None
) -> dict[str, Any] | None:
    """The version's KEDA ScaledObject when spec.serving.autoscaling.minReplicas is 0, else None.

    KEDA scales the version's Deployment between 0 and maxReplicas on the gateways' open requests for
    it (held while it scales up from zero, or in flight), read from the operator's Prometheus
    (KUBETUNE_PROMETHEUS_URL): one held request wakes it, targetConcurrency per replica scales it out,
    and scaleToZeroAfter without requests scales it to zero.
    """
    autoscaling = serving.autoscaling
    if autoscaling is None or not autoscaling.scales_to_zero:
        return None
    if prometheus_url is None:
        raise ValueError(
            f"spec.serving.autoscaling.minReplicas: 0 needs the operator's {PROMETHEUS_URL_ENV}: KEDA "
            "scales the version on the gateway's open requests, read from that Prometheus"
        )
    name = version_child_name(ref.name, version)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(ref, name, version_labels(ref.name, version)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": 0,
            "maxReplicaCount": autoscaling.max_replicas,
            "cooldownPeriod": math.ceil(autoscaling.idle_seconds_before_zero),
            "pollingInterval": SCALED_OBJECT_POLLING_S,
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus_url,
                        "query": open_requests_query(ref.name, version),
                        "threshold": str(autoscaling.target_concurrency),
                        "activationThreshold": "0",
                    },
                }
            ],
        },
    }


def build_version_children(
    ref: DeploymentRef, version: VersionServing, images: ChildImages, prometheus_url: str | None = None
) -> list[dict[str, Any]]:
    """A version's Deployment (serving the vLLM Bento with engine vllm: :mod:`kubetune.kube.vllm_serving`),
    Service and with autoscaling a HorizontalPodAutoscaler, or with minReplicas 0 a KEDA ScaledObject
    (which needs ``prometheus_url``, the operator's Prometheus)."""
    server = build_version_deployment(ref, version, images)
    if version.serving.engine == "vllm":
        server = vllm_deployment(server, version, images.vllm_serving)
    children = [server, build_version_service(ref, version.name)]
    scaled_object = build_version_scaled_object(ref, version.name, version.serving, prometheus_url)
    if scaled_object is not None:
        children.append(scaled_object)
        return children
    autoscaler = build_version_autoscaler(ref, version.name, version.serving)
    if autoscaler is not None:
        children.append(autoscaler)
    return children


# ---- the gateway -----------------------------------------------------------------------------------


def gateway_config_text(config: Mapping[str, Any]) -> str:
    """The bytes of ``gateway.json``: the same config always serialises the same way."""
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def config_checksum(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(gateway_config_text(config).encode()).hexdigest()


def cluster_gateway_config(ref: DeploymentRef, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the cluster's access settings: keys and signing key from the mounted Secret,
    which the gateway also watches through the API (changes apply within seconds, not at the
    kubelet's next sync), authentication required unless the spec disabled it."""
    access = dict(config.get("access") or {})
    access.setdefault("auth", "required")
    access["keysFile"] = f"{ACCESS_DIR}/{ACCESS_KEYS_FILE}"
    access["keysSecret"] = gateway_access_secret_name(ref.name)
    access["signingKeyFile"] = f"{ACCESS_DIR}/{ACCESS_SIGNING_KEY_FILE}"
    return {**config, "access": access}


def build_gateway_config_map(ref: DeploymentRef, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, gateway_config_map_name(ref.name), gateway_labels(ref.name)),
        "data": {GATEWAY_CONFIG_KEY: gateway_config_text(config)},
    }


def build_gateway_deployment(
    ref: DeploymentRef, config: Mapping[str, Any], images: ChildImages, replicas: int = 1
) -> dict[str, Any]:
    labels = gateway_labels(ref.name)
    metadata = _metadata(ref, gateway_name(ref.name), labels)
    # On the Deployment, not its pod template: the config changes in place, the pods stay.
    metadata["annotations"] = {CONFIG_CHECKSUM_ANNOTATION: config_checksum(config)}
    container = {
        "name": "gateway",
        "image": images.gateway,
        "imagePullPolicy": images.pull_policy,
        "command": ["kubetune", "gateway"],
        "args": ["--config", GATEWAY_CONFIG_PATH, "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": _env({"HOME": TMP_DIR, "PYTHONDONTWRITEBYTECODE": "1"}) + _redis_password_env(config),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": GATEWAY_CONFIG_DIR, "readOnly": True},
            {"name": "access", "mountPath": ACCESS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
        ],
        "livenessProbe": _http_probe("/healthz", period=10, failures=3),
        # /readyz fails while a failClosed limit store is unreachable: the rollout shows it
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
    }
    config_volume = {
        "name": gateway_config_map_name(ref.name),
        "items": [{"key": GATEWAY_CONFIG_KEY, "path": GATEWAY_CONFIG_KEY}],
    }
    # optional: without the Secret the gateway starts and refuses every request (no key can match)
    access_volume = {
        "secretName": gateway_access_secret_name(ref.name),
        "optional": True,
        "defaultMode": 0o440,
    }
    volumes = [
        {"name": "config", "configMap": config_volume},
        {"name": "access", "secret": access_volume},
        {"name": "tmp", "emptyDir": {}},
    ]
    pod = {
        "containers": [container],
        "volumes": volumes,
        # its own identity, allowed to read its own key Secret only (kubetune.kube.gateway_access)
        "serviceAccountName": gateway_service_account_name(ref.name),
        "automountServiceAccountToken": True,
    }
    return _deployment(metadata, gateway_selector(ref.name), labels, GATEWAY_PORT, pod, replicas=replicas)


def _redis_password_env(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Redis's password from the Secret the config names, as the variable the gateway reads it from."""
    secret = ((config.get("access") or {}).get("store") or {}).get("redisPasswordSecret")
    if not secret:
        return []
    reference = {"name": secret["name"], "key": secret["key"]}
    return [{"name": REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": reference}}]


def build_gateway_service_account(ref: DeploymentRef) -> dict[str, Any]:
    """The gateway pods' identity; it holds no rights until ``kubetune keys`` binds it to the Role of
    the key Secret it creates (the operator itself never reads Secrets, so it cannot grant that)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ref, gateway_service_account_name(ref.name), gateway_labels(ref.name)),
        "automountServiceAccountToken": False,
    }


def build_gateway_disruption_budget(ref: DeploymentRef) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take at most one gateway pod at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref, gateway_name(ref.name), gateway_labels(ref.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": gateway_selector(ref.name)}},
    }


def build_gateway_service(ref: DeploymentRef) -> dict[str, Any]:
    return _service(
        ref, gateway_name(ref.name), gateway_labels(ref.name), gateway_selector(ref.name), GATEWAY_PORT
    )


def build_gateway_children(
    ref: DeploymentRef, config: Mapping[str, Any], images: ChildImages, replicas: int = 1
) -> list[dict[str, Any]]:
    """The gateway's ServiceAccount, ConfigMap, Deployment (``replicas`` pods), PodDisruptionBudget and
    Service (the ServiceAccount and ConfigMap first: the pods need them), and the NetworkPolicy that
    keeps everyone else from the version pods."""
    config = cluster_gateway_config(ref, config)
    return [
        build_gateway_service_account(ref),
        build_gateway_config_map(ref, config),
        build_gateway_deployment(ref, config, images, replicas=replicas),
        build_gateway_disruption_budget(ref),
        build_gateway_service(ref),
        build_versions_network_policy(ref),
    ]
