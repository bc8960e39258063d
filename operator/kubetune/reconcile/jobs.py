"""Observe -> plan -> act, shared by the Kopf handlers and by `kubetune up`.

Everything that decides is in kubetune.plan; this module only gathers observations from the backend
and the run's workspace, and carries the decision out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.validation import ResourceInvalid, parse_resource
from kubetune.backends.kfp import KfpBackend
from kubetune.backends.local import LocalBackend
from kubetune.common.clock import utc_now
from kubetune.config import OperatorConfig
from kubetune.plan import quantize as quantize_plan
from kubetune.plan.finetune import build_request, plan_finetune, teacher_job
from kubetune.plan.lifecycle import Decision, Observed
from kubetune.plan.quantize import plan_quantize
from kubetune.plan.references import FineTuneJobLookup, no_finetune_jobs
from kubetune.plan.runs import Backend, RunRequest, RunStatus
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.quantize import QuantizeJob
from kubetune_contract.workspace import WorkspaceReport


@dataclass
class Backends:
    """The backends of one control plane, created on first use."""

    settings: OperatorConfig
    _made: dict[str, Backend] = field(default_factory=dict)

    def get(self, executor: str) -> Backend:
        if executor not in self._made:
            if executor == "local":
                self._made[executor] = LocalBackend(self.settings.home / "local-runs")
            elif executor == "kfp":
                self._made[executor] = KfpBackend.from_settings(self.settings)
            else:
                raise ValueError(f"unknown executor {executor!r}")
        return self._made[executor]

    def local(self) -> LocalBackend | None:
        backend = self._made.get("local")
        return backend if isinstance(backend, LocalBackend) else None


def resource_namespace(request: RunRequest) -> str:
    return str(request.config["metadata"]["namespace"])


def observed_report(run: RunStatus | None, request: RunRequest) -> WorkspaceReport:
    """What the run's steps reported: carried by the run when its backend reads it (kfp: from the run's
    task outputs, since a user's workspace claim is not mounted here), else read from its workspace."""
    if run is None:
        return WorkspaceReport()
    return run.report if run.report is not None else WorkspaceReport.read(request.workspace)


def _carry_out(
    backends: Backends,
    request: RunRequest | None,
    plan: Callable[[Observed], Decision],
) -> Decision:
    """Observe the run (if the job could have one), plan, and act on the plan's decision."""
    if request is None:
        return plan(Observed())
    backend = backends.get(request.config["spec"]["executor"])
    namespace = resource_namespace(request)
    run = backend.find(request.key, namespace)
    report = observed_report(run, request)
    decision = plan(Observed(run=run, report=report))
    if decision.action == "submit" and decision.request is not None:
        run = backend.submit(decision.request)
    elif decision.action == "resume":
        run = backend.resume(request.key, namespace)
    else:
        return decision
    acted = plan(Observed(run=run, report=report))
    return Decision(action=decision.action, status=acted.status, events=decision.events + acted.events)


def _finetune_request(
    body: dict[str, Any], settings: OperatorConfig, base_dir: Path | None, lookup: FineTuneJobLookup
) -> RunRequest | None:
    try:
        job = parse_resource(body, FineTuneJob)
    except ResourceInvalid:
        return None
    teacher, hold = teacher_job(job, lookup, settings.missing_reference_grace_s)
    if hold is not None:
        return None
    return build_request(job, settings, base_dir, teacher)


def _quantize_request(
    body: dict[str, Any], settings: OperatorConfig, lookup: FineTuneJobLookup, base_dir: Path | None
) -> RunRequest | None:
    try:
        job = parse_resource(body, QuantizeJob)
    except ResourceInvalid:
        return None
    source, hold = quantize_plan.source_job(job, lookup, settings.missing_reference_grace_s)
    if hold is not None:
        return None
    return quantize_plan.build_request(job, source, settings, base_dir)


def reconcile_finetune(
    body: dict[str, Any],
    backends: Backends,
    *,
    base_dir: Path | None = None,
    now: str | None = None,
    lookup: FineTuneJobLookup = no_finetune_jobs,
) -> Decision:
    """One reconcile pass for a FineTuneJob; returns the decision whose status the caller writes.
    `lookup` finds FineTuneJobs by namespace and name (a distillation teacher's fineTuneJobRef)."""
    settings = backends.settings
    at = now or utc_now()
    return _carry_out(
        backends,
        _finetune_request(body, settings, base_dir, lookup),
        lambda observed: plan_finetune(body, observed, settings, at, base_dir, lookup),
    )


def reconcile_quantize(
    body: dict[str, Any],
    backends: Backends,
    lookup: FineTuneJobLookup,
    *,
    base_dir: Path | None = None,
    now: str | None = None,
) -> Decision:
    """One reconcile pass for a QuantizeJob; `lookup` finds FineTuneJobs by namespace and name."""
    settings = backends.settings
    at = now or utc_now()
    return _carry_out(
        backends,
        _quantize_request(body, settings, lookup, base_dir),
        lambda observed: plan_quantize(body, observed, settings, at, lookup, base_dir),
    )


def cancel_job(
    body: dict[str, Any],
    backends: Backends,
    *,
    lookup: FineTuneJobLookup | None = None,
    base_dir: Path | None = None,
) -> str | None:
    """Cancel the job's pipeline run if one is going; returns the run's id when there was one."""
    settings = backends.settings
    if body.get("kind") == "QuantizeJob":
        request = _quantize_request(body, settings, lookup or (lambda _ns, _name: None), base_dir)
    else:
        request = _finetune_request(body, settings, base_dir, lookup or no_finetune_jobs)
    if request is None:
        return None
    backend = backends.get(request.config["spec"]["executor"])
    run = backend.find(request.key, resource_namespace(request))
    if run is None or run.finished:
        return None
    backend.cancel(request.key, resource_namespace(request))
    return run.id
