"""`kubetune up`: apply resources to the local store, run the jobs, and serve the ModelDeployments.

The same planning code as the operator runs here, with local backends: jobs run as local pipeline
workers (they checkpoint on SIGTERM; running `kubetune up` again resumes what was unfinished), and
each ModelDeployment is served by one `bentoml serve` process per version and a gateway on free
loopback ports (:class:`kubetune.local.serving.LocalServing`), its status (endpoint, weights,
conditions) written to the local store so `kubetune get mdep` shows it.

With only jobs, `up` returns when they have all finished. With a ModelDeployment it serves until
SIGINT (Ctrl+C), SIGTERM or SIGHUP, then stops every process it started; or until nothing can make
progress any more (every job ended, every ModelDeployment stalled with no version answering), which
it says, naming each failure. One `up` runs per home (a
lock file): a second `kubetune up -f FILE` applies FILE to the store and leaves it to the running
one, which picks the change up within a second (a weight change is applied in place, without
restarting the version servers). The second one returns only once a pass of the running one has
seen the change; a running `up` that is stopping takes up nothing new, so when its lock comes free
first, the second one takes the lock and runs the change itself.

The ModelDeployment reconcile is the operator's coroutine: each pass over them runs on an event loop
of its own in the main thread, with a Prometheus client for that pass; LocalServing's blocking calls
are made on that loop (:class:`kubetune.local.serving.ServingOnTheLoop` says why not in a thread).

Exit codes: 0 done (every job succeeded; serving stopped by a signal with nothing failed, or the
files were handed to the running `up`); 1 a job failed or a ModelDeployment is stalled; 2 invalid
input; 130 interrupted while jobs were still running (`kubetune up` resumes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, cast

from kubetune.api.registry import get_definition
from kubetune.api.validation import format_issues, read_manifests, validate_paths
from kubetune.config import PROMETHEUS_URL_ENV, OperatorConfig
from kubetune.local.liveness import DEPLOYMENTS, mark_not_served, served_before
from kubetune.local.report import (
    deployment_signature,
    describe_deployment,
    describe_line,
    evaluation_summary,
    progress_signature,
    ready_banner,
    ready_condition,
    report_summary,
    succeeded_condition,
)
from kubetune.local.serving import LocalServing, ServingOnTheLoop
from kubetune.local.session import GoneTerminalSafe, StopSignals, UpLock
from kubetune.local.store import ApplyError, LocalStore
from kubetune.plan.lifecycle import Decision, is_finished
from kubetune.reconcile.deployment import reconcile_deployment, remove_deployment
from kubetune.reconcile.jobs import Backends, reconcile_finetune, reconcile_quantize
from kubetune.rollout.prometheus import PrometheusClient, checked_base_url
from kubetune_contract.conditions import find_condition

Reconciler = Callable[[dict[str, Any], Backends, Path, LocalStore], Decision]
HAND_OFF_PATIENCE_S = 5.0  # how long a second `up -f` waits for the running one before it says so
HAND_OFF_LIMIT_S = 120.0  # ... and before it gives up (a pass of the running one takes seconds)


# In dependency order: a QuantizeJob sees the FineTuneJob it waits for updated in the same pass.
RECONCILERS: dict[str, Reconciler] = {
    "finetunejobs": lambda body, backends, base_dir, store: reconcile_finetune(
        body, backends, base_dir=base_dir, lookup=store.finetune_job
    ),
    "quantizejobs": lambda body, backends, base_dir, store: reconcile_quantize(
        body, backends, store.finetune_job, base_dir=base_dir
    ),
}


# -- applying --------------------------------------------------------------------------------------


def apply_paths(paths: list[Path], store: LocalStore, out: TextIO) -> list[tuple[str, dict[str, Any]]] | None:
    issues = validate_paths(paths)
    if issues:
        print(format_issues(issues), file=sys.stderr)
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


def is_new(obj: dict[str, Any]) -> bool:
    """Whether no pass has seen this generation of the object yet (it was just applied)."""
    observed: object = (obj.get("status") or {}).get("observedGeneration")
    generation: object = obj["metadata"].get("generation")
    return observed != generation


def reconcile_jobs(
    store: LocalStore,
    backends: Backends,
    base_dir: Path,
    out: TextIO,
    progress: Progress,
    stopping: Callable[[], bool] = lambda: False,
) -> bool:
    """One pass over the unfinished jobs; True while some job has not finished. Once ``stopping``,
    a job applied since the last pass is left alone: the `up -f` that applied it runs it (see
    :func:`hand_off`)."""
    pending = False
    for plural, obj in store.all(list(RECONCILERS)):
        generation = obj["metadata"].get("generation")
        if is_finished(obj.get("status"), generation):
            continue
        if stopping() and is_new(obj):
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
        if succeeded_condition(obj.get("status") or {}).get("status") == "False"
    ]


# -- ModelDeployments ------------------------------------------------------------------------------


def _job_lookup(store: LocalStore) -> Callable[[str, str, str], dict[str, Any] | None]:
    def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return store.get(get_definition(kind).plural, name, namespace)

    return lookup


@contextlib.asynccontextmanager
async def _prometheus(url: str | None) -> AsyncIterator[PrometheusClient | None]:
    if url is None:
        yield None
        return
    async with PrometheusClient(url) as client:
        yield client


async def reconcile_deployments(
    store: LocalStore,
    serving: LocalServing,
    prometheus_url: str | None,
    base_dir: Path,
    out: TextIO,
    progress: Progress,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """One pass over every stored ModelDeployment (and the deleted ones still served); returns how
    many are stored. Once ``stopping``, a change applied since the last pass is left alone."""
    backend = ServingOnTheLoop(serving)
    objects = store.list_objects(DEPLOYMENTS)
    stored = {(obj["metadata"]["namespace"], obj["metadata"]["name"]) for obj in objects}
    for ref in serving.deployments():
        if (ref.namespace, ref.name) not in stored:
            await remove_deployment({"metadata": {"name": ref.name, "namespace": ref.namespace}}, backend)
            print(f"modeldeployment/{ref.name} was deleted: it is no longer served", file=out, flush=True)
    lookup = _job_lookup(store)
    async with _prometheus(prometheus_url) as prometheus:
        for obj in objects:
            if stopping() and is_new(obj):
                continue
            name = obj["metadata"]["name"]
            key = f"{DEPLOYMENTS}/{obj['metadata']['namespace']}/{name}"
            try:
                outcome = await reconcile_deployment(
                    obj, lookup=lookup, serving=backend, prometheus=prometheus, base_dir=base_dir
                )
            except Exception as exc:  # a serving failure: said, and tried again next pass
                message = f"{type(exc).__name__}: {exc}"
                if progress.errors.get(key) != message:
                    print(
                        f"modeldeployment/{name}: reconcile failed, retrying: {message}", file=out, flush=True
                    )
                progress.errors[key] = message
                continue
            progress.errors.pop(key, None)
            ready = ready_condition(outcome.status)
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


def _stalled(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The Stalled condition of a ModelDeployment when it is True, else None."""
    stalled = find_condition(list((obj.get("status") or {}).get("conditions") or []), "Stalled") or {}
    return stalled if stalled.get("status") == "True" else None


def stalled_deployments(store: LocalStore) -> list[dict[str, Any]]:
    return [obj for obj in store.list_objects(DEPLOYMENTS) if _stalled(obj) is not None]


def deployments_left_to_serve(store: LocalStore) -> list[dict[str, Any]]:
    """The stored ModelDeployments `up` still has a reason to run for: not stalled (on their way or
    served), or stalled with some version still answering (a rolled-back canary's stable versions)."""
    return [
        obj
        for obj in store.list_objects(DEPLOYMENTS)
        if _stalled(obj) is None
        or any(version.get("ready") for version in (obj.get("status") or {}).get("versions") or [])
    ]


def nothing_can_progress_message(store: LocalStore) -> str:
    """What `up` says when it exits because every job ended and every ModelDeployment is stalled with
    nothing to serve: which ones, and why."""
    lines = ["nothing left that can make progress: every job ended and no ModelDeployment can be served"]
    for obj in failed_jobs(store):
        condition = succeeded_condition(obj.get("status") or {})
        lines.append(
            f"  {obj['kind'].lower()}/{obj['metadata']['name']} failed "
            f"({condition.get('reason')}: {condition.get('message')})"
        )
    for obj in stalled_deployments(store):
        stalled = _stalled(obj) or {}
        lines.append(
            f"  modeldeployment/{obj['metadata']['name']} is stalled "
            f"({stalled.get('reason')}: {stalled.get('message')})"
        )
    lines.append("fix what is named above, then run `kubetune up -f` with the fixed files")
    return "\n".join(lines)


def prometheus_url_from_env(env: dict[str, str] | None = None) -> str | None:
    """The Prometheus that judges canaries (KUBETUNE_PROMETHEUS_URL), None when unset."""
    url = (os.environ if env is None else env).get(PROMETHEUS_URL_ENV, "").strip()
    if not url:
        return None
    try:
        return checked_base_url(url)
    except ValueError as exc:
        raise ValueError(f"{PROMETHEUS_URL_ENV}: {exc}") from exc


# -- the loop ----------------------------------------------------------------------------------------


def run_until_stopped(
    store: LocalStore,
    backends: Backends,
    serving: LocalServing,
    *,
    prometheus_url: str | None,
    base_dir: Path,
    out: TextIO,
    stop: StopSignals,
    poll_s: float = 1.0,
) -> int:
    """Reconcile jobs and ModelDeployments every ``poll_s`` until the jobs are done and nothing is to
    be served, or until a signal; returns the exit code."""
    progress = Progress()
    while True:

        def stopping() -> bool:
            return stop.received is not None

        jobs_pending = reconcile_jobs(store, backends, base_dir, out, progress, stopping)
        # An event loop per pass, in the main thread (see ServingOnTheLoop).
        passed = reconcile_deployments(store, serving, prometheus_url, base_dir, out, progress, stopping)
        deployments = asyncio.run(passed)
        if stop.received is not None:
            break
        if not jobs_pending and deployments == 0 and not serving.deployments():
            return 1 if failed_jobs(store) else 0
        if not jobs_pending and deployments > 0 and not deployments_left_to_serve(store):
            print(nothing_can_progress_message(store), file=out, flush=True)
            return 1
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
        prometheus_url = prometheus_url_from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lock = UpLock(settings.home)
    holder = lock.acquire()
    try:
        applied = apply_paths(paths, store, out) if paths else []
        if applied is None:
            return 2
        if holder is not None:
            if paths:
                handed = hand_off(applied, lock, store, holder, out, poll_s)
                if handed == "taken":
                    print(
                        f"kubetune up (pid {holder}) is running with {settings.home}: it applies the change",
                        file=out,
                    )
                    return 0
                if handed == "not taken":
                    print(
                        f"error: kubetune up (pid {holder}) is running with {settings.home} but did not take "
                        f"the change up within {HAND_OFF_LIMIT_S:g}s (its output says why); the change is "
                        "stored",
                        file=sys.stderr,
                    )
                    return 1
                print(
                    f"the kubetune up that held {settings.home} stopped before it took the change: "
                    "this one runs it",
                    file=out,
                    flush=True,
                )
                return _run(store, settings, prometheus_url, out, poll_s)
            print(
                f"error: kubetune up (pid {holder}) is already running with {settings.home}", file=sys.stderr
            )
            return 1
        return _run(store, settings, prometheus_url, out, poll_s)
    finally:
        lock.release()


def taken_up(store: LocalStore, applied: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether a reconcile pass has seen the current generation of every object applied."""
    for plural, obj in applied:
        meta = obj["metadata"]
        current = store.get(plural, meta["name"], meta["namespace"])
        if current is None:
            continue  # deleted meanwhile: nothing left to hand over
        seen = (current.get("status") or {}).get("observedGeneration")
        if seen != current["metadata"].get("generation"):
            return False
    return True


HandOff = Literal["taken", "ours", "not taken"]


def hand_off(
    applied: list[tuple[str, dict[str, Any]]],
    lock: UpLock,
    store: LocalStore,
    holder: int,
    out: TextIO,
    poll_s: float,
    limit_s: float = HAND_OFF_LIMIT_S,
) -> HandOff:
    """Leave what was applied to the running `up` (pid ``holder``), and say so, only once a pass of it
    has seen it ("taken"). A running `up` that is stopping takes up nothing new, so when its lock
    comes free first this process holds the lock ("ours") and must run the change itself. "not taken":
    the running `up` did not take it up within ``limit_s`` (its output says why; the change is stored)."""
    started = time.monotonic()
    said_waiting = False
    try:
        while not taken_up(store, applied):
            if (holder_now := lock.acquire()) is None:
                return "ours"
            holder = holder_now or holder
            waited = time.monotonic() - started
            if waited > limit_s:
                return "not taken"
            if not said_waiting and waited > HAND_OFF_PATIENCE_S:
                print(f"waiting for kubetune up (pid {holder}) to take the change up", file=out, flush=True)
                said_waiting = True
            time.sleep(min(poll_s, 0.2))
    except KeyboardInterrupt:
        print("\nthe change is stored: the next `kubetune up` runs it", file=out, flush=True)
        raise
    return "taken"


def _run(
    store: LocalStore, settings: OperatorConfig, prometheus_url: str | None, out: TextIO, poll_s: float
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
            return run_until_stopped(
                store,
                backends,
                serving,
                prometheus_url=prometheus_url,
                base_dir=Path.cwd(),
                out=out,
                stop=stop,
                poll_s=poll_s,
            )
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
