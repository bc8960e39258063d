"""Server-side apply of child objects, listing and deleting them, with lightkube's AsyncClient.

Children are plain dicts (:mod:`kubetune.kube.children` builds them); each kind in
:data:`~kubetune.kube.permissions.CHILD_RESOURCES` maps to lightkube's resource class of that
apiVersion and kind, and what the API server answers comes back as a dict.

Objects are applied with ``PATCH`` ``application/apply-patch+yaml``, ``fieldManager=kubetune`` and
``force=true``: kubetune owns every field it sets and takes them back from anyone who changed them
(``kubectl edit`` of a child is undone on the next reconcile). Fields kubetune stops setting are
removed by the API server unless another manager owns them.

kmock's emulator (the integration tests) approximates server-side apply as "create if absent, else a
JSON merge-patch": lists are replaced whole and a map key kubetune stops setting is *not* removed
(no field managers). Nothing here depends on that removal: children that are no longer wanted are
deleted whole (:func:`prune`), never emptied field by field.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.core.resource import NamespacedResource
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import CascadeType, PatchType

from kubetune.kube.client import FIELD_MANAGER
from kubetune.kube.permissions import CHILD_RESOURCES, ChildResource

__all__ = [
    "DEPLOYMENTS",
    "FIELD_MANAGER",
    "HORIZONTAL_POD_AUTOSCALERS",
    "SCALED_OBJECTS",
    "SERVICES",
    "AddonMissing",
    "ChildConflict",
    "apply",
    "controller_uid",
    "delete",
    "get",
    "list_objects",
    "merge_patch",
    "prune",
    "resource_of",
    "status_code",
]


class ChildConflict(Exception):
    """An object with a child's name exists and is not controlled by the child's owner."""


class AddonMissing(Exception):
    """The cluster does not serve an add-on's kind (its CRD is not installed)."""

    def __init__(self, resource: ChildResource) -> None:
        super().__init__(
            f"the cluster has no {resource.api_version} {resource.kind}: install the add-on that defines "
            f"it ({resource.group})"
        )


# ---- resources -------------------------------------------------------------------------------------


def _child_resource(plural: str) -> ChildResource:
    return next(resource for resource in CHILD_RESOURCES if resource.plural == plural)


DEPLOYMENTS = _child_resource("deployments")
SERVICES = _child_resource("services")
HORIZONTAL_POD_AUTOSCALERS = _child_resource("horizontalpodautoscalers")
SCALED_OBJECTS = _child_resource("scaledobjects")
CONFIG_MAPS = _child_resource("configmaps")
# lightkube knows the built-in kinds; an add-on's kind is registered as a generic resource
for _addon in (resource for resource in CHILD_RESOURCES if resource.from_addon):
    create_namespaced_resource(_addon.group, _addon.version, _addon.kind, _addon.plural)


def resource_class(resource: ChildResource) -> type[NamespacedResource]:
    """lightkube's class of the kind (every child kind is a namespaced built-in)."""
    found = resource_registry.load(resource.api_version, resource.kind)
    if not issubclass(found, NamespacedResource):
        raise TypeError(f"{resource.api_version}/{resource.kind} is not a namespaced resource")
    return found


def resource_of(obj: Mapping[str, Any]) -> ChildResource:
    """The kind of child ``obj`` is; only kinds the operator's RBAC grants (CHILD_RESOURCES) are known."""
    for resource in CHILD_RESOURCES:
        if obj.get("apiVersion") == resource.api_version and obj.get("kind") == resource.kind:
            return resource
    raise ValueError(
        f"{obj.get('apiVersion')}/{obj.get('kind')} is not in kubetune.kube.permissions.CHILD_RESOURCES"
    )


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def _as_dict(found: NamespacedResource) -> dict[str, Any]:
    as_dict: dict[str, Any] = found.to_dict()  # type: ignore[attr-defined]  # every built-in model has it
    return as_dict


def status_code(error: ApiError) -> int:
    """The HTTP status the API server answered a failed request with."""
    code = error.status.code  # a Status body's code; the HTTP status when the body has none
    return code if code is not None else error.response.status_code


def not_found(error: ApiError) -> bool:
    return status_code(error) == 404


def _kind_not_served(resource: ChildResource, error: Exception) -> bool:
    """An add-on's kind the API server does not serve: a plain-text 404 for its path, which lightkube
    raises as its HTTP client's status error (not as an ApiError, which carries a Status)."""
    if not resource.from_addon or isinstance(error, ApiError):
        return False
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) == 404


# ---- operations ------------------------------------------------------------------------------------


async def get(
    client: AsyncClient, resource: ChildResource, namespace: str, name: str
) -> dict[str, Any] | None:
    try:
        found = await client.get(resource_class(resource), name, namespace=namespace)
    except ApiError as error:
        if not_found(error):
            return None
        raise
    except Exception as error:
        if _kind_not_served(resource, error):
            raise AddonMissing(resource) from error
        raise
    return _as_dict(found)


async def apply(
    client: AsyncClient, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER
) -> dict[str, Any]:
    """Server-side apply ``obj`` as ``field_manager``; returns the object as stored (with its status).

    An object of that name that exists and is not controlled by the owner ``obj`` names (another
    ModelDeployment's, or one a user created) is never taken over: :class:`ChildConflict`. Applying
    with force would otherwise adopt it, and the garbage collector would delete it with its new owner.
    """
    resource = resource_of(obj)
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    wanted = controller_uid(obj)
    existing = await get(client, resource, namespace, name)
    if existing is not None and wanted is not None and controller_uid(existing) != wanted:
        owner = controller_uid(existing)
        raise ChildConflict(
            f"{resource.kind} {namespace}/{name} already exists and "
            + (f"is controlled by another owner (uid {owner})" if owner else "has no controlling owner")
            + "; kubetune does not take it over: rename or delete it, or rename the ModelDeployment"
        )
    stored = await client.patch(
        resource_class(resource),
        name,
        dict(obj),
        namespace=namespace,
        patch_type=PatchType.APPLY,
        field_manager=field_manager,
        force=True,
    )
    return _as_dict(stored)


async def merge_patch(
    client: AsyncClient, resource: ChildResource, namespace: str, name: str, patch: Mapping[str, Any]
) -> dict[str, Any]:
    """A JSON merge patch (for the few fields that are not part of the applied object)."""
    patched = await client.patch(
        resource_class(resource), name, dict(patch), namespace=namespace, patch_type=PatchType.MERGE
    )
    return _as_dict(patched)


async def list_objects(
    client: AsyncClient, resource: ChildResource, namespace: str, labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The objects of one kind in ``namespace`` carrying every label of ``labels`` (none of an add-on's
    kind whose CRD the cluster does not have)."""
    try:
        return [
            _as_dict(found)
            async for found in client.list(resource_class(resource), namespace=namespace, labels=dict(labels))
        ]
    except Exception as error:
        if _kind_not_served(resource, error):
            return []
        raise


async def delete(client: AsyncClient, resource: ChildResource, namespace: str, name: str) -> bool:
    """Delete one object (its dependents in the background); False when it was already gone."""
    try:
        await client.delete(
            resource_class(resource), name, namespace=namespace, cascade=CascadeType.BACKGROUND
        )
    except ApiError as error:
        if not_found(error):
            return False
        raise
    return True


async def prune(
    client: AsyncClient,
    namespace: str,
    labels: Mapping[str, str],
    keep: Collection[tuple[str, str]],
    owner_uid: str | None,
    resources: Collection[ChildResource] = CHILD_RESOURCES,
) -> list[tuple[str, str]]:
    """Delete the objects carrying ``labels`` that are not in ``keep`` ((kind, name) pairs).

    Only objects whose controller is ``owner_uid`` are deleted (with ``owner_uid`` None: any that
    match), so an object that merely carries the labels is never touched. Returns what was deleted.
    """
    deleted: list[tuple[str, str]] = []
    for resource in resources:
        for obj in await list_objects(client, resource, namespace, labels):
            name = obj["metadata"]["name"]
            if (resource.kind, name) in keep:
                continue
            if owner_uid is not None and controller_uid(obj) != owner_uid:
                continue
            if await delete(client, resource, namespace, name):
                deleted.append((resource.kind, name))
    return deleted
