"""What `kubetune up` prints about the resources it runs: one line per change of a job or a
ModelDeployment, a job's evaluation or quantization report when it ends, and how to use a
deployment once it is ready."""

from __future__ import annotations

from typing import Any

from kubetune_contract.conditions import find_condition


def succeeded_condition(status: dict[str, Any]) -> dict[str, Any]:
    return find_condition(list(status.get("conditions") or []), "Succeeded") or {}


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return find_condition(list(status.get("conditions") or []), "Ready") or {}


# -- jobs ------------------------------------------------------------------------------------------


def describe_line(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    condition = succeeded_condition(status)
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    parts = [
        f"{obj['kind'].lower()}/{obj['metadata']['name']}",
        f"{status.get('phase', 'Pending'):<9}",
    ]
    if progress.get("totalSteps"):
        parts.append(f"{progress.get('percent', 0):>3}%")
    if condition.get("message"):
        parts.append(str(condition["message"]))
    if metrics.get("trainLoss") is not None and status.get("phase") == "Running":
        parts.append(f"loss {metrics['trainLoss']:.4f}")
    return "  ".join(parts)


def progress_signature(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What must change for `up` to print a new line: the phase, the step's kind, or a tenth of progress."""
    status = obj.get("status") or {}
    condition = succeeded_condition(status)
    message = str(condition.get("message", ""))
    return (
        status.get("phase"),
        condition.get("reason"),
        message.split(":")[0] if status.get("phase") == "Running" else message,
        int((status.get("progress") or {}).get("percent", 0)) // 10,
    )


def evaluation_summary(obj: dict[str, Any]) -> list[str]:
    evaluation = (obj.get("status") or {}).get("evaluation") or {}
    baseline, final = evaluation.get("baseline") or {}, evaluation.get("final") or {}
    if not baseline and not final and not evaluation.get("harness"):
        return []
    lines = [f"  {'metric':<12} {'baseline':>10} {'final':>10}"]
    for metric in ("evalLoss", "perplexity", "exactMatch", "lenientMatch", "preferenceAccuracy"):
        if metric in baseline or metric in final:
            b, f = baseline.get(metric), final.get(metric)
            lines.append(
                f"  {metric:<12} {'' if b is None else f'{b:.4f}':>10} {'' if f is None else f'{f:.4f}':>10}"
            )
    return (
        lines
        + reference_baseline_lines(evaluation.get("referenceBaselines") or {})
        + reference_set_lines(evaluation.get("reference") or [])
        + harness_lines(evaluation.get("harness") or [])
        + cross_validation_lines(evaluation.get("crossValidation") or {})
        + checkpoint_lines(obj.get("status") or {})
        + gate_lines(evaluation.get("gates", []))
    )


def reference_set_lines(references: list[dict[str, Any]]) -> list[str]:
    """Each reference set before and after tuning, and what tuning lost on it."""
    lines = []
    for row in references:
        drop, metric = row.get("drop"), row.get("metric")
        lost = ""
        if drop is not None:
            lost = f"  ({drop:+.2%})" if metric == "perplexity" else f"  ({-drop:+.4f})"
        before = _number(row.get("baseline"), ".4f") or "n/a"
        after = _number(row.get("final"), ".4f") or "n/a"
        lines.append(f"  reference {row.get('name')} {metric}: {before} -> {after}{lost}")
    return lines


def harness_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each lm-evaluation-harness score (evaluation.harness) before and after tuning."""
    return [
        f"  harness {row.get('task')} {row.get('metric')}: "
        f"{_number(row.get('baseline'), '.4f') or 'n/a'} -> {_number(row.get('final'), '.4f') or 'n/a'}"
        for row in rows
    ]


def cross_validation_lines(summary: dict[str, Any]) -> list[str]:
    """Each metric's mean and standard deviation across the folds (evaluation.crossValidation)."""
    metrics = summary.get("metrics") or {}
    return [
        f"  cross-validation ({summary.get('folds')} folds) {name}: {row['mean']:.4f} +/- {row['std']:.4f} "
        f"(folds: {', '.join(f'{value:.4f}' for value in row.get('perFold') or [])})"
        for name, row in metrics.items()
    ]


def checkpoint_lines(status: dict[str, Any]) -> list[str]:
    """The checkpoint published, when periodic evaluations chose among several."""
    checkpoints = status.get("checkpoints") or []
    selected = next((c for c in checkpoints if c.get("selected")), None)
    if selected is None:
        return []
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (selected.get("metrics") or {}).items())
    line = f"  published checkpoint: step {selected['step']} of {len(checkpoints)} evaluated ({metrics})"
    if status.get("earlyStoppedAtStep") is not None:
        line += f"; early stopping ended training at step {status['earlyStoppedAtStep']}"
    return [line]


def reference_baseline_lines(baselines: dict[str, Any]) -> list[str]:
    """What trivial predictors score on the same held-out examples, to read the models' exactMatch against."""
    scores = [
        f"{label} {baselines[key]:.4f}"
        for key, label in (("majorityClass", "majority class"), ("nearestNeighbour", "nearest neighbour"))
        if baselines.get(key) is not None
    ]
    if not scores:
        return []
    return [f"  exactMatch of trivial predictors on the same examples: {', '.join(scores)}"]


def _number(value: Any, fmt: str = ".4g") -> str:
    return "" if value is None else format(value, fmt)


def gate_lines(gates: list[dict[str, Any]]) -> list[str]:
    return [
        f"  gate {gate['metric']} {gate['op']} {_number(gate.get('threshold'))}: "
        f"{_number(gate.get('value')) or 'n/a'} {'passed' if gate.get('passed') else 'FAILED'}"
        for gate in gates
    ]


def report_summary(obj: dict[str, Any]) -> list[str]:
    """A QuantizeJob's before/after report, as `kubetune up` prints it when the job ends."""
    report = (obj.get("status") or {}).get("report") or {}
    if not report:
        return []
    size, latency = report.get("sizeBytes") or {}, report.get("latency") or {}
    quality = report.get("quality") or {}
    before, after = quality.get("before") or {}, quality.get("after") or {}
    rows = [
        (
            "size MB",
            _number(size.get("before") and size["before"] / 1e6, ".3f"),
            _number(size.get("after") and size["after"] / 1e6, ".3f"),
        ),
        (
            "ms/token",
            _number(latency.get("before") and latency["before"] * 1e3, ".3f"),
            _number(latency.get("after") and latency["after"] * 1e3, ".3f"),
        ),
        ("perplexity", _number(before.get("perplexity"), ".4f"), _number(after.get("perplexity"), ".4f")),
        ("exactMatch", _number(before.get("exactMatch"), ".4f"), _number(after.get("exactMatch"), ".4f")),
    ]
    lines = [f"  {'':<12} {'before':>10} {'after':>10}"]
    lines += [f"  {name:<12} {b:>10} {a:>10}" for name, b, a in rows if b or a]
    if report.get("sizeRatio") is not None:
        lines.append(f"  size ratio {report['sizeRatio']:.3f}")
    return lines + gate_lines(report.get("gates", []))


# -- ModelDeployments ------------------------------------------------------------------------------


def deployment_signature(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What must change for `up` to print a new line about a ModelDeployment (not the seconds a server
    has been loading, which its message counts)."""
    status = obj.get("status") or {}
    ready = ready_condition(status)
    rollout = status.get("rollout") or {}
    return (
        status.get("phase"),
        ready.get("status"),
        ready.get("reason"),
        status.get("readyVersions"),
        status.get("weights"),
        status.get("endpoint"),
        rollout.get("state"),
        rollout.get("step"),
    )


def describe_deployment(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    ready = ready_condition(status)
    parts = [f"modeldeployment/{obj['metadata']['name']}", f"{status.get('phase') or 'Pending':<9}"]
    if status.get("readyVersions"):
        parts.append(f"{status['readyVersions']} ready")
    if status.get("weights"):
        parts.append(str(status["weights"]))
    if ready.get("message"):
        parts.append(str(ready["message"]))
    return "  ".join(parts)


def ready_banner(obj: dict[str, Any]) -> list[str]:
    """How to use a deployment that just became ready: its versions, and requests to copy and paste."""
    status = obj.get("status") or {}
    name, endpoint = obj["metadata"]["name"], status["endpoint"]
    lines = [f"modeldeployment/{name} is ready: OpenAI-compatible endpoint {endpoint}"]
    for version in status.get("versions") or []:
        lines.append(
            f"  {version.get('name')!s:<12} {version.get('weight', 0):>3}%  {version.get('url') or ''}  "
            f"{version.get('modelUri') or ''}"
        )
    ticket = "I was charged twice for order 1234, please refund one payment."
    lines += [
        "  Try it (the x-kubetune-version response header says which version answered):",
        f"    curl -si {endpoint}/chat/completions -H 'content-type: application/json' \\",
        f'      -d \'{{"model": "{name}", "user": "alice", '
        f'"messages": [{{"role": "user", "content": "{ticket}"}}]}}\'',
        "    python -c 'from openai import OpenAI; "
        f'client = OpenAI(base_url="{endpoint}", api_key="unused"); '
        f'reply = client.chat.completions.create(model="{name}", user="alice", '
        f'messages=[{{"role": "user", "content": "{ticket}"}}]); '
        "print(reply.choices[0].message.content)'",
        f"  `kubetune get mdep {name} -o wide` shows its status; Ctrl+C stops serving.",
    ]
    return lines
