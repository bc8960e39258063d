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
)
from kubetune.plan.runs import RunRequest
from kubetune_contract.finetune import FineTuneJob
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


def _eval_status(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    values = {key: finite_number(report.get(key)) for key in ("evalLoss", "perplexity", "exactMatch")}
    return {key: value for key, value in values.items() if value is not None}


def fill_status(status: dict[str, Any], report: WorkspaceReport, finished_ok: bool) -> None:
    status["progress"] = progress_status(report.progress, finished_ok)
    if report.progress:
        metrics = {
            "trainLoss": finite_number(report.progress.get("trainLoss")),
            "learningRate": finite_number(report.progress.get("learningRate")),
        }
        status["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    evaluation: dict[str, Any] = {}
    if (baseline := _eval_status(report.baseline)) is not None:
        evaluation["baseline"] = baseline
    if (final := _eval_status(report.final)) is not None:
        evaluation["final"] = final
    if report.gates:
        evaluation["gates"] = gate_status(report.gates)
    if evaluation:
        status["evaluation"] = evaluation


def success_message(status: dict[str, Any]) -> str:
    final = status.get("evaluation", {}).get("final", {})
    summary = ", ".join(f"{k} {v:.4g}" for k, v in final.items())
    return f"published {status.get('output', {}).get('uri', '')}" + (f" ({summary})" if summary else "")


def finetune_kind(settings: OperatorConfig, base_dir: Path | None = None) -> JobKind:
    def parse(body: dict[str, Any]) -> BaseModel:
        return parse_resource(body, FineTuneJob)

    def request_for(job: BaseModel) -> RunRequest:
        assert isinstance(job, FineTuneJob)
        return build_request(job, settings, base_dir)

    return JobKind(
        parse=parse, request_for=request_for, fill_status=fill_status, success_message=success_message
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
        decision.status["progress"] = progress_status(None, False)
    return decision
