"""Kopf handlers: thin. Read the object, let the controller observe/plan/act, write status, post events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from kubetune.config import OperatorConfig
from kubetune.handlers.metrics import METRICS, MetricsServer, serve
from kubetune.plan.lifecycle import Decision, is_finished
from kubetune.plan.quantize import FineTuneJobLookup
from kubetune.reconcile.jobs import Backends, cancel_job, reconcile_finetune, reconcile_quantize
from kubetune_contract.common import GROUP, VERSION

FINALIZER = "kubetune.dev/finalizer"
_INTERVAL_S = OperatorConfig.from_env().reconcile_interval_s


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    if "backends" not in memo:
        memo["backends"] = Backends(OperatorConfig.from_env())
    if "written_statuses" not in memo:  # one for all jobs: each object's memo is a shallow copy of this
        memo["written_statuses"] = WrittenStatuses()
    if "pass_schedule" not in memo:
        memo["pass_schedule"] = PassSchedule(_INTERVAL_S)
    # `kubetune operator` (main.py) puts the port in the memo; without one, no endpoint is served.
    port = int(memo.get("metrics_port") or 0)
    if port and memo.get("metrics_server") is None:
        memo["metrics_server"] = serve(port, str(memo.get("metrics_address") or "0.0.0.0"))


@kopf.on.cleanup()
def stop_metrics_server(memo: kopf.Memo, **_: Any) -> None:
    server = memo.get("metrics_server")
    if isinstance(server, MetricsServer):
        server.stop()
        memo["metrics_server"] = None


def _unfinished(body: Mapping[str, Any], **_: Any) -> bool:
    return not is_finished(dict(body.get("status") or {}), body.get("metadata", {}).get("generation"))


def _backends(memo: kopf.Memo) -> Backends:
    backends = memo["backends"]
    assert isinstance(backends, Backends)
    return backends


# Indexes and event handlers are async although nothing in them waits: Kopf runs a plain function in a
# worker thread, a hop per watch event that costs more than the function itself with hundreds of jobs.
@kopf.index(GROUP, VERSION, "finetunejobs")
async def finetunejobs_by_name(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """FineTuneJobs by (namespace, name), for QuantizeJobs that take their output."""
    return {(namespace, name): {"spec": dict(spec), "status": dict(status)}}


def _lookup(index: kopf.Index[tuple[str | None, str], dict[str, Any]]) -> FineTuneJobLookup:
    def lookup(namespace: str, name: str) -> dict[str, Any] | None:
        for value in index.get((namespace, name), []):
            return value
        return None

    return lookup


class WrittenStatuses:
    """The status this operator last wrote for each job (by uid), laid over the body a timer is given.

    Kopf gives a timer the body of the latest watch event, and our own status patch comes back through
    the watch only later: on a loaded API server, after the next pass has begun. Planned from that stale
    body, a pass would restart what is set once (startTime, completionTime, condition times) or finish
    a finished job a second time (a second Succeeded event). Only this operator writes a job's status,
    so what it wrote is never older than what the watch shows; a restarted operator starts empty and
    lists fresh bodies.
    """

    def __init__(self) -> None:
        self._by_uid: dict[str, dict[str, Any]] = {}

    def fresh(self, body: kopf.Body) -> dict[str, Any]:
        """The body with the status as last written (a plain dict the planner may read)."""
        fresh = dict(body)
        written = self._by_uid.get(str(body.metadata.uid))
        if written:
            status = {**dict(body.get("status") or {}), **written}
            fresh["status"] = {key: value for key, value in status.items() if value is not None}
        return fresh

    def write(self, decision: Decision, fresh: dict[str, Any], body: kopf.Body, patch: kopf.Patch) -> bool:
        """Patch what the stored status lacks, and post the decision's events; whether the decision
        changed anything against the freshest status known.

        The patch is computed against the body as stored, not as last written: a patch that failed
        is sent again on the next pass instead of being taken as written forever. While the watch
        lags, that repeats values the API server already holds, which is harmless.
        """
        known = dict(fresh.get("status") or {})
        stored = dict(body.get("status") or {})
        changed = {key: value for key, value in decision.status.items() if known.get(key) != value}
        unstored = {key: value for key, value in decision.status.items() if stored.get(key) != value}
        for key, value in unstored.items():
            patch.status[key] = value
        if unstored:
            self._by_uid.setdefault(str(body.metadata.uid), {}).update(unstored)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])
        return bool(changed or decision.events)

    def forget(self, uid: str | None) -> None:
        self._by_uid.pop(str(uid), None)


def _written_statuses(memo: kopf.Memo) -> WrittenStatuses:
    written = memo["written_statuses"]
    assert isinstance(written, WrittenStatuses)
    return written


class PassSchedule:
    """When each unfinished job is next reconciled: every ``interval_s`` while passes change something,
    backing off (doubling, up to ``max_factor`` times the interval) while they change nothing.

    A run that waits in a queue, or a QuantizeJob that waits for its source, is then looked at a few
    times a minute instead of every interval: with hundreds of jobs, passes that only confirm nothing
    changed would otherwise take the operator's CPU and the backend's API from the passes that do work.
    A new generation is due at once. A training run changes its progress on every pass, so it is
    followed at the full rate.
    """

    def __init__(self, interval_s: float, max_factor: int = 8) -> None:
        self.interval_s = interval_s
        self.max_delay_s = interval_s * max_factor
        self._next: dict[str, tuple[int | None, float, float]] = {}  # uid -> generation, due at, delay

    def due(self, uid: str, generation: int | None, now: float) -> bool:
        planned = self._next.get(uid)
        return planned is None or planned[0] != generation or now >= planned[1]

    def record(self, uid: str, generation: int | None, changed: bool, now: float) -> None:
        previous = self._next.get(uid)
        delay = self.interval_s
        if not changed and previous is not None and previous[0] == generation:
            delay = min(previous[2] * 2, self.max_delay_s)
        # Kopf's timer ticks every interval: come back on the tick just before the delay is over.
        self._next[uid] = (generation, now + delay - self.interval_s / 2, delay)

    def forget(self, uid: str | None) -> None:
        self._next.pop(str(uid), None)


def _schedule(memo: kopf.Memo) -> PassSchedule:
    schedule = memo["pass_schedule"]
    assert isinstance(schedule, PassSchedule)
    return schedule


async def _reconcile(
    kind: str,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    reconcile: Callable[[dict[str, Any]], Decision],
) -> None:
    """One timer tick: skipped until the job is due (cheaply, in the event loop); otherwise one pass
    in a worker thread (it reads files and calls backends), its status patched and events posted."""
    uid, generation = str(body.metadata.uid), body.metadata.get("generation")
    schedule, written = _schedule(memo), _written_statuses(memo)
    if not schedule.due(uid, generation, time.monotonic()):
        return
    fresh = written.fresh(body)
    if not _unfinished(fresh):
        return

    def one_pass() -> Decision:
        with METRICS.reconcile(kind):
            return reconcile(fresh)

    decision = await asyncio.get_running_loop().run_in_executor(None, one_pass)
    changed = written.write(decision, fresh, body, patch)
    schedule.record(uid, generation, changed or decision.action != "none", time.monotonic())


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
async def reconcile_finetunejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
    # A distillation job may take its teacher from another FineTuneJob (the index, as for QuantizeJobs).
    lookup = _lookup(kwargs["finetunejobs_by_name"])
    backends = _backends(memo)
    await _reconcile(
        "FineTuneJob", body, patch, memo, lambda fresh: reconcile_finetune(fresh, backends, lookup=lookup)
    )


@kopf.timer(GROUP, VERSION, "quantizejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
async def reconcile_quantizejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
    # Kopf passes indexes as keyword arguments named after the index function.
    lookup = _lookup(kwargs["finetunejobs_by_name"])
    backends = _backends(memo)
    await _reconcile(
        "QuantizeJob", body, patch, memo, lambda fresh: reconcile_quantize(fresh, backends, lookup)
    )


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
@kopf.on.delete(GROUP, VERSION, "quantizejobs")
def cancel_pipeline_run(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    with METRICS.reconcile(str(body.get("kind"))):
        run_id = cancel_job(dict(body), _backends(memo), lookup=_lookup(kwargs["finetunejobs_by_name"]))
    if run_id is not None:
        logger.info("cancelled pipeline run %s", run_id)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
@kopf.on.event(GROUP, VERSION, "quantizejobs")
async def count_jobs_by_state(
    type: str | None, body: kopf.Body, resource: kopf.Resource, memo: kopf.Memo, **_: Any
) -> None:
    """Keep the jobs-by-state gauge current from every watch event, finished jobs and deletions included."""
    kind = str(body.get("kind") or resource.kind)
    namespace, name = body.metadata.namespace, str(body.metadata.name)
    if type == "DELETED":
        METRICS.forget_job(kind, namespace, name)
        _written_statuses(memo).forget(body.metadata.uid)
        _schedule(memo).forget(body.metadata.uid)
    else:
        METRICS.observe_job(kind, namespace, name, (body.get("status") or {}).get("phase"))
