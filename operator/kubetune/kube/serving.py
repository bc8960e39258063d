"""The ServingBackend of a cluster: a ModelDeployment's versions and gateway as owned Kubernetes objects.

``ensure_versions`` applies each version's Deployment, Service and HorizontalPodAutoscaler, or KEDA
ScaledObject with minReplicas 0 (server-side apply), and deletes the version children this deployment
no longer wants: an HPA or ScaledObject once autoscaling changes at once, a removed version
``retire_after_s`` (:data:`kubetune.config.RETIRE_AFTER_S`) after it was removed. A version is ready
when its Deployment's rollout is complete: the Deployment controller has seen the current spec, every
pod runs it (no pod of a previous model is left) and enough of them are ready (a version KEDA scaled
to zero is not ready: the gateway holds its requests while KEDA scales it up). ``ensure_gateway``
applies the gateway's ConfigMap, Deployment and Service; a new config only changes the ConfigMap
(the gateway reloads the mounted file once the kubelet refreshes it, within about a minute or two).
``remove`` deletes every child; on a real cluster the ownerReferences make the garbage collector do
that anyway.

A version whose children cannot be built or are refused by the API server (4xx: invalid, forbidden,
owned by another object) is reported as not ready with the reason, and its existing children are
left as they are; the other versions go on. Server errors and timeouts raise, so the reconcile is
retried.

A version that is not ready is failed (``VersionObservation.failed``: the ModelDeployment goes Stalled
with ModelInvalid at once, instead of crash-looping) when a pod of its current model says the model
cannot be served: its model-building init container exited with ``MODEL_INVALID_EXIT_CODE``, now or
the last time it ran; the message is the container's termination message (``<Reason>: <message>``).

LoRA versions of one base model that :func:`~kubetune.plan.versions.shared_adapter_groups` groups
(adapters on claims, ``spec.serving.shareBaseModel``) are served by one Deployment per group instead
(:mod:`kubetune.kube.adapter_group`): a version joining or leaving changes the group's ConfigMap,
which the running pods follow. A grouped version is ready once the group's rollout is complete and its
pods hold its adapter: they started after it entered the ConfigMap, or it has been there
:data:`~kubetune.kube.adapter_group.ADAPTER_LOAD_WAIT_S`. A version moving into or out of a group
keeps its previous server for ``retire_after_s``, as a removed version does, while the gateway's
pods still route to it.

Every method is a coroutine over lightkube's AsyncClient: the reconcile pass awaits them on the
operator's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod

from kubetune.config import RETIRE_AFTER_S
from kubetune.kube import apply as kube
from kubetune.kube.adapter_group import (
    ADAPTER_LOAD_WAIT_S,
    BASE_MODEL_ANNOTATION,
    GROUP_LABEL,
    adapters_since,
    build_group_children,
    group_child_name,
    group_selector,
    group_version_url,
    shares_on_cluster,
)
from kubetune.kube.apply import AddonMissing, ChildConflict
from kubetune.kube.children import (
    RETIRED_AT_ANNOTATION,
    VERSION_LABEL,
    ChildImages,
    build_gateway_children,
    build_version_children,
    child_selector,
    gateway_endpoint,
    gateway_name,
    version_child_name,
    version_children_selector,
    version_url,
)
from kubetune.kube.permissions import ChildResource
from kubetune.plan.versions import (
    DeploymentRef,
    GatewayObservation,
    VersionObservation,
    VersionServing,
    shared_adapter_groups,
)
from kubetune_contract.serving import MODEL_INVALID_EXIT_CODE

VERSION_RESOURCES = (kube.DEPLOYMENTS, kube.SERVICES, kube.HORIZONTAL_POD_AUTOSCALERS, kube.SCALED_OBJECTS)
# what a version or a group of versions sharing a base model may own (a group also has a ConfigMap)
SERVING_RESOURCES = (*VERSION_RESOURCES, kube.CONFIG_MAPS)
# Holds a version's replica count between kubetune's last apply that set it and the HPA's first scale
# (see :meth:`KubernetesServing._hand_replicas_over`).
HANDOVER_FIELD_MANAGER = "kubetune-handover-to-hpa"


def _retired_at(deployment: Mapping[str, Any]) -> float | None:
    stamp = ((deployment.get("metadata") or {}).get("annotations") or {}).get(RETIRED_AT_ANNOTATION)
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0  # unreadable: long retired


def _timestamp(stamp: str) -> float:
    """Seconds since the epoch of a Kubernetes timestamp (``2026-01-02T03:04:05Z``); 0 if unreadable."""
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def rollout_state(deployment: Mapping[str, Any], required: int) -> tuple[bool, str | None]:
    """Whether a Deployment (as stored, with status) serves its current spec with ``required`` ready pods."""
    name = deployment.get("metadata", {}).get("name", "?")
    if required < 1:
        return False, f"Deployment {name} is scaled to 0 replicas"
    generation = deployment.get("metadata", {}).get("generation")
    status = deployment.get("status") or {}
    observed = status.get("observedGeneration")
    if observed is None or (generation is not None and observed < generation):
        return False, f"Deployment {name}: waiting for the Deployment controller to act on the new spec"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return (
                False,
                f"Deployment {name} is stuck: {condition.get('message') or 'progress deadline exceeded'}",
            )
    total = int(status.get("replicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    if updated < total:
        return False, f"Deployment {name}: rolling out, {updated} of {total} pods run the current spec"
    if updated < required or ready < required:
        return False, f"Deployment {name}: {min(ready, updated)}/{required} pods ready"
    return True, None


def _required_replicas(version: VersionServing, stored: Mapping[str, Any]) -> int:
    autoscaling = version.serving.autoscaling
    if autoscaling is None:
        return version.serving.replicas
    # The HPA owns the count: at least minReplicas, or what the Deployment has until the HPA acts.
    current = int((stored.get("spec") or {}).get("replicas", 1))
    return max(1, min(autoscaling.min_replicas, current))


SCALED_TO_ZERO = (
    "scaled to zero by KEDA (spec.serving.autoscaling.minReplicas 0): the gateway holds the next request "
    "while it scales up"
)


def _scaled_to_zero(version: VersionServing, stored: Mapping[str, Any]) -> bool:
    """Whether KEDA has scaled the version's (or group's) Deployment to zero: it sleeps, it has not failed."""
    autoscaling = version.serving.autoscaling
    spec, status = stored.get("spec") or {}, stored.get("status") or {}
    return (
        autoscaling is not None
        and autoscaling.scales_to_zero
        and spec.get("replicas") == 0
        and not status.get("replicas")
    )


def _applies_replicas(stored: Mapping[str, Any], manager: str) -> bool:
    """Whether ``manager``'s server-side apply owns the object's ``spec.replicas``."""
    for entry in (stored.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != "Apply":
            continue
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


def model_invalid_message(pod: Mapping[str, Any], model_uri: str) -> str | None:
    """What a pod's init container said when it exited with MODEL_INVALID_EXIT_CODE building
    ``model_uri`` (a pod of a previous model, still being replaced, does not count); None otherwise."""
    spec = pod.get("spec") or {}
    builds_this_model = {
        container["name"]
        for container in spec.get("initContainers") or []
        if model_uri in (container.get("args") or [])
    }
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if status.get("name") not in builds_this_model:
            continue
        for state in (status.get("state"), status.get("lastState")):
            terminated = (state or {}).get("terminated") or {}
            if terminated.get("exitCode") == MODEL_INVALID_EXIT_CODE:
                said = str(terminated.get("message") or "").strip()
                said = said or f"it exited with status {MODEL_INVALID_EXIT_CODE}"
                name = (pod.get("metadata") or {}).get("name", "")
                return f"the model cannot be served: {said} (init container {status['name']} of pod {name})"
    return None


def _client_error(error: ApiError) -> bool:
    return 400 <= kube.status_code(error) < 500


class KubernetesServing:
    """ServingBackend on Kubernetes (see the module docstring)."""

    def __init__(
        self,
        client: AsyncClient,
        images: ChildImages,
        *,
        retire_after_s: float = RETIRE_AFTER_S,
        clock: Callable[[], float] = time.time,
        prometheus_url: str | None = None,
    ) -> None:
        self.client = client
        self.images = images
        self.prometheus_url = prometheus_url  # KEDA's ScaledObjects read the gateways' series from it
        self.retire_after_s = retire_after_s
        self.clock = clock

    async def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> dict[str, VersionObservation]:
        observations: dict[str, VersionObservation] = {}
        keep: set[tuple[str, str]] = set()
        shareable = [version for version in versions if shares_on_cluster(version)]
        groups = shared_adapter_groups(shareable, running=await self._running_groups(deployment))
        for base, members in groups.items():
            try:
                group = await self._apply_group(deployment, base, members)
            except ValueError as error:
                group = {
                    member.name: VersionObservation(url=None, ready=False, message=str(error))
                    for member in members
                }
            keep |= {
                (resource.kind, group_child_name(deployment.name, base)) for resource in SERVING_RESOURCES
            }
            observations.update(group)
        grouped = {member.name for members in groups.values() for member in members}
        for version in versions:
            if version.name in grouped:
                continue
            try:
                children = build_version_children(deployment, version, self.images, self.prometheus_url)
            except ValueError as error:
                # Nothing to apply: leave whatever serves this version now as it is.
                name = version_child_name(deployment.name, version.name)
                keep |= {(resource.kind, name) for resource in VERSION_RESOURCES}
                observations[version.name] = VersionObservation(url=None, ready=False, message=str(error))
                continue
            keep |= {(child["kind"], child["metadata"]["name"]) for child in children}
            observations[version.name] = await self._apply_version(deployment, version, children)
        await self._retire(deployment, keep)
        return observations

    async def _running_groups(self, deployment: DeploymentRef) -> set[str]:
        """The base models whose group's Deployment exists (its last version stays in it)."""
        selector = version_children_selector(deployment.name)
        bases: set[str] = set()
        for obj in await kube.list_objects(self.client, kube.DEPLOYMENTS, deployment.namespace, selector):
            meta = obj["metadata"]
            base = (meta.get("annotations") or {}).get(BASE_MODEL_ANNOTATION)
            if base and GROUP_LABEL in (meta.get("labels") or {}) and _retired_at(obj) is None:
                bases.add(str(base))
        return bases

    async def _apply_group(
        self, deployment: DeploymentRef, base: str, members: Sequence[VersionServing]
    ) -> dict[str, VersionObservation]:
        """Apply a group's children; each member's observation (ValueError when they cannot be built)."""
        name = group_child_name(deployment.name, base)
        stored_map = await kube.get(self.client, kube.CONFIG_MAPS, deployment.namespace, name)
        since = adapters_since(members, stored_map, self.clock())
        children = build_group_children(deployment, base, members, self.images, since, self.prometheus_url)

        def every(message: str) -> dict[str, VersionObservation]:
            return {
                member.name: VersionObservation(url=None, ready=False, message=message) for member in members
            }

        try:
            if members[0].serving.autoscaling is not None:
                await self._hand_replicas_over(deployment, children[1])
            stored = [await kube.apply(self.client, child) for child in children]
        except ChildConflict as error:
            return every(str(error))
        except AddonMissing as error:
            return every(f"the versions sharing {base}: {error}")
        except ApiError as error:
            if not _client_error(error):
                raise
            return every(f"the API server refused the objects of the versions sharing {base}: {error}")
        server = stored[1]
        if _retired_at(server) is not None:  # the group came back before it was deleted
            patch = {"metadata": {"annotations": {RETIRED_AT_ANNOTATION: None}}}
            server = await kube.merge_patch(self.client, kube.DEPLOYMENTS, deployment.namespace, name, patch)
        ready, message = rollout_state(server, _required_replicas(members[0], server))
        if not ready and _scaled_to_zero(members[0], server):
            return {
                member.name: VersionObservation(
                    url=group_version_url(deployment, base, member.name),
                    ready=False,
                    message=SCALED_TO_ZERO,
                    scaled_to_zero=True,
                )
                for member in members
            }
        oldest_pod = (
            await self._oldest_pod(deployment.namespace, group_selector(deployment.name, base))
            if ready
            else None
        )
        observations: dict[str, VersionObservation] = {}
        now = self.clock()
        for member in members:
            url = group_version_url(deployment, base, member.name)
            if not ready:
                observations[member.name] = VersionObservation(url=url, ready=False, message=message)
                continue
            added = _timestamp(since[member.name]["since"])
            loaded = now - added >= ADAPTER_LOAD_WAIT_S or (oldest_pod is not None and oldest_pod > added)
            waiting = (
                None
                if loaded
                else f"waiting for the pods of Deployment {name} to load version {member.name}'s adapter "
                f"(the kubelet refreshes their ConfigMap {name} within about a minute; taken as loaded "
                f"{ADAPTER_LOAD_WAIT_S:.0f}s after it was written)"
            )
            observations[member.name] = VersionObservation(url=url, ready=loaded, message=waiting)
        return observations

    async def _oldest_pod(self, namespace: str, selector: Mapping[str, str]) -> float | None:
        """When the oldest running pod matching ``selector`` was created (None: no pod)."""
        created: list[float] = []
        try:
            async for found in self.client.list(Pod, namespace=namespace, labels=dict(selector)):
                meta = found.to_dict().get("metadata") or {}
                if meta.get("deletionTimestamp") or not meta.get("creationTimestamp"):
                    continue
                created.append(_timestamp(str(meta["creationTimestamp"])))
        except ApiError as error:
            if not _client_error(error):
                raise
            return None  # e.g. RBAC from before pods were read: its adapters count as loaded after the wait
        return min(created) if created else None

    async def _retire(self, deployment: DeploymentRef, keep: set[tuple[str, str]]) -> None:
        """Delete the version (and adapter group) objects that are no longer wanted.

        An HPA whose version stays (autoscaling turned off) goes at once. A removed version, a group
        no version shares any more, and a version's own server once it joined a group (or a group's
        once it left it) keep serving for ``retire_after_s`` after it was first found unwanted (the
        time is written on its Deployment): the gateway's pods see the ConfigMap without it only once
        the kubelet has refreshed the mounted file, and until then they may still send it requests.
        """
        selector = version_children_selector(deployment.name)
        unwanted: dict[str, list[tuple[ChildResource, dict[str, Any]]]] = {}
        for resource in SERVING_RESOURCES:
            for obj in await kube.list_objects(self.client, resource, deployment.namespace, selector):
                meta = obj["metadata"]
                if (resource.kind, meta["name"]) in keep:
                    continue
                if deployment.uid is not None and kube.controller_uid(obj) != deployment.uid:
                    continue  # it only carries the label: not ours to delete
                labels = meta.get("labels") or {}
                owner = labels.get(VERSION_LABEL) or f"{GROUP_LABEL}={labels.get(GROUP_LABEL, '')}"
                unwanted.setdefault(owner, []).append((resource, obj))
        now = self.clock()
        for objects in unwanted.values():
            server = next((obj for resource, obj in objects if resource is kube.DEPLOYMENTS), None)
            # A server still wanted by its version is unwanted only when the version moved into or out of
            # a group: it serves on for the same while as a removed version's, for the same reason.
            if server is not None and self.retire_after_s > 0:
                retired_at = _retired_at(server)
                if retired_at is None:
                    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    patch = {"metadata": {"annotations": {RETIRED_AT_ANNOTATION: stamp}}}
                    await kube.merge_patch(
                        self.client, kube.DEPLOYMENTS, deployment.namespace, server["metadata"]["name"], patch
                    )
                    continue
                if now - retired_at < self.retire_after_s:
                    continue
            for resource, obj in objects:
                await kube.delete(self.client, resource, deployment.namespace, obj["metadata"]["name"])

    async def _apply_version(
        self, deployment: DeploymentRef, version: VersionServing, children: list[dict[str, Any]]
    ) -> VersionObservation:
        try:
            if version.serving.autoscaling is not None:
                await self._hand_replicas_over(deployment, children[0])
            stored = [await kube.apply(self.client, child) for child in children]
        except ChildConflict as error:
            return VersionObservation(url=None, ready=False, message=str(error))
        except AddonMissing as error:
            return VersionObservation(url=None, ready=False, message=f"version {version.name}: {error}")
        except ApiError as error:
            if not _client_error(error):
                raise
            refused = f"the API server refused version {version.name}'s objects: {error}"
            return VersionObservation(url=None, ready=False, message=refused)
        server = stored[0]
        if _retired_at(server) is not None:  # the version came back before it was deleted
            patch = {"metadata": {"annotations": {RETIRED_AT_ANNOTATION: None}}}
            name = server["metadata"]["name"]
            server = await kube.merge_patch(self.client, kube.DEPLOYMENTS, deployment.namespace, name, patch)
        ready, message = rollout_state(server, _required_replicas(version, server))
        url = version_url(deployment, version.name)
        if not ready and (invalid := await self._model_invalid(deployment.namespace, server, version)):
            return VersionObservation(url=url, ready=False, message=invalid, failed=True)
        if not ready and _scaled_to_zero(version, server):
            return VersionObservation(url=url, ready=False, message=SCALED_TO_ZERO, scaled_to_zero=True)
        return VersionObservation(url=url, ready=ready, message=message)

    async def _model_invalid(
        self, namespace: str, server: Mapping[str, Any], version: VersionServing
    ) -> str | None:
        """Why the version's model cannot be served, when one of its pods for this model says so."""
        selector = ((server.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not selector:
            return None
        try:
            async for found in self.client.list(Pod, namespace=namespace, labels=selector):
                pod: dict[str, Any] = found.to_dict()
                if (said := model_invalid_message(pod, version.model_uri)) is not None:
                    return said
        except ApiError as error:
            if not _client_error(error):
                raise
            # e.g. RBAC from before pods were read: the version stays not ready, as it did then
            return None
        return None

    async def _hand_replicas_over(self, deployment: DeploymentRef, server: Mapping[str, Any]) -> None:
        """Keep the replica count when autoscaling is turned on.

        kubetune's apply leaves ``spec.replicas`` to the HPA then; were kubetune still its only owner,
        the API server would reset it to 1 (scaling a loaded version down) until the HPA next scales.
        Applying the current count as another field manager first keeps it, until the HPA takes it
        over (the hand-over in the Kubernetes server-side apply docs).
        """
        meta = server["metadata"]
        stored = await kube.get(self.client, kube.DEPLOYMENTS, meta["namespace"], meta["name"])
        if stored is None or kube.controller_uid(stored) != deployment.uid:
            return  # nothing to keep, or not ours (the apply reports that)
        if not _applies_replicas(stored, kube.FIELD_MANAGER):
            return
        replicas = (stored.get("spec") or {}).get("replicas")
        if replicas is None:
            return
        handover = {
            "apiVersion": server["apiVersion"],
            "kind": server["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": replicas},
        }
        await kube.apply(self.client, handover, field_manager=HANDOVER_FIELD_MANAGER)

    async def ensure_gateway(
        self, deployment: DeploymentRef, config: Mapping[str, Any], replicas: int = 1
    ) -> GatewayObservation:
        try:
            stored = [
                await kube.apply(self.client, child)
                for child in build_gateway_children(deployment, config, self.images, replicas)
            ]
        except ChildConflict as error:
            return GatewayObservation(endpoint=None, ready=False, message=str(error))
        except ApiError as error:
            if not _client_error(error):
                raise
            return GatewayObservation(
                endpoint=None, ready=False, message=f"the API server refused the gateway's objects: {error}"
            )
        gateway = next(obj for obj in stored if obj["metadata"]["name"] == gateway_name(deployment.name))
        ready, message = rollout_state(gateway, int(gateway.get("spec", {}).get("replicas", 1)))
        return GatewayObservation(endpoint=gateway_endpoint(deployment), ready=ready, message=message)

    async def remove(self, deployment: DeploymentRef) -> list[tuple[str, str]]:
        """Delete every child of the deployment; returns the (kind, name) of what was deleted."""
        return await kube.prune(
            self.client, deployment.namespace, child_selector(deployment.name), set(), deployment.uid
        )
