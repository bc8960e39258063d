"""`kubetune up`: apply resources to the local store and reconcile them until every job is finished.

The same planning code as the operator runs here, with the local backend. Ctrl+C stops the workers
(they checkpoint on SIGTERM); running `kubetune up` again resumes what was unfinished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kubetune.api.registry import get_definition
from kubetune.api.validation import read_manifests, validate_paths
from kubetune.config import OperatorConfig
from kubetune.controller import Backends, reconcile_finetune, reconcile_quantize
from kubetune.local.store import ApplyError, LocalStore
from kubetune.plan.lifecycle import Decision, is_finished

Reconciler = Callable[[dict[str, Any], Backends, Path, LocalStore], Decision]


def _reconcile_quantize(
    body: dict[str, Any], backends: Backends, base_dir: Path, store: LocalStore
) -> Decision:
    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        return store.get("finetunejobs", name, namespace)

    return reconcile_quantize(body, backends, lookup, base_dir=base_dir)


# In dependency order: a QuantizeJob sees the FineTuneJob it waits for updated in the same pass.
RECONCILERS: dict[str, Reconciler] = {
    "finetunejobs": lambda body, backends, base_dir, _store: reconcile_finetune(
        body, backends, base_dir=base_dir
    ),
    "quantizejobs": _reconcile_quantize,
}


def _succeeded(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c.get("type") == "Succeeded"), {})


def describe_line(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    condition = _succeeded(status)
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
    condition = _succeeded(status)
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
    if not baseline and not final:
        return []
    lines = [f"  {'metric':<12} {'baseline':>10} {'final':>10}"]
    for metric in ("evalLoss", "perplexity", "exactMatch"):
        if metric in baseline or metric in final:
            b, f = baseline.get(metric), final.get(metric)
            lines.append(
                f"  {metric:<12} {'' if b is None else f'{b:.4f}':>10} {'' if f is None else f'{f:.4f}':>10}"
            )
    return lines + gate_lines(evaluation.get("gates", []))


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


def apply_paths(paths: list[Path], store: LocalStore, out: TextIO) -> list[tuple[str, dict[str, Any]]] | None:
    issues = validate_paths(paths)
    if issues:
        for issue in issues:
            print(str(issue), file=sys.stderr)
        return None
    applied = []
    for document in read_manifests(paths):
        if not str(document.get("apiVersion", "")).startswith("kubetune.dev/"):
            continue
        definition = get_definition(str(document["kind"]))
        try:
            result = store.apply(definition.plural, document, immutable_spec=definition.immutable_spec)
        except ApplyError as exc:
            print(str(exc), file=sys.stderr)
            return None
        print(f"{document['kind'].lower()}/{document['metadata']['name']} {result.action}", file=out)
        applied.append((definition.plural, result.obj))
    return applied


def reconcile_until_done(
    store: LocalStore, backends: Backends, base_dir: Path, out: TextIO, poll_s: float = 1.0
) -> int:
    shown: dict[str, tuple[Any, ...]] = {}
    while True:
        pending = False
        for plural, obj in store.all(list(RECONCILERS)):
            generation = obj["metadata"].get("generation")
            if is_finished(obj.get("status"), generation):
                continue
            decision = RECONCILERS[plural](obj, backends, base_dir, store)
            obj = store.update_status(plural, obj, decision.status)
            key = f"{plural}/{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            signature = progress_signature(obj)
            if shown.get(key) != signature:
                print(describe_line(obj), file=out, flush=True)
                shown[key] = signature
            if decision.finished:
                for summary in evaluation_summary(obj) + report_summary(obj):
                    print(summary, file=out)
            else:
                pending = True
        if not pending:
            break
        time.sleep(poll_s)
    failed = [
        obj
        for _, obj in store.all(list(RECONCILERS))
        if _succeeded(obj.get("status") or {}).get("status") == "False"
    ]
    return 1 if failed else 0


def up(paths: list[Path], settings: OperatorConfig, out: TextIO = sys.stdout, poll_s: float = 1.0) -> int:
    store = LocalStore(settings.home)
    if paths and apply_paths(paths, store, out) is None:
        return 2
    backends = Backends(settings)
    try:
        return reconcile_until_done(store, backends, Path.cwd(), out, poll_s)
    except KeyboardInterrupt:
        local = backends.local()
        stopped = local.interrupt_all() if local is not None else []
        print(
            f"\nstopped {len(stopped)} running pipeline(s); run `kubetune up` again to resume them", file=out
        )
        return 130
