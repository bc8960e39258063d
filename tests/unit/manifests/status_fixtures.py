"""Status fixtures for the GitOps health tests (kstatus, Argo CD).

Job fixtures come from the real planning code (kubetune.plan): each state is reached the way the
operator reaches it, one reconcile pass after another, writing the planned status back onto the
object. ModelDeployment fixtures are hand-written in modeldeployment-statuses.yaml: they are the shape
the ModelDeployment planner must write (its own tests can load them with :func:`modeldeployment_cases`).

Every case names what kstatus (Flux) and Argo CD must make of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.config import OperatorConfig
from kubetune.plan.finetune import plan_finetune
from kubetune.plan.lifecycle import Decision, Observed
from kubetune.plan.quantize import plan_quantize
from kubetune.plan.runs import RunPhase, RunStatus
from kubetune_contract.workspace import WorkspaceReport

FIXTURES = Path(__file__).parent / "fixtures"
SETTINGS = OperatorConfig(home=Path("/var/lib/kubetune"), default_executor="local", artifact_store="/store")
TIMES = [f"2026-01-01T00:0{i}:00Z" for i in range(10)]


@dataclass(frozen=True)
class Case:
    name: str
    obj: dict[str, Any]
    kstatus: str  # InProgress | Current | Failed
    argocd: str  # Progressing | Healthy | Degraded
    message: str = ""  # what Argo CD's health message must contain, if anything


Planner = Callable[[dict[str, Any], Observed, str], Decision]


def _finetune_body(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "ml", "uid": "1234abcd-0000", "generation": 1},
        "spec": {
            "baseModel": {"uri": "/models/base"},
            "dataset": {"uri": "/data/train.jsonl"},
            "method": {"type": "lora"},
            "training": {"maxSteps": 10},
        },
    }
    body["spec"].update(spec)
    return body


def _quantize_body(**model: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "router-int8", "namespace": "ml", "uid": "abcdef12-3", "generation": 1},
        "spec": {
            "model": model or {"fineTuneJobRef": {"name": "router"}},
            "method": {"type": "int8-weight-only"},
            "evaluation": {"gates": [{"metric": "perplexityIncrease", "max": "0.05"}]},
        },
    }


def _run(phase: RunPhase, **kwargs: Any) -> RunStatus:
    return RunStatus(backend="local", id="run-1", phase=phase, **kwargs)


def _passes(plan: Planner, body: dict[str, Any], observations: list[Observed]) -> dict[str, Any]:
    """The object after one reconcile pass per observation, each writing its status back."""
    obj = copy.deepcopy(body)
    for at, observed in zip(TIMES, observations, strict=False):
        obj["status"] = plan(obj, observed, at).status
    return obj


def _stale(obj: dict[str, Any]) -> dict[str, Any]:
    """The object right after a spec change the operator has not seen yet."""
    stale = copy.deepcopy(obj)
    stale["metadata"]["generation"] += 1
    return stale


TRAINING = WorkspaceReport(progress={"phase": "training", "step": 3, "totalSteps": 10})
PUBLISHED = WorkspaceReport(
    progress={"phase": "training", "step": 10, "totalSteps": 10},
    output={"uri": "/store/ml/router/v1", "version": "v1"},
)
GATE_FAILED = WorkspaceReport(
    error={"step": "publish", "reason": "QualityGateFailed", "message": "exactMatch 0.1 < 0.5"}
)


def finetune_cases() -> list[Case]:
    def plan(body: dict[str, Any], observed: Observed, now: str) -> Decision:
        return plan_finetune(body, observed, SETTINGS, now)

    body = _finetune_body()
    submitted = Observed()
    running = Observed(run=_run("Running"), report=TRAINING)
    pending = _passes(plan, body, [submitted])
    training = _passes(plan, body, [submitted, running])
    succeeded = _passes(plan, body, [submitted, running, Observed(run=_run("Succeeded"), report=PUBLISHED)])
    failed = _passes(plan, body, [submitted, running, Observed(run=_run("Failed"), report=GATE_FAILED)])
    resuming = _passes(
        plan, body, [submitted, running, Observed(run=_run("Interrupted", message="pod evicted"))]
    )
    cancelled = _passes(plan, body, [submitted, running, Observed(run=_run("Cancelled"))])
    invalid = _passes(plan, _finetune_body(training={"learningRate": "fast"}), [submitted])
    return [
        Case("FineTuneJob pending", pending, "InProgress", "Progressing", "Pending"),
        Case("FineTuneJob running", training, "InProgress", "Progressing", "training: step 3/10"),
        Case("FineTuneJob resuming", resuming, "InProgress", "Progressing", "Resuming"),
        Case("FineTuneJob succeeded", succeeded, "Current", "Healthy", "published /store/ml/router/v1"),
        Case("FineTuneJob gate failed", failed, "Failed", "Degraded", "QualityGateFailed"),
        Case("FineTuneJob cancelled", cancelled, "Failed", "Degraded", "Cancelled"),
        Case("FineTuneJob invalid spec", invalid, "Failed", "Degraded", "spec.training.learningRate"),
        Case("FineTuneJob running, stale generation", _stale(training), "InProgress", "Progressing"),
        Case("FineTuneJob succeeded, stale generation", _stale(succeeded), "InProgress", "Progressing"),
    ]


def quantize_cases() -> list[Case]:
    source_done = {
        "metadata": {"name": "router", "namespace": "ml"},
        "spec": {"dataset": {"uri": "/data/tickets.jsonl", "format": "instruction"}},
        "status": {
            "phase": "Succeeded",
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed"}],
            "output": {"uri": "/store/ml/router/v1", "version": "v1"},
        },
    }
    source_failed = {
        "metadata": {"name": "router", "namespace": "ml"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "Succeeded", "status": "False", "reason": "QualityGateFailed"}],
        },
    }

    def planner(source: dict[str, Any] | None) -> Planner:
        def plan(body: dict[str, Any], observed: Observed, now: str) -> Decision:
            return plan_quantize(body, observed, SETTINGS, now, lambda _ns, _name: source)

        return plan

    body = _quantize_body()
    submitted = Observed()
    running = Observed(run=_run("Running"), report=WorkspaceReport(progress={"phase": "quantizing"}))
    published = Observed(
        run=_run("Succeeded"),
        report=WorkspaceReport(output={"uri": "/store/ml/router-int8/v1", "version": "v1"}),
    )
    gate = Observed(
        run=_run("Failed"),
        report=WorkspaceReport(
            error={
                "step": "publish-quantized",
                "reason": "QualityGateFailed",
                "message": "sizeRatio 0.9 > 0.5",
            }
        ),
    )
    waiting = _passes(planner(None), body, [submitted])
    source_broke = _passes(planner(source_failed), body, [submitted])
    training = _passes(planner(source_done), body, [submitted, running])
    succeeded = _passes(planner(source_done), body, [submitted, running, published])
    failed = _passes(planner(source_done), body, [submitted, running, gate])
    return [
        Case("QuantizeJob waiting for its source", waiting, "InProgress", "Progressing", "WaitingForSource"),
        Case("QuantizeJob source failed", source_broke, "Failed", "Degraded", "SourceFailed"),
        Case("QuantizeJob running", training, "InProgress", "Progressing", "quantizing"),
        Case("QuantizeJob succeeded", succeeded, "Current", "Healthy", "/store/ml/router-int8/v1"),
        Case("QuantizeJob gate failed", failed, "Failed", "Degraded", "sizeRatio 0.9 > 0.5"),
        Case("QuantizeJob running, stale generation", _stale(training), "InProgress", "Progressing"),
    ]


def job_cases() -> list[Case]:
    return [*finetune_cases(), *quantize_cases()]


def modeldeployment_cases() -> list[Case]:
    """The ModelDeployment statuses of modeldeployment-statuses.yaml, with their expected health."""
    raw = yaml.safe_load((FIXTURES / "modeldeployment-statuses.yaml").read_text())
    return [
        Case(
            f"ModelDeployment {case['name']}",
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "support-bot", "namespace": "ml", "generation": case["generation"]},
                **({"status": case["status"]} if "status" in case else {}),
            },
            case["kstatus"],
            case["argocd"],
            case.get("argocdMessage", ""),
        )
        for case in raw["cases"]
    ]
