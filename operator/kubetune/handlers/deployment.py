"""Kopf handlers of ModelDeployments: reconcile each one through the shared brain on a schedule.

One timer per ModelDeployment ticks every KUBETUNE_RECONCILE_INTERVAL seconds and awaits a pass of
:func:`kubetune.reconcile.deployment.reconcile_deployment` when one is due
(:mod:`kubetune.reconcile.schedule`): at once for a new generation, within a tick when one of its
Deployments changes (a watch of Deployments labelled ``kubetune.dev/deployment``), when the previous
pass asked to come back, and after a failed pass with a growing backoff.

Only the timer writes the status, so two passes never race (a change handler next to the timer
would run concurrently with it). Children are Kubernetes objects owned by the ModelDeployment
(:class:`kubetune.kube.serving.KubernetesServing`); deleting the ModelDeployment lets the garbage
collector delete them, so there is no delete handler (Kopf's finalizer is there only to stop the
timer).

The pass runs on Kopf's event loop: its Kubernetes calls are coroutines of lightkube's AsyncClient and
its Prometheus queries of httpx's. Both clients are made at startup, the Kubernetes one from the
credentials the operator logs Kopf in with (:mod:`kubetune.handlers.login`), and closed at cleanup.
Settings: :class:`kubetune.config.DeploymentSettings`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from lightkube import AsyncClient

from kubetune.config import DeploymentSettings, OperatorConfig
from kubetune.handlers.metrics import METRICS
from kubetune.kube.children import DEPLOYMENT_LABEL, ChildImages
from kubetune.kube.client import async_client, cluster_config
from kubetune.kube.serving import KubernetesServing
from kubetune.reconcile.deployment import DeploymentOutcome, JobLookup, reconcile_deployment
from kubetune.reconcile.schedule import Schedules
from kubetune.rollout.prometheus import PrometheusClient
from kubetune_contract.common import GROUP, VERSION
from kubetune_contract.deployment import PLURAL

KIND = "ModelDeployment"
_INTERVAL_S = OperatorConfig.from_env().reconcile_interval_s
_MEMO_KEY = "modeldeployments"


@dataclass
class DeploymentRuntime:
    """The handlers' state in the operator's memo."""

    settings: DeploymentSettings
    prometheus: PrometheusClient | None
    client: AsyncClient
    schedules: Schedules = field(default_factory=Schedules)

    def serving(self) -> KubernetesServing:
        images = ChildImages(
            serving=self.settings.serving_image,
            gateway=self.settings.gateway_image,
            vllm_serving=self.settings.vllm_serving_image,
        )
        return KubernetesServing(
            self.client,
            images,
            retire_after_s=self.settings.retire_after_s,
            prometheus_url=self.settings.prometheus_url,
        )


def _runtime(memo: kopf.Memo) -> DeploymentRuntime:
    runtime = memo.get(_MEMO_KEY)
    if not isinstance(runtime, DeploymentRuntime):
        raise RuntimeError("the ModelDeployment handlers' startup handler has not run")
    return runtime


@kopf.on.startup()
async def configure_modeldeployments(memo: kopf.Memo, **_: Any) -> None:
    """Read the settings at startup, so a bad value stops the operator with a clear message."""
    settings = DeploymentSettings.from_env()
    url = settings.prometheus_url
    memo[_MEMO_KEY] = DeploymentRuntime(
        settings=settings,
        prometheus=PrometheusClient(url) if url else None,
        client=async_client(cluster_config()),
    )


@kopf.on.cleanup()
async def close_clients(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get(_MEMO_KEY)
    if isinstance(runtime, DeploymentRuntime):
        await runtime.client.close()
        if runtime.prometheus is not None:
            await runtime.prometheus.aclose()


# ---- the jobs a version's model comes from ----------------------------------------------------------


# Async, as the jobs' own index (handlers/jobs.py): no worker-thread hop for each watch event.
@kopf.index(GROUP, VERSION, "finetunejobs")
async def mdep_finetunejobs(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """FineTuneJobs by (namespace, name), for versions that serve their published model."""
    return {(namespace, name): {"spec": dict(spec), "status": dict(status)}}


@kopf.index(GROUP, VERSION, "quantizejobs")
async def mdep_quantizejobs(
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
    lookup = job_lookup(kwargs["mdep_finetunejobs"], kwargs["mdep_quantizejobs"])
    try:
        with METRICS.reconcile(KIND):
            outcome = await reconcile_deployment(
                copy.deepcopy(dict(body)),
                lookup=lookup,
                serving=runtime.serving(),
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
