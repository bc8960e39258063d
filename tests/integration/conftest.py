"""Integration-test harness: a real Kopf operator against kmock's in-memory Kubernetes API.

Fixtures (function-scoped; everything async -- ``asyncio_mode=auto``):

``k8s`` -> :class:`Cluster`
    A :class:`KubeEmulator` (a ``kmock.KubernetesEmulator`` subclass with apiserver semantics)
    served over HTTP on ``127.0.0.1:<free port>`` (``k8s.url``), with the kubetune CRDs
    (:data:`KUBETUNE_RESOURCES`) and builtins (:data:`BUILTIN_RESOURCES`) served for discovery.
    Async helpers go through the real HTTP API: ``create``, ``get``, ``list``, ``patch``
    (merge/json/strategic/apply), ``replace``, ``delete``, ``request`` (raw); errors raise
    ``k8s.ApiError`` (``.status``, ``.reason``). Sync helpers read the in-memory state directly:
    ``peek`` (None if absent), ``history`` (all versions), ``events`` (core v1 Events).
    Polling: ``await k8s.wait_for(resource, name, predicate)`` -> the object, ``wait_gone``,
    ``wait_events``. Resources are named by plural (``"finetunejobs"``), ``"group/version/plural"``,
    kind, or a :class:`ResourceSpec`; namespaced ones default to ``namespace="default"``.

``run_operator`` -> :class:`OperatorRunner`
    ``async with run_operator("kubetune.handlers.jobs", ...) as op:`` runs Kopf with only
    those modules' handlers (plus a login handler pointing at the emulator), in its own thread and
    event loop; entering returns once kopf is ready and watching every handled resource; exiting
    stops it gracefully and joins its threads. Enter it again (or ``await op.restart()``, or
    ``op.stop()`` + ``op.start()``) for "the operator restarted": the emulator keeps the state
    (annotations with kopf's progress, status, finalizers). A crashed operator fails the next
    ``wait_for`` at once. Options: ``namespaces=[...]``, ``configure=fn(settings)``, ``memo=``,
    ``registry=``; settings are tuned for tests in :func:`tune_settings`.

``wait_for`` -> the generic poller :func:`wait_for`: ``await wait_for(probe, predicate, timeout=...)``.

Example::

    async def test_it(k8s: Cluster, run_operator: OperatorRunner) -> None:
        async with run_operator("kubetune.handlers.jobs"):
            await k8s.create("finetunejobs", {"metadata": {"name": "x"}, "spec": {...}})
            obj = await k8s.wait_for("finetunejobs", "x", lambda o: o["status"]["phase"] == "Succeeded")

Test modules must not ``from conftest import ...`` at runtime (pytest imports every conftest.py
under the same module name); use the fixtures, ``k8s.ApiError``/``k8s.WaitTimeoutError``, and
``if TYPE_CHECKING: from conftest import Cluster, OperatorRunner`` for annotations.

Why a thread for the operator: on exit, ``kopf.operator()`` cancels *every* task of its event
loop that appeared while it ran (it cannot tell its own ones apart): in the test's loop, that
would hit the emulator's server-side connections and the test's own tasks. In its own loop it
owns everything there. Sync handlers run in kopf's thread pool, which is shut down on stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import importlib
import inspect
import itertools
import json
import logging
import pprint
import re
import secrets
import string
import sys
import threading
import types
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar, cast

import aiohttp
import aiohttp.test_utils
import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
import pytest
import yaml

T = TypeVar("T")
Body = dict[str, Any]
Bodies = list[Body]  # aliases: Cluster.list() shadows the builtin in the class's annotations
Versions = list[Body | None]

# --------------------------------------------------------------------------------------------------
# Resources served by the emulator (discovery + storage). Unknown resources are 404, like a cluster
# without that CRD installed.
# --------------------------------------------------------------------------------------------------

_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset({"status"})
    shortnames: frozenset[str] = frozenset()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> kmock.resource:
        return kmock.resource(group=self.group, version=self.version, plural=self.plural)

    def url(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        parts = ["/apis", self.group, self.version] if self.group else ["/api", self.version]
        if self.namespaced and namespace is not None:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
            if subresource is not None:
                parts.append(subresource)
        return "/".join(parts)


KUBETUNE_GROUP = "kubetune.dev"
KUBETUNE_VERSION = "v1alpha1"
FINETUNEJOBS = ResourceSpec(
    KUBETUNE_GROUP, KUBETUNE_VERSION, "finetunejobs", "FineTuneJob", shortnames=frozenset({"ftj"})
)
QUANTIZEJOBS = ResourceSpec(
    KUBETUNE_GROUP, KUBETUNE_VERSION, "quantizejobs", "QuantizeJob", shortnames=frozenset({"qj"})
)
MODELDEPLOYMENTS = ResourceSpec(
    KUBETUNE_GROUP, KUBETUNE_VERSION, "modeldeployments", "ModelDeployment", shortnames=frozenset({"mdep"})
)
KUBETUNE_RESOURCES: tuple[ResourceSpec, ...] = (FINETUNEJOBS, QUANTIZEJOBS, MODELDEPLOYMENTS)

BUILTIN_RESOURCES: tuple[ResourceSpec, ...] = (
    # Kopf's backbone: it waits for namespaces & CRDs to be discoverable, posts v1 events.
    # NB: kmock 0.8 misparses /api/v1/namespaces[/name] (HTTP 500), so Namespace objects cannot be
    # stored or listed -- discovery only; hence settings.scanning.disabled=True in tune_settings().
    ResourceSpec("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceSpec(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
    ),
    ResourceSpec("", "v1", "events", "Event", subresources=frozenset()),
    # What the operator manages.
    ResourceSpec("", "v1", "configmaps", "ConfigMap", subresources=frozenset()),
    ResourceSpec("", "v1", "secrets", "Secret", subresources=frozenset()),
    ResourceSpec("", "v1", "services", "Service"),
    ResourceSpec("", "v1", "pods", "Pod"),
    ResourceSpec("apps", "v1", "deployments", "Deployment", subresources=frozenset({"status", "scale"})),
    ResourceSpec("batch", "v1", "jobs", "Job"),
    ResourceSpec("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
)


# --------------------------------------------------------------------------------------------------
# The emulator.
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch: dicts merge recursively, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _version_rank(version: str) -> tuple[int, int, int]:
    """Kubernetes version priority: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 (for preferredVersion)."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (-1, -1, -1)
    stability = {"alpha": 0, "beta": 1, None: 2}[match.group(2)]
    return (stability, int(match.group(1)), int(match.group(3) or 0))


_SELECTOR_SPLIT = re.compile(r",(?![^()]*\))")
_SET_TERM = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_Term = tuple[str, str, frozenset[str]]  # (key or dotted path, operator, values)


def _parse_selector(selector: str | None, *, sets: bool) -> list[_Term]:
    """``a=b,c==d,e!=f`` and, if ``sets``, also ``g``, ``!h``, ``i in (x,y)``, ``j notin (z)``."""
    terms: list[_Term] = []
    for raw_term in _SELECTOR_SPLIT.split(selector or "") if sets else (selector or "").split(","):
        term = raw_term.strip()
        if not term:
            continue
        if sets and (m := _SET_TERM.match(term)):
            terms.append((m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(","))))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", frozenset({value.strip()})))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", frozenset({value.strip()})))
        elif sets and term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", frozenset()))
        elif sets:
            terms.append((term, "exists", frozenset()))
    return terms


def _check_term(present: bool, value: str, op: str, values: frozenset[str]) -> bool:
    match op:
        case "=" | "in":
            return present and value in values
        case "!=" | "notin":
            return not present or value not in values
        case "exists":
            return present
        case _:  # "!exists"
            return not present


def _selector_matcher(request: kmock.Request) -> Callable[[Body], bool]:
    """Label selectors (equality- & set-based) and field selectors (any dotted path, = and !=)."""
    label_terms = _parse_selector(request.params.get("labelSelector"), sets=True)
    field_terms = _parse_selector(request.params.get("fieldSelector"), sets=False)

    def lookup(body: Body, path: str) -> str:
        value: Any = body
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return "" if value is None else str(value)

    def matches(body: Body) -> bool:
        labels = body.get("metadata", {}).get("labels") or {}
        return all(
            _check_term(k in labels, str(labels.get(k, "")), op, vs) for k, op, vs in label_terms
        ) and all(_check_term(True, lookup(body, p), op, vs) for p, op, vs in field_terms)

    return matches


class _FastShutdownServer(aiohttp.test_utils.RawTestServer):
    """The kmock server, but not waiting 60s for still-open watch streams at shutdown."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        server = aiohttp.web.Server(self._handler, loop=self._loop, debug=debug, **kwargs)
        return aiohttp.web.ServerRunner(server, debug=debug, shutdown_timeout=1.0, **kwargs)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """
    ``kmock.KubernetesEmulator`` with the apiserver semantics that Kopf and controllers rely on.

    kmock 0.8 stores request bodies as-is and merges every PATCH as a dict. This subclass takes
    over all writes (the state changes under kmock's lock, kmock's reactions render responses, so
    user reactions such as ``k8s.emulator["patch", kmock.resource("pods")] << 500`` still work):

    * server-populated metadata: ``uid``, ``creationTimestamp``, ``generation`` (bumped on
      non-metadata/status changes), a cluster-wide monotonic ``resourceVersion``; ``generateName``;
      ``namespace`` from the URL; ``apiVersion``/``kind``; immutable fields are kept on updates;
      no-op writes do not bump the version nor emit events;
    * PATCH by content type: JSON-patch (``test`` failures -> 422), merge-patch (RFC 7386),
      strategic-merge (approximated as merge-patch: lists are replaced), server-side apply
      (approximated as merge-patch + create-if-absent; no field managers); PUT replaces;
      ``metadata.resourceVersion`` preconditions -> 409;
    * the status subresource: writes to the object ignore ``status``, writes to ``/status``
      change only ``status`` (for resources registered with ``status``);
    * finalizers: DELETE sets ``deletionTimestamp``; removing the last finalizer deletes; no new
      finalizers once deleting (422);
    * ownerReferences: deleting an owner deletes its dependents (synchronously; Orphan honoured);
    * LIST/WATCH: label & field selectors; WATCH resumes from ``resourceVersion`` (replays the
      event log), honours ``timeoutSeconds``, and cannot lose events between snapshot & stream;
    * discovery: a deterministic ``preferredVersion``; unknown resources are 404 (not auto-created).
    """

    _specs: dict[kmock.resource, ResourceSpec] = attrs.field(factory=dict, init=False)
    _revision: int = attrs.field(default=1000, init=False)
    _log: list[tuple[int, kmock.resource, Body]] = attrs.field(factory=list, init=False)
    _results: dict[int, Body] = attrs.field(factory=dict, init=False)
    _activity: int = attrs.field(default=0, init=False)  # requests other than watches

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_result

    # ---- registration -----------------------------------------------------------------------

    def register(self, *specs: ResourceSpec) -> None:
        for spec in specs:
            self._specs[spec.key] = spec
            self.resources[spec.key] = kmock.ResourceInfo(
                kind=spec.kind,
                singular=spec.kind.lower(),
                namespaced=spec.namespaced,
                verbs=_VERBS,
                shortnames=spec.shortnames,
                subresources=spec.subresources,
            )

    @property
    def specs(self) -> Collection[ResourceSpec]:
        return list(self._specs.values())

    def spec_for(self, resource: kmock.resource | None) -> ResourceSpec:
        spec = self._specs.get(resource) if resource is not None else None
        if spec is None:
            raise kmock.KubernetesResourceNotFoundError()
        return spec

    # ---- state access (call under self._lock or from the emulator's own event loop) ----------

    def live(self, spec: ResourceSpec, namespace: str | None, name: str) -> Body | None:
        key = (spec.key, namespace if spec.namespaced else None, name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj.raw

    @property
    def activity(self) -> int:
        """How many API requests (except watches) were received so far."""
        return self._activity

    @property
    def undelivered_events(self) -> int:
        """Watch events not yet taken by every open watch-stream (0 when all streams are caught up)."""
        return sum(bus.buffer_size for bus in self._buses.values())

    def live_objects(self, spec: ResourceSpec, namespace: str | None = None) -> list[Body]:
        return [
            obj.raw
            for (res, ns, _), obj in self.objects.items()
            if res == spec.key and not obj.deleted and (namespace is None or ns == namespace)
        ]

    # ---- writes --------------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.action != kmock.action.WATCH:
            self._activity += 1
        writes = {kmock.method.POST, kmock.method.PATCH, kmock.method.PUT, kmock.method.DELETE}
        if request.resource is not None and request.resource.plural and request.method in writes:
            async with self._lock:
                self._results[request.id] = await self._write(request)
        try:
            # Skip kmock's own state-changing _handle() -- straight to the reactions/fallbacks.
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        finally:
            self._results.pop(request.id, None)

    async def _serve_result(self, request: kmock.Request) -> kmock.Payload:
        if request.id not in self._results:
            raise kmock.KubernetesEndpointNotFoundError()
        return self._results[request.id]

    # kmock registers these by name as fallbacks for CREATE/UPDATE/DELETE; the state is changed above.
    _serve_create = _serve_update = _serve_delete = _serve_result

    async def _write(self, request: kmock.Request) -> Body:
        spec = self.spec_for(request.resource)
        namespace = request.namespace if spec.namespaced else None
        if spec.namespaced and request.name is not None and namespace is None:
            raise kmock.KubernetesNotFoundError(message="Namespaced objects need a namespaced URL.")
        if request.method == kmock.method.POST and request.name is None:
            return await self._create(spec, request.namespace, request.data)
        if request.method == kmock.method.PATCH and request.name is not None:
            return await self._patch(spec, namespace, request.name, request)
        if request.method == kmock.method.PUT and request.name is not None:
            return await self._replace(spec, namespace, request.name, request.subresource, request.data)
        if request.method == kmock.method.DELETE and request.name is not None and not request.subresource:
            options = request.data if isinstance(request.data, Mapping) else {}
            policy = request.params.get("propagationPolicy") or options.get("propagationPolicy")
            return await self._delete(spec, namespace, request.name, orphan=policy == "Orphan")
        raise kmock.KubernetesError(
            status=405,
            reason="MethodNotAllowed",
            message=f"{request.method} is not supported on {request.url.path}",
        )

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    async def _emit(self, spec: ResourceSpec, event_type: str, body: Body) -> None:
        event = {"type": event_type, "object": copy.deepcopy(body)}
        self._log.append((int(body["metadata"]["resourceVersion"]), spec.key, event))
        await self._buses[spec.key].put(event)

    def _store(self, spec: ResourceSpec, namespace: str | None, name: str, body: Body | None) -> None:
        key = (spec.key, namespace, name)
        if key not in self.objects:
            self.objects[key] = cast(Body, body)
        elif body is None:
            self.objects[key].delete()
        else:
            self.objects[key].history.append(body)

    async def _create(self, spec: ResourceSpec, url_namespace: str | None, data: Any) -> Body:
        if not isinstance(data, Mapping):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="A JSON object is required.")
        body: Body = copy.deepcopy(dict(data))
        meta = body.setdefault("metadata", {})
        if spec.namespaced:
            namespace = url_namespace
            if namespace is None:
                raise kmock.KubernetesError(
                    status=405,
                    reason="MethodNotAllowed",
                    message="Create namespaced objects via a namespaced URL.",
                )
            if meta.get("namespace", namespace) != namespace:
                raise kmock.KubernetesError(
                    status=400,
                    reason="BadRequest",
                    message="The namespace of the object does not match the URL.",
                )
            meta["namespace"] = namespace
        else:
            namespace = None
            meta.pop("namespace", None)
        name = meta.get("name")
        if not name and meta.get("generateName"):
            alphabet = string.ascii_lowercase + string.digits
            while True:
                name = meta["generateName"] + "".join(secrets.choice(alphabet) for _ in range(5))
                if self.live(spec, namespace, name) is None:
                    break
        if not name:
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message="metadata.name or metadata.generateName is required."
            )
        if self.live(spec, namespace, name) is not None:
            raise kmock.KubernetesError(
                status=409, reason="AlreadyExists", message=f'{spec.plural} "{name}" already exists'
            )
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        meta.update(
            name=name,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            resourceVersion=self._next_revision(),
        )
        body["apiVersion"], body["kind"] = spec.api_version, spec.kind
        if "status" in spec.subresources:
            body.pop("status", None)  # as the apiserver does: status is set only via /status
        self._store(spec, namespace, name, body)
        await self._emit(spec, "ADDED", body)
        return body

    async def _patch(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        request: kmock.Request,
    ) -> Body:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        data = request.data
        if content_type == "application/apply-patch+yaml":
            data = data if data is not None else yaml.safe_load(request.text)
            if not isinstance(data, Mapping):
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="Bad apply patch.")
            if self.live(spec, namespace, name) is None and not request.subresource:
                data = _merge_patch(data, {"metadata": {"name": name, "namespace": namespace}})
                return await self._create(spec, namespace, data)
        old = self.live(spec, namespace, name)
        if old is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'{spec.plural} "{name}" not found')
        if isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
        elif isinstance(data, Mapping):
            expected = (data.get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != old["metadata"]["resourceVersion"]:
                raise kmock.KubernetesError(status=409, reason="Conflict", message="resourceVersion mismatch")
            new = _merge_patch(old, data)
        else:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="Unsupported patch body.")
        return await self._update(spec, namespace, name, old, new, request.subresource)

    async def _replace(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        subresource: str | None,
        data: Any,
    ) -> Body:
        old = self.live(spec, namespace, name)
        if old is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'{spec.plural} "{name}" not found')
        if not isinstance(data, Mapping):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="A JSON object is required.")
        expected = (data.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != old["metadata"]["resourceVersion"]:
            raise kmock.KubernetesError(status=409, reason="Conflict", message="resourceVersion mismatch")
        return await self._update(spec, namespace, name, old, copy.deepcopy(dict(data)), subresource)

    async def _update(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        old: Body,
        new: Body,
        subresource: str | None,
    ) -> Body:
        has_status = "status" in spec.subresources
        if subresource == "status" and has_status:
            result = copy.deepcopy(old)
            result.pop("status", None)
            if new.get("status") is not None:
                result["status"] = new["status"]
        elif subresource is None:
            result = new
            if has_status:  # the main endpoint ignores status changes
                result.pop("status", None)
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
        else:
            raise kmock.KubernetesNotFoundError(message=f"Subresource {subresource!r} is not emulated.")

        old_meta, meta = old["metadata"], result.setdefault("metadata", {})
        for field in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or []) - set(
            old_meta.get("finalizers") or []
        ):
            raise kmock.KubernetesError(
                status=422,
                reason="Forbidden",
                message="No new finalizers can be added to an object being deleted.",
            )
        if result == old:
            return old  # a no-op: no new resourceVersion, no watch event (as in Kubernetes)

        def essence(body: Body) -> Body:
            return {k: v for k, v in body.items() if k not in {"metadata", "status"}}

        if essence(result) != essence(old):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_revision()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(spec, namespace, name, result, orphan=False, bump=False)
        else:
            self._store(spec, namespace, name, result)
            await self._emit(spec, "MODIFIED", result)
        return result

    async def _delete(self, spec: ResourceSpec, namespace: str | None, name: str, *, orphan: bool) -> Body:
        old = self.live(spec, namespace, name)
        if old is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'{spec.plural} "{name}" not found')
        if not old["metadata"].get("finalizers"):
            return await self._remove(spec, namespace, name, copy.deepcopy(old), orphan=orphan, bump=True)
        if old["metadata"].get("deletionTimestamp"):
            return old  # already being deleted, waiting for the finalizers
        body = copy.deepcopy(old)
        body["metadata"].update(
            deletionTimestamp=_now(), deletionGracePeriodSeconds=0, resourceVersion=self._next_revision()
        )
        self._store(spec, namespace, name, body)
        await self._emit(spec, "MODIFIED", body)
        return body

    async def _remove(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        body: Body,
        *,
        orphan: bool,
        bump: bool,
    ) -> Body:
        if bump:
            body["metadata"]["resourceVersion"] = self._next_revision()
        self._store(spec, namespace, name, body)  # the final state, for history & assertions
        self._store(spec, namespace, name, None)
        await self._emit(spec, "DELETED", body)
        if not orphan:  # the garbage collector, synchronous & background-style
            uid = body["metadata"]["uid"]
            for (res, ns, dep_name), obj in list(self.objects.items()):
                refs = [] if obj.deleted else obj.raw.get("metadata", {}).get("ownerReferences") or []
                if res in self._specs and any(ref.get("uid") == uid for ref in refs):
                    await self._delete(self._specs[res], ns, dep_name, orphan=False)
        return body

    # ---- reads ---------------------------------------------------------------------------------

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        spec = self.spec_for(request.resource)
        matches = self._matcher(request)
        async with self._lock:
            items = [copy.deepcopy(o) for o in self.live_objects(spec, request.namespace) if matches(o)]
            revision = str(self._revision)
        return {
            "apiVersion": spec.api_version,
            "kind": f"{spec.kind}List",
            "metadata": {"resourceVersion": revision},
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        spec = self.spec_for(request.resource)
        matches = self._matcher(request)
        since = request.params.get("resourceVersion", "")
        timeout = float(request.params["timeoutSeconds"]) if request.params.get("timeoutSeconds") else None
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        yield b""  # send the headers now, even if there are no events yet

        bus = self._buses[spec.key]
        async with self._lock:  # atomically: the starting point & the backlog, so nothing is lost
            mark = await bus.mark()
            if since.isdigit() and since != "0":
                backlog = [event for rv, res, event in self._log if res == spec.key and rv > int(since)]
            else:
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(body)}
                    for body in self.live_objects(spec, request.namespace)
                ]
        stream = cast(AsyncGenerator[Body, None], bus.stream(since=mark))
        try:
            for event in backlog:
                if matches(event["object"]):
                    yield event
            while True:
                if deadline is None:
                    event = await anext(stream)
                else:
                    try:
                        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                        event = await asyncio.wait_for(anext(stream), timeout=remaining)
                    except TimeoutError:
                        return
                if matches(event["object"]):
                    yield event
        finally:
            await stream.aclose()
            await bus.unmark(mark)

    def _matcher(self, request: kmock.Request) -> Callable[[Body], bool]:
        selectors = _selector_matcher(request)

        def matches(body: Body) -> bool:
            meta = body.get("metadata", {})
            return (
                (request.namespace is None or meta.get("namespace") == request.namespace)
                and (request.name is None or meta.get("name") == request.name)
                and selectors(body)
            )

        return matches

    # ---- discovery: a deterministic preferred version ------------------------------------------

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for res in self._get_resources():
            if isinstance(res.group, str) and res.group and isinstance(res.version, str):
                groups.setdefault(res.group, set()).add(res.version)
        return {group: sorted(vs, key=_version_rank, reverse=True) for group, vs in groups.items()}

    @staticmethod
    def _group_doc(group: str, versions: list[str]) -> Body:
        return {
            "name": group,
            "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
        }

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        groups = [self._group_doc(group, versions) for group, versions in self._group_versions().items()]
        return {"apiVersion": "v1", "kind": "APIGroupList", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        groups = self._group_versions()
        group = request.resource.group if request.resource is not None else None
        if not isinstance(group, str) or group not in groups:
            raise kmock.KubernetesResourceNotFoundError()
        return {"apiVersion": "v1", "kind": "APIGroup", **self._group_doc(group, groups[group])}


# --------------------------------------------------------------------------------------------------
# Polling.
# --------------------------------------------------------------------------------------------------


class WaitTimeoutError(AssertionError):
    """The awaited condition did not happen in time; the message shows the last observed state."""


def _describe(fn: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):
        return repr(fn)


async def wait_for(
    probe: Callable[[], Awaitable[T] | T],
    predicate: Callable[[T], Any] = bool,
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    description: str | None = None,
    health: Callable[[], None] | None = None,
) -> T:
    """
    Poll ``probe()`` (sync or async) until ``predicate(value)`` is truthy; return that value.

    Exceptions of the probe or the predicate (e.g. ``KeyError`` while ``status`` is not there yet)
    count as "not yet". On timeout, :class:`WaitTimeoutError` shows the last value and error.
    ``health()`` is called on every iteration and may raise to abort early (e.g. operator crashed).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_value: Any = "<never probed successfully>"
    last_error: BaseException | None = None
    while True:
        if health is not None:
            health()
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            last_value = value
            last_error = None
            if predicate(cast(T, value)):
                return cast(T, value)
        except Exception as e:
            last_error = e
        if loop.time() >= deadline:
            raise WaitTimeoutError(
                f"Timed out after {timeout}s waiting for {description or _describe(predicate)}\n"
                f"Last error: {last_error!r}\n"
                f"Last value:\n{pprint.pformat(last_value, width=110, sort_dicts=False)}"
            )
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------------------------------
# The cluster facade used by tests.
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason") if isinstance(body, Mapping) else None
        message = body.get("message") if isinstance(body, Mapping) else body
        super().__init__(f"HTTP {status} {self.reason or ''}: {message}")


ResourceRef = ResourceSpec | str  # a spec, a plural ("finetunejobs"), or "group/version/plural"

_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


class Cluster:
    """The emulator + helpers. Async helpers use HTTP; ``peek``/``events`` read memory directly."""

    # Exposed here so that test modules need not import from conftest at runtime (which is fragile:
    # pytest re-imports every conftest.py as the same top-level module name "conftest").
    ApiError = ApiError
    WaitTimeoutError = WaitTimeoutError

    def __init__(self, emulator: KubeEmulator, server: kmock.Server, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.server = server
        self.session = session
        self.operators: list[Operator] = []  # the running ones, for crash detection in wait_for()

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    # ---- resources -----------------------------------------------------------------------------

    def register(self, *specs: ResourceSpec) -> None:
        self.emulator.register(*specs)

    def resource(self, ref: ResourceRef) -> ResourceSpec:
        if isinstance(ref, ResourceSpec):
            return ref
        specs = self.emulator.specs
        found = [s for s in specs if ref in {s.plural, f"{s.api_version}/{s.plural}", s.kind}]
        if len(found) != 1:
            raise LookupError(f"Resource {ref!r} is {'ambiguous' if found else 'not registered'}.")
        return found[0]

    # ---- HTTP API ------------------------------------------------------------------------------

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A raw API call; returns the decoded JSON; raises :class:`ApiError` on HTTP errors."""
        async with self.session.request(method, path, **kwargs) as response:
            text = await response.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            if response.status >= 400:
                raise ApiError(response.status, data)
            return data

    async def create(
        self,
        resource: ResourceRef,
        body: Mapping[str, Any],
        *,
        namespace: str = "default",
    ) -> Body:
        """Create an object; a ``status`` in the body is then written via ``/status`` (as controllers do)."""
        spec = self.resource(resource)
        body = dict(body)
        status = body.pop("status", None) if "status" in spec.subresources else None
        created: Body = await self.request("POST", spec.url(namespace), json=body)
        if status is not None:
            created = await self.patch(
                spec,
                created["metadata"]["name"],
                {"status": status},
                namespace=namespace,
                subresource="status",
            )
        return created

    async def get(self, resource: ResourceRef, name: str, *, namespace: str = "default") -> Body:
        spec = self.resource(resource)
        result: Body = await self.request("GET", spec.url(namespace, name))
        return result

    async def list(
        self,
        resource: ResourceRef,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Bodies:
        spec = self.resource(resource)
        selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
        params = {k: v for k, v in selectors.items() if v}
        result = await self.request("GET", spec.url(namespace), params=params)
        return cast(Bodies, result["items"])

    async def patch(
        self,
        resource: ResourceRef,
        name: str,
        patch: Any,
        *,
        namespace: str = "default",
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Body:
        """``patch_type``: merge (default), json (a list of ops), strategic, or apply (server-side apply)."""
        spec = self.resource(resource)
        headers = {"Content-Type": _PATCH_TYPES[patch_type]}
        result: Body = await self.request(
            "PATCH", spec.url(namespace, name, subresource), data=json.dumps(patch).encode(), headers=headers
        )
        return result

    async def replace(
        self,
        resource: ResourceRef,
        name: str,
        body: Mapping[str, Any],
        *,
        namespace: str = "default",
        subresource: str | None = None,
    ) -> Body:
        spec = self.resource(resource)
        result: Body = await self.request("PUT", spec.url(namespace, name, subresource), json=dict(body))
        return result

    async def delete(
        self,
        resource: ResourceRef,
        name: str,
        *,
        namespace: str = "default",
        missing_ok: bool = False,
    ) -> Body | None:
        """Delete; returns the object as left (marked with ``deletionTimestamp`` if finalizers block it)."""
        spec = self.resource(resource)
        try:
            result: Body = await self.request("DELETE", spec.url(namespace, name))
        except ApiError as e:
            if missing_ok and e.status == 404:
                return None
            raise
        return result

    # ---- in-memory reads (sync, exact, no HTTP) ------------------------------------------------

    def peek(self, resource: ResourceRef, name: str, *, namespace: str = "default") -> Body | None:
        """The current object (a deep copy), or None if absent/deleted."""
        body = self.emulator.live(self.resource(resource), namespace, name)
        return copy.deepcopy(body) if body is not None else None

    def history(self, resource: ResourceRef, name: str, *, namespace: str = "default") -> Versions:
        """Every stored version of the object; ``None`` marks deletions."""
        spec = self.resource(resource)
        key = (spec.key, namespace if spec.namespaced else None, name)
        if key not in self.emulator.objects:
            return []
        return [None if v is None else copy.deepcopy(v.raw) for v in self.emulator.objects[key].history]

    def events(
        self,
        name: str | None = None,
        *,
        namespace: str | None = "default",
        kind: str | None = None,
        reason: str | None = None,
    ) -> Bodies:
        """Core v1 Events (e.g. posted by kopf), filtered by the involved object and reason."""
        result = []
        for event in self.emulator.live_objects(self.resource("v1/events"), namespace):
            involved = event.get("involvedObject", {})
            if (
                (name is None or involved.get("name") == name)
                and (kind is None or involved.get("kind") == kind)
                and (reason is None or event.get("reason") == reason)
            ):
                result.append(copy.deepcopy(event))
        return result

    # ---- polling -------------------------------------------------------------------------------

    def check_operators(self) -> None:
        for operator in self.operators:
            operator.check()

    async def wait_for(
        self,
        resource: ResourceRef,
        name: str,
        predicate: Callable[[Body], Any] = bool,
        *,
        namespace: str = "default",
        timeout: float = 10.0,
        description: str | None = None,
    ) -> Body:
        """Wait until the object exists and ``predicate(obj)`` is truthy; return the object."""
        spec = self.resource(resource)
        result = await wait_for(
            lambda: self.peek(spec, name, namespace=namespace),
            lambda obj: obj is not None and predicate(obj),
            timeout=timeout,
            health=self.check_operators,
            description=description or f"{spec.kind} {namespace}/{name}: {_describe(predicate)}",
        )
        assert result is not None
        return result

    async def wait_gone(
        self, resource: ResourceRef, name: str, *, namespace: str = "default", timeout: float = 10.0
    ) -> None:
        spec = self.resource(resource)
        await wait_for(
            lambda: self.peek(spec, name, namespace=namespace),
            lambda obj: obj is None,
            timeout=timeout,
            health=self.check_operators,
            description=f"{spec.kind} {namespace}/{name} to be deleted",
        )

    async def wait_events(
        self,
        name: str,
        *,
        namespace: str = "default",
        reason: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
    ) -> Bodies:
        return await wait_for(
            lambda: self.events(name, namespace=namespace, reason=reason),
            lambda events: len(events) >= count,
            timeout=timeout,
            health=self.check_operators,
            description=f"{count}+ event(s) reason={reason!r} for {namespace}/{name}",
        )


# --------------------------------------------------------------------------------------------------
# The operator.
# --------------------------------------------------------------------------------------------------

_SUBREGISTRIES = ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks")
_captured: dict[str, kopf.OperatorRegistry] = {}


def _handlers(registry: kopf.OperatorRegistry) -> Iterable[tuple[str, Any]]:
    for attr in _SUBREGISTRIES:
        for handler in getattr(registry, attr).get_all_handlers():
            yield attr, handler


def load_registry(*modules: str | types.ModuleType) -> kopf.OperatorRegistry:
    """
    A fresh registry with only the handlers of these modules (and what they import).

    A module imported here for the first time is imported with a capturing default registry;
    its handlers are then also added to the real default registry, as a plain import would do.
    For modules imported earlier, their handlers are picked from the default registry by
    ``fn.__module__`` (the module itself or its submodules).
    """
    result = kopf.OperatorRegistry()
    seen: set[int] = set()
    for module in modules:
        name = module if isinstance(module, str) else module.__name__
        if name not in _captured:
            capture = kopf.OperatorRegistry()
            if name not in sys.modules:
                default = kopf.get_default_registry()
                kopf.set_default_registry(capture)
                try:
                    importlib.import_module(name)
                finally:
                    kopf.set_default_registry(default)
                for attr, handler in _handlers(capture):
                    getattr(default, attr).append(handler)
            known = {id(h) for _, h in _handlers(capture)}
            for attr, handler in _handlers(kopf.get_default_registry()):
                module_name = getattr(handler.fn, "__module__", None) or ""
                if (module_name == name or module_name.startswith(f"{name}.")) and id(handler) not in known:
                    getattr(capture, attr).append(handler)
            _captured[name] = capture
        for attr, handler in _handlers(_captured[name]):
            if id(handler) not in seen:
                seen.add(id(handler))
                getattr(result, attr).append(handler)
    return result


def tune_settings(settings: kopf.OperatorSettings) -> None:
    """Settings for fast, safe in-process tests (applied before the operator's startup handlers)."""
    settings.process.ultimate_exiting_timeout = None  # never SIGKILL the pytest process
    settings.peering.standalone = True  # no peering objects/CRDs needed
    settings.peering.mandatory = False
    settings.scanning.disabled = True  # no CRD/namespace watching; exact namespaces only
    settings.posting.enabled = True  # kopf.info/warn/exception -> v1 Events
    settings.posting.default_backoffs = (0.1, 0.2, 0.5)
    settings.posting.logging_backoffs = (0.1, 0.2)
    settings.networking.error_backoffs = (0.1, 0.2, 0.5)
    settings.networking.request_timeout = 10.0
    settings.watching.server_timeout = 10.0  # the emulator honours ?timeoutSeconds, resumes by version
    settings.watching.client_timeout = 15.0
    settings.watching.connect_timeout = 2.0
    settings.watching.reconnect_backoff = 0.05
    settings.persistence.consistency_timeout = 1.0
    settings.execution.default_backoff = 1.0  # retry arbitrary handler errors after 1s, not 60s


class Operator:
    """One operator run in a dedicated thread + event loop. Restartable: ``stop()`` then ``start()``."""

    _counter = itertools.count(1)

    def __init__(
        self,
        cluster: Cluster,
        registry: kopf.OperatorRegistry,
        *,
        clusterwide: bool,
        namespaces: Collection[str],
        memo: Any,
        configure: Callable[[kopf.OperatorSettings], None] | None,
        startup_timeout: float,
        stop_timeout: float,
        wait_watching: bool,
        log_level: int,
    ) -> None:
        self.cluster = cluster
        self.handlers_registry = registry
        self.clusterwide = clusterwide
        self.namespaces = list(namespaces)
        self.memo = memo
        self.configure = configure
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.wait_watching = wait_watching
        self.log_level = log_level
        self.settings: kopf.OperatorSettings | None = None
        self.thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # kopf's own loop, in its own thread
        self._stop_flag: asyncio.Event | None = None  # belongs to kopf's loop
        self._ready_flag = threading.Event()
        self._loop_ready = threading.Event()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopping = False
        self._old_log_level: int | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and not self._done.done()

    def _build_registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        for attr, handler in _handlers(self.handlers_registry):
            getattr(registry, attr).append(handler)
        url = self.cluster.url

        @kopf.on.login(registry=registry, id="integration-login")
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True, default_namespace="default")

        @kopf.on.startup(registry=registry, id="integration-settings")  # after the operator's own
        def _enforce(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.process.ultimate_exiting_timeout = None
            settings.peering.standalone = True
            if self.configure is not None:
                self.configure(settings)

        return registry

    async def start(self) -> Operator:
        if self.running:
            raise RuntimeError("The operator is already running.")
        self._ready_flag = threading.Event()
        self._loop_ready = threading.Event()
        self._done = concurrent.futures.Future()
        self._loop = self._stop_flag = None
        self._stopping = False
        self.settings = kopf.OperatorSettings()
        tune_settings(self.settings)
        if self.configure is not None:
            self.configure(self.settings)
        registry = self._build_registry()
        resources = self._watched_resources(registry)
        kopf_logger = logging.getLogger("kopf")
        self._old_log_level = kopf_logger.level
        kopf_logger.setLevel(self.log_level)
        first_request = len(self.cluster.emulator)  # kmock: the handler is a sequence of requests

        self.thread = threading.Thread(
            target=self._thread_main,
            args=(registry, self.settings),
            name=f"kopf-operator-{next(self._counter)}",
            daemon=True,
        )
        self.thread.start()
        self.cluster.operators.append(self)
        try:
            await wait_for(
                self._ready_flag.is_set,
                timeout=self.startup_timeout,
                health=self.check,
                description="the operator to start (kopf's ready flag)",
            )
            if self.wait_watching:
                await wait_for(
                    lambda: self._watching(resources, first_request),
                    timeout=self.startup_timeout,
                    health=self.check,
                    description=f"kopf to watch {sorted(resources)}",
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        return self

    def _thread_main(self, registry: kopf.OperatorRegistry, settings: kopf.OperatorSettings) -> None:
        async def main() -> None:
            # As kopf.operator(), but if kopf exits on its own (e.g. a failed startup), raise the
            # stop-flag at once: else its waiter is a "hung task" and kopf waits 5s for it.
            self._loop = asyncio.get_running_loop()
            self._stop_flag = stop_flag = asyncio.Event()
            self._loop_ready.set()
            existing = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            root_tasks = await kopf.spawn_tasks(
                registry=registry,
                settings=settings,
                memo=self.memo,
                standalone=True,
                clusterwide=self.clusterwide,
                namespaces=self.namespaces,
                stop_flag=stop_flag,
                ready_flag=self._ready_flag,
            )

            async def watchdog() -> None:
                await asyncio.wait(root_tasks, return_when=asyncio.FIRST_COMPLETED)
                stop_flag.set()

            existing.add(asyncio.create_task(watchdog(), name="integration-watchdog"))
            await kopf.run_tasks(root_tasks, ignored=existing)

        error: BaseException | None = None
        try:
            asyncio.run(main())
        except BaseException as e:
            error = e
        finally:
            settings.execution.executor.shutdown(wait=True, cancel_futures=True)  # kopf's sync handlers
            if error is None:
                self._done.set_result(None)  # the very last thing the thread does
            else:
                self._done.set_exception(error)

    def _watched_resources(self, registry: kopf.OperatorRegistry) -> set[str]:
        resources = [
            kopf.Resource(
                group=s.group,
                version=s.version,
                plural=s.plural,
                kind=s.kind,
                namespaced=s.namespaced,
                preferred=True,
                verbs=_VERBS,
                subresources=s.subresources,
            )
            for s in self.cluster.emulator.specs
        ]
        selected: set[str] = set()
        for attr in ("_indexing", "_watching", "_spawning", "_changing"):
            for handler in getattr(registry, attr).get_all_handlers():
                if handler.selector is not None:
                    matched = handler.selector.select(resources)
                    if not matched:  # kopf would only log it, and the test would time out
                        raise LookupError(
                            f"Handler {handler.id!r} serves {handler.selector}, which the emulator does not"
                            f" serve: add a ResourceSpec to KUBETUNE_RESOURCES or call k8s.register(...)."
                        )
                    selected |= {f"{r.group}/{r.version}/{r.plural}" for r in matched}
        return selected

    def _watching(self, resources: set[str], since: int) -> bool:
        watched = {
            f"{r.resource.group}/{r.resource.version}/{r.resource.plural}"
            for r in list(self.cluster.emulator)[since:]
            if r.action == kmock.action.WATCH and r.resource is not None
        }
        return resources <= watched

    def check(self) -> None:
        """Raise if the operator has exited without being asked to."""
        if self._done.done() and not self._stopping:
            error = self._done.exception()
            raise RuntimeError(f"The operator exited unexpectedly: {error!r}") from error

    async def quiesce(self, *, quiet: float = 0.1, timeout: float = 1.0) -> None:
        """
        Wait (best effort, at most ``timeout``) until all watch events are delivered and no API
        requests (except watches) came for ``quiet`` seconds. Otherwise, stopping kopf right after
        its own patch loses that patch's watch event, and kopf waits for it (consistency timeout).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        emulator = self.cluster.emulator
        count, since = emulator.activity, loop.time()
        while loop.time() < deadline and self.running:
            await asyncio.sleep(0.01)
            if emulator.activity != count:
                count, since = emulator.activity, loop.time()
            elif not emulator.undelivered_events and loop.time() - since >= quiet:
                return

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop kopf (after :meth:`quiesce` if ``graceful``) and wait for its thread to exit."""
        if self.thread is None:
            return
        if graceful:
            await self.quiesce()
        self._stopping = True
        try:
            await wait_for(
                lambda: self._loop_ready.is_set() or self._done.done(),
                timeout=self.stop_timeout,
                description="the operator's event loop to start",
            )
            if self._loop is not None and self._stop_flag is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    self._loop.call_soon_threadsafe(self._stop_flag.set)
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), self.stop_timeout)
            except TimeoutError:
                raise RuntimeError(f"The operator did not stop in {self.stop_timeout}s.") from None
            self.thread.join(timeout=1.0)  # it has nothing left to do but to return
            error = self._done.exception()
            if error is not None and not isinstance(error, asyncio.CancelledError):
                raise RuntimeError(f"The operator failed: {error!r}") from error
        finally:
            if self in self.cluster.operators:
                self.cluster.operators.remove(self)
            if self._old_log_level is not None:
                logging.getLogger("kopf").setLevel(self._old_log_level)
            self.thread = None

    async def restart(self) -> Operator:
        await self.stop()
        return await self.start()

    async def __aenter__(self) -> Operator:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class OperatorRunner:
    """``run_operator(*handler_modules, **options)`` -> an :class:`Operator` (an async context manager)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.created: list[Operator] = []

    def __call__(
        self,
        *handlers: str | types.ModuleType,
        registry: kopf.OperatorRegistry | None = None,
        clusterwide: bool = True,
        namespaces: Collection[str] = (),
        memo: Any = None,
        configure: Callable[[kopf.OperatorSettings], None] | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 15.0,
        wait_watching: bool = True,
        log_level: int = logging.DEBUG,
    ) -> Operator:
        """
        :param handlers: modules (or their names) whose kopf handlers to run, e.g.
            ``"kubetune.handlers.jobs"``. Only these handlers run, not the whole default registry.
        :param registry: an explicit registry instead of (or in addition to) the modules.
        :param clusterwide: serve all namespaces (default); or pass ``namespaces=["ns1", ...]``
            (exact names; patterns need ``settings.scanning.disabled = False`` + Namespace objects).
        :param configure: a callback to adjust the ``kopf.OperatorSettings`` (applied both before
            the start and after the operator's own startup handlers, so it wins).
        :param wait_watching: on start, also wait until kopf watches every handled resource.
        :param log_level: for the "kopf" loggers; pytest shows the captured logs on failures.
        """
        combined = load_registry(*handlers)
        if registry is not None:
            for attr, handler in _handlers(registry):
                getattr(combined, attr).append(handler)
        operator = Operator(
            self.cluster,
            combined,
            clusterwide=clusterwide and not namespaces,
            namespaces=namespaces,
            memo=memo,
            configure=configure,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            wait_watching=wait_watching,
            log_level=log_level,
        )
        self.created.append(operator)
        return operator


# --------------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------------


@pytest.fixture
async def k8s() -> AsyncIterator[Cluster]:
    """A started emulator on 127.0.0.1 with the kubetune + builtin resources registered."""
    emulator = KubeEmulator()
    emulator.register(*KUBETUNE_RESOURCES, *BUILTIN_RESOURCES)
    async with (
        emulator,
        kmock.Server(emulator, server_cls=_FastShutdownServer) as server,
        aiohttp.ClientSession(base_url=server.url) as session,
    ):
        yield Cluster(emulator, server, session)


@pytest.fixture
async def run_operator(k8s: Cluster) -> AsyncIterator[OperatorRunner]:
    """A factory of operators on the ``k8s`` emulator; any left running are stopped at teardown."""
    runner = OperatorRunner(k8s)
    try:
        yield runner
    finally:
        for operator in runner.created:
            await operator.stop()


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Awaitable[Any]]:
    """The generic poller: ``await wait_for(probe, predicate, timeout=...)`` (see :func:`wait_for`)."""
    return wait_for
