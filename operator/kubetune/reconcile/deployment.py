"""Observe -> plan -> act for a ModelDeployment, shared by the Kopf handlers and by `kubetune up`.

The decisions are pure and live in kubetune.plan (deployment, versions, gateway, deployment_status;
the canary state machine in kubetune.rollout is asked by planning only). This module does the I/O,
in one straight line. What differs between a cluster and a laptop is behind :class:`ServingBackend`:
Deployments, Services and a ConfigMap on a cluster; processes and a config file locally.

A pass is a coroutine: the operator awaits it on Kopf's event loop, where the backend's Kubernetes
calls and the Prometheus queries are awaited too; `kubetune up` runs it on an event loop of its own,
its local backend doing its blocking work in a worker thread.

One reconcile pass:

1. resolve each version's model (a job's published output, or a URI);
2. ``serving.ensure_versions`` with every version that has a model to serve -> URLs and readiness;
3. when planning asks for a canary analysis, query Prometheus for it;
4. plan: the weights (the rollout machine, with that analysis) and the gateway config;
5. ``serving.ensure_gateway`` with that config;
6. the status, the events to post and when to come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.validation import ResourceInvalid, parse_resource
from kubetune.common.events import Event
from kubetune.plan.deployment import AnalysisRequest, analysis_request, canary_facts, plan_deployment
from kubetune.plan.deployment_status import condition_events, deployment_status, invalid_status
from kubetune.plan.versions import (
    DeploymentRef,
    GatewayObservation,
    JobLookup,
    VersionObservation,
    VersionServing,
    resolve_versions,
    served_models,
    version_servings,
)
from kubetune.rollout.analysis import QueryClient, analyse, unavailable
from kubetune_contract.conditions import RECONCILING, find_condition
from kubetune_contract.deployment import AnalysisRun, ModelDeployment

__all__ = [
    "DeploymentOutcome",
    "DeploymentRef",
    "GatewayObservation",
    "JobLookup",
    "ServingBackend",
    "VersionObservation",
    "VersionServing",
    "deployment_ref",
    "reconcile_deployment",
    "remove_deployment",
]

POLL_S = 5.0  # how soon to look again while a model, a server or the gateway is on its way

# -- the serving backend: implemented for a cluster (Kubernetes children) and for local mode ---------
# DeploymentRef, VersionServing, VersionObservation and GatewayObservation live in
# kubetune.plan.versions (pure data) and are re-exported here.


class ServingBackend(Protocol):
    """Runs the model servers and the gateway of ModelDeployments. Calls are idempotent."""

    async def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        """Make exactly these versions' servers exist, as described; stop or delete any other version
        of this deployment. A version whose ``model_uri`` (or serving settings) changed is replaced.
        ``versions`` may be empty (every model still awaited).

        Returns an observation for every version passed in, by name.
        """
        ...

    async def ensure_gateway(
        self, deployment: DeploymentRef, config: Mapping[str, Any], replicas: int = 1
    ) -> GatewayObservation:
        """Make the deployment's gateway run with this config (the GatewayConfig JSON as a dict, camelCase
        keys; ConfigMap key ``gateway.json`` or a file). Only the config changes between calls as weights
        move: the gateway reloads it, so write it in place rather than restarting the gateway.
        ``replicas`` is ``spec.serving.gatewayReplicas``; a backend that runs one gateway process may
        ignore it.

        Called only once some version can take traffic; until then the deployment has no gateway.
        """
        ...

    async def remove(self, deployment: DeploymentRef) -> object:
        """Stop and delete everything serving this deployment (on deletion of the ModelDeployment).
        What it returns (a backend may say what it deleted) is not used."""
        ...


# -- one reconcile pass ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentOutcome:
    """What a pass decided: the status to write, the events to post, and when to come back (seconds;
    None: only when something changes)."""

    status: dict[str, Any]
    requeue_after: float | None
    events: list[Event] = field(default_factory=list)


def deployment_ref(body: Mapping[str, Any]) -> DeploymentRef:
    metadata = body.get("metadata") or {}
    return DeploymentRef(
        name=str(metadata.get("name")),
        namespace=str(metadata.get("namespace") or "default"),
        uid=metadata.get("uid"),
    )


async def remove_deployment(body: Mapping[str, Any], serving: ServingBackend) -> None:
    """Tear down what serves a deleted ModelDeployment."""
    await serving.remove(deployment_ref(body))


async def _analyse(
    request: AnalysisRequest, prometheus: QueryClient | None, deployment: str, now: datetime
) -> AnalysisRun:
    if prometheus is None:
        why = "no Prometheus is configured (KUBETUNE_PROMETHEUS_URL), so the metrics were not checked"
        return unavailable(request.metrics, why, now)
    return await analyse(request.metrics, prometheus, deployment, request.version, request.window_s, now)


async def reconcile_deployment(
    obj: Mapping[str, Any],
    *,
    lookup: JobLookup,
    serving: ServingBackend,
    prometheus: QueryClient | None,
    now: datetime | None = None,
    base_dir: Path | None = None,
) -> DeploymentOutcome:
    """One reconcile pass for a ModelDeployment (``obj``: the resource as a dict, with its status).

    ``lookup`` finds FineTuneJobs and QuantizeJobs; ``prometheus`` answers the canary analysis (None:
    the analysis is inconclusive, "no Prometheus is configured", which pauses the rollout once past
    ``analysis.inconclusiveLimit``); ``base_dir`` resolves relative model paths in local mode. Backend
    errors propagate (the caller retries).
    """
    moment = now or datetime.now(UTC)
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # conditions: whole seconds
    body = dict(obj)
    previous_status: dict[str, Any] = dict(body.get("status") or {})
    try:
        deployment = parse_resource(body, ModelDeployment)
    except ResourceInvalid as invalid:
        status = invalid_status(body, invalid.condition_message, stamp)
        return DeploymentOutcome(status, None, condition_events(previous_status, status))

    meta = deployment.metadata
    ref = DeploymentRef(meta.name, meta.namespace, meta.uid)
    resolved = resolve_versions(deployment.spec, meta.namespace, lookup, base_dir)
    served = served_models(resolved, previous_status)
    observed = await serving.ensure_versions(ref, version_servings(deployment, served, resolved))
    answering = {name: name in observed and observed[name].ready for name in served}
    current = {
        name: answering.get(name, False) and served.get(name) == version.model_uri
        for name, version in resolved.items()
    }
    urls = {
        name: observation.url for name, observation in observed.items() if observation.url and name in served
    }

    facts = canary_facts(deployment, previous_status, served, current)
    request = analysis_request(deployment, facts, moment)
    analysis = await _analyse(request, prometheus, meta.name, moment) if request is not None else None
    plan = plan_deployment(
        deployment, facts, answering=answering, urls=urls, analysis=analysis, now=moment, model_uris=served
    )

    gateway = GatewayObservation(endpoint=None, ready=False, message="no version is served yet")
    if plan.gateway_config is not None:
        gateway = await serving.ensure_gateway(
            ref, plan.gateway_config, replicas=deployment.spec.serving.gateway_replicas
        )

    status = deployment_status(
        deployment,
        previous_status,
        resolved=resolved,
        served=served,
        versions=observed,
        gateway=gateway,
        planned=plan.planned,
        effective=plan.effective,
        rollout=plan.rollout,
        now=stamp,
        spec_error=plan.spec_error,
    )
    waits = [plan.requeue_after] if plan.requeue_after is not None else []
    reconciling = find_condition(status["conditions"], RECONCILING) or {}
    if reconciling.get("status") == "True":
        waits.append(POLL_S)
    return DeploymentOutcome(
        status=status,
        requeue_after=min(waits) if waits else None,
        events=[*plan.events, *condition_events(previous_status, status)],
    )
