"""Observe -> plan -> act, shared by the Kopf handlers and by `kubetune up`.

Everything that decides is in kubetune.plan; this module only gathers observations from the backend
and the run's workspace, and carries the decision out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.api.finetune import FineTuneJob
from kubetune.api.validation import ResourceInvalid, parse_resource
from kubetune.backends.base import Backend
from kubetune.backends.kfp import KfpBackend
from kubetune.backends.local import LocalBackend
from kubetune.config import OperatorConfig
from kubetune.plan.finetune import Decision, Observed, build_request, plan_finetune
from kubetune.workspace import WorkspaceReport


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
                self._made[executor] = KfpBackend(
                    self.settings.kfp_host,
                    ui_url=self.settings.kfp_ui_url,
                    namespace=self.settings.kfp_namespace,
                )
            else:
                raise ValueError(f"unknown executor {executor!r}")
        return self._made[executor]

    def local(self) -> LocalBackend | None:
        backend = self._made.get("local")
        return backend if isinstance(backend, LocalBackend) else None


def _valid_job(body: dict[str, Any]) -> FineTuneJob | None:
    try:
        job = parse_resource(body)
    except ResourceInvalid:
        return None
    return job if isinstance(job, FineTuneJob) else None


def reconcile_finetune(
    body: dict[str, Any],
    backends: Backends,
    *,
    base_dir: Path | None = None,
    now: str | None = None,
) -> Decision:
    """One reconcile pass for a FineTuneJob; returns the decision whose status the caller writes."""
    settings = backends.settings
    now = now or utc_now()
    job = _valid_job(body)
    if job is None:
        return plan_finetune(body, Observed(), settings, now, base_dir)
    request = build_request(job, settings, base_dir)
    backend = backends.get(request.config["spec"]["executor"])
    run = backend.find(request.key)
    report = WorkspaceReport.read(request.workspace) if run is not None else WorkspaceReport()
    decision = plan_finetune(body, Observed(run=run, report=report), settings, now, base_dir)
    if decision.action == "submit" and decision.request is not None:
        run = backend.submit(decision.request)
    elif decision.action == "resume":
        run = backend.resume(request.key)
    else:
        return decision
    acted = plan_finetune(body, Observed(run=run, report=report), settings, now, base_dir)
    return Decision(action=decision.action, status=acted.status, events=decision.events + acted.events)


def cancel_finetune(body: dict[str, Any], backends: Backends, *, base_dir: Path | None = None) -> str | None:
    """Cancel the job's pipeline run if one is going; returns the run's id when there was one."""
    job = _valid_job(body)
    if job is None:
        return None
    request = build_request(job, backends.settings, base_dir)
    backend = backends.get(request.config["spec"]["executor"])
    run = backend.find(request.key)
    if run is None or run.finished:
        return None
    backend.cancel(request.key)
    return run.id
