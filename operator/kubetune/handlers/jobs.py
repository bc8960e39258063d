"""Kopf handlers: thin. Read the object, let the controller observe/plan/act, write status, post events."""

from __future__ import annotations

import logging
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


def _unfinished(body: kopf.Body, **_: Any) -> bool:
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


def _write(decision: Decision, body: kopf.Body, patch: kopf.Patch) -> None:
    current = dict(body.get("status") or {})
    for key, value in decision.status.items():
        if current.get(key) != value:
            patch.status[key] = value
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
def reconcile_finetunejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    with METRICS.reconcile("FineTuneJob"):
        _write(reconcile_finetune(dict(body), _backends(memo)), body, patch)


@kopf.timer(GROUP, VERSION, "quantizejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
def reconcile_quantizejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
    # Kopf passes indexes as keyword arguments named after the index function.
    lookup = _lookup(kwargs["finetunejobs_by_name"])
    with METRICS.reconcile("QuantizeJob"):
        _write(reconcile_quantize(dict(body), _backends(memo), lookup), body, patch)


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
@kopf.on.delete(GROUP, VERSION, "quantizejobs")
def cancel_pipeline_run(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any) -> None:
    with METRICS.reconcile(str(body.get("kind"))):
        run_id = cancel_job(dict(body), _backends(memo), lookup=_lookup(kwargs["finetunejobs_by_name"]))
    if run_id is not None:
        logger.info("cancelled pipeline run %s", run_id)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
@kopf.on.event(GROUP, VERSION, "quantizejobs")
def count_jobs_by_state(type: str | None, body: kopf.Body, resource: kopf.Resource, **_: Any) -> None:
    """Keep the jobs-by-state gauge current from every watch event, finished jobs and deletions included."""
    kind = str(body.get("kind") or resource.kind)
    namespace, name = body.metadata.namespace, str(body.metadata.name)
    if type == "DELETED":
        METRICS.forget_job(kind, namespace, name)
    else:
        METRICS.observe_job(kind, namespace, name, (body.get("status") or {}).get("phase"))
