"""Operator-wide settings, read from the environment (the Helm chart sets them from a ConfigMap)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from kubetune import __version__

ExecutorName = Literal["kfp", "local"]

RUNTIME_IMAGE = f"ghcr.io/kubetune/runtime:{__version__}"
OPERATOR_IMAGE = f"ghcr.io/kubetune/operator:{__version__}"
VLLM_SERVING_IMAGE = f"ghcr.io/kubetune/runtime-vllm:{__version__}"
"""Serves versions with spec.serving.engine vllm: the runtime plus vLLM (and the CUDA torch it needs)."""
PROMETHEUS_URL_ENV = "KUBETUNE_PROMETHEUS_URL"
# The kubelet refreshes a mounted ConfigMap within its sync period plus its cache's TTL (1 minute
# each by default): a removed version serves that long after the gateway config dropped it.
RETIRE_AFTER_S = 150.0
# How long a job waits for a resource it names that does not exist before it fails (SourceNotFound):
# long enough for a FineTuneJob applied right after its QuantizeJob, short enough to be noticed.
MISSING_REFERENCE_GRACE_S = 300.0
MISSING_REFERENCE_GRACE_ENV = "KUBETUNE_MISSING_REFERENCE_GRACE"


KFP_NAMESPACE_MAP_ENV = "KUBETUNE_KFP_NAMESPACE_MAP"
KFP_AUTH_ENV = "KUBETUNE_KFP_AUTH"
KFP_TOKEN_PATH_ENV = "KUBETUNE_KFP_TOKEN_PATH"
KFP_TOKEN_ENV = "KUBETUNE_KFP_TOKEN"
# Where Kubeflow's docs (and kfp.client.KF_PIPELINES_SA_TOKEN_PATH) project a ServiceAccount token with
# audience pipelines.kubeflow.org, which a multi-user KFP API server accepts as the caller's identity.
KFP_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
KfpAuthMode = Literal["serviceAccountToken", "token", "none"]


@dataclass(frozen=True)
class KfpNamespaceMap:
    """Which Kubeflow namespace (a multi-user KFP's profile namespace) runs a resource's pipeline.

    By default a resource's own namespace: there its steps find the workspace claim and the hub-token
    Secret they mount by name. ``overrides`` sends a resource namespace elsewhere; ``default`` (``*``),
    when set, every namespace without an override.
    """

    overrides: Mapping[str, str] = field(default_factory=dict)
    default: str = ""

    def for_resource(self, namespace: str) -> str:
        return self.overrides.get(namespace) or self.default or namespace

    @classmethod
    def parse(cls, raw: str) -> KfpNamespaceMap:
        """``team-a=ml-a,team-b=ml-b,*=ml``: comma-separated ``resource-namespace=kfp-namespace`` pairs."""
        overrides: dict[str, str] = {}
        default = ""
        for entry in (part.strip() for part in raw.split(",")):
            if not entry:
                continue
            source, separator, target = (text.strip() for text in entry.partition("="))
            if not separator or not source or not target:
                raise ValueError(
                    f"{KFP_NAMESPACE_MAP_ENV}: {entry!r} is not NAMESPACE=KFP_NAMESPACE "
                    "(e.g. team-a=ml-a,*=ml)"
                )
            if source in overrides or (source == "*" and default):
                raise ValueError(f"{KFP_NAMESPACE_MAP_ENV}: {source!r} is mapped twice")
            if source == "*":
                default = target
            else:
                overrides[source] = target
        return cls(overrides=overrides, default=default)


@dataclass(frozen=True)
class KfpAuth:
    """How the operator authenticates to the KFP API: ``serviceAccountToken`` (a projected token file,
    re-read on every request since the kubelet rotates it), ``token`` (a fixed bearer token) or ``none``
    (a KFP without authentication; only when configured so)."""

    mode: KfpAuthMode = "serviceAccountToken"
    token_path: str = KFP_TOKEN_PATH
    token: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KfpAuth:
        mode = env.get(KFP_AUTH_ENV, "").strip() or "serviceAccountToken"
        if mode not in get_args(KfpAuthMode):
            raise ValueError(
                f"{KFP_AUTH_ENV} must be one of {', '.join(get_args(KfpAuthMode))}, not {mode!r}"
            )
        token = env.get(KFP_TOKEN_ENV, "").strip()
        if mode == "token" and not token:
            raise ValueError(f"{KFP_AUTH_ENV}=token needs the bearer token in {KFP_TOKEN_ENV}")
        return cls(
            mode=mode,  # type: ignore[arg-type]
            token_path=env.get(KFP_TOKEN_PATH_ENV, "").strip() or KFP_TOKEN_PATH,
            token=token,
        )


def _home(env: dict[str, str]) -> Path:
    return Path(env.get("KUBETUNE_HOME", ".kubetune")).resolve()


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration setting in seconds (a number >= 0); ``default`` when unset or empty."""
    raw = env.get(name, "").strip()
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0, not {raw!r}")
    return seconds


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the control plane needs to know that is not in a resource's spec."""

    home: Path = field(default_factory=lambda: _home(dict(os.environ)))
    default_executor: ExecutorName = "local"
    artifact_store: str = ""
    workspace_root: str = ""
    kfp_host: str | None = None
    kfp_ui_url: str | None = None
    # Named kfp_namespace for its callers; it maps each resource namespace to its KFP namespace.
    kfp_namespace: KfpNamespaceMap = field(default_factory=KfpNamespaceMap)
    kfp_auth: KfpAuth = field(default_factory=KfpAuth)
    runtime_image: str = RUNTIME_IMAGE
    reconcile_interval_s: float = 2.0
    max_run_attempts: int = 3
    missing_reference_grace_s: float = MISSING_REFERENCE_GRACE_S

    def __post_init__(self) -> None:
        if not self.artifact_store:
            object.__setattr__(self, "artifact_store", str(self.home / "artifacts"))
        if not self.workspace_root:
            object.__setattr__(self, "workspace_root", str(self.home / "runs"))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        env = dict(os.environ) if env is None else env
        executor = env.get("KUBETUNE_DEFAULT_EXECUTOR", "local")
        if executor not in ("kfp", "local"):
            raise ValueError(f"KUBETUNE_DEFAULT_EXECUTOR must be 'kfp' or 'local', not {executor!r}")
        return cls(
            home=_home(env),
            default_executor=executor,  # type: ignore[arg-type]
            artifact_store=env.get("KUBETUNE_ARTIFACT_STORE", ""),
            workspace_root=env.get("KUBETUNE_WORKSPACE_ROOT", ""),
            kfp_host=env.get("KUBETUNE_KFP_HOST") or None,
            kfp_ui_url=env.get("KUBETUNE_KFP_UI_URL") or None,
            kfp_namespace=KfpNamespaceMap.parse(env.get(KFP_NAMESPACE_MAP_ENV, "")),
            kfp_auth=KfpAuth.from_env(env),
            runtime_image=env.get("KUBETUNE_RUNTIME_IMAGE", RUNTIME_IMAGE),
            reconcile_interval_s=float(env.get("KUBETUNE_RECONCILE_INTERVAL", "2")),
            max_run_attempts=int(env.get("KUBETUNE_MAX_RUN_ATTEMPTS", "3")),
            missing_reference_grace_s=_seconds(env, MISSING_REFERENCE_GRACE_ENV, MISSING_REFERENCE_GRACE_S),
        )


@dataclass(frozen=True)
class DeploymentSettings:
    """What the operator's ModelDeployment handlers read from its environment.

    KUBETUNE_SERVING_IMAGE (default: the runtime image, KUBETUNE_RUNTIME_IMAGE) runs each version's
    server, KUBETUNE_VLLM_SERVING_IMAGE that of a version with engine vllm, KUBETUNE_GATEWAY_IMAGE
    (default: the operator's image) the gateway; KUBETUNE_PROMETHEUS_URL
    answers the canary analyses (unset: they are recorded as inconclusive); KUBETUNE_RETIRE_GRACE_SECONDS
    is how long a version removed from the spec keeps serving while the gateways reload.
    """

    serving_image: str = RUNTIME_IMAGE
    vllm_serving_image: str = VLLM_SERVING_IMAGE
    gateway_image: str = OPERATOR_IMAGE
    prometheus_url: str | None = None
    retire_after_s: float = RETIRE_AFTER_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DeploymentSettings:
        env = dict(os.environ) if env is None else dict(env)
        url = env.get(PROMETHEUS_URL_ENV, "").strip() or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"{PROMETHEUS_URL_ENV} must be an http:// or https:// URL, not {url!r}")
        retire_after_s = _seconds(env, "KUBETUNE_RETIRE_GRACE_SECONDS", RETIRE_AFTER_S)
        return cls(
            serving_image=env.get("KUBETUNE_SERVING_IMAGE", "").strip()
            or OperatorConfig.from_env(env).runtime_image,
            vllm_serving_image=env.get("KUBETUNE_VLLM_SERVING_IMAGE", "").strip() or VLLM_SERVING_IMAGE,
            gateway_image=env.get("KUBETUNE_GATEWAY_IMAGE", "").strip() or OPERATOR_IMAGE,
            prometheus_url=url,
            retire_after_s=retire_after_s,
        )
