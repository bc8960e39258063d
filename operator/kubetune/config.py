"""Operator-wide settings, read from the environment (the Helm chart sets them from a ConfigMap)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kubetune import __version__

ExecutorName = Literal["kfp", "local"]

RUNTIME_IMAGE = f"ghcr.io/kubetune/runtime:{__version__}"
OPERATOR_IMAGE = f"ghcr.io/kubetune/operator:{__version__}"
PROMETHEUS_URL_ENV = "KUBETUNE_PROMETHEUS_URL"
# The kubelet refreshes a mounted ConfigMap within its sync period plus its cache's TTL (1 minute
# each by default): a removed version serves that long after the gateway config dropped it.
RETIRE_AFTER_S = 150.0
# How long a job waits for a resource it names that does not exist before it fails (SourceNotFound):
# long enough for a FineTuneJob applied right after its QuantizeJob, short enough to be noticed.
MISSING_REFERENCE_GRACE_S = 300.0
MISSING_REFERENCE_GRACE_ENV = "KUBETUNE_MISSING_REFERENCE_GRACE"


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
    kfp_namespace: str = "kubeflow"
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
            kfp_namespace=env.get("KUBETUNE_KFP_NAMESPACE", "kubeflow"),
            runtime_image=env.get("KUBETUNE_RUNTIME_IMAGE", RUNTIME_IMAGE),
            reconcile_interval_s=float(env.get("KUBETUNE_RECONCILE_INTERVAL", "2")),
            max_run_attempts=int(env.get("KUBETUNE_MAX_RUN_ATTEMPTS", "3")),
            missing_reference_grace_s=_seconds(env, MISSING_REFERENCE_GRACE_ENV, MISSING_REFERENCE_GRACE_S),
        )


@dataclass(frozen=True)
class DeploymentSettings:
    """What the operator's ModelDeployment handlers read from its environment.

    KUBETUNE_SERVING_IMAGE (default: the runtime image, KUBETUNE_RUNTIME_IMAGE) runs each version's
    server, KUBETUNE_GATEWAY_IMAGE (default: the operator's image) the gateway; KUBETUNE_PROMETHEUS_URL
    answers the canary analyses (unset: they are recorded as inconclusive); KUBETUNE_RETIRE_GRACE_SECONDS
    is how long a version removed from the spec keeps serving while the gateways reload.
    """

    serving_image: str = RUNTIME_IMAGE
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
            gateway_image=env.get("KUBETUNE_GATEWAY_IMAGE", "").strip() or OPERATOR_IMAGE,
            prometheus_url=url,
            retire_after_s=retire_after_s,
        )
