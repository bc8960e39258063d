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
from kubetune.config import MISSING_REFERENCE_GRACE_S, OperatorConfig
from kubetune.plan.lifecycle import (
    Decision,
    Hold,
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
from kubetune.plan.references import (
    FineTuneJobLookup,
    no_finetune_jobs,
    published_finetune_job,
    published_uri,
)
from kubetune.plan.runs import RunRequest
from kubetune_contract.finetune import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    CheckpointStatus,
    CrossValidationStatus,
    EvalMetrics,
    EvaluationStatus,
    FairnessResult,
    FairnessStatus,
    FineTuneJob,
    FineTuneJobStatus,
    FoldMetric,
    HarnessResult,
    ReferenceBaselines,
    ReferenceResult,
    TrainMetrics,
    reference_drop,
    trainjob_name,
)
from kubetune_contract.workspace import WorkspaceReport

__all__ = ["Decision", "Event", "Observed", "build_request", "is_finished", "plan_finetune", "run_key"]


def run_key(job: FineTuneJob) -> str:
    return job_key(job)


def teacher_job(
    job: FineTuneJob, lookup: FineTuneJobLookup, missing_grace_s: float = MISSING_REFERENCE_GRACE_S
) -> tuple[dict[str, Any] | None, Hold | None]:
    """The FineTuneJob whose published model a distillation job learns from (None without a
    teacher.fineTuneJobRef), and why the job cannot start yet, if so (as a QuantizeJob's source)."""
    distillation = job.spec.method.distillation
    ref = distillation.teacher.fine_tune_job_ref if distillation is not None else None
    if ref is None:
        return None, None
    return published_finetune_job(
        lookup,
        job.metadata.namespace,
        ref.name,
        field="spec.method.distillation.teacher.fineTuneJobRef",
        referrer=f"FineTuneJob/{job.metadata.name}",
        role="Teacher",
        missing_grace_s=missing_grace_s,
    )


def resolve_config(
    job: FineTuneJob,
    settings: OperatorConfig,
    base_dir: Path | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job as the pipeline steps receive it: defaults filled, store and relative paths resolved, and
    a teacher's fineTuneJobRef resolved into the model that job published (`teacher`)."""
    spec = job.spec.to_wire()
    if teacher is not None:
        spec["method"]["distillation"]["teacher"] = {"uri": published_uri(teacher)}
    if spec["method"].get("distillation"):
        resolved = spec["method"]["distillation"]["teacher"]
        resolved["uri"] = absolute(resolved["uri"], base_dir)
    spec["baseModel"]["uri"] = absolute(spec["baseModel"]["uri"], base_dir)
    spec["dataset"]["uri"] = absolute(spec["dataset"]["uri"], base_dir)
    if spec["dataset"].get("validationUri"):
        spec["dataset"]["validationUri"] = absolute(spec["dataset"]["validationUri"], base_dir)
    if spec["training"].get("replay"):
        spec["training"]["replay"]["uri"] = absolute(spec["training"]["replay"]["uri"], base_dir)
    for reference in spec["evaluation"].get("reference") or []:
        reference["uri"] = absolute(reference["uri"], base_dir)
    for task in (spec["evaluation"].get("harness") or {}).get("tasks") or []:
        task["uri"] = absolute(task["uri"], base_dir)
    spec["output"]["uri"] = absolute(spec["output"].get("uri") or settings.artifact_store, base_dir)
    spec["executor"] = spec.get("executor") or settings.default_executor
    return resource_config(job, spec)


def build_request(
    job: FineTuneJob,
    settings: OperatorConfig,
    base_dir: Path | None = None,
    teacher: dict[str, Any] | None = None,
) -> RunRequest:
    config = resolve_config(job, settings, base_dir, teacher)
    spec = config["spec"]
    uris = [spec["baseModel"]["uri"], spec["dataset"]["uri"], spec["output"]["uri"]]
    if spec["method"].get("distillation"):
        uris.append(spec["method"]["distillation"]["teacher"]["uri"])
    if spec["dataset"].get("validationUri"):
        uris.append(spec["dataset"]["validationUri"])
    if spec["training"].get("replay"):
        uris.append(spec["training"]["replay"]["uri"])
    uris += [reference["uri"] for reference in spec["evaluation"].get("reference") or []]
    request = job_request(
        job, config, settings, base_dir, uris=uris, token=job.spec.base_model.token_secret_ref
    )
    # Kueue admits the pipeline's pods (as the finetune step does the TrainJob) from the team's LocalQueue,
    # ordered by the WorkloadPriorityClass.
    request.pipeline_options["labels"] = {**request.pipeline_options["labels"], **kueue_labels(job)}
    return request


def kueue_labels(job: FineTuneJob) -> dict[str, str]:
    scheduling = job.spec.scheduling
    labels: dict[str, str] = {}
    if scheduling is not None and scheduling.queue_name is not None:
        labels[KUEUE_QUEUE_LABEL] = scheduling.queue_name
    if scheduling is not None and scheduling.priority_class_name is not None:
        labels[KUEUE_PRIORITY_LABEL] = scheduling.priority_class_name
    return labels


def _eval_metrics(report: dict[str, Any] | None) -> EvalMetrics | None:
    if not report:
        return None
    return EvalMetrics(
        eval_loss=finite_number(report.get("evalLoss")),
        perplexity=finite_number(report.get("perplexity")),
        exact_match=finite_number(report.get("exactMatch")),
        lenient_match=finite_number(report.get("lenientMatch")),
        preference_accuracy=finite_number(report.get("preferenceAccuracy")),
    )


def _reference_baselines(report: dict[str, Any] | None) -> ReferenceBaselines | None:
    """The trivial predictors' scores, which the baseline evaluation writes beside the base model's."""
    baselines = ReferenceBaselines(
        majority_class=finite_number((report or {}).get("majorityClass")),
        nearest_neighbour=finite_number((report or {}).get("nearestNeighbour")),
    )
    return baselines if baselines.to_wire() else None


def _reference_scores(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    scores = (report or {}).get("reference")
    if not isinstance(scores, dict):
        return {}
    return {str(name): score for name, score in scores.items() if isinstance(score, dict)}


def _reference_results(report: WorkspaceReport) -> list[ReferenceResult]:
    """Each reference set's score before and after tuning, and what tuning lost on it."""
    before, after = _reference_scores(report.baseline), _reference_scores(report.final)
    results = []
    for name in dict.fromkeys([*before, *after]):
        metric = str((after.get(name) or before.get(name) or {}).get("metric"))
        baseline = finite_number((before.get(name) or {}).get("value"))
        final = finite_number((after.get(name) or {}).get("value"))
        drop = reference_drop(metric, baseline, final)
        results.append(ReferenceResult(name=name, metric=metric, baseline=baseline, final=final, drop=drop))
    return results


def _checkpoints(report: dict[str, Any] | None) -> list[CheckpointStatus]:
    """The periodic evaluations of evaluation/checkpoints.json, the selected one marked."""
    entries = (report or {}).get("checkpoints")
    return [
        CheckpointStatus(
            step=int(entry["step"]),
            train_loss=finite_number(entry.get("trainLoss")),
            metrics=_eval_metrics(entry.get("metrics")) or EvalMetrics(),
            selected=bool(entry.get("selected")),
        )
        for entry in entries or []
        if isinstance(entry, dict) and isinstance(entry.get("step"), int)
    ]


def _fairness_result(evaluation: dict[str, Any] | None) -> FairnessResult | None:
    entry = (evaluation or {}).get("fairness")
    if not isinstance(entry, dict) or not isinstance(entry.get("pairs"), int):
        return None
    return FairnessResult(
        pairs=entry["pairs"],
        flip_rate=finite_number(entry.get("flipRate")),
        score_gap=finite_number(entry.get("scoreGap")),
    )


def _fairness(report: WorkspaceReport) -> FairnessStatus | None:
    """evaluation.fairness of the base and the tuned model, as the evaluate steps measured it."""
    baseline, final = _fairness_result(report.baseline), _fairness_result(report.final)
    if baseline is None and final is None:
        return None
    return FairnessStatus(baseline=baseline, final=final)


def _fold_metric(entry: object) -> FoldMetric | None:
    if not isinstance(entry, dict):
        return None
    mean, std = finite_number(entry.get("mean")), finite_number(entry.get("std"))
    raw = entry.get("perFold")
    per_fold = [finite_number(value) for value in raw] if isinstance(raw, list) else []
    if mean is None or std is None or not per_fold:
        return None
    values = [value for value in per_fold if value is not None]
    return FoldMetric(mean=mean, std=std, per_fold=values) if len(values) == len(per_fold) else None


def _cross_validation(summary: dict[str, Any] | None) -> CrossValidationStatus | None:
    """evaluation/cross-validation.json, which publish writes from the folds' evaluations."""
    if not summary or not isinstance(summary.get("folds"), int):
        return None
    entries = summary.get("metrics")
    metrics = {
        str(name): metric
        for name, entry in (entries.items() if isinstance(entries, dict) else [])
        if (metric := _fold_metric(entry)) is not None
    }
    return CrossValidationStatus(folds=summary["folds"], metrics=metrics)


def _harness_scores(report: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    scores = (report or {}).get("harness")
    if not isinstance(scores, dict):
        return {}
    return {str(task): entry for task, entry in scores.items() if isinstance(entry, dict)}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _harness_results(report: WorkspaceReport) -> list[HarnessResult]:
    """Every lm-evaluation-harness score (evaluation.harness) on the base and the tuned model."""
    before, after = _harness_scores(report.baseline), _harness_scores(report.final)
    results = []
    for task in dict.fromkeys([*before, *after]):
        entry_before, entry_after = before.get(task) or {}, after.get(task) or {}
        scores_before = _dict(entry_before.get("metrics"))
        scores_after = _dict(entry_after.get("metrics"))
        directions = _dict(entry_after.get("higherIsBetter")) or _dict(entry_before.get("higherIsBetter"))
        samples = entry_after.get("samples", entry_before.get("samples"))
        for metric in dict.fromkeys([*scores_before, *scores_after]):
            results.append(
                HarnessResult(
                    task=task,
                    metric=str(metric),
                    baseline=finite_number(scores_before.get(metric)),
                    final=finite_number(scores_after.get(metric)),
                    higher_is_better=bool(directions.get(str(metric).partition(",")[0], True)),
                    samples=samples if isinstance(samples, int) else None,
                )
            )
    return results


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
    if references := _reference_results(report):
        evaluation["reference"] = references
    if (fairness := _fairness(report)) is not None:
        evaluation["fairness"] = fairness
    if harness := _harness_results(report):
        evaluation["harness"] = harness
    if (cross_validation := _cross_validation(report.cross_validation)) is not None:
        evaluation["cross_validation"] = cross_validation
    if report.gates:
        evaluation["gates"] = gate_status(report.gates)
    if evaluation:
        update["evaluation"] = EvaluationStatus(**evaluation)
    if checkpoints := _checkpoints(report.checkpoints):
        update["checkpoints"] = checkpoints
    if report.checkpoints and isinstance(report.checkpoints.get("earlyStoppedAtStep"), int):
        update["early_stopped_at_step"] = report.checkpoints["earlyStoppedAtStep"]
    return status.model_copy(update=update)


def success_message(status: FineTuneJobStatus) -> str:
    final = status.evaluation.final if status.evaluation is not None else None
    measured = final.to_wire() if final is not None else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
    uri = status.output.uri if status.output is not None else ""
    return f"published {uri}" + (f" ({summary})" if summary else "")


def finetune_kind(
    settings: OperatorConfig, base_dir: Path | None = None, lookup: FineTuneJobLookup = no_finetune_jobs
) -> JobKind[FineTuneJobStatus]:
    def parse(body: dict[str, Any]) -> BaseModel:
        return parse_resource(body, FineTuneJob)

    def hold(job: BaseModel) -> Hold | None:
        assert isinstance(job, FineTuneJob)
        return teacher_job(job, lookup, settings.missing_reference_grace_s)[1]

    def request_for(job: BaseModel) -> RunRequest:
        assert isinstance(job, FineTuneJob)
        return build_request(job, settings, base_dir, teacher_job(job, lookup)[0])

    return JobKind(
        parse=parse,
        request_for=request_for,
        status_model=FineTuneJobStatus,
        fill_status=fill_status,
        success_message=success_message,
        hold=hold,
    )


def plan_finetune(
    body: dict[str, Any],
    observed: Observed,
    settings: OperatorConfig,
    now: str,
    base_dir: Path | None = None,
    lookup: FineTuneJobLookup = no_finetune_jobs,
) -> Decision:
    """Decide the next step for one FineTuneJob. Never raises for a bad spec: it reports it.

    `lookup` finds FineTuneJobs by namespace and name, for a distillation teacher's fineTuneJobRef."""
    decision = plan_job(finetune_kind(settings, base_dir, lookup), body, observed, settings, now)
    if decision.action == "submit":
        decision.status["progress"] = status_patch(progress_status(None, False))
    run_ref = decision.status.get("pipelineRun")
    if isinstance(run_ref, dict) and run_ref.get("backend") == "kfp":
        job = parse_resource(body, FineTuneJob)
        if job.spec.training.distributed is not None:
            # The finetune step creates this TrainJob (kubetune_components.finetune.trainjob).
            workspace = build_request(job, settings, base_dir, teacher_job(job, lookup)[0]).workspace
            run_ref["trainJob"] = trainjob_name(job.metadata.name, workspace)
    return decision
