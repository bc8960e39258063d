"""Kopf handlers: thin. Read the object, let the controller observe/plan/act, write status, post events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
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


@kopf.index(GROUP, VERSION, "finetunejobs")
def finetunejobs_by_name(
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

    def write(self, decision: Decision, fresh: dict[str, Any], body: kopf.Body, patch: kopf.Patch) -> None:
        """Patch what changed against the freshest status known, and post the decision's events."""
        current = dict(fresh.get("status") or {})
        changed = {key: value for key, value in decision.status.items() if current.get(key) != value}
        for key, value in changed.items():
            patch.status[key] = value
        if changed:
            self._by_uid.setdefault(str(body.metadata.uid), {}).update(changed)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])

    def forget(self, uid: str | None) -> None:
        self._by_uid.pop(str(uid), None)


def _written_statuses(memo: kopf.Memo) -> WrittenStatuses:
    written = memo["written_statuses"]
    assert isinstance(written, WrittenStatuses)
    return written


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
def reconcile_finetunejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    written = _written_statuses(memo)
    fresh = written.fresh(body)
    if _unfinished(fresh):
        with METRICS.reconcile("FineTuneJob"):
            written.write(reconcile_finetune(fresh, _backends(memo)), fresh, body, patch)


@kopf.timer(GROUP, VERSION, "quantizejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
def reconcile_quantizejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
    # Kopf passes indexes as keyword arguments named after the index function.
    lookup = _lookup(kwargs["finetunejobs_by_name"])
    written = _written_statuses(memo)
    fresh = written.fresh(body)
    if _unfinished(fresh):
        with METRICS.reconcile("QuantizeJob"):
            written.write(reconcile_quantize(fresh, _backends(memo), lookup), fresh, body, patch)


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
@kopf.on.delete(GROUP, VERSION, "quantizejobs")
def cancel_pipeline_run(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    with METRICS.reconcile(str(body.get("kind"))):
        run_id = cancel_job(dict(body), _backends(memo), lookup=_lookup(kwargs["finetunejobs_by_name"]))
    if run_id is not None:
        logger.info("cancelled pipeline run %s", run_id)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
@kopf.on.event(GROUP, VERSION, "quantizejobs")
def count_jobs_by_state(
    type: str | None, body: kopf.Body, resource: kopf.Resource, memo: kopf.Memo, **_: Any
) -> None:
    """Keep the jobs-by-state gauge current from every watch event, finished jobs and deletions included."""
    kind = str(body.get("kind") or resource.kind)
    namespace, name = body.metadata.namespace, str(body.metadata.name)
    if type == "DELETED":
        METRICS.forget_job(kind, namespace, name)
        _written_statuses(memo).forget(body.metadata.uid)
    else:
        METRICS.observe_job(kind, namespace, name, (body.get("status") or {}).get("phase"))
