"""Planning for QuantizeJob: wait for the source FineTuneJob, then run the quantize pipeline.

Pure functions, no I/O: the caller passes in how to look a FineTuneJob up (a Kopf index on a
cluster, the local store in `kubetune up`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kubetune.api.validation import parse_resource
from kubetune.common.uris import absolute
from kubetune.config import MISSING_REFERENCE_GRACE_S, OperatorConfig
from kubetune.plan.lifecycle import (
    Decision,
    Hold,
    JobKind,
    Observed,
    finite_number,
    gate_status,
    job_request,
    plan_job,
    progress_status,
    resource_config,
)
from kubetune.plan.references import FineTuneJobLookup as FineTuneJobLookup
from kubetune.plan.references import published_finetune_job, published_uri
from kubetune.plan.runs import RunRequest
from kubetune_contract.quantize import (
    LatencyReport,
    QualityMetrics,
    QualityReport,
    QuantizeJob,
    QuantizeJobStatus,
    QuantizeReport,
    ResolvedSource,
    SizeReport,
)
from kubetune_contract.workspace import WorkspaceReport


def source_job(
    job: QuantizeJob, lookup: FineTuneJobLookup, missing_grace_s: float = MISSING_REFERENCE_GRACE_S
) -> tuple[dict[str, Any] | None, Hold | None]:
    """The FineTuneJob the job quantizes (None for a ``uri`` model), and why it cannot start yet, if so.

    A FineTuneJob that does not exist is waited for ``missing_grace_s`` seconds (it may be applied
    next), then the job fails with SourceNotFound.
    """
    ref = job.spec.model.fine_tune_job_ref
    if ref is None:
        return None, None
    return published_finetune_job(
        lookup,
        job.metadata.namespace,
        ref.name,
        field="spec.model.fineTuneJobRef",
        referrer=f"QuantizeJob/{job.metadata.name}",
        role="Source",
        missing_grace_s=missing_grace_s,
    )


def resolve_config(
    job: QuantizeJob, source: dict[str, Any] | None, settings: OperatorConfig, base_dir: Path | None
) -> dict[str, Any]:
    spec = job.spec.to_wire()
    if source is not None:
        # The steps get a QuantizeJob the API admits: the reference resolved into the model it published.
        del spec["model"]["fineTuneJobRef"]
        spec["model"]["uri"] = published_uri(source)
        if spec.get("dataset") is None and source.get("spec", {}).get("dataset"):
            # The fine-tune's own held-out split: quality before and after is measured where it was.
            spec["dataset"] = dict(source["spec"]["dataset"])
    spec["model"]["uri"] = absolute(spec["model"]["uri"], base_dir)
    if spec.get("dataset"):
        spec["dataset"]["uri"] = absolute(spec["dataset"]["uri"], base_dir)
        if spec["dataset"].get("validationUri"):
            spec["dataset"]["validationUri"] = absolute(spec["dataset"]["validationUri"], base_dir)
    spec["output"]["uri"] = absolute(spec["output"].get("uri") or settings.artifact_store, base_dir)
    spec["executor"] = spec.get("executor") or settings.default_executor
    return resource_config(job, spec)


def build_request(
    job: QuantizeJob, source: dict[str, Any] | None, settings: OperatorConfig, base_dir: Path | None = None
) -> RunRequest:
    config = resolve_config(job, source, settings, base_dir)
    spec = config["spec"]
    uris = [spec["model"]["uri"], spec["output"]["uri"]]
    if spec.get("dataset"):
        uris.append(spec["dataset"]["uri"])
    return job_request(job, config, settings, base_dir, uris=uris, token=job.spec.model.token_secret_ref)


def _quality(measured: dict[str, Any] | None) -> QualityMetrics | None:
    if not measured:
        return None
    quality = QualityMetrics(
        perplexity=finite_number(measured.get("perplexity")),
        exact_match=finite_number(measured.get("exactMatch")),
    )
    return quality if quality.perplexity is not None or quality.exact_match is not None else None


def fill_status(status: QuantizeJobStatus, report: WorkspaceReport, finished_ok: bool) -> QuantizeJobStatus:
    final = report.quantize_report or {}
    before, after = report.measured_before or {}, report.measured_after or {}
    size_before = final.get("sizeBytes", {}).get("before", before.get("sizeBytes"))
    size_after = final.get("sizeBytes", {}).get("after", after.get("sizeBytes"))
    summary: dict[str, Any] = {}
    if size_before is not None or size_after is not None:
        summary["size_bytes"] = SizeReport(before=size_before, after=size_after)
    ratio = finite_number(final.get("sizeRatio"))
    if ratio is None and size_before and size_after:
        ratio = size_after / size_before
    if ratio is not None:
        summary["size_ratio"] = round(ratio, 4)
    latency = LatencyReport(
        before=finite_number(before.get("latencySecondsPerToken")),
        after=finite_number(after.get("latencySecondsPerToken")),
    )
    if latency.before is not None or latency.after is not None:
        summary["latency"] = latency
    quality_before, quality_after = _quality(before), _quality(after)
    if quality_before is not None or quality_after is not None:
        summary["quality"] = QualityReport(before=quality_before, after=quality_after)
    if report.gates:
        summary["gates"] = gate_status(report.gates)
    update: dict[str, Any] = {"progress": progress_status(report.progress, finished_ok)}
    if summary:
        update["report"] = QuantizeReport(**summary)
    return status.model_copy(update=update)


def success_message(status: QuantizeJobStatus) -> str:
    report = status.report or QuantizeReport()
    parts = []
    if report.size_ratio is not None:
        parts.append(f"size ratio {report.size_ratio:.3f}")
    quality = report.quality or QualityReport()
    before = quality.before.perplexity if quality.before is not None else None
    after = quality.after.perplexity if quality.after is not None else None
    if before and after:
        parts.append(f"perplexity {100 * (after / before - 1):+.2f}%")
    detail = f" ({', '.join(parts)})" if parts else ""
    uri = status.output.uri if status.output is not None else ""
    return f"published {uri}{detail}"


def quantize_kind(
    settings: OperatorConfig, lookup: FineTuneJobLookup, base_dir: Path | None = None
) -> JobKind[QuantizeJobStatus]:
    def parse(body: dict[str, Any]) -> BaseModel:
        return parse_resource(body, QuantizeJob)

    def hold(job: BaseModel) -> Hold | None:
        assert isinstance(job, QuantizeJob)
        return source_job(job, lookup, settings.missing_reference_grace_s)[1]

    def request_for(job: BaseModel) -> RunRequest:
        assert isinstance(job, QuantizeJob)
        return build_request(job, source_job(job, lookup)[0], settings, base_dir)

    def extra_status(job: BaseModel, status: QuantizeJobStatus) -> QuantizeJobStatus:
        assert isinstance(job, QuantizeJob)
        ref = job.spec.model.fine_tune_job_ref
        source = ResolvedSource(
            uri=request_for(job).config["spec"]["model"]["uri"],
            fine_tune_job=ref.name if ref is not None else None,
        )
        return status.model_copy(update={"source": source})

    return JobKind(
        parse=parse,
        request_for=request_for,
        status_model=QuantizeJobStatus,
        fill_status=fill_status,
        success_message=success_message,
        hold=hold,
        extra_status=extra_status,
    )


def plan_quantize(
    body: dict[str, Any],
    observed: Observed,
    settings: OperatorConfig,
    now: str,
    lookup: FineTuneJobLookup,
    base_dir: Path | None = None,
) -> Decision:
    """Decide the next step for one QuantizeJob."""
    return plan_job(quantize_kind(settings, lookup, base_dir), body, observed, settings, now)
