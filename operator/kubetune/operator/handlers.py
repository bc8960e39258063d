"""Kopf handlers: thin. Read the object, let the controller observe/plan/act, write status, post events."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api.common import GROUP, VERSION
from kubetune.config import OperatorConfig
from kubetune.controller import Backends, cancel_finetune, reconcile_finetune
from kubetune.plan.finetune import is_finished

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


def _unfinished(body: kopf.Body, **_: Any) -> bool:
    return not is_finished(dict(body.get("status") or {}), body.get("metadata", {}).get("generation"))


def _backends(memo: kopf.Memo) -> Backends:
    backends = memo["backends"]
    assert isinstance(backends, Backends)
    return backends


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=_INTERVAL_S, initial_delay=0, when=_unfinished)
def reconcile_finetunejob(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    decision = reconcile_finetune(dict(body), _backends(memo))
    current = dict(body.get("status") or {})
    changed = {key: value for key, value in decision.status.items() if current.get(key) != value}
    for key, value in changed.items():
        patch.status[key] = value
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1000])


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
def cancel_finetunejob(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    run_id = cancel_finetune(dict(body), _backends(memo))
    if run_id is not None:
        logger.info("cancelled pipeline run %s", run_id)
