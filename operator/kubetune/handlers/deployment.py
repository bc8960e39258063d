"""Kopf handlers of ModelDeployments: reconcile each one through the shared brain on a schedule.

One timer per ModelDeployment ticks every KUBETUNE_RECONCILE_INTERVAL seconds and runs a pass of
:func:`kubetune.reconcile.deployment.reconcile_deployment` when one is due:

* at once for a generation it has not reconciled yet (creation, any spec change: weights, versions,
  prompts), so a spec change takes effect within one tick;
* when one of its Deployments changes (a watch of Deployments labelled ``kubetune.dev/deployment``),
  so readiness shows in the status within one tick;
* when the previous pass asked to come back (``requeue_after``: a rollout step, a model on its way),
  and at the latest after :data:`RESYNC_S`;
* after a failed pass, with a growing backoff (:data:`ERROR_BACKOFF_S`).

Only the timer writes the status, so two passes never race (a change handler next to the timer
would run concurrently with it). Children are Kubernetes objects owned by the ModelDeployment
(:class:`kubetune.kube.serving.KubernetesServing`); deleting the ModelDeployment lets the garbage
collector delete them, so there is no delete handler (Kopf's finalizer is there only to stop the
timer).

The pass runs in a worker thread (the brain and the ServingBackend protocol are synchronous, and it
queries Prometheus); its Kubernetes API calls are coroutines of lightkube's AsyncClient, awaited on
Kopf's event loop where the client lives (:class:`ServingFromWorkerThread`). The client is made at
startup from the credentials the operator logs Kopf in with (:mod:`kubetune.handlers.login`).

Settings (environment; see :class:`DeploymentSettings`): KUBETUNE_SERVING_IMAGE (default: the
runtime image, KUBETUNE_RUNTIME_IMAGE), KUBETUNE_GATEWAY_IMAGE (default: the operator's image),
KUBETUNE_PROMETHEUS_URL (unset: canary analyses are recorded as inconclusive) and
KUBETUNE_RETIRE_GRACE_SECONDS (how long a removed version keeps serving, see
:data:`kubetune.kube.serving.RETIRE_AFTER_S`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from lightkube import AsyncClient

from kubetune.config import OperatorConfig
from kubetune.handlers.metrics import METRICS
from kubetune.kube.children import DEFAULT_GATEWAY_IMAGE, DEPLOYMENT_LABEL, ChildImages
from kubetune.kube.client import async_client, cluster_config
from kubetune.kube.serving import RETIRE_AFTER_S, KubernetesServing
from kubetune.reconcile.deployment import (
    DeploymentOutcome,
    DeploymentRef,
    GatewayObservation,
    JobLookup,
    VersionObservation,
    VersionServing,
    reconcile_deployment,
)
from kubetune.rollout.analysis import QueryClient
from kubetune.rollout.prometheus import PrometheusClient
from kubetune_contract.common import GROUP, VERSION
from kubetune_contract.deployment import PLURAL

KIND = "ModelDeployment"
RESYNC_S = 30.0
ERROR_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)
_INTERVAL_S = OperatorConfig.from_env().reconcile_interval_s
_MEMO_KEY = "modeldeployments"
API_TIMEOUT_S = 60.0  # one serving call (a few API requests) from the reconcile's worker thread

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentSettings:
    """What the ModelDeployment handlers need from the operator's environment."""

    images: ChildImages
    prometheus_url: str | None
    retire_after_s: float = RETIRE_AFTER_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DeploymentSettings:
        env = dict(os.environ) if env is None else dict(env)
        runtime_image = OperatorConfig.from_env(env).runtime_image
        url = env.get("KUBETUNE_PROMETHEUS_URL", "").strip() or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"KUBETUNE_PROMETHEUS_URL must be an http:// or https:// URL, not {url!r}")
        grace = env.get("KUBETUNE_RETIRE_GRACE_SECONDS", "").strip()
        try:
            retire_after_s = float(grace) if grace else RETIRE_AFTER_S
        except ValueError:
            retire_after_s = -1.0
        if not 0 <= retire_after_s < float("inf"):
            raise ValueError(f"KUBETUNE_RETIRE_GRACE_SECONDS must be a number of seconds >= 0, not {grace!r}")
        return cls(
            images=ChildImages(
                serving=env.get("KUBETUNE_SERVING_IMAGE", "").strip() or runtime_image,
                gateway=env.get("KUBETUNE_GATEWAY_IMAGE", "").strip() or DEFAULT_GATEWAY_IMAGE,
            ),
            prometheus_url=url,
            retire_after_s=retire_after_s,
        )


@dataclass
class _Schedule:
    """When one ModelDeployment is next due, and the generation last reconciled."""

    generation: int | None = None
    due: float = 0.0
    failures: int = 0


@dataclass
class Schedules:
    """When each ModelDeployment (by uid) is next due for a reconcile pass."""

    by_uid: dict[str, _Schedule] = field(default_factory=dict)

    def due(self, uid: str, generation: int | None, now: float) -> bool:
        schedule = self.by_uid.get(uid)
        return schedule is None or schedule.generation != generation or now >= schedule.due

    def done(self, uid: str, generation: int | None, now: float, requeue_after: float | None) -> None:
        wait = RESYNC_S if requeue_after is None else min(max(requeue_after, 0.0), RESYNC_S)
        self.by_uid[uid] = _Schedule(generation=generation, due=now + wait)

    def poke(self, uid: str) -> None:
        """Make a reconciled deployment due at the next tick (something it owns changed)."""
        schedule = self.by_uid.get(uid)
        if schedule is not None and schedule.failures == 0:
            schedule.due = 0.0

    def failed(self, uid: str, generation: int | None, now: float) -> None:
        failures = self.by_uid[uid].failures + 1 if uid in self.by_uid else 1
        backoff = ERROR_BACKOFF_S[min(failures, len(ERROR_BACKOFF_S)) - 1]
        self.by_uid[uid] = _Schedule(generation=generation, due=now + backoff, failures=failures)

    def forget(self, uid: str) -> None:
        self.by_uid.pop(uid, None)


@dataclass
class DeploymentRuntime:
    """The handlers' state in the operator's memo."""

    settings: DeploymentSettings
    prometheus: QueryClient | None
    client: AsyncClient
    schedules: Schedules = field(default_factory=Schedules)


def _runtime(memo: kopf.Memo) -> DeploymentRuntime:
    runtime = memo.get(_MEMO_KEY)
    if not isinstance(runtime, DeploymentRuntime):
        raise RuntimeError("the ModelDeployment handlers' startup handler has not run")
    return runtime


@kopf.on.startup()
def configure_modeldeployments(memo: kopf.Memo, **_: Any) -> None:
    """Read the settings at startup, so a bad value stops the operator with a clear message."""
    deployment_settings = DeploymentSettings.from_env()
    url = deployment_settings.prometheus_url
    memo[_MEMO_KEY] = DeploymentRuntime(
        settings=deployment_settings,
        prometheus=PrometheusClient(url) if url else None,
        client=async_client(cluster_config()),
    )


@kopf.on.cleanup()
async def close_kubernetes_client(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get(_MEMO_KEY)
    if isinstance(runtime, DeploymentRuntime):
        await runtime.client.close()


class ServingFromWorkerThread:
    """The synchronous ServingBackend the reconcile calls from its worker thread.

    Each call awaits the :class:`KubernetesServing` coroutine on the operator's event loop, which
    owns the client's connections, and waits for it at most :data:`API_TIMEOUT_S`.
    """

    def __init__(self, serving: KubernetesServing, loop: asyncio.AbstractEventLoop) -> None:
        self.serving = serving
        self.loop = loop

    def _wait(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self.loop).result(API_TIMEOUT_S)

    def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        return self._wait(self.serving.ensure_versions(deployment, versions))

    def ensure_gateway(self, deployment: DeploymentRef, config: Mapping[str, Any]) -> GatewayObservation:
        return self._wait(self.serving.ensure_gateway(deployment, config))

    def remove(self, deployment: DeploymentRef) -> None:
        self._wait(self.serving.remove(deployment))


# ---- the jobs a version's model comes from ----------------------------------------------------------


@kopf.index(GROUP, VERSION, "finetunejobs")
def mdep_finetunejobs(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """FineTuneJobs by (namespace, name), for versions that serve their published model."""
    return {(namespace, name): {"spec": dict(spec), "status": dict(status)}}


@kopf.index(GROUP, VERSION, "quantizejobs")
def mdep_quantizejobs(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """QuantizeJobs by (namespace, name), for versions that serve their published model."""
    return {(namespace, name): {"spec": dict(spec), "status": dict(status)}}


def job_lookup(
    finetunejobs: kopf.Index[tuple[str | None, str], dict[str, Any]],
    quantizejobs: kopf.Index[tuple[str | None, str], dict[str, Any]],
) -> JobLookup:
    indexes = {"FineTuneJob": finetunejobs, "QuantizeJob": quantizejobs}

    def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        index = indexes.get(kind)
        if index is None:
            raise ValueError(f"no index of {kind!r}: only FineTuneJob and QuantizeJob serve models")
        for value in index.get((namespace, name), []):
            return copy.deepcopy(value)
        return None

    return lookup


# ---- the reconcile ----------------------------------------------------------------------------------


def _status_patch(current: Mapping[str, Any], planned: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch from the current status to the planned one (None removes a key)."""
    changes: dict[str, Any] = {key: value for key, value in planned.items() if current.get(key) != value}
    changes |= {key: None for key in current if key not in planned}
    return changes


def _write(outcome: DeploymentOutcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in _status_patch(dict(body.get("status") or {}), outcome.status).items():
        patch.status[key] = value
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])


@kopf.timer(GROUP, VERSION, PLURAL, interval=_INTERVAL_S, initial_delay=0)
async def reconcile_modeldeployment(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    runtime = _runtime(memo)
    uid = str(body.metadata.uid)
    generation = body.metadata.get("generation")
    if not runtime.schedules.due(uid, generation, time.monotonic()):
        return
    serving = KubernetesServing(
        runtime.client, runtime.settings.images, retire_after_s=runtime.settings.retire_after_s
    )
    lookup = job_lookup(kwargs["mdep_finetunejobs"], kwargs["mdep_quantizejobs"])
    try:
        with METRICS.reconcile(KIND):
            outcome = await asyncio.to_thread(
                reconcile_deployment,
                copy.deepcopy(dict(body)),
                lookup=lookup,
                serving=ServingFromWorkerThread(serving, asyncio.get_running_loop()),
                prometheus=runtime.prometheus,
            )
    except Exception:
        runtime.schedules.failed(uid, generation, time.monotonic())
        raise
    runtime.schedules.done(uid, generation, time.monotonic(), outcome.requeue_after)
    _write(outcome, body, patch)


@kopf.on.event(GROUP, VERSION, PLURAL)
def observe_modeldeployment(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the rollouts gauge current, and forget a deleted deployment's schedule."""
    namespace, name = body.metadata.namespace, str(body.metadata.name)
    if type == "DELETED":
        METRICS.observe_rollout(namespace, name, None)
        _runtime(memo).schedules.forget(str(body.metadata.uid))
        return
    rollout = (body.get("status") or {}).get("rollout") or {}
    METRICS.observe_rollout(namespace, name, rollout.get("state"))


@kopf.on.event("apps", "v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def notice_child_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Deployment of a ModelDeployment changed (pods became ready, or went away): look again soon."""
    for owner in body.metadata.get("ownerReferences") or []:
        if owner.get("kind") == KIND and owner.get("controller"):
            _runtime(memo).schedules.poke(str(owner.get("uid")))
