"""Planning for ModelDeployment: which model each version serves, the gateway config, the status.

Pure functions, no I/O: the caller passes in how to look jobs up (a Kopf index on a cluster, the
local store in `kubetune up`) and what its serving backend observed.

Weights, three ways:
- spec weights: what the user asked for;
- planned weights: what the rollout machine decides (the spec weights, or a canary step's split);
- effective weights: what the gateway is told. A version that does not answer yet gives its planned
  share to the versions that do, in proportion to theirs, so traffic never goes to a server that is
  still starting or to a model that is still being trained. ``status.versions[].weight`` and
  ``status.weights`` show these.

Conditions (``status.conditions``), set on first sight:
- ``Ready``: True when every version with a planned weight above 0 serves its spec'd model and the
  gateway is up. Reasons: AllVersionsReady; WaitingForModel, VersionNotReady, GatewayNotReady (on
  their way); ModelFailed, RolledBack, RolloutPaused, InvalidSpec (a person must act; see Stalled).
- ``Progressing``: True while a model is awaited, a server or the gateway is starting, or a canary
  rollout is under way; False with RolloutComplete (spec.rollout set) or Stable when done, or with
  the Stalled reason.
- ``Reconciling`` / ``Stalled``: the kstatus conventions (kstatus reads only these and
  observedGeneration for custom resources). Reconciling mirrors Progressing, so a rollout or a wait
  reads InProgress. Stalled is True when the operator cannot get further without a person: a model's
  job failed, the spec is invalid, or the canary failed its analysis — RolledBack (the stable
  versions keep serving, but the spec is not realised until someone fixes the canary and edits the
  spec) or Paused (autoRollback off). kstatus reads those as Failed; Ready is then False too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune.common.events import Event
from kubetune.common.uris import absolute
from kubetune.gateway.config import GatewayConfigError, parse_gateway_config
from kubetune.rollout.weights import format_weights, proportional
from kubetune_contract.common import API_VERSION, SecretKeyRef, as_float
from kubetune_contract.conditions import find_condition, set_condition
from kubetune_contract.deployment import (
    KIND,
    ModelDeployment,
    ModelDeploymentSpec,
    RolloutStatus,
    Serving,
    VersionStatus,
    duration_seconds,
)

# (kind, namespace, name) -> the job ({"spec": ..., "status": ...}) or None; kind is FineTuneJob or
# QuantizeJob.
JobLookup = Callable[[str, str, str], dict[str, Any] | None]

READY = "Ready"
PROGRESSING = "Progressing"
RECONCILING = "Reconciling"
STALLED = "Stalled"

# -- what the serving backend is given and what it sees ---------------------------------------------


@dataclass(frozen=True)
class DeploymentRef:
    """The ModelDeployment that owns the serving objects."""

    name: str
    namespace: str
    uid: str | None = None

    def owner_reference(self) -> dict[str, Any]:
        """An entry for the ``metadata.ownerReferences`` of a child object (needs the uid)."""
        if not self.uid:
            raise ValueError(f"{KIND}/{self.name} has no metadata.uid, so it cannot own objects")
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class VersionServing:
    """Everything one version's model server needs.

    ``env`` holds the serving runtime's settings per the contract (KUBETUNE_DEPLOYMENT,
    KUBETUNE_VERSION, KUBETUNE_MAX_PROMPT_TOKENS, KUBETUNE_CONTEXT_OVERFLOW, KUBETUNE_MAX_BATCH_SIZE,
    KUBETUNE_MAX_LATENCY_MS). It does not hold KUBETUNE_MODEL_DIR: the backend sets that to wherever it
    makes ``model_uri`` available (a mounted volume on a cluster, the path itself locally).
    """

    name: str
    model_uri: str
    bento: str  # the Bento tag, "<deployment>-<version>" in lower case
    env: Mapping[str, str]
    serving: Serving  # replicas, autoscaling, resources, batching (spec.serving)
    token_secret: SecretKeyRef | None = None  # hub token for hf:// models, when the spec names one


@dataclass(frozen=True)
class VersionObservation:
    """What a backend sees of one version's server.

    ``url`` is the base URL the gateway sends the version's requests to (known as soon as the server
    is set up, before it is ready). ``ready`` means it answers, serving the ``model_uri`` it was last
    given (not a previous model still being replaced). ``message`` says why it is not ready.
    """

    url: str | None
    ready: bool
    message: str | None = None


@dataclass(frozen=True)
class GatewayObservation:
    """What a backend sees of the deployment's gateway. ``endpoint``: its OpenAI base URL (…/v1)."""

    endpoint: str | None
    ready: bool
    message: str | None = None


# -- models -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedVersion:
    """Where a version's model stands: ready (with its URI), waiting for a job, or failed."""

    name: str
    state: Literal["ready", "waiting", "failed"]
    model_uri: str | None = None
    reason: str | None = None  # WaitingForModel | ModelFailed
    message: str | None = None


def _resolve_job(name: str, kind: str, job_name: str, namespace: str, lookup: JobLookup) -> ResolvedVersion:
    job = lookup(kind, namespace, job_name)
    if job is None:
        return ResolvedVersion(
            name, "waiting", reason="WaitingForModel", message=f"{kind}/{job_name} does not exist (yet)"
        )
    status = job.get("status") or {}
    condition = find_condition(status.get("conditions") or [], "Succeeded") or {}
    if condition.get("status") == "False":
        why = f"{condition.get('reason') or 'Failed'}: {condition.get('message') or ''}".rstrip(": ")
        return ResolvedVersion(
            name, "failed", reason="ModelFailed", message=f"{kind}/{job_name} failed ({why})"
        )
    if condition.get("status") != "True":
        phase = status.get("phase") or "Pending"
        return ResolvedVersion(
            name,
            "waiting",
            reason="WaitingForModel",
            message=f"waiting for {kind}/{job_name} to succeed ({phase})",
        )
    uri = (status.get("output") or {}).get("uri")
    if not uri:
        return ResolvedVersion(
            name,
            "failed",
            reason="ModelFailed",
            message=f"{kind}/{job_name} succeeded but published no output",
        )
    return ResolvedVersion(name, "ready", model_uri=str(uri))


def resolve_versions(
    spec: ModelDeploymentSpec, namespace: str, lookup: JobLookup, base_dir: Path | None = None
) -> dict[str, ResolvedVersion]:
    """Each version's model, by version name (in spec order). ``base_dir`` resolves relative local
    paths of ``uri`` versions (local mode)."""
    resolved: dict[str, ResolvedVersion] = {}
    for version in spec.versions:
        model = version.model
        if model.fine_tune_job_ref is not None:
            resolved[version.name] = _resolve_job(
                version.name, "FineTuneJob", model.fine_tune_job_ref.name, namespace, lookup
            )
        elif model.quantize_job_ref is not None:
            resolved[version.name] = _resolve_job(
                version.name, "QuantizeJob", model.quantize_job_ref.name, namespace, lookup
            )
        else:
            assert model.uri is not None  # the API guarantees exactly one source
            resolved[version.name] = ResolvedVersion(
                version.name, "ready", model_uri=absolute(model.uri, base_dir)
            )
    return resolved


def bento_tag(deployment: str, version: str) -> str:
    return f"{deployment}-{version}".lower()


def serving_env(deployment: ModelDeployment, version: str) -> dict[str, str]:
    """The serving runtime's settings for one version (the contract's KUBETUNE_* variables)."""
    window = deployment.spec.generation.context_window
    batching = deployment.spec.serving.batching
    return {
        "KUBETUNE_DEPLOYMENT": deployment.metadata.name,
        "KUBETUNE_VERSION": version,
        "KUBETUNE_MAX_PROMPT_TOKENS": str(window.max_prompt_tokens),
        "KUBETUNE_CONTEXT_OVERFLOW": window.overflow,
        "KUBETUNE_MAX_BATCH_SIZE": str(batching.max_batch_size),
        "KUBETUNE_MAX_LATENCY_MS": str(batching.max_latency_ms),
    }


def version_servings(deployment: ModelDeployment, served: Mapping[str, str]) -> list[VersionServing]:
    """What to serve: each version that has a model (``served``: version -> model URI), in spec order."""
    return [
        VersionServing(
            name=version.name,
            model_uri=served[version.name],
            bento=bento_tag(deployment.metadata.name, version.name),
            env=serving_env(deployment, version.name),
            serving=deployment.spec.serving,
            token_secret=version.model.token_secret_ref,
        )
        for version in deployment.spec.versions
        if version.name in served
    ]


def served_models(
    resolved: Mapping[str, ResolvedVersion], previous_status: Mapping[str, Any] | None
) -> dict[str, str]:
    """The model URI each version is served with: its resolved model, or — while a new one is awaited
    or failed — the model it served before, so that changing a version's model never takes it away."""
    before = {
        str(item.get("name")): item.get("modelUri")
        for item in (previous_status or {}).get("versions") or []
        if isinstance(item, Mapping)
    }
    served: dict[str, str] = {}
    for name, version in resolved.items():
        if version.model_uri is not None:
            served[name] = version.model_uri
        elif before.get(name):
            served[name] = str(before[name])
    return served


# -- weights and the gateway -------------------------------------------------------------------------


def effective_weights(
    planned: Mapping[str, int], answering: Mapping[str, bool], served: Sequence[str] | set[str]
) -> dict[str, int]:
    """The planned weights with the share of versions that do not answer moved to those that do.

    When no version with planned traffic answers, the versions being served keep their planned
    share (the gateway must point somewhere); when none is served, every weight is 0.
    """
    carrying = {name: weight for name, weight in planned.items() if weight > 0 and answering.get(name)}
    if not carrying:
        carrying = {name: weight for name, weight in planned.items() if weight > 0 and name in served}
    if not carrying:
        return dict.fromkeys(planned, 0)
    split = proportional(100, carrying)
    return {name: split.get(name, 0) for name in planned}


class GatewayConfigInvalid(ValueError):
    """The spec makes a gateway config the gateway would refuse (the message names the field)."""


def gateway_config(
    deployment: ModelDeployment, urls: Mapping[str, str], weights: Mapping[str, int]
) -> dict[str, Any] | None:
    """The gateway's config (GatewayConfig JSON, camelCase) for the versions that have a URL.

    None when no such version has traffic (nothing for a gateway to do yet). Decimal strings become
    floats and durations seconds. Raises :class:`GatewayConfigInvalid` for a config the gateway would
    reject, e.g. a prompt template without ``{{input}}``.
    """
    spec = deployment.spec
    versions = [
        {
            "name": version.name,
            "url": urls[version.name],
            "weight": weights.get(version.name, 0),
            "prompt": version.prompt,
        }
        for version in spec.versions
        if version.name in urls
    ]
    if not any(version["weight"] for version in versions):
        return None
    names = [version["name"] for version in versions]
    generation = spec.generation

    def present(values: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in values.items() if value is not None}

    config: dict[str, Any] = {
        "deployment": deployment.metadata.name,
        "namespace": deployment.metadata.namespace,
        "versions": versions,
        "control": spec.versions[0].name if spec.versions[0].name in names else names[0],
        "routing": {
            "stickyBy": spec.routing.sticky_by,
            "header": spec.routing.header,
            "overrideHeader": spec.routing.override_header,
        },
        "generation": {
            "defaults": present(
                {
                    "temperature": as_float(generation.defaults.temperature),
                    "topP": as_float(generation.defaults.top_p),
                    "maxTokens": generation.defaults.max_tokens,
                }
            ),
            "limits": present(
                {
                    "maxTemperature": as_float(generation.limits.max_temperature),
                    "maxTopP": as_float(generation.limits.max_top_p),
                    "maxTokens": generation.limits.max_tokens,
                }
            ),
        },
        "prompts": [
            {
                "name": prompt.name,
                "system": prompt.system,
                "template": prompt.template,
                "examples": [{"user": e.user, "assistant": e.assistant} for e in prompt.examples],
            }
            for prompt in spec.prompts
        ],
        "cache": (
            {
                "enabled": spec.cache.enabled,
                "ttlSeconds": duration_seconds(spec.cache.ttl),
                "maxEntries": spec.cache.max_entries,
            }
            if spec.cache is not None
            else {"enabled": False}
        ),
        "fallback": (
            {"version": spec.fallback.version, "timeoutSeconds": duration_seconds(spec.fallback.timeout)}
            if spec.fallback is not None and spec.fallback.version in names
            else None
        ),
    }
    try:
        parse_gateway_config(json.dumps(config), "gateway config")
    except GatewayConfigError as exc:
        raise GatewayConfigInvalid(str(exc)) from exc
    return config


# -- status -----------------------------------------------------------------------------------------


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
) -> _Verdict:
    if spec_error is not None:
        return _Verdict(
            ("False", "InvalidSpec", spec_error), ("False", "InvalidSpec", spec_error), True, "Failed"
        )
    failed = [resolved[v.name] for v in spec.versions if resolved[v.name].state == "failed"]
    if failed:
        message = "; ".join(f"version {r.name}: {r.message}" for r in failed)
        return _Verdict(("False", "ModelFailed", message), ("False", "ModelFailed", message), True, "Failed")
    if rollout is not None and rollout.state in ("RolledBack", "Paused"):
        reason = "RolledBack" if rollout.state == "RolledBack" else "RolloutPaused"
        message = f"{rollout.message} (serving {format_weights(effective)})"
        return _Verdict(("False", reason, message), ("False", reason, message), True, rollout.state)

    waiting = [resolved[v.name] for v in spec.versions if resolved[v.name].state == "waiting"]
    weighted_waiting = [r for r in waiting if planned.get(r.name, 0) > 0]
    not_ready = [status for status in version_status if not status.ready and planned.get(status.name, 0) > 0]
    weighted_not_ready = [s for s in not_ready if resolved[s.name].state == "ready"]
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
    verdict = _verdict(
        deployment.spec, resolved, version_status, gateway, planned, effective, rollout, spec_error
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
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "phase": verdict.phase,
        "versions": [status.to_wire() for status in version_status],
        "weights": format_weights(effective),
        "readyVersions": f"{ready_count}/{len(version_status)}",
    }
    if gateway.endpoint is not None:
        status["endpoint"] = gateway.endpoint
    if rollout is not None:
        status["rollout"] = rollout.to_wire()
    return status


def invalid_status(body: Mapping[str, Any], message: str, now: str) -> dict[str, Any]:
    """The status of a ModelDeployment whose spec is invalid: whatever was served is left as it was
    (versions, weights, endpoint kept), the conditions say why nothing changes."""
    previous = dict(body.get("status") or {})
    status = {key: value for key, value in previous.items() if not key.startswith("kopf")}
    generation = (body.get("metadata") or {}).get("generation")
    conditions: list[dict[str, Any]] = list(previous.get("conditions") or [])
    for type_, state in ((READY, "False"), (PROGRESSING, "False"), (RECONCILING, "False"), (STALLED, "True")):
        conditions = set_condition(
            conditions, type_, state, "InvalidSpec", message, now=now, generation=generation
        )
    status.update({"observedGeneration": generation, "conditions": conditions, "phase": "Failed"})
    return status


_QUIET_REASONS = {"RolledBack", "RolloutPaused"}  # the rollout machine posts its own events for these
_WARNING_REASONS = {"ModelFailed", "InvalidSpec"}


def condition_events(previous_status: Mapping[str, Any] | None, status: Mapping[str, Any]) -> list[Event]:
    """An event when the Ready condition changes reason (ModelFailed / InvalidSpec as warnings)."""
    before = find_condition(list((previous_status or {}).get("conditions") or []), READY) or {}
    after = find_condition(list(status.get("conditions") or []), READY) or {}
    reason = str(after.get("reason") or "")
    if not reason or reason == before.get("reason") or reason in _QUIET_REASONS:
        return []
    kind: Literal["Normal", "Warning"] = "Warning" if reason in _WARNING_REASONS else "Normal"
    return [Event(kind, reason, str(after.get("message") or reason))]
