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
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from kubetune.api.validation import ResourceInvalid
from kubetune.common.clock import parse_time
from kubetune.common.events import Event
from kubetune.common.uris import absolute, pvc_claims, short_uid
from kubetune.config import OperatorConfig
from kubetune.plan.runs import RunRequest, RunStatus
from kubetune_contract.common import Condition, GateResult, KubeModel, OutputRef, PipelineRunRef
from kubetune_contract.conditions import SUCCEEDED, find_condition, set_job_conditions
from kubetune_contract.finetune import FineTuneJobStatus, Progress
from kubetune_contract.quantize import QuantizeJobStatus
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
class GiveUp:
    """How a wait that may never end does end: after ``after_s`` seconds, the job fails with this."""

    after_s: float
    reason: str
    message: str


@dataclass(frozen=True)
class Hold:
    """Why a valid job cannot be submitted yet (Unknown: it waits) or ever (False: it fails).

    ``give_up``: the wait depends on something no run of this job can bring about (a resource it names
    does not exist), so it is bounded; counted from when the job started waiting (see :func:`waiting_since`).
    """

    status: Literal["Unknown", "False"]
    reason: str
    message: str
    give_up: GiveUp | None = None


def waiting_since(body: dict[str, Any], now: str) -> str:
    """When a job that has no run yet started waiting: its Succeeded condition has been Unknown since
    the first pass (lastTransitionTime), else it was created then; ``now`` on first sight."""
    condition = find_condition(list((body.get("status") or {}).get("conditions") or []), SUCCEEDED) or {}
    if condition.get("status") == "Unknown" and condition.get("lastTransitionTime"):
        return str(condition["lastTransitionTime"])
    return str((body.get("metadata") or {}).get("creationTimestamp") or now)


def _bounded(hold: Hold, body: dict[str, Any], now: str) -> Hold:
    """The hold, or the failure it turns into once its wait has lasted longer than it may."""
    if hold.give_up is None:
        return hold
    waited = (parse_time(now) - parse_time(waiting_since(body, now))).total_seconds()
    if waited < hold.give_up.after_s:
        return hold
    return Hold("False", hold.give_up.reason, hold.give_up.message)


# The status model of the kind being planned; statuses are built as these, then written by alias.
JobStatus = TypeVar("JobStatus", FineTuneJobStatus, QuantizeJobStatus)


def _unchanged(job: BaseModel, status: JobStatus) -> JobStatus:
    return status


@dataclass(frozen=True)
class JobKind(Generic[JobStatus]):
    """What differs between kinds of job.

    ``fill_status``: the status with what the steps reported (``True``: the run succeeded);
    ``extra_status``: the status with what the kind knows from the spec alone (e.g. the source).
    """

    parse: Callable[[dict[str, Any]], BaseModel]
    request_for: Callable[[BaseModel], RunRequest]
    status_model: type[JobStatus]
    fill_status: Callable[[JobStatus, WorkspaceReport, bool], JobStatus]
    success_message: Callable[[JobStatus], str]
    hold: Callable[[BaseModel], Hold | None] = lambda _: None
    extra_status: Callable[[BaseModel, JobStatus], JobStatus] = _unchanged


def status_patch(status: KubeModel) -> dict[str, Any]:
    """The status as written to the resource: camelCase, only the fields set, no nulls."""
    return status.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


def _previous_status(model: type[JobStatus], current: dict[str, Any]) -> JobStatus:
    """The status as it was (Kopf's bookkeeping left out); afresh if an older operator wrote fields
    this one does not know."""
    kept = {key: value for key, value in current.items() if not key.startswith("kopf")}
    try:
        return model.model_validate(kept)
    except ValidationError:
        return model()


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


def progress_status(progress: dict[str, Any] | None, finished_ok: bool) -> Progress:
    progress = progress or {}
    step = int(progress.get("step") or 0)
    total = int(progress.get("totalSteps") or 0)
    percent = 100 if finished_ok else (min(99, int(100 * step / total)) if total else 0)
    return Progress(
        step=step,
        total_steps=total,
        epoch=round(float(progress.get("epoch") or 0.0), 3),
        percent=percent,
        resumed_from_step=_step_or_none(progress.get("resumedFromStep")),
    )


def _step_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def gate_status(gates: list[dict[str, Any]]) -> list[GateResult]:
    """The gates as the steps wrote them (gates.json), with a value that is not finite left out."""
    return [
        GateResult(
            metric=str(gate.get("metric")),
            op=str(gate.get("op")),
            threshold=float(gate["threshold"]),
            value=finite_number(gate.get("value")),
            passed=bool(gate.get("passed")),
        )
        for gate in gates
    ]


def phase_message(report: WorkspaceReport) -> str:
    progress = report.progress or {}
    phase = str(progress.get("phase") or "starting")
    if phase in ("training", "quantizing") and progress.get("totalSteps"):
        step, total = progress.get("step", 0), progress["totalSteps"]
        resumed_from = _step_or_none(progress.get("resumedFromStep"))
        if resumed_from is None:
            return f"{phase}: step {step}/{total}"
        if step == resumed_from:
            return f"{phase}: resuming from step {resumed_from} of {total}"
        return f"{phase}: step {step}/{total} (resumed from step {resumed_from})"
    return phase.replace("-", " ")


def resume_point(report: WorkspaceReport) -> str:
    """Where an interrupted run will pick up: its newest checkpoint's step, when the steps reported one."""
    checkpoint_step = _step_or_none((report.progress or {}).get("checkpointStep"))
    return "the last checkpoint" if checkpoint_step is None else f"step {checkpoint_step}"


def plan_job(
    kind: JobKind[JobStatus],
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
    status = _previous_status(kind.status_model, current).model_copy(
        update={"observed_generation": generation}
    )

    def ended(
        status: JobStatus, state: Literal["True", "False", "Unknown"], reason: str, message: str, phase: str
    ) -> dict[str, Any]:
        updated = set_job_conditions(conditions, state, reason, message, now=now, generation=generation)
        typed = [Condition.model_validate(condition) for condition in updated]
        return status_patch(status.model_copy(update={"conditions": typed, "phase": phase}))

    previous = find_condition(conditions, SUCCEEDED)
    previous_reason = previous.get("reason") if previous else None

    if is_finished(current, generation):
        return Decision(action="none", status=current)

    try:
        job = kind.parse(body)
    except ResourceInvalid as invalid:
        message = "; ".join(str(issue) for issue in invalid.issues)
        status = status.model_copy(update={"completion_time": status.completion_time or now})
        return Decision(
            action="none",
            status=ended(status, "False", "InvalidSpec", message, "Failed"),
            events=[Event("Warning", "InvalidSpec", message)],
        )
    run = observed.run

    if run is None:
        hold = kind.hold(job)
        if hold is not None:
            hold = _bounded(hold, body, now)
            failed = hold.status == "False"
            if failed:
                status = status.model_copy(update={"completion_time": now})
            events = (
                []
                if previous_reason == hold.reason
                else [Event("Warning" if failed else "Normal", hold.reason, hold.message)]
            )
            return Decision(
                action="none",
                status=ended(
                    status, hold.status, hold.reason, hold.message, "Failed" if failed else "Pending"
                ),
                events=events,
            )
        request = kind.request_for(job)
        status = kind.extra_status(job, status)
        status = status.model_copy(update={"start_time": status.start_time or now})
        return Decision(
            action="submit",
            status=ended(status, "Unknown", "Pending", "submitting the pipeline run", "Pending"),
            events=[Event("Normal", "Submitted", f"submitting pipeline run {request.key}")],
            request=request,
        )

    request = kind.request_for(job)
    status = kind.extra_status(job, status)
    pipeline_run = PipelineRunRef(
        backend=run.backend, id=run.id, url=run.url, name=request.key, generation=generation
    )
    status = status.model_copy(update={"pipeline_run": pipeline_run, "start_time": status.start_time or now})
    report = observed.report
    status = kind.fill_status(status, report, run.phase == "Succeeded")

    if run.phase in ("Pending", "Running"):
        reason = "Running" if run.phase == "Running" else "Pending"
        events = []
        if reason == "Running" and previous_reason != "Running":
            events.append(Event("Normal", "Running", f"pipeline run {run.id} is running"))
        return Decision(
            action="none",
            status=ended(status, "Unknown", reason, phase_message(report), run.phase),
            events=events,
        )

    if run.phase == "Interrupted":
        if run.attempt < settings.max_run_attempts:
            message = f"{run.message}; resuming from {resume_point(report)} (attempt {run.attempt + 1})"
            return Decision(
                action="resume",
                status=ended(status, "Unknown", "Resuming", message, "Running"),
                events=[Event("Normal", "Resuming", message)],
                request=request,
            )
        message = f"{run.message}; gave up after {run.attempt} attempts"
        status = status.model_copy(update={"completion_time": now})
        return Decision(
            action="none",
            status=ended(status, "False", "BackoffLimitExceeded", message, "Failed"),
            events=[Event("Warning", "BackoffLimitExceeded", message)],
        )

    status = status.model_copy(update={"completion_time": status.completion_time or now})
    if run.phase == "Succeeded":
        output = report.output or {}
        if output.get("uri"):
            published = OutputRef(uri=str(output["uri"]), version=str(output.get("version", "")))
            status = status.model_copy(update={"output": published})
        message = kind.success_message(status)
        return Decision(
            action="none",
            status=ended(status, "True", "Completed", message, "Succeeded"),
            events=[Event("Normal", "Succeeded", message)],
        )
    if run.phase == "Cancelled":
        return Decision(
            action="none",
            status=ended(status, "False", "Cancelled", "the pipeline run was cancelled", "Failed"),
            events=[Event("Warning", "Cancelled", "the pipeline run was cancelled")],
        )
    error = report.error or {}
    reason = str(error.get("reason") or run.reason or "PipelineFailed")
    message = str(error.get("message") or run.message or "the pipeline run failed")
    if error.get("step"):
        message = f"step {error['step']}: {message}"
    return Decision(
        action="none",
        status=ended(status, "False", reason, message, "Failed"),
        events=[Event("Warning", reason, message)],
    )
