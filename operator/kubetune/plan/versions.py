"""Which model each version of a ModelDeployment serves, and what its server is given and seen to do.

Pure: the caller passes in how to look jobs up (a Kopf index on a cluster, the local store in
`kubetune up`); the serving backend reports back with :class:`VersionObservation` and
:class:`GatewayObservation`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune.common.uris import absolute
from kubetune.plan.engines import engine_problem
from kubetune_contract.common import API_VERSION, SecretKeyRef
from kubetune_contract.conditions import find_condition
from kubetune_contract.deployment import KIND, ModelDeployment, ModelDeploymentSpec, Serving, ServingEngine
from kubetune_contract.finetune import PEFT_METHODS, Method, Output
from kubetune_contract.serving import (
    CONTEXT_OVERFLOW_ENV,
    DEPLOYMENT_ENV,
    MAX_BATCH_SIZE_ENV,
    MAX_LATENCY_MS_ENV,
    MAX_PROMPT_TOKENS_ENV,
    VERSION_ENV,
    VLLM_OPTIONS_ENV,
)

# (kind, namespace, name) -> the job ({"spec": ..., "status": ...}) or None; kind is FineTuneJob or
# QuantizeJob.
JobLookup = Callable[[str, str, str], dict[str, Any] | None]

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
    base_model_uri: str | None = None
    """The base model an adapter is served on, when the planner knows it (a FineTuneJob that publishes
    its adapter unmerged): the backend makes it readable beside ``model_uri`` (a pvc:// base's claim
    is mounted too). None for full weights and for ``uri`` versions, whose base must then be on the
    adapter's own claim or on the hub."""
    lora_adapter: bool = False
    """``model_uri`` is an unmerged LoRA adapter of ``base_model_uri``: it can share a model server with
    the other LoRA versions of that base (:func:`shared_adapter_groups`)."""


@dataclass(frozen=True)
class VersionObservation:
    """What a backend sees of one version's server.

    ``url`` is the base URL the gateway sends the version's requests to (known as soon as the server
    is set up, before it is ready). ``ready`` means it answers, serving the ``model_uri`` it was last
    given (not a previous model still being replaced). ``message`` says why it is not ready.
    ``failed``: it will not get ready without a change to the spec or the model (the same error came
    back when tried again, e.g. the model path holds no model), so the backend stopped trying; the
    message says why and where the log is.
    """

    url: str | None
    ready: bool
    message: str | None = None
    failed: bool = False
    scaled_to_zero: bool = False
    """Not ready because it sleeps at ``autoscaling.minReplicas`` 0 (KEDA, or ``kubetune up``, scaled it to
    zero): not a failure, the gateway holds its next request while it starts (the message says so)."""


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
    base_model_uri: str | None = None  # an adapter's base model (see VersionServing.base_model_uri)
    lora_adapter: bool = False  # see VersionServing.lora_adapter


def _adapter_base(kind: str, spec: Mapping[str, Any]) -> str | None:
    """The base model a job's published model needs beside it: a FineTuneJob's spec.baseModel.uri when
    it publishes an adapter (a PEFT method, output.mergeAdapter false). A QuantizeJob publishes full
    weights (its step merges an adapter source into its base first), so it needs none."""
    if kind != "FineTuneJob":
        return None
    method = (spec.get("method") or {}).get("type") or Method.model_fields["type"].default
    merged = (spec.get("output") or {}).get("mergeAdapter", Output.model_fields["merge_adapter"].default)
    if method not in PEFT_METHODS or merged:
        return None
    uri = (spec.get("baseModel") or {}).get("uri")
    return str(uri) if uri else None


def _resolve_job(
    name: str,
    kind: str,
    job_name: str,
    namespace: str,
    lookup: JobLookup,
    engine: ServingEngine = "transformers",
) -> ResolvedVersion:
    job = lookup(kind, namespace, job_name)
    if job is None:
        return ResolvedVersion(
            name, "waiting", reason="WaitingForModel", message=f"{kind}/{job_name} does not exist (yet)"
        )
    # known from the job's spec: said at once, not after the job has run
    if (problem := engine_problem(engine, kind, job_name, job.get("spec") or {})) is not None:
        return ResolvedVersion(name, "failed", reason="ModelFailed", message=problem)
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
    job_spec = job.get("spec") or {}
    base = _adapter_base(kind, job_spec)
    method = (job_spec.get("method") or {}).get("type") or Method.model_fields["type"].default
    lora = base is not None and method == "lora"
    return ResolvedVersion(name, "ready", model_uri=str(uri), base_model_uri=base, lora_adapter=lora)


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
                version.name,
                "FineTuneJob",
                model.fine_tune_job_ref.name,
                namespace,
                lookup,
                spec.serving.engine,
            )
        elif model.quantize_job_ref is not None:
            resolved[version.name] = _resolve_job(
                version.name,
                "QuantizeJob",
                model.quantize_job_ref.name,
                namespace,
                lookup,
                spec.serving.engine,
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
        DEPLOYMENT_ENV: deployment.metadata.name,
        VERSION_ENV: version,
        MAX_PROMPT_TOKENS_ENV: str(window.max_prompt_tokens),
        CONTEXT_OVERFLOW_ENV: window.overflow,
        MAX_BATCH_SIZE_ENV: str(batching.max_batch_size),
        MAX_LATENCY_MS_ENV: str(batching.max_latency_ms),
        **_engine_env(deployment.spec.serving),
    }


def _engine_env(serving: Serving) -> dict[str, str]:
    """The vLLM engine's arguments (spec.serving.vllm, defaults included) for a vllm version's server."""
    if serving.engine != "vllm":
        return {}
    return {VLLM_OPTIONS_ENV: json.dumps(serving.vllm_options.to_wire(), sort_keys=True)}


def version_servings(
    deployment: ModelDeployment,
    served: Mapping[str, str],
    resolved: Mapping[str, ResolvedVersion] | None = None,
) -> list[VersionServing]:
    """What to serve: each version that has a model (``served``: version -> model URI), in spec order.

    A version served with its ``resolved`` model gets that model's base; one still served with a
    previous model (see :func:`served_models`) gets none, as nothing recorded that model's base.
    """
    servings: list[VersionServing] = []
    for version in deployment.spec.versions:
        if version.name not in served:
            continue
        model_uri = served[version.name]
        current = (resolved or {}).get(version.name)
        same_model = current is not None and current.model_uri == model_uri
        base = current.base_model_uri if current is not None and same_model else None
        servings.append(
            VersionServing(
                name=version.name,
                model_uri=model_uri,
                bento=bento_tag(deployment.metadata.name, version.name),
                env=serving_env(deployment, version.name),
                serving=deployment.spec.serving,
                token_secret=version.model.token_secret_ref,
                base_model_uri=base,
                lora_adapter=current.lora_adapter if current is not None and same_model else False,
            )
        )
    return servings


def shared_adapter_groups(
    versions: Sequence[VersionServing], running: Collection[str] = ()
) -> dict[str, list[VersionServing]]:
    """The versions that share one model server, by base model URI: two or more LoRA adapters of the
    same base (all loaded in float32 on it, so one dtype), with ``spec.serving.shareBaseModel`` on and
    at least one replica; or the last one left of a base whose shared server is ``running``, so that a
    version never goes down while a server of its own would start. Every other version gets a server
    of its own."""
    groups: dict[str, list[VersionServing]] = {}
    for version in versions:
        serving = version.serving
        if (
            version.lora_adapter
            and version.base_model_uri is not None
            and serving.share_base_model
            # a vllm version's own server holds its LoRA on the base (kubetune.kube.vllm_serving)
            and serving.engine == "transformers"
            and serving.replicas > 0
        ):
            groups.setdefault(version.base_model_uri, []).append(version)
    return {base: members for base, members in groups.items() if len(members) > 1 or base in running}


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
