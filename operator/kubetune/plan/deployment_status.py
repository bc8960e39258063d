"""The status of a ModelDeployment: each version's state, the verdict in four conditions, the events.

Conditions (``status.conditions``), set on first sight:
- ``Ready``: True when every version with a planned weight above 0 serves its spec'd model and the
  gateway is up; a version scaled to zero (minReplicas 0) counts as up, its next request held by the
  gateway (Knative's and KServe's convention). Reasons: AllVersionsReady, ScaledToZero;
  WaitingForModel, VersionNotReady, GatewayNotReady (on their way); ModelFailed, ModelInvalid,
  RolledBack, RolloutPaused, AnalysisInconclusive, InvalidSpec (a person must act; see Stalled).
- ``Progressing``: True while a model is awaited, a server or the gateway is starting, or a canary
  rollout is under way; False with RolloutComplete (spec.rollout set) or Stable when done, or with
  the Stalled reason.
- ``Reconciling`` / ``Stalled``: the kstatus conventions (kstatus reads only these and
  observedGeneration for custom resources). Reconciling mirrors Progressing, so a rollout or a wait
  reads InProgress. Stalled is True when the operator cannot get further without a person: a model's
  job failed, a version's model cannot be served (ModelInvalid: its build failed the same way twice;
  it is not retried until the model or the spec changes), the spec is invalid, or the canary's
  analysis stopped the rollout — RolledBack (the stable versions keep serving, but the spec is not
  realised until someone fixes the canary and edits the spec), Paused on a failed analysis with
  autoRollback off (RolloutPaused), or Paused after more inconclusive analyses in a row than
  analysis.inconclusiveLimit (AnalysisInconclusive: the metrics could not be measured). kstatus
  reads those as Failed; Ready is then False too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from kubetune.common.events import Event
from kubetune.plan.versions import GatewayObservation, ResolvedVersion, VersionObservation, bento_tag
from kubetune.rollout.weights import format_weights
from kubetune_contract.common import Condition
from kubetune_contract.conditions import READY, RECONCILING, STALLED, find_condition, set_condition
from kubetune_contract.deployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    RolloutStatus,
    VersionStatus,
)

PROGRESSING = "Progressing"


# (rollout state, rollout reason) -> the conditions' reason when the canary's analysis stopped the rollout.
_STOPPED_REASONS: dict[tuple[str, str | None], str] = {
    ("RolledBack", "AnalysisFailed"): "RolledBack",
    ("RolledBack", None): "RolledBack",  # written before rollouts carried a reason
    ("Paused", "AnalysisFailed"): "RolloutPaused",
    ("Paused", None): "RolloutPaused",
    ("Paused", "AnalysisInconclusive"): "AnalysisInconclusive",
}


@dataclass(frozen=True)
class _Verdict:
    ready: tuple[str, str, str]  # status, reason, message
    progressing: tuple[str, str, str]
    stalled: bool
    phase: str


def _verdict(
    spec: ModelDeploymentSpec,
    resolved: Mapping[str, ResolvedVersion],
    version_status: Sequence[VersionStatus],
    gateway: GatewayObservation,
    planned: Mapping[str, int],
    effective: Mapping[str, int],
    rollout: RolloutStatus | None,
    spec_error: str | None,
    unservable: Mapping[str, str],
    sleeping: Collection[str] = (),
) -> _Verdict:
    """``unservable``: the versions whose backend gave up on them (see VersionObservation.failed),
    with why; ``sleeping``: those scaled to zero (VersionObservation.scaled_to_zero), which do not make
    the deployment not ready (as in Knative and KServe): Ready stays True with reason ScaledToZero."""
    if spec_error is not None:
        return _Verdict(
            ("False", "InvalidSpec", spec_error), ("False", "InvalidSpec", spec_error), True, "Failed"
        )
    failed = [resolved[v.name] for v in spec.versions if resolved[v.name].state == "failed"]
    if failed:
        message = "; ".join(f"version {r.name}: {r.message}" for r in failed)
        return _Verdict(("False", "ModelFailed", message), ("False", "ModelFailed", message), True, "Failed")
    if unservable:
        message = "; ".join(f"version {name}: {why}" for name, why in unservable.items())
        return _Verdict(
            ("False", "ModelInvalid", message), ("False", "ModelInvalid", message), True, "Failed"
        )
    if rollout is not None and rollout.state in ("RolledBack", "Paused"):
        reason = _STOPPED_REASONS[(rollout.state, rollout.reason)]
        message = f"{rollout.message} (serving {format_weights(effective)})"
        return _Verdict(("False", reason, message), ("False", reason, message), True, rollout.state)

    waiting = [resolved[v.name] for v in spec.versions if resolved[v.name].state == "waiting"]
    weighted_waiting = [r for r in waiting if planned.get(r.name, 0) > 0]
    not_ready = [status for status in version_status if not status.ready and planned.get(status.name, 0) > 0]
    weighted_not_ready = [
        s for s in not_ready if resolved[s.name].state == "ready" and s.name not in sleeping
    ]
    weighted_sleeping = [s.name for s in not_ready if s.name in sleeping]
    rolling = rollout is not None and rollout.state == "Progressing"

    if weighted_waiting:
        ready = (
            "False",
            "WaitingForModel",
            "; ".join(f"version {r.name}: {r.message}" for r in weighted_waiting),
        )
    elif weighted_not_ready:
        details = "; ".join(f"version {s.name}: {s.message or 'not ready'}" for s in weighted_not_ready)
        ready = ("False", "VersionNotReady", details)
    elif not gateway.ready:
        ready = ("False", "GatewayNotReady", f"the gateway is not ready: {gateway.message or 'starting'}")
    elif weighted_sleeping:
        asleep = ", ".join(weighted_sleeping)
        ready = (
            "True",
            "ScaledToZero",
            f"serving {format_weights(effective)} at {gateway.endpoint}; scaled to zero (minReplicas 0): "
            f"{asleep}, whose next request the gateway holds while it starts",
        )
    else:
        ready = ("True", "AllVersionsReady", f"serving {format_weights(effective)} at {gateway.endpoint}")

    if waiting:
        progressing = (
            "True",
            "WaitingForModel",
            "; ".join(f"version {r.name}: {r.message}" for r in waiting),
        )
    elif weighted_not_ready:
        progressing = ("True", "WaitingForVersions", ready[2])
    elif not gateway.ready:
        progressing = ("True", "WaitingForGateway", ready[2])
    elif rolling and rollout is not None:
        progressing = ("True", "RolloutInProgress", rollout.message)
    elif rollout is not None:
        progressing = ("False", "RolloutComplete", rollout.message)
    else:
        progressing = ("False", "Stable", f"serving {format_weights(effective)}")

    if ready[0] == "True":
        phase = "Progressing" if progressing[0] == "True" else "Ready"
    else:
        phase = "Pending" if gateway.endpoint is None else "Progressing"
    return _Verdict(ready, progressing, False, phase)


def deployment_status(
    deployment: ModelDeployment,
    previous_status: Mapping[str, Any] | None,
    *,
    resolved: Mapping[str, ResolvedVersion],
    served: Mapping[str, str],
    versions: Mapping[str, VersionObservation],
    gateway: GatewayObservation,
    planned: Mapping[str, int],
    effective: Mapping[str, int],
    rollout: RolloutStatus | None,
    now: str,
    spec_error: str | None = None,
) -> dict[str, Any]:
    """The status (ModelDeploymentStatus, camelCase) for what was decided and observed this pass.

    ``served``: the model URI each version is served with (see :func:`served_models`); ``versions``:
    the backend's observations; ``now``: RFC 3339, for the conditions' lastTransitionTime.
    """
    name = deployment.metadata.name
    version_status = []
    for version in deployment.spec.versions:
        model = resolved[version.name]
        uri = served.get(version.name)
        seen = versions.get(version.name)
        current = uri is not None and uri == model.model_uri
        ready = bool(seen is not None and seen.ready and current)
        if model.state != "ready":
            message = model.message
            if uri is not None:
                message = f"{message}; serving the previous model {uri} meanwhile"
        elif seen is None:
            message = "not served yet"
        elif not seen.ready:
            message = seen.message or "not ready yet"
        else:
            message = None
        version_status.append(
            VersionStatus(
                name=version.name,
                weight=effective.get(version.name, 0),
                ready=ready,
                model_uri=uri or model.model_uri,
                url=seen.url if seen is not None else None,
                bento=bento_tag(name, version.name) if uri is not None else None,
                message=message,
            )
        )
    unservable = {
        version.name: observation.message or "the backend gave up on it"
        for version in deployment.spec.versions
        if (observation := versions.get(version.name)) is not None and observation.failed
    }
    verdict = _verdict(
        deployment.spec,
        resolved,
        version_status,
        gateway,
        planned,
        effective,
        rollout,
        spec_error,
        unservable,
        sleeping={name for name, observation in versions.items() if observation.scaled_to_zero},
    )
    generation = deployment.metadata.generation
    conditions: list[dict[str, Any]] = list((previous_status or {}).get("conditions") or [])
    progressing_status, progressing_reason, progressing_message = verdict.progressing
    stalled = (
        ("True", verdict.ready[1], verdict.ready[2])
        if verdict.stalled
        else ("False", "NotStalled", "nothing needs a person's attention")
    )
    for type_, (state, reason, message) in (
        (READY, verdict.ready),
        (PROGRESSING, verdict.progressing),
        (RECONCILING, (progressing_status, progressing_reason, progressing_message)),
        (STALLED, stalled),
    ):
        conditions = set_condition(conditions, type_, state, reason, message, now=now, generation=generation)
    ready_count = sum(1 for status in version_status if status.ready)
    status = ModelDeploymentStatus(
        observed_generation=generation,
        conditions=[Condition.model_validate(condition) for condition in conditions],
        phase=verdict.phase,
        endpoint=gateway.endpoint,
        versions=version_status,
        weights=format_weights(effective),
        ready_versions=f"{ready_count}/{len(version_status)}",
        rollout=rollout,
    )
    return status.to_wire()


def invalid_status(body: Mapping[str, Any], message: str, now: str) -> dict[str, Any]:
    """The status of a ModelDeployment whose spec is invalid: whatever was served is left as it was
    (versions, weights, endpoint kept), the conditions say why nothing changes."""
    previous = dict(body.get("status") or {})
    kept = {key: value for key, value in previous.items() if not key.startswith("kopf")}
    try:
        status = ModelDeploymentStatus.model_validate(kept)
    except ValidationError:  # written by an operator that knew other fields: only the verdict is kept
        status = ModelDeploymentStatus()
    generation = (body.get("metadata") or {}).get("generation")
    conditions: list[dict[str, Any]] = list(previous.get("conditions") or [])
    for type_, state in ((READY, "False"), (PROGRESSING, "False"), (RECONCILING, "False"), (STALLED, "True")):
        conditions = set_condition(
            conditions, type_, state, "InvalidSpec", message, now=now, generation=generation
        )
    status = status.model_copy(
        update={
            "observed_generation": generation,
            "conditions": [Condition.model_validate(condition) for condition in conditions],
            "phase": "Failed",
        }
    )
    # Only the fields the previous status had, and those just set: nothing is invented for it.
    return status.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


_QUIET_REASONS = {
    "RolledBack",
    "RolloutPaused",
    "AnalysisInconclusive",
}  # the rollout machine posts its own events for these
_WARNING_REASONS = {"ModelFailed", "ModelInvalid", "InvalidSpec"}


def condition_events(previous_status: Mapping[str, Any] | None, status: Mapping[str, Any]) -> list[Event]:
    """An event when the Ready condition changes reason (ModelFailed, ModelInvalid, InvalidSpec as
    warnings)."""
    before = find_condition(list((previous_status or {}).get("conditions") or []), READY) or {}
    after = find_condition(list(status.get("conditions") or []), READY) or {}
    reason = str(after.get("reason") or "")
    if not reason or reason == before.get("reason") or reason in _QUIET_REASONS:
        return []
    kind: Literal["Normal", "Warning"] = "Warning" if reason in _WARNING_REASONS else "Normal"
    return [Event(kind, reason, str(after.get("message") or reason))]
