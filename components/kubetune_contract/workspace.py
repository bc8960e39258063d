"""Read what pipeline steps report in a run's workspace (progress, evaluations, gates, output, errors).

The steps write these files atomically (see kubetune_components.finetune.steps); the control plane only reads
them, so a half-written file is never seen. Missing or unreadable files read as None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
PVC_MOUNT_ROOT = "/mnt/pvc"
"""Where every pod kubetune renders (steps, model servers, the operator) mounts a claim: <root>/<claim>."""


def _local(uri: str) -> Path | None:
    if uri.startswith("pvc://"):
        # On a cluster the operator mounts the workspace claim where the steps do: /mnt/pvc/<claim>.
        return Path(os.environ.get(PVC_ROOT_ENV) or PVC_MOUNT_ROOT) / uri[len("pvc://") :]
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        return None
    return Path(uri)


def read_report(workspace: str, relative: str) -> Any:
    path = _local(workspace)
    try:
        if path is not None:
            return json.loads((path / relative).read_text())
        import fsspec

        with fsspec.open(f"{workspace.rstrip('/')}/{relative}", "r") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class WorkspaceReport:
    progress: dict[str, Any] | None = None
    curation: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    gates: list[dict[str, Any]] | None = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    measured_before: dict[str, Any] | None = None
    measured_after: dict[str, Any] | None = None
    quantize_report: dict[str, Any] | None = None

    @classmethod
    def read(cls, workspace: str) -> WorkspaceReport:
        return cls(
            progress=read_report(workspace, "progress.json"),
            curation=read_report(workspace, "data/curation.json"),
            baseline=read_report(workspace, "evaluation/baseline.json"),
            final=read_report(workspace, "evaluation/final.json"),
            gates=read_report(workspace, "gates.json"),
            output=read_report(workspace, "output.json"),
            error=read_report(workspace, "error.json"),
            measured_before=read_report(workspace, "report/before.json"),
            measured_after=read_report(workspace, "report/after.json"),
            quantize_report=read_report(workspace, "report.json"),
        )
