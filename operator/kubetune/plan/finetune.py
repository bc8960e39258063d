"""Planning for FineTuneJob: spec + what was observed -> the action to take and the next status.

Pure functions, no I/O: the Kopf handlers and `kubetune up` both call `plan_finetune` and then
carry out its decision through a backend.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune.api.finetune import FineTuneJob
from kubetune.api.validation import ResourceInvalid, parse_resource
from kubetune.backends.base import RunRequest, RunStatus
from kubetune.config import OperatorConfig
from kubetune.plan.conditions import find_condition, set_condition
from kubetune.workspace import WorkspaceReport

SUCCEEDED = "Succeeded"
Action = Literal["none", "submit", "resume", "cancel"]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the control plane saw this time round."""

    run: RunStatus | None = None
    report: WorkspaceReport = field(default_factory=WorkspaceReport)


@dataclass(frozen=True)
class Decision:
    action: Action
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    request: RunRequest | None = None

    @property
    def finished(self) -> bool:
        return is_finished(self.status)


def is_finished(status: dict[str, Any] | None, generation: int | None = None) -> bool:
    """Whether the job ended (Succeeded True or False) for this generation."""
    if not status:
        return False
    condition = find_condition(status.get("conditions") or [], SUCCEEDED)
    if condition is None or condition.get("status") == "Unknown":
        return False
    return generation is None or status.get("observedGeneration") == generation


def _is_local_path(uri: str) -> bool:
    return "://" not in uri


def _absolute(uri: str, base_dir: Path | None) -> str:
    if base_dir is None or not _is_local_path(uri):
        return uri
    path = Path(uri)
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def run_key(job: FineTuneJob) -> str:
    uid = (job.metadata.uid or "nouid").replace("-", "")[:8]
    return f"ftj-{job.metadata.namespace}-{job.metadata.name}-g{job.metadata.generation or 1}-{uid}"


def workspace_for(job: FineTuneJob, settings: OperatorConfig) -> str:
    uid = (job.metadata.uid or "nouid").replace("-", "")[:8]
    root = settings.workspace_root.rstrip("/")
    return f"{root}/{job.metadata.namespace}/{job.metadata.name}/g{job.metadata.generation or 1}-{uid}"


def resolve_config(
    job: FineTuneJob, settings: OperatorConfig, base_dir: Path | None = None
) -> dict[str, Any]:
    """The job as the pipeline steps receive it: defaults filled, store and relative paths resolved."""
    spec = job.spec.to_wire()
    spec["baseModel"]["uri"] = _absolute(spec["baseModel"]["uri"], base_dir)
    spec["dataset"]["uri"] = _absolute(spec["dataset"]["uri"], base_dir)
    if spec["dataset"].get("validationUri"):
        spec["dataset"]["validationUri"] = _absolute(spec["dataset"]["validationUri"], base_dir)
    spec["output"]["uri"] = _absolute(spec["output"].get("uri") or settings.artifact_store, base_dir)
    spec["executor"] = spec.get("executor") or settings.default_executor
    return {
        "apiVersion": job.api_version,
        "kind": job.kind,
        "metadata": {
            "name": job.metadata.name,
            "namespace": job.metadata.namespace,
            "uid": job.metadata.uid or "",
            "generation": job.metadata.generation or 1,
        },
        "spec": spec,
    }


def _pvc_claims(uris: list[str]) -> tuple[str, ...]:
    claims = {uri[len("pvc://") :].split("/", 1)[0] for uri in uris if uri.startswith("pvc://")}
    return tuple(sorted(claims))


def build_request(job: FineTuneJob, settings: OperatorConfig, base_dir: Path | None = None) -> RunRequest:
    config = resolve_config(job, settings, base_dir)
    workspace = _absolute(workspace_for(job, settings), base_dir)
    spec = config["spec"]
    token = job.spec.base_model.token_secret_ref
    labels = {
        "kubetune.dev/kind": "finetunejob",
        "kubetune.dev/name": job.metadata.name,
        "kubetune.dev/namespace": job.metadata.namespace,
        "kubetune.dev/generation": str(job.metadata.generation or 1),
    }
    return RunRequest(
        key=run_key(job),
        kind=job.kind,
        display_name=f"{job.metadata.namespace}/{job.metadata.name}",
        config=config,
        workspace=workspace,
        experiment=f"kubetune-{job.metadata.namespace}",
        labels=labels,
        pipeline_options={
            "image": settings.runtime_image,
            "pvc_claims": list(
                _pvc_claims(
                    [spec["baseModel"]["uri"], spec["dataset"]["uri"], spec["output"]["uri"], workspace]
                    + ([spec["dataset"]["validationUri"]] if spec["dataset"].get("validationUri") else [])
                )
            ),
            "token_secret": [token.name, token.key] if token else None,
            "labels": labels,
        },
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _eval_status(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    values = {key: _finite(report.get(key)) for key in ("evalLoss", "perplexity", "exactMatch")}
    return {key: value for key, value in values.items() if value is not None}


def _progress_status(progress: dict[str, Any] | None, finished_ok: bool) -> dict[str, Any]:
    progress = progress or {}
    step = int(progress.get("step") or 0)
    total = int(progress.get("totalSteps") or 0)
    percent = 100 if finished_ok else (min(99, int(100 * step / total)) if total else 0)
    return {
        "step": step,
        "totalSteps": total,
        "epoch": round(float(progress.get("epoch") or 0.0), 3),
        "percent": percent,
    }


def _with_report(status: dict[str, Any], report: WorkspaceReport, finished_ok: bool) -> dict[str, Any]:
    status["progress"] = _progress_status(report.progress, finished_ok)
    if report.progress:
        metrics = {
            "trainLoss": _finite(report.progress.get("trainLoss")),
            "learningRate": _finite(report.progress.get("learningRate")),
        }
        status["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    evaluation: dict[str, Any] = {}
    if (baseline := _eval_status(report.baseline)) is not None:
        evaluation["baseline"] = baseline
    if (final := _eval_status(report.final)) is not None:
        evaluation["final"] = final
    if report.gates:
        evaluation["gates"] = [
            {
                "metric": str(gate.get("metric")),
                "op": str(gate.get("op")),
                "threshold": _finite(gate.get("threshold")),
                "value": _finite(gate.get("value")),
                "passed": bool(gate.get("passed")),
            }
            for gate in report.gates
        ]
    if evaluation:
        status["evaluation"] = evaluation
    return status


def _phase_message(report: WorkspaceReport) -> str:
    progress = report.progress or {}
    phase = str(progress.get("phase") or "starting")
    if phase == "training" and progress.get("totalSteps"):
        return f"training: step {progress.get('step', 0)}/{progress['totalSteps']}"
    return phase.replace("-", " ")


def plan_finetune(
    body: dict[str, Any],
    observed: Observed,
    settings: OperatorConfig,
    now: str,
    base_dir: Path | None = None,
) -> Decision:
    """Decide the next step for one FineTuneJob. Never raises for a bad spec: it reports it."""
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    current = copy.deepcopy(body.get("status") or {})
    conditions: list[dict[str, Any]] = list(current.get("conditions") or [])
    status: dict[str, Any] = {k: v for k, v in current.items() if not k.startswith("kopf")}
    status["observedGeneration"] = generation

    def with_condition(state: str, reason: str, message: str, phase: str) -> dict[str, Any]:
        status["conditions"] = set_condition(
            conditions, SUCCEEDED, state, reason, message, now=now, generation=generation
        )
        status["phase"] = phase
        return status

    if is_finished(current, generation):
        return Decision(action="none", status=current)

    try:
        job = parse_resource(body)
    except ResourceInvalid as invalid:
        message = "; ".join(str(issue) for issue in invalid.issues)
        status.setdefault("completionTime", now)
        return Decision(
            action="none",
            status=with_condition("False", "InvalidSpec", message, "Failed"),
            events=[Event("Warning", "InvalidSpec", message)],
        )
    assert isinstance(job, FineTuneJob)
    request = build_request(job, settings, base_dir)
    run = observed.run

    if run is None:
        status["startTime"] = status.get("startTime") or now
        status["progress"] = _progress_status(None, False)
        return Decision(
            action="submit",
            status=with_condition("Unknown", "Pending", "submitting the pipeline run", "Pending"),
            events=[Event("Normal", "Submitted", f"submitting pipeline run {request.key}")],
            request=request,
        )

    status["pipelineRun"] = {
        "backend": run.backend,
        "id": run.id,
        "url": run.url,
        "name": request.key,
        "generation": generation,
    }
    status["startTime"] = status.get("startTime") or now
    report = observed.report
    _with_report(status, report, finished_ok=run.phase == "Succeeded")
    previous = find_condition(conditions, SUCCEEDED)
    previous_reason = previous.get("reason") if previous else None

    if run.phase in ("Pending", "Running"):
        reason = "Running" if run.phase == "Running" else "Pending"
        events = []
        if reason == "Running" and previous_reason != "Running":
            events.append(Event("Normal", "Running", f"pipeline run {run.id} is running"))
        return Decision(
            action="none",
            status=with_condition("Unknown", reason, _phase_message(report), run.phase),
            events=events,
        )

    if run.phase == "Interrupted":
        if run.attempt < settings.max_run_attempts:
            message = f"{run.message}; resuming from the last checkpoint (attempt {run.attempt + 1})"
            return Decision(
                action="resume",
                status=with_condition("Unknown", "Resuming", message, "Running"),
                events=[Event("Normal", "Resuming", message)],
                request=request,
            )
        message = f"{run.message}; gave up after {run.attempt} attempts"
        status["completionTime"] = now
        return Decision(
            action="none",
            status=with_condition("False", "BackoffLimitExceeded", message, "Failed"),
            events=[Event("Warning", "BackoffLimitExceeded", message)],
        )

    status["completionTime"] = status.get("completionTime") or now
    if run.phase == "Succeeded":
        output = report.output or {}
        if output.get("uri"):
            status["output"] = {"uri": str(output["uri"]), "version": str(output.get("version", ""))}
        final = status.get("evaluation", {}).get("final", {})
        summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items())
        message = f"published {status.get('output', {}).get('uri', '')}" + (
            f" ({summary})" if summary else ""
        )
        return Decision(
            action="none",
            status=with_condition("True", "Completed", message, "Succeeded"),
            events=[Event("Normal", "Succeeded", message)],
        )
    if run.phase == "Cancelled":
        return Decision(
            action="none",
            status=with_condition("False", "Cancelled", "the pipeline run was cancelled", "Failed"),
            events=[Event("Warning", "Cancelled", "the pipeline run was cancelled")],
        )
    error = report.error or {}
    reason = str(error.get("reason") or run.reason or "PipelineFailed")
    message = str(error.get("message") or run.message or "the pipeline run failed")
    if error.get("step"):
        message = f"step {error['step']}: {message}"
    return Decision(
        action="none",
        status=with_condition("False", reason, message, "Failed"),
        events=[Event("Warning", reason, message)],
    )
