"""The life of a job resource, whatever its kind: validate -> (wait) -> submit -> run -> end.

Pure functions: each kind (FineTuneJob, QuantizeJob) supplies how to build its run request, what
it must wait for, and which status fields its steps report; this module decides everything else the
same way for all of them (conditions, events, resume of interrupted runs, exactly-once submission).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from kubetune.api.validation import ResourceInvalid
from kubetune.common.events import Event
from kubetune.common.uris import absolute, pvc_claims, short_uid
from kubetune.config import OperatorConfig
from kubetune.plan.runs import RunRequest, RunStatus
from kubetune_contract.conditions import SUCCEEDED, find_condition, set_job_conditions
from kubetune_contract.workspace import WorkspaceReport

Action = Literal["none", "submit", "resume", "cancel"]


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


@dataclass(frozen=True)
class Hold:
    """Why a valid job cannot be submitted yet (Unknown: it waits) or ever (False: it fails)."""

    status: Literal["Unknown", "False"]
    reason: str
    message: str


@dataclass(frozen=True)
class JobKind:
    """What differs between kinds of job."""

    parse: Callable[[dict[str, Any]], BaseModel]
    request_for: Callable[[BaseModel], RunRequest]
    fill_status: Callable[[dict[str, Any], WorkspaceReport, bool], None]
    success_message: Callable[[dict[str, Any]], str]
    hold: Callable[[BaseModel], Hold | None] = lambda _: None
    extra_status: Callable[[BaseModel], dict[str, Any]] = lambda _: {}


def is_finished(status: dict[str, Any] | None, generation: int | None = None) -> bool:
    """Whether the job ended (Succeeded True or False) for this generation."""
    if not status:
        return False
    condition = find_condition(status.get("conditions") or [], SUCCEEDED)
    if condition is None or condition.get("status") == "Unknown":
        return False
    return generation is None or status.get("observedGeneration") == generation


def resource_config(job: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline steps receive: the resource with its resolved spec and identity."""
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


def job_key(job: Any) -> str:
    """The run key of one generation of one job: kind, namespace, name, generation and uid."""
    meta = job.metadata
    prefix = "".join(c for c in job.kind if c.isupper()).lower()  # FineTuneJob -> ftj, QuantizeJob -> qj
    return f"{prefix}-{meta.namespace}-{meta.name}-g{meta.generation or 1}-{short_uid(meta.uid)}"


def job_request(
    job: Any,
    config: dict[str, Any],
    settings: OperatorConfig,
    base_dir: Path | None,
    *,
    uris: list[str],
    token: Any = None,
) -> RunRequest:
    """The run of one generation of one job: its key, workspace, labels and cluster options."""
    meta = job.metadata
    generation = meta.generation or 1
    root = settings.workspace_root.rstrip("/")
    workspace = absolute(f"{root}/{meta.namespace}/{meta.name}/g{generation}-{short_uid(meta.uid)}", base_dir)
    labels = {
        "kubetune.dev/kind": job.kind.lower(),
        "kubetune.dev/name": meta.name,
        "kubetune.dev/namespace": meta.namespace,
        "kubetune.dev/generation": str(generation),
    }
    return RunRequest(
        key=job_key(job),
        kind=job.kind,
        display_name=f"{meta.namespace}/{meta.name}",
        config=config,
        workspace=workspace,
        experiment=f"kubetune-{meta.namespace}",
        labels=labels,
        pipeline_options={
            "image": settings.runtime_image,
            "pvc_claims": pvc_claims([*uris, workspace]),
            "token_secret": [token.name, token.key] if token else None,
            "labels": labels,
        },
    )


def finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def progress_status(progress: dict[str, Any] | None, finished_ok: bool) -> dict[str, Any]:
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


def gate_status(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "metric": str(gate.get("metric")),
            "op": str(gate.get("op")),
            "threshold": finite_number(gate.get("threshold")),
            "value": finite_number(gate.get("value")),
            "passed": bool(gate.get("passed")),
        }
        for gate in gates
    ]


def phase_message(report: WorkspaceReport) -> str:
    progress = report.progress or {}
    phase = str(progress.get("phase") or "starting")
    if phase in ("training", "quantizing") and progress.get("totalSteps"):
        return f"{phase}: step {progress.get('step', 0)}/{progress['totalSteps']}"
    return phase.replace("-", " ")


def plan_job(
    kind: JobKind,
    body: dict[str, Any],
    observed: Observed,
    settings: OperatorConfig,
    now: str,
) -> Decision:
    """Decide the next step for one job. Never raises for a bad spec: it reports it."""
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    current = copy.deepcopy(body.get("status") or {})
    conditions: list[dict[str, Any]] = list(current.get("conditions") or [])
    status: dict[str, Any] = {k: v for k, v in current.items() if not k.startswith("kopf")}
    status["observedGeneration"] = generation

    def with_condition(
        state: Literal["True", "False", "Unknown"], reason: str, message: str, phase: str
    ) -> dict[str, Any]:
        status["conditions"] = set_job_conditions(
            conditions, state, reason, message, now=now, generation=generation
        )
        status["phase"] = phase
        return status

    previous = find_condition(conditions, SUCCEEDED)
    previous_reason = previous.get("reason") if previous else None

    if is_finished(current, generation):
        return Decision(action="none", status=current)

    try:
        job = kind.parse(body)
    except ResourceInvalid as invalid:
        message = "; ".join(str(issue) for issue in invalid.issues)
        status.setdefault("completionTime", now)
        return Decision(
            action="none",
            status=with_condition("False", "InvalidSpec", message, "Failed"),
            events=[Event("Warning", "InvalidSpec", message)],
        )
    run = observed.run

    if run is None:
        hold = kind.hold(job)
        if hold is not None:
            failed = hold.status == "False"
            if failed:
                status["completionTime"] = now
            events = (
                []
                if previous_reason == hold.reason
                else [Event("Warning" if failed else "Normal", hold.reason, hold.message)]
            )
            return Decision(
                action="none",
                status=with_condition(
                    hold.status, hold.reason, hold.message, "Failed" if failed else "Pending"
                ),
                events=events,
            )
        request = kind.request_for(job)
        status.update(kind.extra_status(job))
        status["startTime"] = status.get("startTime") or now
        return Decision(
            action="submit",
            status=with_condition("Unknown", "Pending", "submitting the pipeline run", "Pending"),
            events=[Event("Normal", "Submitted", f"submitting pipeline run {request.key}")],
            request=request,
        )

    request = kind.request_for(job)
    status.update(kind.extra_status(job))
    status["pipelineRun"] = {
        "backend": run.backend,
        "id": run.id,
        "url": run.url,
        "name": request.key,
        "generation": generation,
    }
    status["startTime"] = status.get("startTime") or now
    report = observed.report
    kind.fill_status(status, report, run.phase == "Succeeded")

    if run.phase in ("Pending", "Running"):
        reason = "Running" if run.phase == "Running" else "Pending"
        events = []
        if reason == "Running" and previous_reason != "Running":
            events.append(Event("Normal", "Running", f"pipeline run {run.id} is running"))
        return Decision(
            action="none",
            status=with_condition("Unknown", reason, phase_message(report), run.phase),
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
        message = kind.success_message(status)
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
