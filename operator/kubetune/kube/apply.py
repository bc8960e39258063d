"""Server-side apply of child objects, listing and deleting them, over an async Kubernetes API client.

Two clients implement :class:`KubeApi`:

* :class:`KopfApi` sends requests through Kopf's own authenticated aiohttp session, with the
  credentials Kopf logged in with (in-cluster service account, kubeconfig, or a ``@kopf.on.login``
  handler such as the integration tests' one) and its retries and re-authentication on 401. Kopf
  exposes no public generic client, so this is the one place that reaches into ``kopf._cogs``;
  kopf is pinned below 2 in pyproject.toml. It must be awaited on the operator's event loop (where
  Kopf's credentials vault is in the context): in a handler, or through :class:`BlockingKube`.
* :class:`SessionApi` uses a plain ``aiohttp.ClientSession`` against a server URL (tests, tools).

Objects are applied with ``PATCH`` ``application/apply-patch+yaml`` (a JSON body is valid YAML),
``fieldManager=kubetune`` and ``force=true``: kubetune owns every field it sets and takes them back
from anyone who changed them (``kubectl edit`` of a child is undone on the next reconcile). Fields
kubetune stops setting are removed by the API server unless another manager owns them.

kmock's emulator (the integration tests) approximates server-side apply as "create if absent, else a
JSON merge-patch": lists are replaced whole and a map key kubetune stops setting is *not* removed
(no field managers). Nothing here depends on that removal: children that are no longer wanted are
deleted whole (:func:`prune`), never emptied field by field.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Collection, Mapping
from typing import Any, Protocol, TypeVar

import aiohttp
import kopf

from kubetune.kube.permissions import CHILD_RESOURCES, ChildResource

FIELD_MANAGER = "kubetune"
APPLY_PATCH = "application/apply-patch+yaml"

T = TypeVar("T")


class KubeApiError(Exception):
    """A Kubernetes API request failed with an HTTP error status."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(f"HTTP {status}{f' {reason}' if reason else ''}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ChildConflict(Exception):
    """An object with a child's name exists and is not controlled by the child's owner."""


class KubeApi(Protocol):
    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON response; raise :class:`KubeApiError` on 4xx/5xx."""
        ...


def _url(path: str, params: Mapping[str, str] | None) -> str:
    return f"{path}?{urllib.parse.urlencode(params)}" if params else path


class SessionApi:
    """A Kubernetes API client over an aiohttp session (the server's URL + any auth in the session)."""

    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self.session = session
        self.server = server.rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        async with self.session.request(
            method, self.server + _url(path, params), json=body, headers=headers
        ) as response:
            if response.status >= 400:
                text = await response.text()
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = None
                if isinstance(payload, dict):
                    raise KubeApiError(
                        response.status, str(payload.get("message") or text), payload.get("reason")
                    )
                raise KubeApiError(response.status, text.strip()[:256])
            return await response.json(content_type=None)


class KopfApi:
    """A Kubernetes API client over Kopf's authenticated session (see the module docstring)."""

    def __init__(
        self, settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        self.settings = settings
        self.logger = logger

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        from kopf._cogs.clients import api as kopf_api
        from kopf._cogs.clients import errors as kopf_errors

        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = await kopf_api.request(
                method.lower(),
                _url(path, params),
                payload=body,
                headers=headers,
                settings=self.settings,
                logger=self.logger,
            )
        except kopf_errors.APIError as error:
            payload = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], dict) else {}
            raise KubeApiError(error.status, error.message or str(error), payload.get("reason")) from error
        async with response:
            return await response.json(content_type=None)


class BlockingKube:
    """Runs coroutines on the operator's event loop from a worker thread, and waits for them.

    The serving backend's interface is synchronous (it is shared with local mode), so a reconcile
    runs in a thread while the API calls it makes run on the loop that holds Kopf's session.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 60.0) -> None:
        self.loop = loop
        self.timeout_s = timeout_s

    def run(self, make: Awaitable[T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("BlockingKube.run() called on its own event loop: it would deadlock")
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(make), self.loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


# ---- resources -------------------------------------------------------------------------------------


def resource_path(resource: ChildResource, namespace: str, name: str | None = None) -> str:
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
    return f"{root}/namespaces/{namespace}/{resource.plural}" + (f"/{name}" if name else "")


def _child_resource(plural: str) -> ChildResource:
    return next(resource for resource in CHILD_RESOURCES if resource.plural == plural)


DEPLOYMENTS = _child_resource("deployments")
SERVICES = _child_resource("services")
HORIZONTAL_POD_AUTOSCALERS = _child_resource("horizontalpodautoscalers")


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


# ---- operations ------------------------------------------------------------------------------------


async def get(api: KubeApi, resource: ChildResource, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = await api.request("GET", resource_path(resource, namespace, name))
    except KubeApiError as error:
        if error.status == 404:
            return None
        raise
    return found


async def apply(api: KubeApi, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply ``obj`` as ``field_manager``; returns the object as stored (with its status).

    An object of that name that exists and is not controlled by the owner ``obj`` names (another
    ModelDeployment's, or one a user created) is never taken over: :class:`ChildConflict`. Applying
    with force would otherwise adopt it, and the garbage collector would delete it with its new owner.
    """
    resource = resource_of(obj)
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    wanted = controller_uid(obj)
    existing = await get(api, resource, namespace, name)
    if existing is not None and wanted is not None and controller_uid(existing) != wanted:
        owner = controller_uid(existing)
        raise ChildConflict(
            f"{resource.kind} {namespace}/{name} already exists and "
            + (f"is controlled by another owner (uid {owner})" if owner else "has no controlling owner")
            + "; kubetune does not take it over: rename or delete it, or rename the ModelDeployment"
        )
    stored: dict[str, Any] = await api.request(
        "PATCH",
        resource_path(resource, namespace, name),
        params={"fieldManager": field_manager, "force": "true"},
        body=obj,
        content_type=APPLY_PATCH,
    )
    return stored


async def merge_patch(
    api: KubeApi, resource: ChildResource, namespace: str, name: str, patch: Mapping[str, Any]
) -> dict[str, Any]:
    """A JSON merge patch (for the few fields that are not part of the applied object)."""
    patched: dict[str, Any] = await api.request(
        "PATCH",
        resource_path(resource, namespace, name),
        params={"fieldManager": FIELD_MANAGER},
        body=patch,
        content_type="application/merge-patch+json",
    )
    return patched


async def list_objects(
    api: KubeApi, resource: ChildResource, namespace: str, label_selector: str
) -> list[dict[str, Any]]:
    found = await api.request(
        "GET", resource_path(resource, namespace), params={"labelSelector": label_selector}
    )
    return list(found.get("items") or [])


async def delete(api: KubeApi, resource: ChildResource, namespace: str, name: str) -> bool:
    """Delete one object (its dependents in the background); False when it was already gone."""
    try:
        await api.request(
            "DELETE",
            resource_path(resource, namespace, name),
            body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
        )
    except KubeApiError as error:
        if error.status == 404:
            return False
        raise
    return True


async def prune(
    api: KubeApi,
    namespace: str,
    label_selector: str,
    keep: Collection[tuple[str, str]],
    owner_uid: str | None,
    resources: Collection[ChildResource] = CHILD_RESOURCES,
) -> list[tuple[str, str]]:
    """Delete the objects matching ``label_selector`` that are not in ``keep`` ((kind, name) pairs).

    Only objects whose controller is ``owner_uid`` are deleted (with ``owner_uid`` None: any that
    match), so an object that merely carries the label is never touched. Returns what was deleted.
    """
    deleted: list[tuple[str, str]] = []
    for resource in resources:
        for obj in await list_objects(api, resource, namespace, label_selector):
            name = obj["metadata"]["name"]
            if (resource.kind, name) in keep:
                continue
            if owner_uid is not None and controller_uid(obj) != owner_uid:
                continue
            if await delete(api, resource, namespace, name):
                deleted.append((resource.kind, name))
    return deleted
