"""`kubetune up`: apply resources to the local store, run the jobs, and serve the ModelDeployments.

The same planning code as the operator runs here, with local backends: jobs run as local pipeline
workers (they checkpoint on SIGTERM; running `kubetune up` again resumes what was unfinished), and
each ModelDeployment is served by one `bentoml serve` process per version and a gateway on free
loopback ports (:class:`kubetune.local.serving.LocalServing`), its status (endpoint, weights,
conditions) written to the local store so `kubetune get mdep` shows it.

With only jobs, `up` returns when they have all finished. With a ModelDeployment it serves until
SIGINT (Ctrl+C), SIGTERM or SIGHUP, then stops every process it started. One `up` runs per home (a
lock file): a second `kubetune up -f FILE` applies FILE to the store and leaves it to the running
one, which picks the change up within a second (a weight change is applied in place, without
restarting the version servers).

Exit codes: 0 done (every job succeeded; serving stopped by a signal with nothing failed, or the
files were handed to the running `up`); 1 a job failed or a ModelDeployment is stalled; 2 invalid
input; 130 interrupted while jobs were still running (`kubetune up` resumes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, cast

from kubetune.api.registry import get_definition
from kubetune.api.validation import read_manifests, validate_paths
from kubetune.common.clock import utc_now
from kubetune.config import OperatorConfig
from kubetune.local.serving import LocalServing
from kubetune.local.store import ApplyError, LocalStore
from kubetune.plan.lifecycle import Decision, is_finished
from kubetune.reconcile.deployment import reconcile_deployment, remove_deployment
from kubetune.reconcile.jobs import Backends, reconcile_finetune, reconcile_quantize
from kubetune.rollout.analysis import QueryClient
from kubetune.rollout.prometheus import PrometheusClient
from kubetune_contract.conditions import find_condition, set_condition

Reconciler = Callable[[dict[str, Any], Backends, Path, LocalStore], Decision]
DEPLOYMENTS = "modeldeployments"
PROMETHEUS_URL_ENV = "KUBETUNE_PROMETHEUS_URL"


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
    return find_condition(list(status.get("conditions") or []), "Succeeded") or {}


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


# -- locks and signals -----------------------------------------------------------------------------


class UpLock:
    """One `kubetune up` reconciles a home at a time: an exclusive lock on ``<home>/up.lock``, which
    holds the owner's pid. The kernel releases it when the process ends, however it ends."""

    def __init__(self, home: Path) -> None:
        self.path = home / "up.lock"
        self._handle: TextIO | None = None

    def acquire(self) -> int | None:
        """None when this process holds the lock now; else the holder's pid (0 if unknown)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            return int(holder) if holder.isdigit() else 0
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class StopSignals:
    """SIGINT (Ctrl+C), SIGTERM and SIGHUP ask `up` to stop after the current pass; a second SIGINT
    stops at once (KeyboardInterrupt), except while shielded (stopping the processes started)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self.shielded = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Installed even where the shell made background jobs ignore SIGINT (`up &` in a script).
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if not first and signum == signal.SIGINT and not self.shielded:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.received is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


class GoneTerminalSafe(io.TextIOBase):
    """``out`` whose writes never raise: once the terminal is closed (SIGHUP: writes fail with EIO) or
    the reader of a pipe is gone (EPIPE), `up` must still stop what it started and mark it not served."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            return self._out.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()


# -- applying --------------------------------------------------------------------------------------


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


# -- jobs ------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What `up` printed last, so it prints only what changed."""

    shown: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    banners: set[tuple[str, str]] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)


def reconcile_jobs(
    store: LocalStore, backends: Backends, base_dir: Path, out: TextIO, progress: Progress
) -> bool:
    """One pass over the unfinished jobs; True while some job has not finished."""
    pending = False
    for plural, obj in store.all(list(RECONCILERS)):
        generation = obj["metadata"].get("generation")
        if is_finished(obj.get("status"), generation):
            continue
        decision = RECONCILERS[plural](obj, backends, base_dir, store)
        try:
            obj = store.update_status(plural, obj, decision.status)
        except KeyError:
            continue  # deleted meanwhile (kubetune delete)
        key = f"{plural}/{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        signature = progress_signature(obj)
        if progress.shown.get(key) != signature:
            print(describe_line(obj), file=out, flush=True)
            progress.shown[key] = signature
        if decision.finished:
            for summary in evaluation_summary(obj) + report_summary(obj):
                print(summary, file=out, flush=True)
        else:
            pending = True
    return pending


def failed_jobs(store: LocalStore) -> list[dict[str, Any]]:
    return [
        obj
        for _, obj in store.all(list(RECONCILERS))
        if _succeeded(obj.get("status") or {}).get("status") == "False"
    ]


# -- ModelDeployments ------------------------------------------------------------------------------


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return find_condition(list(status.get("conditions") or []), "Ready") or {}


def deployment_signature(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What must change for `up` to print a new line about a ModelDeployment (not the seconds a server
    has been loading, which its message counts)."""
    status = obj.get("status") or {}
    ready = _ready(status)
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
    ready = _ready(status)
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


def _job_lookup(store: LocalStore) -> Callable[[str, str, str], dict[str, Any] | None]:
    def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return store.get(get_definition(kind).plural, name, namespace)

    return lookup


def reconcile_deployments(
    store: LocalStore,
    serving: LocalServing,
    prometheus: QueryClient | None,
    base_dir: Path,
    out: TextIO,
    progress: Progress,
) -> int:
    """One pass over every stored ModelDeployment (and the deleted ones still served); returns how
    many are stored."""
    objects = store.list_objects(DEPLOYMENTS)
    stored = {(obj["metadata"]["namespace"], obj["metadata"]["name"]) for obj in objects}
    for ref in serving.deployments():
        if (ref.namespace, ref.name) not in stored:
            remove_deployment({"metadata": {"name": ref.name, "namespace": ref.namespace}}, serving)
            print(f"modeldeployment/{ref.name} was deleted: it is no longer served", file=out, flush=True)
    lookup = _job_lookup(store)
    for obj in objects:
        name = obj["metadata"]["name"]
        key = f"{DEPLOYMENTS}/{obj['metadata']['namespace']}/{name}"
        try:
            outcome = reconcile_deployment(
                obj, lookup=lookup, serving=serving, prometheus=prometheus, base_dir=base_dir
            )
        except Exception as exc:  # a serving failure: said, and tried again next pass
            message = f"{type(exc).__name__}: {exc}"
            if progress.errors.get(key) != message:
                print(f"modeldeployment/{name}: reconcile failed, retrying: {message}", file=out, flush=True)
            progress.errors[key] = message
            continue
        progress.errors.pop(key, None)
        ready = _ready(outcome.status)
        for event in outcome.events:
            if event.reason != ready.get("reason"):  # the Ready condition is printed below
                print(f"modeldeployment/{name}  {event.type} {event.reason}: {event.message}", file=out)
        if obj.get("status") != outcome.status:
            try:
                obj = store.update_status(DEPLOYMENTS, obj, outcome.status)
            except KeyError:
                continue  # deleted meanwhile: the next pass stops serving it
        else:
            obj = {**obj, "status": outcome.status}
        signature = deployment_signature(obj)
        if progress.shown.get(key) != signature:
            print(describe_deployment(obj), file=out, flush=True)
            progress.shown[key] = signature
        endpoint = outcome.status.get("endpoint")
        if ready.get("status") == "True" and endpoint and (key, endpoint) not in progress.banners:
            progress.banners.add((key, endpoint))
            print("\n".join(ready_banner(obj)), file=out, flush=True)
    return len(objects)


def not_served_status(status: dict[str, Any], generation: int | None, now: str) -> dict[str, Any]:
    """The status of a ModelDeployment whose `kubetune up` stopped: nothing answers any more."""
    message = "kubetune up stopped serving it; run `kubetune up` to serve it again"
    conditions = list(status.get("conditions") or [])
    for type_ in ("Ready", "Progressing"):
        conditions = set_condition(
            conditions, type_, "False", "NotServed", message, now=now, generation=generation
        )
    versions = [
        {**version, "ready": False, "url": None, "message": "not served"}
        for version in status.get("versions") or []
    ]
    updated = {key: value for key, value in status.items() if key != "endpoint"}
    updated.update(
        conditions=conditions,
        phase="Stopped",
        versions=versions,
        readyVersions=f"0/{len(versions)}",
    )
    return updated


def mark_not_served(store: LocalStore, served: list[tuple[str, str]]) -> None:
    now = utc_now()
    for namespace, name in served:
        obj = store.get(DEPLOYMENTS, name, namespace)
        if obj is None or not obj.get("status"):
            continue
        status = not_served_status(obj["status"], obj["metadata"].get("generation"), now)
        with contextlib.suppress(KeyError):
            store.update_status(DEPLOYMENTS, obj, status)


def served_before(store: LocalStore) -> list[tuple[str, str]]:
    """The stored ModelDeployments whose status says a `kubetune up` serves them (not yet Stopped)."""
    return [
        (obj["metadata"]["namespace"], obj["metadata"]["name"])
        for obj in store.list_objects(DEPLOYMENTS)
        if (obj.get("status") or {}).get("phase") not in (None, "Stopped")
    ]


def stalled_deployments(store: LocalStore) -> list[dict[str, Any]]:
    return [
        obj
        for obj in store.list_objects(DEPLOYMENTS)
        if (find_condition(list((obj.get("status") or {}).get("conditions") or []), "Stalled") or {}).get(
            "status"
        )
        == "True"
    ]


def prometheus_from_env(env: dict[str, str] | None = None) -> PrometheusClient | None:
    """The Prometheus that judges canaries (KUBETUNE_PROMETHEUS_URL), None when unset."""
    url = (os.environ if env is None else env).get(PROMETHEUS_URL_ENV, "").strip()
    if not url:
        return None
    try:
        return PrometheusClient(url)
    except ValueError as exc:
        raise ValueError(f"{PROMETHEUS_URL_ENV}: {exc}") from exc


# -- the loop ----------------------------------------------------------------------------------------


def run_until_stopped(
    store: LocalStore,
    backends: Backends,
    serving: LocalServing,
    prometheus: QueryClient | None,
    base_dir: Path,
    out: TextIO,
    stop: StopSignals,
    poll_s: float = 1.0,
) -> int:
    """Reconcile jobs and ModelDeployments every ``poll_s`` until the jobs are done and nothing is to
    be served, or until a signal; returns the exit code."""
    progress = Progress()
    while True:
        jobs_pending = reconcile_jobs(store, backends, base_dir, out, progress)
        deployments = reconcile_deployments(store, serving, prometheus, base_dir, out, progress)
        if stop.received is not None:
            break
        if not jobs_pending and deployments == 0 and not serving.deployments():
            return 1 if failed_jobs(store) else 0
        stop.sleep(poll_s)
    print(f"\n{stop.name}: stopping", file=out, flush=True)
    if jobs_pending:
        local = backends.local()
        stopped = local.interrupt_all() if local is not None else []
        print(
            f"stopped {len(stopped)} running pipeline(s); run `kubetune up` again to resume them",
            file=out,
            flush=True,
        )
        return 130
    problems = [f"{obj['kind'].lower()}/{obj['metadata']['name']} failed" for obj in failed_jobs(store)]
    problems += [
        f"modeldeployment/{obj['metadata']['name']} is stalled" for obj in stalled_deployments(store)
    ]
    for problem in problems:
        print(problem, file=out)
    return 1 if problems else 0


def up(paths: list[Path], settings: OperatorConfig, out: TextIO = sys.stdout, poll_s: float = 1.0) -> int:
    out = cast(TextIO, GoneTerminalSafe(out))
    store = LocalStore(settings.home)
    try:
        prometheus = prometheus_from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lock = UpLock(settings.home)
    holder = lock.acquire()
    try:
        if paths and apply_paths(paths, store, out) is None:
            return 2
        if holder is not None:
            if paths:
                print(
                    f"kubetune up (pid {holder}) is running with {settings.home}: it applies the change",
                    file=out,
                )
                return 0
            print(
                f"error: kubetune up (pid {holder}) is already running with {settings.home}", file=sys.stderr
            )
            return 1
        return _run(store, settings, prometheus, out, poll_s)
    finally:
        lock.release()
        if prometheus is not None:
            prometheus.close()


def _run(
    store: LocalStore, settings: OperatorConfig, prometheus: QueryClient | None, out: TextIO, poll_s: float
) -> int:
    backends = Backends(settings)
    serving = LocalServing(settings.home, notify=lambda line: print(line, file=out, flush=True))
    with StopSignals() as stop:
        try:
            # This `up` holds the lock, so no other serves them: what a killed `up` left in the store
            # (Ready, an endpoint nobody answers on) must not be read as true while this one starts.
            mark_not_served(store, served_before(store))
            leftovers = serving.reap_leftovers()
            if leftovers:
                print(
                    f"stopped {leftovers} process(es) that a killed `kubetune up` had left running", file=out
                )
            return run_until_stopped(store, backends, serving, prometheus, Path.cwd(), out, stop, poll_s)
        except KeyboardInterrupt:  # Ctrl+C twice: stop now
            stop.shielded = True  # a third one must not cut the stopping short
            local = backends.local()
            stopped = local.interrupt_all() if local is not None else []
            print(
                f"\nstopped {len(stopped)} running pipeline(s); run `kubetune up` again to resume them",
                file=out,
            )
            return 130
        finally:
            stop.shielded = True
            served = [(ref.namespace, ref.name) for ref in serving.deployments()]
            stopped_processes = serving.close()
            if stopped_processes:
                print(f"stopped {len(stopped_processes)} process(es):", file=out)
                for line in stopped_processes:
                    print(f"  {line}", file=out)
            mark_not_served(store, served)
            out.flush()
