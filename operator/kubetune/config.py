"""Operator-wide settings, read from the environment (the Helm chart sets them from a ConfigMap)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kubetune import __version__

ExecutorName = Literal["kfp", "local"]


def _home(env: dict[str, str]) -> Path:
    return Path(env.get("KUBETUNE_HOME", ".kubetune")).resolve()


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
    runtime_image: str = f"ghcr.io/kubetune/runtime:{__version__}"
    reconcile_interval_s: float = 2.0
    max_run_attempts: int = 3

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
            runtime_image=env.get("KUBETUNE_RUNTIME_IMAGE", f"ghcr.io/kubetune/runtime:{__version__}"),
            reconcile_interval_s=float(env.get("KUBETUNE_RECONCILE_INTERVAL", "2")),
            max_run_attempts=int(env.get("KUBETUNE_MAX_RUN_ATTEMPTS", "3")),
        )
