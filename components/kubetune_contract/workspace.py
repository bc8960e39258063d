"""The files of a run's workspace, and reading what the pipeline steps report there.

The steps write these files atomically (see kubetune_components.finetune.steps and .quantize.steps), at the
paths named here; the control plane only reads them, so a half-written file is never seen. Missing or
unreadable files read as None.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
PVC_MOUNT_ROOT = "/mnt/pvc"
"""Where every pod kubetune renders (steps, model servers, the operator) mounts a claim: <root>/<claim>."""
WORKSPACE_REPORT_OUTPUT = "workspace_report"
"""The output parameter in which every pipeline step hands on the whole :class:`WorkspaceReport` as it
stands when the step ends (JSON), so a control plane that cannot mount the workspace reads it from KFP."""
MODEL_CARD_FILE = "MODEL_CARD.md"
"""The model card every published artifact carries, generated from its manifest, for people to read."""
MODEL_CARD_JSON_FILE = "model-card.json"
"""The same model card as JSON, for programs (the gateway links both from GET /v1/models/{id})."""
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
"""Storage every pod reaches by URI alone; with ``pvc://`` the shared storage a cluster's steps can use."""


class WorkspaceLayout:
    """Paths of the workspace files, relative to the workspace root; both writers and readers use these."""

    PROGRESS = "progress.json"
    ERROR = "error.json"
    DATA = "data"
    TRAIN_SPLIT = "data/train.jsonl"
    VALIDATION_SPLIT = "data/validation.jsonl"
    CURATION = "data/curation.json"
    BASELINE_EVALUATION = "evaluation/baseline.json"
    FINAL_EVALUATION = "evaluation/final.json"
    CHECKPOINT_EVALUATIONS = "evaluation/checkpoints.json"
    """The periodic evaluations of training.evalEverySteps and the checkpoint selected (finetune)."""
    CROSS_VALIDATION = "evaluation/cross-validation.json"
    """The folds' held-out metrics, each one's mean and standard deviation (evaluation.crossValidation)."""
    FOLDS = "folds"
    """Each fold of a cross-validation is a workspace of its own, with these same files, under here."""
    CHECKPOINTS = "checkpoints"
    TRAINED = "trained"
    EXPORT_STAGING = "export"
    GATES = "gates.json"
    OUTPUT = "output.json"
    # QuantizeJob runs
    SOURCE = "source"
    SOURCE_DOWNLOAD = "source-download"
    SOURCE_MANIFEST = "source-manifest.json"
    MEASURED_BEFORE = "report/before.json"
    MEASURED_AFTER = "report/after.json"
    QUANTIZED = "quantized"
    QUANTIZE_REPORT = "report.json"

    @classmethod
    def evaluation(cls, which: Literal["baseline", "final"]) -> str:
        return cls.BASELINE_EVALUATION if which == "baseline" else cls.FINAL_EVALUATION

    @classmethod
    def fold(cls, index: int) -> str:
        """The workspace of fold `index` (0-based): data/, checkpoints/, trained/, evaluation/final.json."""
        return f"{cls.FOLDS}/fold-{index}"

    @classmethod
    def predictions(cls, which: Literal["baseline", "final"]) -> str:
        """Some generations behind exactMatch, kept for people to look at."""
        return f"evaluation/{which}-predictions.jsonl"


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
    checkpoints: dict[str, Any] | None = None
    cross_validation: dict[str, Any] | None = None
    gates: list[dict[str, Any]] | None = None
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    measured_before: dict[str, Any] | None = None
    measured_after: dict[str, Any] | None = None
    quantize_report: dict[str, Any] | None = None

    @classmethod
    def read(cls, workspace: str) -> WorkspaceReport:
        return cls(
            progress=read_report(workspace, WorkspaceLayout.PROGRESS),
            curation=read_report(workspace, WorkspaceLayout.CURATION),
            baseline=read_report(workspace, WorkspaceLayout.BASELINE_EVALUATION),
            final=read_report(workspace, WorkspaceLayout.FINAL_EVALUATION),
            checkpoints=read_report(workspace, WorkspaceLayout.CHECKPOINT_EVALUATIONS),
            cross_validation=read_report(workspace, WorkspaceLayout.CROSS_VALIDATION),
            gates=read_report(workspace, WorkspaceLayout.GATES),
            output=read_report(workspace, WorkspaceLayout.OUTPUT),
            error=read_report(workspace, WorkspaceLayout.ERROR),
            measured_before=read_report(workspace, WorkspaceLayout.MEASURED_BEFORE),
            measured_after=read_report(workspace, WorkspaceLayout.MEASURED_AFTER),
            quantize_report=read_report(workspace, WorkspaceLayout.QUANTIZE_REPORT),
        )

    def to_json(self) -> str:
        """The report as one JSON object, the files' names as keys (what a step publishes)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkspaceReport:
        """The report :meth:`to_json` wrote; raises ``ValueError`` for anything else."""
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("a workspace report is a JSON object")
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in document.items() if key in known})
