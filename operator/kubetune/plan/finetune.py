"""Planning for FineTuneJob: spec + what was observed -> the action to take and the next status.

Pure functions, no I/O: the Kopf handlers and `kubetune up` both call `plan_finetune` and then
carry out its decision through a backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kubetune.api.validation import parse_resource
from kubetune.common.events import Event
from kubetune.common.uris import absolute
from kubetune.config import OperatorConfig
from kubetune.plan.lifecycle import (
    Decision,
    JobKind,
    Observed,
    finite_number,
    gate_status,
    is_finished,
    job_key,
    job_request,
    plan_job,
    progress_status,
    resource_config,
    status_patch,
)
from kubetune.plan.runs import RunRequest
from kubetune_contract.finetune import (
    EvalMetrics,
    EvaluationStatus,
    FineTuneJob,
    FineTuneJobStatus,
    ReferenceBaselines,
    TrainMetrics,
)
from kubetune_contract.workspace import WorkspaceReport

__all__ = ["Decision", "Event", "Observed", "build_request", "is_finished", "plan_finetune", "run_key"]


def run_key(job: FineTuneJob) -> str:
    return job_key(job)


def resolve_config(
    job: FineTuneJob, settings: OperatorConfig, base_dir: Path | None = None
) -> dict[str, Any]:
    """The job as the pipeline steps receive it: defaults filled, store and relative paths resolved."""
    spec = job.spec.to_wire()
    spec["baseModel"]["uri"] = absolute(spec["baseModel"]["uri"], base_dir)
    spec["dataset"]["uri"] = absolute(spec["dataset"]["uri"], base_dir)
    if spec["dataset"].get("validationUri"):
        spec["dataset"]["validationUri"] = absolute(spec["dataset"]["validationUri"], base_dir)
    spec["output"]["uri"] = absolute(spec["output"].get("uri") or settings.artifact_store, base_dir)
    spec["executor"] = spec.get("executor") or settings.default_executor
    return resource_config(job, spec)


def build_request(job: FineTuneJob, settings: OperatorConfig, base_dir: Path | None = None) -> RunRequest:
    config = resolve_config(job, settings, base_dir)
    spec = config["spec"]
    uris = [spec["baseModel"]["uri"], spec["dataset"]["uri"], spec["output"]["uri"]]
    if spec["dataset"].get("validationUri"):
        uris.append(spec["dataset"]["validationUri"])
    return job_request(job, config, settings, base_dir, uris=uris, token=job.spec.base_model.token_secret_ref)


def _eval_metrics(report: dict[str, Any] | None) -> EvalMetrics | None:
    if not report:
        return None
    return EvalMetrics(
        eval_loss=finite_number(report.get("evalLoss")),
        perplexity=finite_number(report.get("perplexity")),
        exact_match=finite_number(report.get("exactMatch")),
        lenient_match=finite_number(report.get("lenientMatch")),
    )


def _reference_baselines(report: dict[str, Any] | None) -> ReferenceBaselines | None:
    """The trivial predictors' scores, which the baseline evaluation writes beside the base model's."""
    baselines = ReferenceBaselines(
        majority_class=finite_number((report or {}).get("majorityClass")),
        nearest_neighbour=finite_number((report or {}).get("nearestNeighbour")),
    )
    return baselines if baselines.to_wire() else None


def fill_status(status: FineTuneJobStatus, report: WorkspaceReport, finished_ok: bool) -> FineTuneJobStatus:
    update: dict[str, Any] = {"progress": progress_status(report.progress, finished_ok)}
    if report.progress:
        update["metrics"] = TrainMetrics(
            train_loss=finite_number(report.progress.get("trainLoss")),
            learning_rate=finite_number(report.progress.get("learningRate")),
        )
    evaluation: dict[str, Any] = {}
    if (baseline := _eval_metrics(report.baseline)) is not None:
        evaluation["baseline"] = baseline
    if (final := _eval_metrics(report.final)) is not None:
        evaluation["final"] = final
    if (reference := _reference_baselines(report.baseline)) is not None:
        evaluation["reference_baselines"] = reference
    if report.gates:
        evaluation["gates"] = gate_status(report.gates)
    if evaluation:
        update["evaluation"] = EvaluationStatus(**evaluation)
    return status.model_copy(update=update)


def success_message(status: FineTuneJobStatus) -> str:
    final = status.evaluation.final if status.evaluation is not None else None
    measured = final.to_wire() if final is not None else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
    uri = status.output.uri if status.output is not None else ""
    return f"published {uri}" + (f" ({summary})" if summary else "")


def finetune_kind(settings: OperatorConfig, base_dir: Path | None = None) -> JobKind[FineTuneJobStatus]:
    def parse(body: dict[str, Any]) -> BaseModel:
        return parse_resource(body, FineTuneJob)

    def request_for(job: BaseModel) -> RunRequest:
        assert isinstance(job, FineTuneJob)
        return build_request(job, settings, base_dir)

    return JobKind(
        parse=parse,
        request_for=request_for,
        status_model=FineTuneJobStatus,
        fill_status=fill_status,
        success_message=success_message,
    )


def plan_finetune(
    body: dict[str, Any],
    observed: Observed,
    settings: OperatorConfig,
    now: str,
    base_dir: Path | None = None,
) -> Decision:
    """Decide the next step for one FineTuneJob. Never raises for a bad spec: it reports it."""
    decision = plan_job(finetune_kind(settings, base_dir), body, observed, settings, now)
    if decision.action == "submit":
        decision.status["progress"] = status_patch(progress_status(None, False))
    return decision
