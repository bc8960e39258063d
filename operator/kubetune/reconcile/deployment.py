"""Observe -> plan -> act for a ModelDeployment, shared by the Kopf handlers and by `kubetune up`.

The decisions are in kubetune.plan.deployment (which model each version serves, the gateway config,
the status) and kubetune.rollout (the canary state machine and its metric analysis). What differs
between a cluster and a laptop is behind :class:`ServingBackend`: Deployments, Services and a
ConfigMap on a cluster; processes and a config file locally.

One reconcile pass:

1. resolve each version's model (a job's published output, or a URI);
2. ``serving.ensure_versions`` with every version that has a model to serve -> URLs and readiness;
3. the rollout machine decides the weights (querying Prometheus when an analysis is due);
4. ``serving.ensure_gateway`` with the gateway config built from those URLs and weights;
5. the status, the events to post and when to come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from kubetune.api.validation import ResourceInvalid, parse_resource
from kubetune.common.events import Event
from kubetune.plan.deployment import (
    DeploymentRef,
    GatewayConfigInvalid,
    GatewayObservation,
    JobLookup,
    VersionObservation,
    VersionServing,
    condition_events,
    deployment_status,
    effective_weights,
    gateway_config,
    invalid_status,
    resolve_versions,
    served_models,
    version_servings,
)
from kubetune.rollout.analysis import QueryClient, analyse, unavailable
from kubetune.rollout.machine import RolloutDecision, plan_rollout
from kubetune_contract.conditions import find_condition
from kubetune_contract.deployment import AnalysisRun, ModelDeployment, RolloutStatus, duration_seconds

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
# kubetune.plan.deployment (pure data) and are re-exported here.


class ServingBackend(Protocol):
    """Runs the model servers and the gateway of ModelDeployments. Calls are idempotent."""

    def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        """Make exactly these versions' servers exist, as described; stop or delete any other version
        of this deployment. A version whose ``model_uri`` (or serving settings) changed is replaced.
        ``versions`` may be empty (every model still awaited).

        Returns an observation for every version passed in, by name.
        """
        ...

    def ensure_gateway(self, deployment: DeploymentRef, config: Mapping[str, Any]) -> GatewayObservation:
        """Make the deployment's gateway run with this config (the GatewayConfig JSON as a dict, camelCase
        keys; ConfigMap key ``gateway.json`` or a file). Only the config changes between calls as weights
        move: the gateway reloads it, so write it in place rather than restarting the gateway.

        Called only once some version can take traffic; until then the deployment has no gateway.
        """
        ...

    def remove(self, deployment: DeploymentRef) -> None:
        """Stop and delete everything serving this deployment (on deletion of the ModelDeployment)."""
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


def remove_deployment(body: Mapping[str, Any], serving: ServingBackend) -> None:
    """Tear down what serves a deleted ModelDeployment."""
    serving.remove(deployment_ref(body))


def _previous_rollout(status: Mapping[str, Any]) -> RolloutStatus | None:
    raw = status.get("rollout")
    if not raw:
        return None
    try:
        return RolloutStatus.model_validate(raw)
    except ValidationError:
        return None  # not written by this version of the operator: start the machine afresh


def reconcile_deployment(
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
    the analysis is recorded as inconclusive, "no Prometheus configured"); ``base_dir`` resolves
    relative model paths in local mode. Backend errors propagate (the caller retries).
    """
    moment = now or datetime.now(UTC)
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = dict(obj)
    previous_status: dict[str, Any] = dict(body.get("status") or {})
    try:
        deployment = parse_resource(body, ModelDeployment)
    except ResourceInvalid as invalid:
        status = invalid_status(body, invalid.condition_message, stamp)
        return DeploymentOutcome(status, None, condition_events(previous_status, status))

    meta, spec = deployment.metadata, deployment.spec
    ref = DeploymentRef(meta.name, meta.namespace, meta.uid)
    resolved = resolve_versions(spec, meta.namespace, lookup, base_dir)
    served = served_models(resolved, previous_status)
    observed = serving.ensure_versions(ref, version_servings(deployment, served))
    answering = {name: name in observed and observed[name].ready for name in served}
    current = {
        name: answering.get(name, False) and served.get(name) == version.model_uri
        for name, version in resolved.items()
    }

    before = {
        str(item.get("name")): item
        for item in previous_status.get("versions") or []
        if isinstance(item, Mapping)
    }
    observed_generation = previous_status.get("observedGeneration")
    canary = spec.canary.name if spec.canary is not None else None
    canary_model_changed = False
    if canary is not None:
        served_before = before.get(canary, {}).get("modelUri")
        canary_model_changed = bool(served_before) and canary in served and served[canary] != served_before

    def decide(analysis_run: AnalysisRun | None = None) -> RolloutDecision:
        return plan_rollout(
            spec,
            _previous_rollout(previous_status),
            first_sight=observed_generation is None,
            spec_changed=observed_generation is not None and observed_generation != meta.generation,
            previous_weights={name: int(item.get("weight") or 0) for name, item in before.items()},
            canary_model_changed=canary_model_changed,
            canary_ready=canary is not None and current.get(canary, False),
            analysis=analysis_run,
            now=moment,
        )

    decision = decide()
    if decision.analysis_due and spec.rollout is not None and canary is not None:
        metrics = spec.rollout.analysis.metrics
        if prometheus is None:
            run = unavailable(metrics, "no Prometheus is configured, so the metrics were not checked", moment)
        else:
            window = duration_seconds(spec.rollout.analysis.window)
            run = analyse(metrics, prometheus, meta.name, canary, window, moment)
        decision = decide(run)

    urls = {
        name: observation.url for name, observation in observed.items() if observation.url and name in served
    }
    # Only a version with a URL can be in the gateway config, so only those may keep a share.
    effective = effective_weights(decision.weights, answering, set(urls))
    spec_error: str | None = None
    gateway = GatewayObservation(endpoint=None, ready=False, message="no version is served yet")
    try:
        config = gateway_config(deployment, urls, effective)
    except GatewayConfigInvalid as invalid_config:
        config, spec_error = None, str(invalid_config)
    if config is not None:
        gateway = serving.ensure_gateway(ref, config)

    status = deployment_status(
        deployment,
        previous_status,
        resolved=resolved,
        served=served,
        versions=observed,
        gateway=gateway,
        planned=decision.weights,
        effective=effective,
        rollout=decision.rollout,
        now=stamp,
        spec_error=spec_error,
    )
    waits = [decision.requeue_after] if decision.requeue_after is not None else []
    reconciling = find_condition(status["conditions"], "Reconciling") or {}
    if reconciling.get("status") == "True":
        waits.append(POLL_S)
    return DeploymentOutcome(
        status=status,
        requeue_after=min(waits) if waits else None,
        events=[*decision.events, *condition_events(previous_status, status)],
    )
