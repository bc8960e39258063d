"""Planning for ModelDeployment: the one decision of a pass, from what was observed to what to serve.

Pure, like the modules it draws on: which model each version serves (kubetune.plan.versions), the
canary state machine (kubetune.rollout.machine, asked once per pass), the gateway's config
(kubetune.plan.gateway) and the status (kubetune.plan.deployment_status). The reconciler does the
I/O around it: it observes the servers, runs the analysis :func:`analysis_request` asks for, then
calls :func:`plan_deployment` and carries the plan out.

Weights, three ways:
- spec weights: what the user asked for;
- planned weights: what the rollout machine decides (the spec weights, or a canary step's split);
- effective weights: what the gateway is told. A version that does not answer yet gives its planned
  share to the versions that do, in proportion to theirs, so traffic never goes to a server that is
  still starting or to a model that is still being trained. ``status.versions[].weight`` and
  ``status.weights`` show these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.common.events import Event
from kubetune.plan.gateway import GatewayConfigInvalid, effective_weights, gateway_config
from kubetune.rollout.machine import analysis_due, plan_rollout
from kubetune_contract.deployment import (
    AnalysisMetric,
    AnalysisRun,
    ModelDeployment,
    RolloutStatus,
    duration_seconds,
)


@dataclass(frozen=True)
class CanaryFacts:
    """What the rollout machine is told about the canary, from the last status and this pass."""

    previous: RolloutStatus | None  # status.rollout as it was
    first_sight: bool  # never reconciled (no status.observedGeneration)
    spec_changed: bool  # the generation moved since the last pass
    previous_weights: dict[str, int]  # the weights the status showed
    model_changed: bool  # the canary is now served with another model than before this pass
    ready: bool  # the canary's server answers with its current model


def _previous_rollout(status: Mapping[str, Any]) -> RolloutStatus | None:
    raw = status.get("rollout")
    if not raw:
        return None
    try:
        return RolloutStatus.model_validate(raw)
    except ValidationError:
        return None  # not written by this version of the operator: start the machine afresh


def canary_facts(
    deployment: ModelDeployment,
    previous_status: Mapping[str, Any],
    served: Mapping[str, str],
    current: Mapping[str, bool],
) -> CanaryFacts:
    """``served``: the model URI each version is served with; ``current``: which versions answer with
    the model they should serve."""
    before = {
        str(item.get("name")): item
        for item in previous_status.get("versions") or []
        if isinstance(item, Mapping)
    }
    observed_generation = previous_status.get("observedGeneration")
    generation = deployment.metadata.generation
    canary = deployment.spec.canary.name if deployment.spec.canary is not None else None
    model_changed = False
    if canary is not None:
        served_before = before.get(canary, {}).get("modelUri")
        model_changed = bool(served_before) and canary in served and served[canary] != served_before
    return CanaryFacts(
        previous=_previous_rollout(previous_status),
        first_sight=observed_generation is None,
        spec_changed=observed_generation is not None and observed_generation != generation,
        previous_weights={name: int(item.get("weight") or 0) for name, item in before.items()},
        model_changed=model_changed,
        ready=canary is not None and current.get(canary, False),
    )


@dataclass(frozen=True)
class AnalysisRequest:
    """The canary analysis a pass needs: these metrics of this version over the last ``window_s``."""

    metrics: list[AnalysisMetric]
    version: str
    window_s: float


def analysis_request(
    deployment: ModelDeployment, facts: CanaryFacts, now: datetime
) -> AnalysisRequest | None:
    """The analysis to run before :func:`plan_deployment` can decide this pass, if one is due."""
    spec = deployment.spec
    if spec.rollout is None or spec.canary is None:
        return None
    due = analysis_due(
        spec,
        facts.previous,
        first_sight=facts.first_sight,
        spec_changed=facts.spec_changed,
        previous_weights=facts.previous_weights,
        canary_model_changed=facts.model_changed,
        canary_ready=facts.ready,
        now=now,
    )
    if not due:
        return None
    analysis = spec.rollout.analysis
    return AnalysisRequest(list(analysis.metrics), spec.canary.name, duration_seconds(analysis.window))


@dataclass(frozen=True)
class DeploymentPlan:
    """What a pass decided before acting.

    ``planned``/``effective``: the weights (see the module's docstring); ``gateway_config``: the
    GatewayConfig JSON to run the gateway with (None: no version can take traffic yet, or the spec
    makes a config the gateway would refuse, ``spec_error`` then says why).
    """

    planned: dict[str, int]
    effective: dict[str, int]
    rollout: RolloutStatus | None
    gateway_config: dict[str, Any] | None
    spec_error: str | None = None
    requeue_after: float | None = None
    events: list[Event] = field(default_factory=list)


def plan_deployment(
    deployment: ModelDeployment,
    facts: CanaryFacts,
    *,
    answering: Mapping[str, bool],
    urls: Mapping[str, str],
    analysis: AnalysisRun | None,
    now: datetime,
    model_uris: Mapping[str, str] | None = None,
) -> DeploymentPlan:
    """Decide the weights (through the rollout machine, with ``analysis`` when one was due) and the
    gateway config for the versions that have a URL. ``answering``: which served versions answer;
    ``model_uris``: the model each serves (the gateway links their model cards)."""
    decision = plan_rollout(
        deployment.spec,
        facts.previous,
        first_sight=facts.first_sight,
        spec_changed=facts.spec_changed,
        previous_weights=facts.previous_weights,
        canary_model_changed=facts.model_changed,
        canary_ready=facts.ready,
        analysis=analysis,
        now=now,
    )
    # Only a version with a URL can be in the gateway config, so only those may keep a share. A version
    # scaling to zero keeps its share while it is asleep: the gateway holds its requests, which wakes it.
    autoscaling = deployment.spec.serving.autoscaling
    weighing = answering
    if autoscaling is not None and autoscaling.scales_to_zero:
        weighing = {name: bool(answering.get(name)) or name in urls for name in decision.weights}
    effective = effective_weights(decision.weights, weighing, set(urls))
    config: dict[str, Any] | None = None
    spec_error: str | None = None
    try:
        config = gateway_config(deployment, urls, effective, ready=answering, model_uris=model_uris)
    except GatewayConfigInvalid as invalid:
        spec_error = str(invalid)
    return DeploymentPlan(
        planned=decision.weights,
        effective=effective,
        rollout=decision.rollout,
        gateway_config=config,
        spec_error=spec_error,
        requeue_after=decision.requeue_after,
        events=decision.events,
    )
